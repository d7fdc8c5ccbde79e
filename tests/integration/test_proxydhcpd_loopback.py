"""proxydhcpd end to end on loopback: the real daemon, scapy-built requests, real replies.

Ports are free high ports (DHCPPort, BootServerPort, ClientPort), so no root is needed and runs
never collide. Replies the daemon broadcasts to 255.255.255.255:ClientPort on `lo` reach a socket
bound to 0.0.0.0:ClientPort; IP_PKTINFO on that socket tells broadcast from unicast.

"No reply" is checked without timing: the daemon reads one socket in order, so after an ignored
request we send a sentinel that is answered, and the next reply must be the sentinel's.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from proxydhcpd import packet
from support import DaemonProcess, write_config

IP_PKTINFO = 8
RECV_TIMEOUT_S = 10.0           # a bound for failing, never an assertion on speed
MAC = bytes.fromhex("00c04fdc2ab5")
DENIED = bytes.fromhex("020000000099")
GUID = b"\x00" + bytes(range(0x10, 0x20))
BOOT_ITEM = (43, b"\x47\x04\x80\x00\x00\x00\xff")


def free_udp_ports(count: int) -> list[int]:
    """Distinct ports free on 0.0.0.0 right now (the daemon binds them moments later)."""
    held, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port > 1024 and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class ProxyDaemon(DaemonProcess):
    dhcp_port: int
    boot_server_port: int
    client_port: int


def _start(tmp: Path, n: int, overrides: dict[str, Any]) -> ProxyDaemon:
    last_error: Exception | None = None
    for attempt in range(3):                       # a port taken between probe and bind: retry
        dhcp, boot, client = free_udp_ports(3)
        values: dict[str, Any] = {
            "IPAddress": "127.0.0.1", "DHCPPort": dhcp, "BootServerPort": boot,
            "ClientPort": client, "StatusPort": 0,
            "StatusSocket": str(tmp / f"proxydhcpd{n}-{attempt}.sock"),
            "PidFile": str(tmp / f"proxydhcpd{n}-{attempt}.pid"),
            "LogLevel": "DEBUG", "LogFile": str(tmp / f"proxydhcpd{n}-{attempt}.log"),
            "IPXEScriptURL": "http://{server}:8080/boot.ipxe",
            "BootFileHTTP": "http://{server}/efi/ipxe.efi",
        }
        values.update(overrides)
        config = write_config(tmp / f"proxydhcpd{n}-{attempt}.conf", values)
        daemon = ProxyDaemon("proxydhcpd", config, values["StatusSocket"],
                             Path(values["LogFile"]))
        daemon.dhcp_port, daemon.boot_server_port, daemon.client_port = dhcp, boot, client
        try:
            return daemon.start()
        except RuntimeError as exc:
            last_error = exc
            if "cannot bind" not in str(exc):
                raise
    raise RuntimeError(f"could not start proxydhcpd: {last_error}")


@pytest.fixture
def proxydhcpd_factory(tmp_path: Path):
    """Start proxydhcpd with overrides of a loopback, free-port config; stopped at teardown."""
    started: list[ProxyDaemon] = []

    def start(**overrides: Any) -> ProxyDaemon:
        daemon = _start(tmp_path, len(started), overrides)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> ProxyDaemon:
    """One daemon for the behaviour tests (counter tests start their own)."""
    daemon = _start(tmp_path_factory.mktemp("proxydhcpd"), 0, {})
    yield daemon
    assert daemon.stop() == 0, daemon.log()


# ---- clients --------------------------------------------------------------------------------


def build(msg: str | None = "discover", *, arch: int | None = 0, vendor: bytes | None = None,
          xid: int, flags: int = 0x8000, ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0",
          mac: bytes = MAC, extra=(), guid: bytes | None = GUID) -> bytes:
    options: list[Any] = []
    if msg is not None:
        options.append(("message-type", msg))
    if vendor is None and arch is not None:
        kind = b"HTTPClient" if arch in (15, 16, 18, 19) else b"PXEClient"
        vendor = kind + b":Arch:%05d:UNDI:003016" % arch
    if vendor is not None:
        options.append((60, vendor))
    if arch is not None:
        options.append((93, arch.to_bytes(2, "big")))
    if guid is not None:
        options.append((97, guid))
    options += list(extra) + ["end"]
    return bytes(BOOTP(op=1, htype=1, hlen=6, hops=1 if giaddr != "0.0.0.0" else 0, xid=xid,
                       flags=flags, ciaddr=ciaddr, giaddr=giaddr, chaddr=mac + bytes(10))
                 / DHCP(options=options))


class Reply:
    def __init__(self, data: bytes, source: tuple[str, int], destination: str | None):
        self.data = data
        self.source = source
        self.destination = destination          # IP header destination (IP_PKTINFO)
        self.packet = packet.parse(data)
        self.layer = BOOTP(data)

    @property
    def options(self) -> dict[int, bytes]:
        return self.packet.options


class Client:
    """A PXE client's view: sends from 127.0.0.1, hears broadcasts on ClientPort."""

    def __init__(self, daemon: ProxyDaemon):
        self.daemon = daemon
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.listener.bind(("0.0.0.0", daemon.client_port))
        self.listener.settimeout(RECV_TIMEOUT_S)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind(("127.0.0.1", 0))
        self.sender.settimeout(RECV_TIMEOUT_S)
        self._xid = int(time.monotonic_ns()) & 0x0FFFFFFF

    def close(self) -> None:
        self.listener.close()
        self.sender.close()

    def xid(self) -> int:
        self._xid += 1
        return self._xid

    def to_67(self, raw: bytes, address: str = "127.0.0.1") -> None:
        self.sender.sendto(raw, (address, self.daemon.dhcp_port))

    def to_4011(self, raw: bytes) -> None:
        self.sender.sendto(raw, ("127.0.0.1", self.daemon.boot_server_port))

    def heard(self) -> Reply:
        """The next reply on ClientPort (broadcast or unicast)."""
        data, ancillary, _flags, source = self.listener.recvmsg(65535, socket.CMSG_SPACE(12))
        destination = None
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                destination = socket.inet_ntoa(value[8:12])
        return Reply(data, source, destination)

    def answer(self) -> Reply:
        """The next reply to the sender socket (4011 unicast back to the requester)."""
        data, source = self.sender.recvfrom(65535)
        return Reply(data, source, None)

    def sentinel_67(self) -> None:
        """A request that is answered; the next reply heard must be its."""
        xid = self.xid()
        self.to_67(build(xid=xid, arch=0))
        reply = self.heard()
        assert reply.packet.xid == xid, "a reply arrived for a request that should be ignored"

    def sentinel_4011(self) -> None:
        xid = self.xid()
        self.to_4011(build("request", xid=xid, arch=0, ciaddr="127.0.0.1", flags=0,
                           extra=[BOOT_ITEM]))
        reply = self.answer()
        assert reply.packet.xid == xid, "a reply arrived for a request that should be ignored"


