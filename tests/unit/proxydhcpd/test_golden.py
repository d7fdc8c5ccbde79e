"""Golden replies: DHCP packets captured from real firmware, answered by our pure code path.

tests/data/pcap/<name>.pcap holds client packets that qemu's firmware really sent (SeaBIOS's iPXE
ROM, OVMF's own PXE client, iPXE after chainloading on UEFI, the same relayed), captured by
tests/e2e/capture_golden.py. Each is run through proxydhcpd.packet.parse, decide.decide (the
daemon's default policy, and the variants named in the expected file, served from 192.168.77.2)
and reply.ReplyBuilder().build; the reply must equal tests/data/pcap/<name>.reply.hex byte for
byte, so any change to what the daemon answers real firmware fails here and has to be reviewed
(regenerate with `python3 tests/e2e/capture_golden.py replies` and read the diff).

No root and no network: this is a unit test. scapy reads the captures and, independently of the
stored bytes, checks that every reply is a sane ProxyDHCP answer (op 2, yiaddr 0, siaddr, file,
options 53/54/60/97/43).
"""

from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from common.daemon.config import defaults
from common.daemon.runner import CommonSettings
from proxydhcpd import decide, packet, reply
from proxydhcpd.config import SCHEMA, make_settings

PCAP_DIR = Path(__file__).resolve().parents[2] / "data" / "pcap"
SERVER = "192.168.77.2"
NEXT_SERVER = SERVER            # NextServer = 0.0.0.0 (default): this server


def default_policy() -> decide.Policy:
    """The policy of a daemon started with an empty config file."""
    values = defaults(SCHEMA)
    return make_settings(values, CommonSettings.from_values(values)).policy


def policies() -> dict[str, decide.Policy]:
    """Policies the expected files may name (each line says which one it was computed with)."""
    base = default_policy()
    return {
        "default": base,
        "uefi-via-4011-no": replace(base, uefi_via_4011=False),
    }


@dataclass(frozen=True)
class ClientPacket:
    frame: int          # 1-based position in the pcap
    port: int           # UDP destination port: 67 or 4011
    source: str         # IP source address
    payload: bytes      # the BOOTP/DHCP message


@functools.lru_cache(maxsize=None)
def read_client_packets(path: Path) -> list[ClientPacket]:
    """BOOTREQUESTs to port 67 or 4011 in a pcap (scapy decodes BOOTP only on 67/68, so the UDP
    payload is taken as is)."""
    from scapy.all import IP, UDP, rdpcap

    found = []
    for index, pkt in enumerate(rdpcap(str(path)), start=1):
        if IP not in pkt or UDP not in pkt or pkt[UDP].dport not in (67, 4011):
            continue
        payload = bytes(pkt[UDP].payload)
        if payload[:1] == bytes((packet.BOOTREQUEST,)):
            found.append(ClientPacket(index, pkt[UDP].dport, pkt[IP].src, payload))
    return found


def answer(client: ClientPacket, policy: decide.Policy) -> tuple[str, str, bytes | None]:
    """(client message name, outcome, reply bytes): outcome is 'reply' or 'ignore <counter>'."""
    request = packet.parse(client.payload)
    name = packet.MESSAGE_NAMES.get(request.message_type or 0, "BOOTP")
    plan = decide.decide(request, client.port, policy, SERVER)
    if isinstance(plan, decide.Ignore):
        return name, f"ignore {plan.counter}", None
    return name, "reply", reply.ReplyBuilder().build(plan, request, SERVER, NEXT_SERVER)


def expected_line(client: ClientPacket, policy_name: str) -> str:
    """One line of a .reply.hex file (what capture_golden.py writes)."""
    name, outcome, data = answer(client, policies()[policy_name])
    tail = f"reply {data.hex()}" if data is not None else outcome
    return f"{client.frame} {client.port} {name} {policy_name} {tail}"


@dataclass(frozen=True)
class Expected:
    pcap: str
    frame: int
    port: int
    message: str
    policy: str
    outcome: str             # "reply" or "ignore <counter>"
    data: bytes | None

    @property
    def id(self) -> str:
        return f"{self.pcap}#{self.frame}:{self.port}:{self.message}:{self.policy}"


_LINE = re.compile(r"^(\d+) (\d+) (\w+) ([\w-]+) (reply ([0-9a-f]+)|ignore \w+)$")


def load_expected() -> list[Expected]:
    cases = []
    for path in sorted(PCAP_DIR.glob("*.reply.hex")):
        pcap = path.name[:-len(".reply.hex")]
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            match = _LINE.match(line.strip())
            if not match:
                raise ValueError(f"{path}:{number}: not an expected-reply line")
            data = bytes.fromhex(match[6]) if match[6] else None
            outcome = "reply" if data is not None else match[5]
            cases.append(Expected(pcap, int(match[1]), int(match[2]), match[3], match[4],
                                  outcome, data))
    return cases


EXPECTED = load_expected()


def _client(case: Expected) -> ClientPacket:
    for client in read_client_packets(PCAP_DIR / f"{case.pcap}.pcap"):
        if client.frame == case.frame:
            assert client.port == case.port
            return client
    raise AssertionError(f"{case.pcap}.pcap has no client packet in frame {case.frame}")


