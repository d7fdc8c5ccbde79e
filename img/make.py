"""`img make`: take a base image of a disk (a block device or a disk image file).

What goes in (docs/image-format.md): the partition table (as metadata), the disk head (from
byte 0 to the first partition: boot code and the boot loader's gap; never the machine's
image-safe data, img/isdstore.py), and each partition's used bytes where partclone knows the
filesystem, else the whole partition (all-zero chunks cost nothing). Extents a little apart are joined, so a fragmented filesystem still gives full-size
chunks that compress well; the bytes in between are free space and harmless to store.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from common import __version__
from common.fileio import atomic_file
from common.imaging.filesets import FileSets, to_metadata
from common.imaging.imagefile import DEFAULT_LEVEL, ImageWriter, WriteStats
from common.imaging.imageformat import DEFAULT_CHUNK_SIZE

from .disk import Disk
from .disklayout import DiskLayout
from .errors import DiskError
from .isdstore import occupied_slot
from .sectors import table_mismatch
from .usedblocks import Extent, UsedMap, used_map

JOIN_GAP = 1 << 20          # join used extents closer than this
MIN_HEAD = 1 << 20          # store at least the first MiB even on a table-less disk

Progress = Callable[[int, int], None]      # (bytes done, bytes total)


@dataclass(frozen=True)
class StreamPlan:
    number: int
    role: str                  # disk-head | partition | whole-disk
    disk_offset: int           # where the stream starts on the disk
    size: int
    extents: tuple[Extent, ...]
    fill: str                  # zero | free
    filesystem: str = "raw"
    partition: int | None = None
    reason: str = ""

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = {"number": self.number, "role": self.role, "size": self.size,
                                "fill": self.fill, "disk_offset": self.disk_offset,
                                "used_bytes": sum(e.length for e in self.extents)}
        if self.role != "disk-head":
            data["filesystem"] = self.filesystem
            data["map"] = self.reason
        if self.partition is not None:
            data["partition"] = self.partition
        return data


def join_extents(extents: tuple[Extent, ...], gap: int = JOIN_GAP) -> tuple[Extent, ...]:
    joined: list[Extent] = []
    for extent in extents:
        if joined and extent.offset - (joined[-1].offset + joined[-1].length) < gap:
            last = joined[-1]
            joined[-1] = Extent(last.offset, extent.offset + extent.length - last.offset)
        else:
            joined.append(extent)
    return tuple(joined)


def plan_streams(disk: Disk, layout: DiskLayout) -> list[StreamPlan]:
    sector = layout.sector_size
    if not layout.partitions:
        mapped = used_map(disk.path, 0, disk.size)
        return [_partition_plan(0, "whole-disk", 0, mapped, None)]
    first = min(p.start_lba for p in layout.partitions) * sector
    head = _head_extents(first, occupied_slot(disk, layout))
    plans = [StreamPlan(0, "disk-head", 0, first, head, "zero")]
    data_parts = [p for p in layout.partitions if not p.is_extended]   # logicals inside it
    for number, part in enumerate(sorted(data_parts, key=lambda p: p.start_lba), 1):
        offset, size = part.start_lba * sector, part.size_lba * sector
        mapped = used_map(disk.path, offset, size)
        plans.append(_partition_plan(number, "partition", offset, mapped, part.number))
    return plans


def _head_extents(first: int, isd: tuple[int, int] | None) -> tuple[Extent, ...]:
    """The disk head, but for the machine's image-safe data: an image is for every machine,
    the identity is this one's (the head's fill is zero: a restore reads zeros there)."""
    if isd is None:
        return (Extent(0, first),)
    offset, length = isd
    return tuple(e for e in (Extent(0, offset), Extent(offset + length, first - offset - length))
                 if e.length > 0)


def _partition_plan(number: int, role: str, offset: int, mapped: UsedMap,
                    partition: int | None) -> StreamPlan:
    known = mapped.filesystem != "raw"
    extents = join_extents(mapped.extents) if known else mapped.extents
    return StreamPlan(number, role, offset, mapped.size, extents, "free" if known else "zero",
                      mapped.filesystem, partition, mapped.reason)


def make_image(disk_path: str, out: BinaryIO, source: dict[str, Any] | None = None,
               level: int = DEFAULT_LEVEL, threads: int = 2,
               chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None,
               sector_size: int | None = None, filesets: FileSets = FileSets()
               ) -> tuple[WriteStats, dict[str, Any]]:
    """Write a base image of `disk_path` to `out` (a file or a stream). Returns the writer's
    statistics and the metadata written. sector_size: a disk image file's logical sector size
    (a device says its own; see Disk.open). A table that reads right only in the other sector
    size is a DiskError: an image of the wrong bytes must never be made. filesets: the file
    sets to declare (`img make --fileset`); each pattern must name a partition of this disk
    whose filesystem a restore can edit, else DiskError before anything is written."""
    with Disk.open(disk_path, sector_size=sector_size) as disk:
        layout = disk.read_layout()
        mismatch = table_mismatch(disk, layout)
        if mismatch:
            raise DiskError(mismatch)
        plans = plan_streams(disk, layout)
        problem = fileset_refusal(filesets, plans)
        if problem:
            raise DiskError(problem)
        metadata: dict[str, Any] = {
            "format": 1, "type": "base",
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tool": f"img {__version__}", "source": source or {},
            "compression": {"algorithm": "zstd", "level": level},
            "disk": {"size": disk.size, "sector_size": layout.sector_size,
                     "layout": layout.to_dict()},
            "streams": [plan.metadata() for plan in plans],
        }
        if filesets.sets:
            metadata["filesets"] = to_metadata(filesets)
        total = sum(e.length for plan in plans for e in plan.extents)
        done = 0
        if progress:
            progress(0, total)
        writer = ImageWriter(out, metadata, chunk_size=chunk_size, level=level, threads=threads)
        try:
            for plan in plans:
                for extent in plan.extents:
                    writer.add_range(plan.number, disk.fd, plan.disk_offset + extent.offset,
                                     extent.offset, extent.length)
                    done += extent.length
                    if progress:
                        progress(done, total)
            stats = writer.close({"used_bytes": total})
        except BaseException:
            writer.abort()
            raise
    return stats, metadata


def fileset_refusal(filesets: FileSets, plans: list[StreamPlan]) -> str:
    """Why the file sets cannot go with this disk ("" when they can): a pattern naming a
    partition the disk lacks, or one whose filesystem a restore could not edit."""
    from .filesets import CHECKERS
    found = {0 if plan.partition is None else plan.partition: plan.filesystem
             for plan in plans if plan.role != "disk-head"}
    for fileset in filesets.sets:
        for partition in fileset.partitions():
            if partition not in found:
                have = ", ".join(str(n) for n in sorted(found)) or "none"
                return (f"file set {fileset.number} ({fileset.name}): the disk has no "
                        f"partition {partition} (partitions: {have}; 0 is a disk without a "
                        "partition table)")
            if found[partition] not in CHECKERS:
                return (f"file set {fileset.number} ({fileset.name}): partition {partition} "
                        f"holds {found[partition]}; file sets can leave files out of "
                        f"{', '.join(sorted(CHECKERS))} only")
    return ""


def make_image_file(disk_path: str, image_path: str, **kwargs: Any
                    ) -> tuple[WriteStats, dict[str, Any]]:
    """make_image into a local file: written under a temporary name, fsynced, then renamed,
    so an interrupted run never leaves a partial image under the final name."""
    with atomic_file(image_path) as out:
        return make_image(disk_path, out, **kwargs)