@pytest.fixture
def client(shared):
    c = Client(shared)
    yield c
    c.close()


def check_common(reply: Reply, xid: int, message_type: int, *, guid: bytes | None = GUID,
                 flags: int = 0x8000) -> None:
    p = reply.packet
    assert p.op == packet.BOOTREPLY and p.xid == xid
    assert p.message_type == message_type
    assert p.yiaddr == "0.0.0.0"
    assert p.siaddr == "127.0.0.1"                       # NextServer 0.0.0.0: this server
    assert p.mac == MAC and p.flags == flags
    assert p.options[packet.OPT_SERVER_ID] == socket.inet_aton("127.0.0.1")
    assert p.client_guid == guid
    assert len(reply.data) >= 300
    assert "end" in reply.layer[DHCP].options


# ---- port 67: offers ------------------------------------------------------------------------


def test_bios_discover_gets_broadcast_offer(shared, client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=0))
    reply = client.heard()
    assert reply.destination == "255.255.255.255"
    assert reply.source == ("127.0.0.1", shared.dhcp_port)
    check_common(reply, xid, packet.OFFER)
    assert reply.packet.file == b"undionly.kpxe"
    assert reply.options[packet.OPT_VENDOR_CLASS] == b"PXEClient"
    assert reply.packet.pxe_suboptions() == {packet.PXE_DISCOVERY_CONTROL: b"\x08"}


def test_uefi_x64_offer_sends_the_client_to_4011(client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=7))
    reply = client.heard()
    check_common(reply, xid, packet.OFFER)
    assert reply.packet.file == b"ipxe.efi"
    assert reply.options[packet.OPT_VENDOR_CLASS] == b"PXEClient"
    assert packet.OPT_VENDOR_SPECIFIC not in reply.options


