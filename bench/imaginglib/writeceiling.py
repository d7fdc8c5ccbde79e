"""The decompress-and-write ceiling's work, as a process of its own (bench/imaginglib/ceiling.py
runs it): the image's chunks read from the file, decompressed with zstandard on `threads`
threads and written to a blank disk file at their places, fsynced, optionally with an
fdatasync thread every sync_step bytes. No network, no checksums, no partition table work.

It imports only what that work needs, so its process start is as light as a restore tool's can
be: `python -m imaginglib.writeceiling IMAGE DISK THREADS SYNC_STEP` prints
{"seconds": the work's seconds, "written": bytes} as JSON.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sys
import threading
import time
from pathlib import Path

import zstandard

from common.imagefile import ImageReader
from common.imageformat import CHUNK_HEADER, ChunkKind


def decompress_to_disk(image: Path, disk: Path, threads: int, sync_step: int = 0
                       ) -> tuple[float, int]:
    """Seconds, bytes written. sync_step > 0: fdatasync on a thread of its own after every
    sync_step bytes written."""
    started = time.perf_counter()
    local = threading.local()
    due = threading.Semaphore(0)
    stopping = threading.Event()
    pending = [0]
    pending_lock = threading.Lock()
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
            if sync_step:
                with pending_lock:
                    pending[0] += len(data)
                    if pending[0] >= sync_step:
                        pending[0] = 0
                        due.release()
            return len(data)

        def sync_behind() -> None:
            while True:
                due.acquire()
                if stopping.is_set():
                    return
                os.fdatasync(fd_out)

        syncer = threading.Thread(target=sync_behind, daemon=True) if sync_step else None
        if syncer:
            syncer.start()
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
            if syncer:
                stopping.set()
                due.release()
                syncer.join()
            os.fsync(fd_out)
        finally:
            if syncer and syncer.is_alive():
                stopping.set()
                due.release()
                syncer.join()
            os.close(fd_out)
    return time.perf_counter() - started, written


if __name__ == "__main__":
    work_s, total = decompress_to_disk(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]),
                                       int(sys.argv[4]))
    print(json.dumps({"seconds": work_s, "written": total}))
