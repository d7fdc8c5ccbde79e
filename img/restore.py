"""`img restore`: put a base image down on a disk of the same or a larger size.

Order matters for a disk that must never look finished when it is not: the partition table is
written last, after every partition's data and the disk head, and the disk is synced before
and after it. An interrupted restore therefore leaves the old table or a zeroed head, never a
new table over half-written partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from common.disklayout import DiskLayout, DiskLayoutError, table_writes
from common.imagefile import ImageReader
from common.imageformat import ChunkKind, IndexEntry

from .disk import Disk

Progress = Callable[[int, int], None]


class RestoreError(Exception):
    """A restore that cannot or must not go ahead; the message says why."""


@dataclass(frozen=True)
class RestoreResult:
    bytes_written: int
    chunks: int
    layout: DiskLayout
    grown: bool


def _target_layout(reader: ImageReader, disk: Disk, grow: bool) -> tuple[DiskLayout, bool]:
    layout = DiskLayout.from_dict(reader.metadata["disk"]["layout"])
    source_size = int(reader.metadata["disk"]["size"])
    needed = layout.last_used_byte() if layout.partitions else source_size
    if disk.size < needed:
        raise RestoreError(
            f"{disk.path} is {disk.size} bytes; the image needs at least {needed} "
            f"(its partitions end there). Restoring onto a smaller disk would need the "
            f"filesystems shrunk first, which this version does not do.")
    if disk.size < source_size and layout.kind == "gpt" and not layout.fits(disk.size):
        raise RestoreError(f"{disk.path} is too small for the image's GPT")
    if not layout.partitions:
        return layout, False
    try:
        if grow and disk.size > layout.last_used_byte():
            return layout.grown(disk.size), True
        return layout.relocated(disk.size), False
    except DiskLayoutError as exc:
        raise RestoreError(f"{disk.path}: {exc}") from None


def restore_image(reader: ImageReader, disk_path: str, grow: bool = False, threads: int = 2,
                  progress: Progress | None = None) -> RestoreResult:
    meta = reader.metadata
    if meta.get("type") != "base":
        raise RestoreError(f"{reader.name} is a {meta.get('type')} image, not a base image")
    with Disk.open(disk_path, writable=True) as disk:
        layout, grown = _target_layout(reader, disk, grow)
        streams = {s["number"]: s for s in meta["streams"]}
        # Partitions first, the disk head (with the old table bytes) last, the new table after.
        head_last = layout.partitions != ()
        entries = sorted(reader.entries(),
                         key=lambda e: (head_last and e.stream == 0, e.stream, e.offset))
        total = sum(e.length for e in entries)
        written = 0
        if progress:
            progress(0, total)
        if layout.partitions:
            # Until the new table is written the disk must not show the old one over new data.
            disk.zero(0, min(disk.size, layout.sector_size * 34))
        for entry, data in reader.chunks(entries, threads=threads):
            stream = streams[entry.stream]
            offset = int(stream["disk_offset"]) + entry.offset
            if entry.kind is ChunkKind.ZERO:
                disk.zero(offset, entry.length)
            else:
                disk.write(offset, data)
            written += entry.length
            if progress:
                progress(written, total)
        _zero_uncovered(disk, streams, entries)
        if layout.partitions:
            disk.sync()
            head = [s for s in meta["streams"] if s["role"] == "disk-head"]
            boot_code = disk.read(0, 440) if head else b""
            for offset, data in table_writes(layout, boot_code):
                disk.write(offset, data)
        disk.sync()
    return RestoreResult(written, len(entries), layout, grown)


def _zero_uncovered(disk: Disk, streams: dict[int, dict], entries: list[IndexEntry]) -> None:
    """Streams with fill "zero" promise zeros wherever no chunk lies: make it so."""
    covered: dict[int, list[tuple[int, int]]] = {}
    for entry in entries:
        covered.setdefault(entry.stream, []).append((entry.offset, entry.end))
    for number, stream in streams.items():
        if stream.get("fill") != "zero":
            continue
        base, size, position = int(stream["disk_offset"]), int(stream["size"]), 0
        for start, end in sorted(covered.get(number, [])):
            disk.zero(base + position, start - position)
            position = max(position, end)
        disk.zero(base + position, size - position)