@pytest.mark.parametrize("user_class", [b"iPXE", b"\x04iPXE"])
@pytest.mark.parametrize("arch", [0, 7])
def test_ipxe_gets_the_policy_script(client, user_class, arch):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=arch, extra=[(77, user_class)]))
    reply = client.heard()
    check_common(reply, xid, packet.OFFER)
    assert reply.packet.file == b"http://127.0.0.1:8080/boot.ipxe"


def test_http_client_gets_a_url(client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=16, vendor=b"HTTPClient:Arch:00016:UNDI:003001"))
    reply = client.heard()
    check_common(reply, xid, packet.OFFER)
    assert reply.options[packet.OPT_VENDOR_CLASS] == b"HTTPClient"
    assert reply.packet.file == b"http://127.0.0.1/efi/ipxe.efi"
    assert packet.OPT_VENDOR_SPECIFIC not in reply.options


def test_without_guid_no_option_97(client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=0, guid=None))
    reply = client.heard()
    check_common(reply, xid, packet.OFFER, guid=None)


@pytest.mark.parametrize("ignored", [
    build(xid=1, arch=None, vendor=b"MSFT 5.0"),
    build(xid=2, arch=None, vendor=None),
    build("request", xid=3, arch=0),                    # REQUEST is not for port 67
    build(xid=4, arch=10),                              # ARM32: no boot file configured
])
def test_ignored_requests_get_no_reply(client, ignored):
    client.to_67(ignored)
    client.sentinel_67()


def test_unicast_flag_without_address_is_still_broadcast(client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=0, flags=0))
    reply = client.heard()
    assert reply.destination == "255.255.255.255"    # no yiaddr to unicast to
    check_common(reply, xid, packet.OFFER, flags=0x8000)  # offers: always broadcast


def test_client_with_address_gets_unicast_to_ciaddr(client):
    xid = client.xid()
    client.to_67(build(xid=xid, arch=0, flags=0, ciaddr="127.0.0.3"))
    reply = client.heard()
    assert reply.destination == "127.0.0.3"
    check_common(reply, xid, packet.OFFER, flags=0x8000)  # offers: always broadcast
    assert reply.packet.ciaddr == "127.0.0.3"


@pytest.mark.parametrize("giaddr,listen,send_to", [
    # The daemon holds 0.0.0.0:DHCPPort with SO_REUSEADDR; a relay socket bound to one loopback
    # address (also SO_REUSEADDR) is the more specific match, so Linux hands it the reply. The
    # request goes to another loopback address so the daemon, not the relay socket, receives it.
    ("127.0.0.1", "127.0.0.1", "127.0.0.2"),
    ("127.0.0.2", "127.0.0.2", "127.0.0.1"),
])
def test_relayed_discover_is_answered_to_giaddr(shared, client, giaddr, listen, send_to):
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        relay.bind((listen, shared.dhcp_port))
    except OSError as exc:
        relay.close()
        pytest.skip(f"cannot share DHCPPort with the daemon on loopback: {exc}")
    relay.settimeout(RECV_TIMEOUT_S)
    try:
        xid = client.xid()
        client.to_67(build(xid=xid, arch=0, flags=0, giaddr=giaddr), address=send_to)
        data, source = relay.recvfrom(65535)
    finally:
        relay.close()
    reply = Reply(data, source, None)
    assert source == ("127.0.0.1", shared.dhcp_port)
    check_common(reply, xid, packet.OFFER, flags=0x8000)  # offers: always broadcast
    assert reply.packet.giaddr == giaddr
    assert reply.packet.file == b"undionly.kpxe"


# ---- port 4011: boot server ACKs ------------------------------------------------------------


def test_4011_request_gets_unicast_ack_with_boot_item(shared, client):
    xid = client.xid()
    client.to_4011(build("request", xid=xid, arch=0, flags=0, ciaddr="127.0.0.1",
                         extra=[BOOT_ITEM]))
    reply = client.answer()
    assert reply.source == ("127.0.0.1", shared.boot_server_port)
    check_common(reply, xid, packet.ACK, flags=0)
    assert reply.packet.ciaddr == "127.0.0.1"
    assert reply.packet.file == b"undionly.kpxe"
    assert reply.packet.pxe_suboptions() == {packet.PXE_BOOT_ITEM: b"\x80\x00\x00\x00"}


