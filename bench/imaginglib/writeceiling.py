"""The decompress-and-write ceiling's work, as a process of its own (bench/imaginglib/ceiling.py
runs it): the image's chunks read from the file, decompressed with zstandard on `threads`
threads and written to a blank disk file at their places, fsynced, optionally with an
fdatasync thread every sync_step bytes (img's own SyncBehind). No network, no checksums, no
partition table work.

It imports only what that work needs, so its process start is as light as a restore tool's can
be: `python -m imaginglib.writeceiling IMAGE DISK THREADS SYNC_STEP` prints
{"seconds": the work's seconds, "written": bytes} as JSON.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import zstandard

from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import CHUNK_HEADER, ChunkKind
from img.disk import Disk, SyncBehind


class _NoSync:
    """The one-fsync ceiling: nothing synced before the end."""

    def wrote(self, length: int) -> None:
        pass


def decompress_to_disk(image: Path, disk: Path, threads: int, sync_step: int = 0
                       ) -> tuple[float, int]:
    """Seconds, bytes written. sync_step > 0: img's own SyncBehind (an fdatasync thread after
    every sync_step bytes written)."""
    started = time.perf_counter()
    local = threading.local()
    with open(image, "rb") as handle, Disk.open(str(disk), writable=True) as target:
        fd_in = handle.fileno()
        reader = ImageReader(handle, str(image))
        offsets = {s["number"]: int(s["disk_offset"]) for s in reader.metadata["streams"]}
        entries = sorted(reader.entries(), key=lambda e: e.position)
        behind = SyncBehind(target, sync_step) if sync_step else contextlib.nullcontext(_NoSync())

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
            target.write(offsets[entry.stream] + entry.offset, data)
            syncer.wrote(len(data))
            return len(data)

        written = 0
        with behind as syncer, concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            window: collections.deque = collections.deque()
            for entry in entries:
                window.append(pool.submit(work, entry))
                if len(window) > 2 * threads:
                    written += window.popleft().result()
            while window:
                written += window.popleft().result()
        target.sync()
    return time.perf_counter() - started, written

if __name__ == "__main__":
    work_s, total = decompress_to_disk(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]),
                                       int(sys.argv[4]))
    print(json.dumps({"seconds": work_s, "written": total}))
