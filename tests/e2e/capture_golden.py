#!/usr/bin/env python3
"""Capture golden DHCP client packets from real firmware; (re)generate the expected replies.

    sudo python3 tests/e2e/capture_golden.py capture   # boot VMs, rewrite the pcaps + replies
    python3 tests/e2e/capture_golden.py replies        # only recompute <name>.reply.hex
    python3 tests/e2e/capture_golden.py show           # decode the stored pcaps and replies

`capture` (root, qemu, dnsmasq, tcpdump; about a minute under TCG) boots these VMs in network
namespaces (netlab.build_proxy_lab: site dnsmasq with a pool only, our proxydhcpd and tftpd on
192.168.77.2), captures udp ports 67/68/4011 with tcpdump, and keeps only the client packets
(BOOTREQUESTs to port 67 or 4011), the first of each (message type, port):

  ipxe-rom-bios           SeaBIOS + qemu's iPXE ROM (e1000): DISCOVER/REQUEST, user class iPXE
  ipxe-rom-bios-colocated the same beside a site DHCP server that sends option 60 PXEClient:
                          iPXE's ProxyDHCPREQUEST to port 4011 (ciaddr set)
  ipxe-rom-bios-relayed   the same behind dnsmasq --dhcp-relay, as our proxy receives it
                          (giaddr 192.168.78.1, hops 1)
  ovmf-pxe-x64            OVMF's own PXE (virtio-net, ROM disabled): DISCOVER arch 7, REQUEST
                          to the site server, REQUEST to our port 4011
  ipxe-efi-x64            iPXE (ipxe.efi) after OVMF chainloaded it: DISCOVER/REQUEST, arch 7,
                          user class iPXE

`replies` runs every stored client packet through proxydhcpd's pure path (packet.parse,
decide.decide with the daemon's default policy and the variants listed in EXTRA_POLICIES, server
192.168.77.2, reply.ReplyBuilder().build) and writes tests/data/pcap/<name>.reply.hex, which
tests/unit/proxydhcpd/test_golden.py compares byte for byte. Review `git diff` and `show`
before committing new expected replies: the test exists to make a changed answer a decision.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PCAP_DIR = REPO / "tests" / "data" / "pcap"
GOLDEN_TEST = REPO / "tests" / "unit" / "proxydhcpd" / "test_golden.py"
for path in (HERE, REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import netlab  # noqa: E402

# policies (named in test_golden.policies()) computed besides "default", per capture
EXTRA_POLICIES = {"ovmf-pxe-x64": ["uefi-via-4011-no"]}
DONE = re.compile(r"PREBOOT-E2E-OK [0-9a-f]{16}|Nothing to boot")


def golden_module():
    """tests/unit/proxydhcpd/test_golden.py, the one place that computes expected replies."""
    spec = importlib.util.spec_from_file_location("test_golden", GOLDEN_TEST)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["test_golden"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Client:
    """What picks a client packet for an output file."""

    message: int
    port: int
    ipxe: bool
    source: str
    destination: str


@dataclass(frozen=True)
class Capture:
    layout: netlab.ProxyLayout
    vm: netlab.VmSpec
    where: str                                         # "client" or "server" segment capture
    outputs: dict[str, Callable[[Client], bool]]
    proxy: dict = field(default_factory=dict)


BIOS = netlab.VmSpec("bios", nic="e1000")
UEFI = netlab.VmSpec("uefi", nic="virtio-net-pci", nic_rom=False)
SERVER = "192.168.77.2"
CAPTURES = [
    Capture("flat", BIOS, "client", {"ipxe-rom-bios": lambda c: True}),
    Capture("colocated", BIOS, "client", {"ipxe-rom-bios-colocated": lambda c: True},
            proxy={"ListenPort67": False}),
    Capture("relay", BIOS, "server",
            {"ipxe-rom-bios-relayed": lambda c: c.destination == SERVER}),
    Capture("flat", UEFI, "client", {"ovmf-pxe-x64": lambda c: not c.ipxe,
                                     "ipxe-efi-x64": lambda c: c.ipxe}),
]


def client_packets(pcap: Path):
    """(scapy packet, Client) for every BOOTREQUEST to port 67 or 4011 in a capture."""
    from scapy.all import IP, UDP, rdpcap

    from proxydhcpd import packet

    for pkt in rdpcap(str(pcap)):
        if IP not in pkt or UDP not in pkt or pkt[UDP].dport not in (67, 4011):
            continue
        try:
            request = packet.parse(bytes(pkt[UDP].payload))
        except packet.MalformedPacket:
            continue
        if request.op != packet.BOOTREQUEST:
            continue
        ipxe = b"iPXE" in request.user_classes or packet.OPT_IPXE_ENCAP in request.options
        yield pkt, Client(request.message_type or 0, pkt[UDP].dport, ipxe, pkt[IP].src,
                          pkt[IP].dst)


def run_capture(capture: Capture, workdir: Path) -> dict[str, int]:
    from scapy.all import wrpcap

    with netlab.Lab(workdir / "lab") as lab:
        root = workdir / "tftproot"
        netlab.make_proxy_root(root, secrets.token_hex(8))
        setup = netlab.build_proxy_lab(lab, capture.layout, root, capture.proxy)
        result = netlab.boot_vm(lab, setup.vm_ns, capture.vm, DONE, timeout=120)
        netlab.stop_captures(lab)
        if not result.ok:
            raise RuntimeError(f"{capture.vm.firmware} {capture.layout}: {result.reason}\n"
                               f"{netlab.tail(result.serial_log)}")
        pcap = setup.captures[capture.where]
        counts = {}
        for name, wanted in capture.outputs.items():
            kept, seen = [], set()
            for pkt, client in client_packets(pcap):
                key = (client.message, client.port)
                if wanted(client) and key not in seen:
                    seen.add(key)
                    kept.append(pkt)
            if not kept:
                raise RuntimeError(f"{name}: no client packets in {pcap}:\n"
                                   f"{netlab.summarize_dhcp_pcap(pcap)}")
            wrpcap(str(PCAP_DIR / f"{name}.pcap"), kept)
            counts[name] = len(kept)
    return counts


def write_replies() -> list[Path]:
    golden = golden_module()
    written = []
    for pcap in sorted(PCAP_DIR.glob("*.pcap")):
        name = pcap.name[:-len(".pcap")]
        lines = [
            f"# Expected proxydhcpd replies to the client packets in {name}.pcap, served from "
            f"{golden.SERVER}.",
            "# <frame> <port> <client message> <policy> reply <hex> | ignore <counter>",
            "# Generated by tests/e2e/capture_golden.py replies; checked by "
            "tests/unit/proxydhcpd/test_golden.py.",
        ]
        for client in golden.read_client_packets(pcap):
            for policy in ["default", *EXTRA_POLICIES.get(name, [])]:
                lines.append(golden.expected_line(client, policy))
        out = PCAP_DIR / f"{name}.reply.hex"
        out.write_text("\n".join(lines) + "\n")
        written.append(out)
    return written


def show() -> None:
    """Decode the stored client packets and expected replies (for reviewing them)."""
    from scapy.layers.dhcp import BOOTP, DHCP

    golden = golden_module()
    for case in golden.EXPECTED:
        client = golden._client(case)
        request = BOOTP(client.payload)
        print(f"== {case.id}")
        print(f"  request from {client.source}: flags={int(request.flags):#06x} "
              f"ciaddr={request.ciaddr} giaddr={request.giaddr} hops={request.hops} "
              f"options={request[DHCP].options}")
        if case.data is None:
            print(f"  -> {case.outcome}")
            continue
        bootp = BOOTP(case.data)
        print(f"  -> op={bootp.op} flags={int(bootp.flags):#06x} ciaddr={bootp.ciaddr} "
              f"yiaddr={bootp.yiaddr} siaddr={bootp.siaddr} giaddr={bootp.giaddr} "
              f"sname={bytes(bootp.sname).rstrip(bytes(1))!r} "
              f"file={bytes(bootp.file).rstrip(bytes(1))!r} len={len(case.data)}")
        print(f"     options={bootp[DHCP].options}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["capture", "replies", "show"])
    parser.add_argument("--only", help="capture only outputs whose name contains this text")
    args = parser.parse_args(argv)
    if args.action == "capture":
        missing = netlab.missing_prerequisites(
            ("ip", "qemu-system-x86_64", "dnsmasq", "tcpdump"),
            [*netlab.firmware_files("uefi"),
             *(netlab.IPXE_DIR / n for n in netlab.IPXE_BINARIES)])
        if missing:
            print("cannot capture: " + "; ".join(missing), file=sys.stderr)
            return 1
        PCAP_DIR.mkdir(parents=True, exist_ok=True)
        for capture in CAPTURES:  # one VM at a time
            if args.only and not any(args.only in name for name in capture.outputs):
                continue
            with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
                counts = run_capture(capture, Path(tmp))
            for name, count in counts.items():
                print(f"{name}.pcap: {count} client packets")
    if args.action in ("capture", "replies"):
        for path in write_replies():
            print(f"wrote {path.relative_to(REPO)}")
    if args.action == "show":
        show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