def test_4011_uefi_binl_request_gets_ack_without_43(shared, client):
    xid = client.xid()
    client.to_4011(build("request", xid=xid, arch=7, flags=0, ciaddr="127.0.0.1"))
    reply = client.answer()
    assert reply.source == ("127.0.0.1", shared.boot_server_port)
    check_common(reply, xid, packet.ACK, flags=0)
    assert reply.packet.file == b"ipxe.efi"
    assert packet.OPT_VENDOR_SPECIFIC not in reply.options


def test_4011_inform_is_answered(client):
    xid = client.xid()
    client.to_4011(build("inform", xid=xid, arch=9, flags=0, ciaddr="127.0.0.1"))
    reply = client.answer()
    check_common(reply, xid, packet.ACK, flags=0)
    assert reply.packet.file == b"ipxe.efi"


@pytest.mark.parametrize("ignored", [
    build("request", xid=11, arch=0, ciaddr="127.0.0.1",
          extra=[(43, b"\x47\x04\x00\x00\x00\x00\xff")]),      # local boot item
    build("discover", xid=12, arch=0, ciaddr="127.0.0.1"),     # DISCOVER is for port 67
    build("request", xid=13, arch=None, vendor=b"MSFT 5.0", ciaddr="127.0.0.1"),
])
def test_4011_ignored_requests_get_no_reply(client, ignored):
    client.to_4011(ignored)
    client.sentinel_4011()


# ---- robustness -----------------------------------------------------------------------------


def _header(op: int = 1, hlen: int = 6) -> bytes:
    return bytes((op, 1, hlen, 0)) + bytes(232)


MALFORMED = [
    b"",
    b"\x01",
    _header(),                                                 # 236 bytes: no cookie
    _header() + b"\0\0\0\0",                                   # plain BOOTP
    _header(op=3) + packet.MAGIC_COOKIE + b"\xff",
    _header(hlen=17) + packet.MAGIC_COOKIE + b"\xff",
    _header() + packet.MAGIC_COOKIE + b"\x35\x05\x01",         # option past the end
    _header() + packet.MAGIC_COOKIE + b"\x35",                 # no length byte
    _header() + packet.MAGIC_COOKIE + b"\x35\x01\x01" + bytes(5000),
    b"\xff" * 1500,
]


def test_malformed_datagrams_are_counted_and_the_daemon_still_answers(shared, client):
    before = shared.counters()
    for raw in MALFORMED:
        client.to_67(raw)
    for raw in MALFORMED[:4]:
        client.to_4011(raw)
    client.sentinel_67()
    client.sentinel_4011()
    after = shared.counters()
    assert after["malformed"] - before["malformed"] == len(MALFORMED) + 4
    assert after["requests"].get("DISCOVER", 0) - before["requests"].get("DISCOVER", 0) == 1
    assert after["offers_sent"] - before["offers_sent"] == 1
    assert after["acks_sent"] - before["acks_sent"] == 1


def test_listen_reports_both_ports(shared):
    status = shared.status()
    assert status["daemon"] == "proxydhcpd" and status["ok"] is True
    assert sorted(entry["port"] for entry in status["listen"]) == \
        sorted([shared.dhcp_port, shared.boot_server_port])


# ---- counters against a fresh daemon --------------------------------------------------------


