"""CPU cost of each stage of our daemon's request path, in-process, without a profiler.

    PYTHONPATH=<checkout> python3 microcost.py [N]     -> one JSON object on stdout

Feeds the bench's DISCOVER (packets.discover_template) through proxydhcpd.packet.parse,
decide.decide, reply.ReplyBuilder.build, the fast path's packet.scan and FastPath.answer, and the
whole ProxyDhcpServer._on_request (fast path) and _on_request_full (full parse, as at DEBUG)
with a socket whose sendmsg does nothing (so: everything but the two system calls), and the
receive handler with its real system calls on loopback (loopback_us); reports microseconds of
CPU (time.process_time) per call: the unprofiled counterpart of
`bench/run-proxydhcp-bench --profile`. It runs in a subprocess of the bench so that it uses the
daemon's interpreter and checkout.
"""

import json
import logging
import os
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxylib import packets  # noqa: E402


def per_call(fn, n: int) -> float:
    fn()
    best = None
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        dt = (time.process_time() - t0) / n
        best = dt if best is None else min(best, dt)
    return best * 1e6


def loopback(settings_for, data: bytes, batch: int = 2000, rounds: int = 5) -> float:
    """CPU us per request of the daemon's receive handler with its real system calls: `batch`
    requests queued on a loopback socket (ciaddr 127.0.0.1, so each offer is a unicast to a
    sink socket), then handled; the best of `rounds`. Sending is not counted."""
    from proxydhcpd import server

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    srv = server.ProxyDhcpServer(settings_for(sink.getsockname()[1]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, server.IP_PKTINFO, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server.RCVBUF_BYTES)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    target = sock.getsockname()
    buf = bytearray(data)
    buf[12:16] = socket.inet_aton("127.0.0.1")
    best = None
    for r in range(rounds):
        for i in range(batch):
            struct.pack_into("!I", buf, 4, r * batch + i)
            struct.pack_into("!I", buf, 30, r * batch + i)
            client.sendto(buf, target)
        before = srv.stats.offers_sent
        t0 = time.process_time()
        while srv.stats.offers_sent - before < batch:
            srv._on_readable(sock, 67)
            if time.process_time() - t0 > 5:
                break
        dt = (time.process_time() - t0) / max(1, srv.stats.offers_sent - before)
        best = dt if best is None else min(best, dt)
    for s in (sink, sock, client):
        s.close()
    return best * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    from common.daemon.config import load_config
    from common.daemon.runner import CommonSettings
    from proxydhcpd import config, decide, packet, reply, server

    logging.getLogger("preboot").setLevel(logging.WARNING)
    tmpl, guid_at = packets.discover_template()
    buf = bytearray(tmpl)
    for off in (4, 30, guid_at):
        struct.pack_into("!I", buf, off, 0x00123456)
    data = bytes(buf)
    def settings_for(client_port: int = 68):
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
            f.write(f"StatusPort = 0\nClientPort = {client_port}\n")
        try:
            values = load_config(f.name, config.SCHEMA)
        finally:
            os.unlink(f.name)
        return config.make_settings(values, CommonSettings.from_values(values))

    settings = settings_for()
    lo = socket.if_nametoindex("lo")
    srv = server.ProxyDhcpServer(settings)
    request = packet.parse(data)
    plan = decide.decide(request, 67, settings.policy, "127.0.0.1")
    builder = reply.ReplyBuilder()

    class NullSocket:
        def sendmsg(self, *args):
            return 300

    null = NullSocket()
    fast = srv._fast
    scanned = packet.scan(data)
    out = {
        "scan_us": per_call(lambda: packet.scan(data), n),
        "fast_scan_us": per_call(lambda: fast.scan(data), n),
        "fast_answer_us": per_call(lambda: fast.answer(data, scanned, 67, "127.0.0.1"), n),
        "on_request_full_us": per_call(
            lambda: srv._on_request_full(null, 67, data, ("10.77.0.2", 68), lo), n),
        "parse_us": per_call(lambda: packet.parse(data), n),
        "decide_us": per_call(lambda: decide.decide(request, 67, settings.policy, "127.0.0.1"),
                              n),
        "build_us": per_call(lambda: builder.build(plan, request, "127.0.0.1", "127.0.0.1"), n),
        "mac_text_us": per_call(lambda: request.mac_text, n),
        "on_request_us": per_call(
            lambda: srv._on_request(null, 67, data, ("10.77.0.2", 68), lo), n),
        "offers_counted": srv.stats.offers_sent,
        "loopback_us": loopback(settings_for, data),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
