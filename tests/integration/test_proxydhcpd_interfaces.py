"""proxydhcpd on two segments: each client is answered from our address on its own segment
(IP_PKTINFO on receive and send), and `Interfaces` limits which segments are answered.

Topology (network namespaces made and removed here): a server namespace with two veth links,
each to a client namespace of its own, on 10.81.1.0/24 and 10.81.2.0/24.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import REPO, DaemonProcess, write_config

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")]

CLIENT = textwrap.dedent("""
    import socket, sys
    sys.path.insert(0, sys.argv[1])
    from scapy.layers.dhcp import BOOTP, DHCP
    from proxydhcpd import packet
    mac = bytes.fromhex(sys.argv[2])
    request = bytes(BOOTP(op=1, xid=0x5eed, flags=0x8000, chaddr=mac + bytes(10)) / DHCP(
        options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"),
                 (93, b"\\x00\\x00"), "end"]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")  # no route needed
    sock.bind(("0.0.0.0", 68))
    sock.settimeout(2)
    sock.sendto(request, ("255.255.255.255", 67))
    try:
        while True:
            data, source = sock.recvfrom(2048)
            reply = packet.parse(data)
            if reply.op == 2 and reply.xid == 0x5eed:
                print(source[0], reply.options[54].hex(), reply.siaddr, reply.file.decode())
                break
    except socket.timeout:
        print("no answer")
""")


class Segments:
    def __init__(self, tag: str):
        self.server = f"pxsrv{tag}"
        self.clients = [f"pxa{tag}", f"pxb{tag}"]

    def __enter__(self) -> "Segments":
        for ns in [self.server, *self.clients]:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for index, client in enumerate(self.clients, start=1):
            subprocess.run(["ip", "-n", self.server, "link", "add", f"seg{index}", "type", "veth",
                            "peer", "name", "eth0", "netns", client], check=True)
            subprocess.run(["ip", "-n", self.server, "addr", "add", f"10.81.{index}.1/24", "dev",
                            f"seg{index}"], check=True)
            subprocess.run(["ip", "-n", client, "addr", "add", f"10.81.{index}.50/24", "dev",
                            "eth0"], check=True)
            subprocess.run(["ip", "-n", self.server, "link", "set", f"seg{index}", "up"],
                           check=True)
            subprocess.run(["ip", "-n", client, "link", "set", "eth0", "up"], check=True)
        return self

    def __exit__(self, *exc) -> None:
        for ns in [self.server, *self.clients]:
            subprocess.run(["ip", "netns", "del", ns], check=False)

    def discover(self, client: str, mac: str) -> str:
        result = subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c", CLIENT,
                                 str(REPO), mac], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


def start_proxy(tmp_path: Path, segments: Segments, **overrides) -> DaemonProcess:
    values = {"StatusSocket": str(tmp_path / "p.sock"), "PidFile": str(tmp_path / "p.pid"),
              "StatusPort": 0, "LogLevel": "DEBUG", "LogFile": str(tmp_path / "p.log"),
              **overrides}
    config = write_config(tmp_path / "p.conf", values)
    daemon = DaemonProcess("proxydhcpd", config, values["StatusSocket"], Path(values["LogFile"]),
                           prefix=["ip", "netns", "exec", segments.server])
    return daemon.start()


def test_each_segment_is_answered_from_its_own_address(tmp_path):
    with Segments(str(os.getpid())) as segments:
        daemon = start_proxy(tmp_path, segments)
        try:
            first = segments.discover(segments.clients[0], "020000000001")
            second = segments.discover(segments.clients[1], "020000000002")
            counters = daemon.counters()
        finally:
            daemon.stop()
    # source address, option 54 (hex), siaddr, boot file
    assert first == "10.81.1.1 0a510101 10.81.1.1 undionly.kpxe"
    assert second == "10.81.2.1 0a510201 10.81.2.1 undionly.kpxe"
    assert counters["offers_sent"] == 2


def test_interfaces_limits_the_segments_answered(tmp_path):
    with Segments(str(os.getpid())) as segments:
        daemon = start_proxy(tmp_path, segments, Interfaces="seg2")
        try:
            first = segments.discover(segments.clients[0], "020000000001")
            second = segments.discover(segments.clients[1], "020000000002")
            counters = daemon.counters()
        finally:
            daemon.stop()
    assert first == "no answer"
    assert second.startswith("10.81.2.1 0a510201 10.81.2.1 ")
    assert counters["offers_sent"] == 1
    assert counters["ignored_other"] == 1
