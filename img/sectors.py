"""Logical sector sizes: the checks that keep a disk from being read or written in the wrong one.

A partition table counts in logical sectors (LBAs) of 512 bytes, or of 4096 on a 4Kn disk; the
same numbers read with the other size put every partition at the wrong byte, and an image made
so stores the wrong bytes "successfully". Two checks:

- table_mismatch(): a table that reads right only in the other sector size, because its
  filesystems lie where the other size puts them and not where this one does (a 4Kn disk's
  image file read with the default 512, or a 4Kn disk copied byte for byte onto a 512-byte
  one). `img make` and the add-on commands refuse such a disk, `img dump` warns.
- convert_for(): an image's table for a disk whose logical sectors differ from the image's:
  converted where every partition boundary converts exactly (DiskLayout.converted()) and every
  filesystem can live on the new sectors (its own unit, usedblocks.filesystem_unit(), is at
  least the new sector size: Linux and Windows mount nothing else), else refused with the reason.
"""

from __future__ import annotations

from typing import Any

from common.imaging.imagefile import ImageReader

from .disk import Disk
from .disklayout import DiskLayout, DiskLayoutError, Partition, read_layout
from .usedblocks import PROBE_BYTES, detect_filesystem, filesystem_unit


def other_sector_size(sector_size: int) -> int:
    return 4096 if sector_size == 512 else 512


def table_mismatch(disk: Disk, layout: DiskLayout) -> str:
    """Why the table reads right only in the other sector size, or "" (pure but for reads)."""
    here = _found_filesystems(disk, layout)
    other = other_sector_size(layout.sector_size)
    try:
        there_layout = read_layout(disk.path, other)
    except (DiskLayoutError, OSError):
        return ""
    there = _found_filesystems(disk, there_layout)
    if len(there) <= len(here):
        return ""
    number, name, offset = there[0]
    remedy = (f"pass --sector-size {other}" if not disk.is_device else
              f"the table was written for a disk with {other}-byte sectors (a copy of one?); "
              "restore an image onto it rather than reading it")
    return (f"{disk.path}: its partition table reads right only with {other}-byte sectors, not "
            f"the {layout.sector_size} it is read with: {len(there)} partition(s) then hold a "
            f"known filesystem (partition {number}: {name} at byte {offset}), {len(here)} now; "
            f"{remedy}")


def _found_filesystems(disk: Disk, layout: DiskLayout) -> list[tuple[int, str, int]]:
    """(partition, filesystem, byte offset) of each data partition with a known filesystem."""
    found = []
    for part in _data_partitions(layout):
        offset = part.start_bytes(layout.sector_size)
        length = min(PROBE_BYTES, part.size_bytes(layout.sector_size), disk.size - offset)
        name = detect_filesystem(disk.read(offset, length)) if length > 0 else None
        if name:
            found.append((part.number, name, offset))
    return found


def _data_partitions(layout: DiskLayout) -> list[Partition]:
    return [p for p in layout.partitions if not p.is_extended]


def convert_for(reader: ImageReader, layout: DiskLayout, sector_size: int
                ) -> tuple[DiskLayout | None, str]:
    """layout (the image's) in LBAs of sector_size, or (None, why it cannot be).

    Going to smaller sectors, every filesystem keeps working (its unit was at least the old
    size); going to larger ones, each data partition's filesystem is read from the image's first
    chunks and must have a unit of at least the new size, and a partition whose filesystem is
    unknown is refused, as nobody can say it would work.
    """
    try:
        new = layout.converted(sector_size)
    except DiskLayoutError as exc:
        return None, str(exc)
    if sector_size < layout.sector_size:
        return new, ""
    streams = {int(s["partition"]): s for s in reader.metadata["streams"]
               if s.get("role") == "partition" and s.get("partition") is not None}
    for part in _data_partitions(layout):
        stream = streams.get(part.number)
        probe = _stream_probe(reader, stream) if stream else b""
        name = detect_filesystem(probe) or "unknown filesystem"
        unit = filesystem_unit(probe)
        if unit is None or unit < sector_size:
            has = f"{unit}-byte sectors or blocks" if unit else "no unit img knows"
            return None, (f"partition {part.number} ({name}) has {has}, and no filesystem can "
                          f"live on a disk whose logical sectors ({sector_size} bytes) are "
                          f"larger than its own; make the image on a disk with {sector_size}-"
                          "byte sectors")
    return new, ""


def _stream_probe(reader: ImageReader, stream: dict[str, Any]) -> bytes:
    """The first PROBE_BYTES of a partition stream as the image holds them (gaps read as 0)."""
    size = min(PROBE_BYTES, int(stream["size"]))
    probe = bytearray(size)
    for entry in reader.entries(int(stream["number"])):
        if entry.offset < size:
            data = reader.read_chunk(entry, frame_checksum_suffices=True)
            piece = data[:size - entry.offset]
            probe[entry.offset:entry.offset + len(piece)] = piece
    return bytes(probe)