def test_every_capture_has_expected_replies() -> None:
    pcaps = {p.name[:-len(".pcap")] for p in PCAP_DIR.glob("*.pcap")}
    assert pcaps, f"no captures in {PCAP_DIR}"
    covered = {(c.pcap, c.frame) for c in EXPECTED}
    for name in sorted(pcaps):
        clients = read_client_packets(PCAP_DIR / f"{name}.pcap")
        assert clients, f"{name}.pcap holds no client packets"
        for client in clients:
            assert (name, client.frame) in covered, (
                f"{name}.pcap frame {client.frame} has no line in {name}.reply.hex "
                f"(rerun tests/e2e/capture_golden.py replies)")


@pytest.mark.parametrize("case", EXPECTED, ids=[c.id for c in EXPECTED])
def test_reply_matches_golden(case: Expected) -> None:
    client = _client(case)
    message, outcome, data = answer(client, policies()[case.policy])
    assert message == case.message
    assert outcome == case.outcome, f"{case.id}: now {outcome}, golden {case.outcome}"
    if data is None:
        return
    if data != case.data:
        first = next((i for i, (a, b) in enumerate(zip(data, case.data)) if a != b),
                     min(len(data), len(case.data)))
        pytest.fail(f"{case.id}: reply differs from the golden bytes at offset {first} "
                    f"(now {len(data)} bytes, golden {len(case.data)});\n"
                    f"now    {data.hex()}\ngolden {case.data.hex()}\n"
                    "review, then regenerate: python3 tests/e2e/capture_golden.py replies")


def _options(dhcp_layer) -> dict[str, object]:
    found: dict[str, object] = {}
    for opt in dhcp_layer.options:
        if isinstance(opt, tuple) and len(opt) >= 2:
            found[opt[0]] = opt[1] if len(opt) == 2 else opt[1:]
    return found


@pytest.mark.parametrize("case", [c for c in EXPECTED if c.data is not None],
                         ids=[c.id for c in EXPECTED if c.data is not None])
def test_golden_reply_is_a_sane_proxydhcp_answer(case: Expected) -> None:
    """What scapy reads in the stored reply makes sense for the request it answers."""
    from scapy.layers.dhcp import BOOTP, DHCP

    request = packet.parse(_client(case).payload)
    bootp = BOOTP(case.data)
    opts = _options(bootp[DHCP])
    assert bootp.op == 2
    assert bootp.xid == request.xid
    assert bytes(bootp.chaddr)[:6] == request.mac
    assert bootp.yiaddr == "0.0.0.0", "a proxyDHCP never hands out an address"
    assert bootp.ciaddr == request.ciaddr and bootp.giaddr == request.giaddr
    assert bootp.siaddr == NEXT_SERVER
    file = bytes(bootp.file).rstrip(b"\0").decode()
    assert file in ("undionly.kpxe", "ipxe.efi", "boot.ipxe")
    if b"iPXE" in request.user_classes:
        assert file == "boot.ipxe", "iPXE must get the script, never iPXE again"
    elif request.architectures[:1] == (7,):
        assert file == "ipxe.efi"
    want_type = 2 if case.port == 67 else 5
    assert opts["message-type"] == want_type
    assert opts["server_id"] == SERVER
    assert opts["vendor_class_id"] == b"PXEClient"
    parsed = packet.parse(case.data)          # our own codec reads it back too
    assert parsed.op == packet.BOOTREPLY
    assert parsed.options.get(packet.OPT_CLIENT_GUID) == request.client_guid, (
        "option 97 must be echoed when the client sent it (PXE 2.1), and only then")
    if 43 in parsed.options:
        sub = parsed.pxe_suboptions()
        assert packet.PXE_DISCOVERY_CONTROL in sub or packet.PXE_BOOT_ITEM in sub
    assert len(case.data) >= reply.MIN_REPLY_LEN
    assert socket.inet_aton(SERVER) in case.data


def test_relayed_reply_asks_the_relay_to_broadcast() -> None:
    """A relayed ProxyDHCPOFFER has yiaddr 0, so the relay agent cannot unicast it to the client
    (RFC 1542 section 4.1.2: the relay goes by the broadcast flag; dnsmasq's relay sends a
    flag-clear reply to yiaddr); the reply must set the broadcast flag, as dnsmasq's own proxy
    mode does for every DISCOVER. Checked on the captured relayed DISCOVER from iPXE (flags 0).
    (Found by the relay e2e case: proxydhcpd used to copy the client's flag.)"""
    relayed = [c for c in EXPECTED if c.pcap.endswith("-relayed") and c.message == "DISCOVER"
               and c.policy == "default"]
    assert relayed, "no relayed capture stored"
    for case in relayed:
        client = _client(case)
        assert packet.parse(client.payload).giaddr != "0.0.0.0"
        _, _, data = answer(client, policies()["default"])
        assert data is not None
        assert int.from_bytes(data[10:12], "big") & 0x8000, "broadcast flag clear"
