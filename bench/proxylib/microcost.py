"""CPU cost of each stage of our daemon's request path, in-process, without a profiler.

    PYTHONPATH=<checkout> python3 microcost.py [N]     -> one JSON object on stdout

Feeds the bench's DISCOVER (packets.discover_template) through proxydhcpd.packet.parse,
decide.decide, reply.ReplyBuilder.build, and the whole ProxyDhcpServer._on_request with a socket
whose sendmsg does nothing (so: everything but the two system calls), and reports microseconds
of CPU (time.process_time) per call: the unprofiled counterpart of `bench/proxydhcp --profile`.
It runs in a subprocess of the bench so that it uses the daemon's interpreter and checkout.
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    from common.config import load_config
    from common.runner import CommonSettings
    from proxydhcpd import config, decide, packet, reply, server

    logging.getLogger("preboot").setLevel(logging.WARNING)
    tmpl, guid_at = packets.discover_template()
    buf = bytearray(tmpl)
    for off in (4, 30, guid_at):
        struct.pack_into("!I", buf, off, 0x00123456)
    data = bytes(buf)
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write("StatusPort = 0\n")
    try:
        values = load_config(f.name, config.SCHEMA)
    finally:
        os.unlink(f.name)
    settings = config.make_settings(values, CommonSettings.from_values(values))
    lo = socket.if_nametoindex("lo")
    srv = server.ProxyDhcpServer(settings)
    request = packet.parse(data)
    plan = decide.decide(request, 67, settings.policy, "127.0.0.1")
    builder = reply.ReplyBuilder()

    class NullSocket:
        def sendmsg(self, *args):
            return 300

    null = NullSocket()
    out = {
        "parse_us": per_call(lambda: packet.parse(data), n),
        "decide_us": per_call(lambda: decide.decide(request, 67, settings.policy, "127.0.0.1"),
                              n),
        "build_us": per_call(lambda: builder.build(plan, request, "127.0.0.1", "127.0.0.1"), n),
        "mac_text_us": per_call(lambda: request.mac_text, n),
        "on_request_us": per_call(
            lambda: srv._on_request(null, 67, data, ("10.77.0.2", 68), lo), n),
        "offers_counted": srv.stats.offers_sent,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
