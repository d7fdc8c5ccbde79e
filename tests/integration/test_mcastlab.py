"""The multicast lab (tests/mcastlab.py) itself: topology, multicast delivery, impairments,
counters, KillAt and teardown. Root only (network namespaces, nft); no multicast peer needed:
the sender and receivers here are small Python programs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import netlab
from tests.mcastlab import KillAt, MulticastLab, folder_bytes, reap

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nft)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("ip", "nft", "ethtool")),
                       reason="needs ip, nft and ethtool"),
]

GROUP, PORT = "239.77.0.1", 5600

RECEIVER = """
import socket, struct, sys
group, port, iface_addr, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(group) + socket.inet_aton(iface_addr))
s.settimeout(3.0)
got = 0
try:
    while got < count:
        s.recv(2048)
        got += 1
except socket.timeout:
    pass
print(got, flush=True)
"""

SENDER = """
import socket, sys, time
group, port, iface_addr, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface_addr))
for i in range(count):
    s.sendto(b"x" * 1000, (group, port))
    if i % 50 == 49:
        time.sleep(0.005)          # no socket buffer overflows: only the lab's loss counts
"""


GRO_RECEIVER = """
import socket, struct, sys
group, port, iface_addr, count, gro = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                       int(sys.argv[4]), sys.argv[5] == "1")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if gro:
    s.setsockopt(17, 104, 1)                            # SOL_UDP, UDP_GRO
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(group) + socket.inet_aton(iface_addr))
s.settimeout(3.0)
calls, seen = 0, []
try:
    while len(seen) < count:
        data, anc, _flags, _addr = s.recvmsg(65536, 64)
        calls += 1
        size = len(data)
        for level, kind, value in anc:
            if (level, kind) == (17, 104):
                size = struct.unpack("=i", value[:4])[0]
        for at in range(0, len(data), size):
            seen.append(struct.unpack_from("!I", data, at)[0])
except socket.timeout:
    pass
print(calls, " ".join(map(str, seen)), flush=True)
"""

GSO_SENDER = """
import socket, struct, sys, time
group, port, iface_addr, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface_addr))
run = 40                                                # datagrams per UDP_SEGMENT send
for first in range(0, count, run):
    buf = b"".join(struct.pack("!I", n) + b"x" * 996 for n in range(first, min(count, first + run)))
    s.sendmsg([buf], [(17, 103, struct.pack("=H", 1000))], 0, (group, port))
    time.sleep(0.002)              # no socket buffer overflows: only the lab's loss counts