def test_status_counters_match_the_traffic(proxydhcpd_factory):
    daemon = proxydhcpd_factory(DeniedMACs="02:00:00:00:00:99", BootFileARM64="arm64.efi")
    assert daemon.counters() == {
        "requests": {}, "architectures": {}, "offers_sent": 0, "acks_sent": 0,
        "ignored_not_pxe": 0, "ignored_other": 0, "denied_mac": 0, "no_boot_file": 0,
        "malformed": 0, "send_errors": 0}
    c = Client(daemon)
    try:
        answered_67 = [
            build(xid=c.xid(), arch=0),
            build(xid=c.xid(), arch=0, flags=0),
            build(xid=c.xid(), arch=7),
            build(xid=c.xid(), arch=9),
            build(xid=c.xid(), arch=0, extra=[(77, b"iPXE")]),
            build(xid=c.xid(), arch=16, vendor=b"HTTPClient:Arch:00016:UNDI:003001"),
        ]
        ignored_67 = [
            build(xid=c.xid(), arch=None, vendor=b"MSFT 5.0"),            # ignored_not_pxe
            build(xid=c.xid(), arch=None, vendor=b"android-dhcp-13"),     # ignored_not_pxe
            build(xid=c.xid(), arch=0, mac=DENIED),                       # denied_mac
            build(xid=c.xid(), arch=10),                                  # no_boot_file
            build("request", xid=c.xid(), arch=0),                        # ignored_other
            _header() + packet.MAGIC_COOKIE + b"\x35",                    # malformed
        ]
        for raw in ignored_67 + answered_67:
            c.to_67(raw)
        heard = [c.heard() for _ in answered_67]
        assert sorted(r.packet.xid for r in heard) == \
            sorted(packet.parse(raw).xid for raw in answered_67)

        answered_4011 = [
            build("request", xid=c.xid(), arch=0, ciaddr="127.0.0.1", extra=[BOOT_ITEM]),
            build("request", xid=c.xid(), arch=7, ciaddr="127.0.0.1"),
            build("inform", xid=c.xid(), arch=11, ciaddr="127.0.0.1",
                  vendor=b"PXEClient:Arch:00011:UNDI:003000"),
        ]
        ignored_4011 = [
            build("request", xid=c.xid(), arch=0, ciaddr="127.0.0.1", mac=DENIED),
            build("request", xid=c.xid(), arch=0, ciaddr="127.0.0.1",
                  extra=[(43, b"\x47\x04\x00\x00\x00\x00\xff")]),           # ignored_other
            b"\x00" * 100,                                                  # malformed
        ]
        for raw in ignored_4011 + answered_4011:
            c.to_4011(raw)
        for _ in answered_4011:
            c.answer()
    finally:
        c.close()

    assert daemon.counters() == {
        "requests": {"DISCOVER": 10, "REQUEST": 5, "INFORM": 1},
        # BIOS x2 (67) + BIOS (4011); x64 UEFI: arch 7, arch 9 (67) + arch 7 (4011); ARM64 (4011)
        "architectures": {"bios": 3, "efi-x64": 3, "ipxe": 1, "http-x64": 1, "efi-arm64": 1},
        "offers_sent": 6, "acks_sent": 3,
        "ignored_not_pxe": 2, "ignored_other": 2, "denied_mac": 2, "no_boot_file": 1,
        "malformed": 2, "send_errors": 0,
    }


def test_allowed_macs_only(proxydhcpd_factory):
    daemon = proxydhcpd_factory(AllowedMACs="00-C0-4F-DC-2A-B5")
    c = Client(daemon)
    try:
        c.to_67(build(xid=c.xid(), arch=0, mac=DENIED))
        c.sentinel_67()                                  # MAC 00:c0:4f:dc:2a:b5 is allowed
    finally:
        c.close()
    counters = daemon.counters()
    assert counters["denied_mac"] == 1 and counters["offers_sent"] == 1


def test_next_server_is_siaddr_for_bios(proxydhcpd_factory):
    daemon = proxydhcpd_factory(NextServer="127.0.0.9")
    c = Client(daemon)
    try:
        xid = c.xid()
        c.to_67(build(xid=xid, arch=0))
        reply = c.heard()
    finally:
        c.close()
    assert reply.packet.siaddr == "127.0.0.9"
    assert reply.options[packet.OPT_SERVER_ID] == socket.inet_aton("127.0.0.1")


def test_uefi_via_4011_offer_points_siaddr_at_this_server(proxydhcpd_factory):
    daemon = proxydhcpd_factory(NextServer="127.0.0.9")
    c = Client(daemon)
    try:
        xid = c.xid()
        c.to_67(build(xid=xid, arch=7))
        reply = c.heard()
    finally:
        c.close()
    assert packet.OPT_VENDOR_SPECIFIC not in reply.options
    assert reply.packet.siaddr in ("127.0.0.1", "0.0.0.0")


def test_listen_port_67_no_answers_only_4011(proxydhcpd_factory):
    daemon = proxydhcpd_factory(ListenPort67=False)
    assert [entry["port"] for entry in daemon.status()["listen"]] == [daemon.boot_server_port]
    c = Client(daemon)
    try:
        xid = c.xid()
        c.to_4011(build("request", xid=xid, arch=0, ciaddr="127.0.0.1", extra=[BOOT_ITEM]))
        assert c.answer().packet.xid == xid
    finally:
        c.close()
