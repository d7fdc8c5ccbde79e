"""The ceilings: (a) socket.sendfile of the stored image over loopback to a receiver that
discards; (b) what decompression and the disk allow: the image's chunks read from the file,
decompressed with zstandard on as many threads as img uses, and written to a blank disk file
at their places, fsynced; no network, no checksums, no partition table work. The disk part is
measured two ways, the faster being the ceiling: everything left to one fsync at the end, and
synced behind (an fdatasync thread every sync_step bytes, as img does), which lets the disk
write while the CPU decompresses.

A restore is a process: `img` pays the interpreter's start and its imports in every measured
second. So the write ceiling runs as a process too (`python -m imaginglib.writeceiling`, which
imports no more than the work needs), timed from spawn to exit like img, and also reports its
in-process time (the work alone)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from .sysutil import REPO, Usage

RECEIVER = r"""
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
buffer = bytearray(1 << 20)
total = 0
while True:
    n = conn.recv_into(buffer)
    if not n:
        break
    total += n
print(total, flush=True)
"""


def _self_usage() -> Usage:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(ru.ru_utime, ru.ru_stime)


def sendfile(image: Path) -> tuple[float, Usage, Usage]:
    """Seconds, sender CPU, receiver CPU."""
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                                text=True)
    try:
        port = int(receiver.stdout.readline())
        before = _self_usage()
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock, open(image, "rb") as handle:
            sent = sock.sendfile(handle)
            sock.shutdown(socket.SHUT_WR)
            total = int(receiver.stdout.readline())
        seconds = time.perf_counter() - started
        after = _self_usage()
        _, status, ru = os.wait4(receiver.pid, 0)
        receiver.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if receiver.returncode is None:
            receiver.kill()
            receiver.wait()
    if sent != total or total != image.stat().st_size:
        raise RuntimeError(f"sendfile: sent {sent}, received {total}")
    return seconds, Usage(after.user - before.user, after.sys - before.sys), \
        Usage(ru.ru_utime, ru.ru_stime)


def decompress_to_disk_process(image: Path, disk: Path, threads: int, sync_step: int = 0
                               ) -> tuple[float, float, Usage, int]:
    """decompress_to_disk in a process of its own: (seconds from spawn to exit, seconds of the
    work inside, the process's CPU, bytes written)."""
    bench = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bench), str(REPO)]))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "imaginglib.writeceiling", str(image),
                              str(disk),
                              str(threads), str(sync_step)], stdout=subprocess.PIPE, env=env,
                             cwd=str(bench))
    output = child.stdout.read() if child.stdout else b""
    _, status, ru = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"the ceiling process exited with {child.returncode}")
    answer = json.loads(output)
    return seconds, answer["seconds"], Usage(ru.ru_utime, ru.ru_stime), answer["written"]

