"""The ceilings: (a) socket.sendfile of the stored image over loopback to a receiver that
discards; (b) what decompression and the disk allow: the image's chunks read from the file,
decompressed with zstandard on as many threads as img uses, and written to a blank disk file
at their places, fsynced; no network, no checksums, no partition table work."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import zstandard

from .sysutil import REPO, Usage

sys.path.insert(0, str(REPO))
from common.imagefile import ImageReader  # noqa: E402
from common.imageformat import CHUNK_HEADER, ChunkKind  # noqa: E402

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


def decompress_to_disk(image: Path, disk: Path, threads: int) -> tuple[float, Usage, int]:
    """Seconds, CPU, bytes written."""
    before = _self_usage()
    started = time.perf_counter()
    local = threading.local()
    with open(image, "rb") as handle:
        fd_in = handle.fileno()
        reader = ImageReader(handle, str(image))
        offsets = {s["number"]: int(s["disk_offset"]) for s in reader.metadata["streams"]}
        entries = sorted(reader.entries(), key=lambda e: e.position)
        fd_out = os.open(disk, os.O_WRONLY)

        def work(entry) -> int:
            if entry.kind is ChunkKind.ZERO:
                return 0
            payload = os.pread(fd_in, entry.payload_length, entry.position + CHUNK_HEADER.size)
            if entry.kind is ChunkKind.ZSTD:
                decompressor = getattr(local, "d", None)
                if decompressor is None:
                    decompressor = local.d = zstandard.ZstdDecompressor()
                data = decompressor.decompress(payload, max_output_size=entry.length)
            else:
                data = payload
            view, where = memoryview(data), offsets[entry.stream] + entry.offset
            while view:
                n = os.pwrite(fd_out, view, where)
                view, where = view[n:], where + n
            return len(data)

        written = 0
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
                window: collections.deque = collections.deque()
                for entry in entries:
                    window.append(pool.submit(work, entry))
                    if len(window) > 2 * threads:
                        written += window.popleft().result()
                while window:
                    written += window.popleft().result()
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    seconds = time.perf_counter() - started
    after = _self_usage()
    return seconds, Usage(after.user - before.user, after.sys - before.sys), written