"""


def _multicast(lab: MulticastLab, count: int) -> list[int]:
    """Send `count` datagrams to GROUP from the sender; how many each receiver got."""
    procs = [lab.spawn(h, f"rx-{h.name}-{time.monotonic_ns()}",
                       [sys.executable, "-c", RECEIVER, GROUP, str(PORT), h.addr, str(count)])
             for h in lab.receivers]
    for h in lab.receivers:
        assert netlab.wait_for(lambda h=h: lab.udp_bound(h, PORT), 10)
    time.sleep(0.2)                # IGMP joins done
    sender = lab.spawn(lab.sender, f"tx-{time.monotonic_ns()}",
                       [sys.executable, "-c", SENDER, GROUP, str(PORT), lab.sender.addr,
                        str(count)])
    assert netlab.wait_for(lambda: reap(sender) is not None, 30)
    assert sender.exit.code == 0, netlab.tail(sender.log)
    assert netlab.wait_for(lambda: all(reap(p) is not None for p in procs), 30)
    return [int(netlab.read_text(p.log).split()[0]) for p in procs]


def test_topology_delivery_impairments_and_teardown(tmp_path: Path) -> None:
    lab = MulticastLab(tmp_path / "lab", receivers=3)
    names = [lab.switch.name] + [h.ns.name for h in lab.hosts]
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout
        assert all(n in listed for n in names)
        assert [h.addr for h in lab.hosts] == ["10.79.0.1", "10.79.0.11", "10.79.0.12",
                                               "10.79.0.13"]
        routes = lab.sender.ns.ip("route", "show").stdout
        assert "224.0.0.0/4 dev snd0" in routes

        # every receiver gets the sender's multicast, nothing lost, counters move
        before = lab.link_stats(lab.sender)
        assert _multicast(lab, 400) == [400, 400, 400]
        after = lab.link_stats(lab.sender)
        assert after["tx_packets"] - before["tx_packets"] >= 400
        assert after["tx_bytes"] - before["tx_bytes"] >= 400 * 1028

        # 30 % loss on r1's input: only r1 misses packets, and the counter says how many
        lab.loss_in(lab.receivers[0], 30)
        got = _multicast(lab, 1000)
        drops = lab.nft_drops(lab.receivers[0])["loss-in"]
        assert got[1:] == [1000, 1000]
        assert 200 < 1000 - got[0] < 400 and got[0] + drops == 1000

        # 20 % loss on the sender's output: every receiver misses the very same packets
        lab.loss_out(lab.sender, 20)
        got = _multicast(lab, 1000)
        lost = lab.nft_drops(lab.sender)["loss-out"]
        assert 100 < lost < 300
        assert got[1] == got[2] == 1000 - lost
    finally:
        lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_gro_coalesces_and_loss_stays_per_packet(tmp_path: Path) -> None:
    """A UDP_GRO socket gets runs of datagrams in one buffer (the lab's offloads work), a plain
    socket single ones; loss_in drops datagrams one by one even for the GRO socket (it acts
    on the wire, before GRO), not whole coalesced runs."""
    count = 4000
    with MulticastLab(tmp_path / "lab", receivers=3) as lab:
        r1, r2, r3 = lab.receivers
        lab.loss_in(r1, 30)
        procs = [lab.spawn(h, f"gro-{h.name}", [sys.executable, "-c", GRO_RECEIVER, GROUP,
                                                 str(PORT), h.addr, str(count), gro])
                 for h, gro in ((r1, "1"), (r2, "1"), (r3, "0"))]
        for h in lab.receivers:
            assert netlab.wait_for(lambda h=h: lab.udp_bound(h, PORT), 10)
        time.sleep(0.2)
        sender = lab.spawn(lab.sender, "gso-tx", [sys.executable, "-c", GSO_SENDER, GROUP,
                                                  str(PORT), lab.sender.addr, str(count)])
        assert netlab.wait_for(lambda: reap(sender) is not None, 30)
        assert sender.exit.code == 0, netlab.tail(sender.log)
        assert netlab.wait_for(lambda: all(reap(p) is not None for p in procs), 30)
        results = []
        for proc in procs:
            calls, *seen = netlab.read_text(proc.log).split()
            results.append((int(calls), [int(n) for n in seen]))
        drops = lab.nft_drops(r1)["loss-in"]

    (calls1, seen1), (calls2, seen2), (calls3, seen3) = results
    assert seen2 == list(range(count)) and seen3 == list(range(count))
    assert calls3 == count                          # plain socket: one datagram a call
    assert calls2 < count // 4                      # GRO: runs of datagrams a call
    lost = sorted(set(range(count)) - set(seen1))
    assert len(lost) == drops and 0.25 * count < drops < 0.35 * count
    # independent loss: after a lost datagram the next is lost about 30 % of the time; losing
    # whole coalesced runs would make it ~95 %
    lost_set = set(lost)
    followed = sum(1 for n in lost if n + 1 in lost_set) / len(lost)
    assert followed < 0.45, followed


def test_rate_limit_and_kill_at(tmp_path: Path) -> None:
    with MulticastLab(tmp_path / "lab", receivers=1) as lab:
        rx = lab.receivers[0]
        lab.rate_limit_in(rx, 50_000)                    # ~1 s bucket: ~50 packets pass
        got = _multicast(lab, 400)
        assert got[0] < 150 and lab.nft_drops(rx)["rate"] == 400 - got[0]

        out = tmp_path / "out"
        out.mkdir()
        writer = lab.spawn(rx, "writer", [sys.executable, "-c",
                                          "import sys, time\n"
                                          "with open(sys.argv[1], 'wb') as f:\n"
                                          "    for _ in range(400):\n"
                                          "        f.write(b'y' * 65536); f.flush()\n"
                                          "        time.sleep(0.01)\n",
                                          str(out / "file")])
        killer = KillAt(writer, out, 4 << 20)
        assert netlab.wait_for(lambda: reap(writer) is not None, 30)
        killer.cancel()
        assert writer.exit.code == -9
        assert killer.progress is not None and killer.progress >= 4 << 20
        assert folder_bytes(out) < 26 << 20                # killed long before the end
