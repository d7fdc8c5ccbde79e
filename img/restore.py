"""`img restore`: put a base image down on a disk of the same or a larger size, or (--shrink)
on a smaller one when the partitions at the end can be shrunk.

Order matters for a disk that must never look finished when it is not: the partition table is
written last, after every partition's data and the disk head, and the disk is synced before
and after it. An interrupted restore therefore leaves the old table or a zeroed head, never a
new table over half-written partitions.

Shrinking (img/shrink.py for the tools, DiskLayout.shrunk() for the new table): every check and
the shrink itself happen in scratch files before the first byte reaches the disk, so a refusal
or a tool failure leaves the disk as it was; the shrunk filesystem is then copied onto the disk
like any other partition data, before the table.

Image-safe data (img/isdstore.py): the target's record, when it has one, is kept: no write of
the restore touches its bytes (Disk.keep), and an image whose table would not leave room for it
is refused before the first write.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from common.imaging.filesets import WHOLE_IMAGE, FileSet, FilesetError, from_metadata
from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import ChunkKind, IndexEntry

from .disk import Disk, SyncBehind
from .disklayout import MBR_SIZE, DiskLayout, DiskLayoutError, table_writes
from .errors import DiskError, RestoreError
from .grow import GrowOutcome, grow_filesystems, grow_jobs
from .isdstore import disk_layout, occupied_slot, slot_for
from .sectors import convert_for
from .shrink import (Scratch, ShrinkError, ShrinkJob, check_filesystem, check_space,
                     copy_prefix, create_scratch, minimum_size, missing_tools, refusal,
                     scratch_needed, shrink_filesystem)

Progress = Callable[[int, int], None]
MiB = 1 << 20


@dataclass(frozen=True)
class RestoreResult:
    bytes_written: int
    chunks: int
    layout: DiskLayout
    grown: bool
    shrunk: tuple[ShrinkJob, ...] = ()
    converted_from: int | None = None     # the image's sector size, when the table was converted
    grew: tuple[GrowOutcome, ...] = ()     # --grow: each grown partition's filesystem (grow.py)
    fileset: Any = None                    # --fileset N > 1: img.filesets.FilesetOutcome

    @property
    def fileset_failed(self) -> bool:
        """Whether the file set asked for could not be applied (the image is on the disk)."""
        return self.fileset is not None and self.fileset.failed

    @property
    def grow_failed(self) -> bool:
        """Whether a grown partition's filesystem could not be grown (the restore is whole)."""
        return any(outcome.status == "failed" for outcome in self.grew)


@dataclass(frozen=True)
class _ShrinkPlan:
    """What shrinking would take: the new layout and jobs, or the reason it cannot be done."""

    layout: DiskLayout | None
    jobs: tuple[ShrinkJob, ...]
    reason: str


def _plan_shrink(meta: dict[str, Any], layout: DiskLayout, disk_size: int) -> _ShrinkPlan:
    """The layout for a smaller disk, with each partition's used data as its floor (pure).

    The filesystem is judged before the floor: a raw partition "needs" its whole size, and
    "cannot be shrunk: stored raw" is the reason worth telling.
    """
    streams = {int(s["partition"]): s for s in meta["streams"]
               if s.get("role") == "partition" and s.get("partition") is not None}
    floors = {number: int(s.get("used_bytes", s["size"])) for number, s in streams.items()}
    try:
        cut = layout.shrunk(disk_size)
        for old in layout.partitions:
            if cut.partition(old.number).size_lba != old.size_lba and not old.is_extended:
                _check_shrinkable(old.number, streams.get(old.number))
        new = layout.shrunk(disk_size, floors)
    except (DiskLayoutError, ShrinkError) as exc:
        return _ShrinkPlan(None, (), str(exc))
    jobs = tuple(
        ShrinkJob(old.number, int(streams[old.number]["number"]),
                  str(streams[old.number].get("filesystem", "raw")),
                  old.size_bytes(layout.sector_size),
                  new.partition(old.number).size_bytes(layout.sector_size), floors[old.number])
        for old in layout.partitions
        if new.partition(old.number).size_lba != old.size_lba and not old.is_extended)
    return _ShrinkPlan(new, jobs, "")


def _check_shrinkable(number: int, stream: dict[str, Any] | None) -> None:
    if stream is None:
        raise ShrinkError(f"partition {number} has no data stream in the image")
    why = refusal(str(stream.get("filesystem", "raw")), number)
    if why:
        raise ShrinkError(why)


def _too_small(path: str, size: int, needed: int, plan: _ShrinkPlan, shrink: bool) -> str:
    """The one-line refusal for a disk smaller than where the image's partitions end."""
    head = (f"{path} is {size // MiB} MiB ({size} bytes); the image needs at least "
            f"{-(-needed // MiB)} MiB ({needed} bytes, for its partitions and table)")
    if plan.reason:
        what = "cannot shrink" if shrink else "it would not fit even shrunk"
        return f"{head}; {what}: {plan.reason}"
    used = sum(j.used_bytes for j in plan.jobs)
    room = sum(j.new_size for j in plan.jobs)
    parts = ", ".join(str(j.partition) for j in plan.jobs)
    return (f"{head}; the used data ({-(-used // MiB)} MiB) would fit in {room // MiB} MiB: "
            f"use --shrink to shrink partition {parts} (img auto: a rule with shrink = yes)")


def _target_layout(reader: ImageReader, disk: Disk, grow: bool, shrink: bool = False
                   ) -> tuple[DiskLayout, bool, tuple[ShrinkJob, ...]]:
    """The layout to write, whether it was grown, and the partitions to shrink first."""
    layout = _layout_for_sectors(reader, disk)
    source_size = int(reader.metadata["disk"]["size"])
    needed = layout.min_disk_size() if layout.partitions else source_size
    if disk.size < needed:
        if not layout.partitions:
            raise RestoreError(f"{disk.path} is {disk.size} bytes; the image needs at least "
                               f"{needed} (a whole-disk filesystem cannot be shrunk)")
        plan = _plan_shrink(reader.metadata, layout, disk.size)
        if not shrink or plan.layout is None:
            raise RestoreError(_too_small(disk.path, disk.size, needed, plan, shrink))
        return plan.layout, False, plan.jobs
    if not layout.partitions:
        return layout, False, ()
    try:
        if grow and disk.size > layout.last_used_byte():
            return layout.grown(disk.size), True, ()
        return layout.relocated(disk.size), False, ()
    except DiskLayoutError as exc:
        raise RestoreError(f"{disk.path}: {exc}") from None


def _layout_for_sectors(reader: ImageReader, disk: Disk) -> DiskLayout:
    """The image's table in the target disk's logical sectors, converted where it can be
    (img/sectors.py); a RestoreError with the reason where it cannot, before any write."""
    layout = DiskLayout.from_dict(reader.metadata["disk"]["layout"])
    if layout.sector_size == disk.sector_size:
        return layout
    new, why = convert_for(reader, layout, disk.sector_size)
    if new is None:
        raise RestoreError(
            f"{disk.path} has {disk.sector_size}-byte logical sectors but the image's disk had "
            f"{layout.sector_size}-byte ones, and its table cannot be converted: {why}")
    return new


def restore_image(reader: ImageReader, disk_path: str, grow: bool = False, threads: int = 2,
                  progress: Progress | None = None, shrink: bool = False,
                  scratch: str | None = None, sector_size: int | None = None,
                  fileset: int = WHOLE_IMAGE) -> RestoreResult:
    """Restore reader's base image onto disk_path.

    fileset: the image's file set to restore (docs/image-format.md, "File sets"); a number
    the image does not declare is a RestoreError before anything is written. After the whole
    restore the set's exclusions are removed (img/filesets.py); the outcome is in the result.

    sector_size: a disk image file's logical sector size (a device says its own; Disk.open);
    where it differs from the image's, the table is converted or the restore refused
    (_layout_for_sectors).

    shrink: on a disk smaller than where the partitions end, shrink the partitions at the end
    (img/shrink.py says which filesystems can be) in scratch files under scratch (default: the
    system's temporary directory). RestoreError means nothing was written.
    """
    meta = reader.metadata
    if meta.get("type") != "base":
        raise RestoreError(f"{reader.name} is not a base image (its type is {meta.get('type')})")
    chosen = chosen_fileset(reader, fileset)
    try:
        disk = Disk.open(disk_path, writable=True, sector_size=sector_size)
    except DiskError as exc:
        raise RestoreError(str(exc)) from None
    with disk:
        layout, grown, jobs = _target_layout(reader, disk, grow, shrink)
        disk.keep = _kept_isd(disk, layout, sector_size is not None)
        with _scratch_dir(jobs, scratch) as work:
            shrunk_files = _shrink_in_scratch(reader, jobs, work, threads)
            written, chunks = _write_disk(reader, disk, layout, shrunk_files, threads, progress)
        grew = _grow_filesystems(meta, disk, layout) if grown else ()
    applied = None
    if chosen is not None:
        from .filesets import apply_fileset      # mounts and tools: only when a set is asked
        applied = apply_fileset(disk_path, chosen, sector_size)
    source = int(meta["disk"]["layout"]["sector_size"])
    return RestoreResult(written, chunks, layout, grown, jobs,
                         source if source != layout.sector_size else None, grew, applied)


def chosen_fileset(reader: ImageReader, number: int) -> FileSet | None:
    """The image's file set `number` (None: set 1, the whole image), or RestoreError."""
    if number == WHOLE_IMAGE:
        return None
    try:
        return from_metadata(reader.metadata).choose(number)
    except FilesetError as exc:
        raise RestoreError(f"{reader.name}: {exc}") from None


def _kept_isd(disk: Disk, layout: DiskLayout, explicit_sectors: bool) -> tuple[int, int] | None:
    """The target's image-safe data (img/isdstore.py), which no write of the restore may touch:
    (offset, length), or None when it has none. Its bytes lie where the image's layout must
    leave room too, or the restore is refused before a write: a machine's identity is not lost
    to an image (`img isd clear` first, to restore such an image anyway)."""
    try:
        kept = occupied_slot(disk, disk_layout(disk, explicit_sectors))
    except (DiskLayoutError, OSError):
        return None             # no table img can read: nothing kept
    if kept is None:
        return None
    slot = slot_for(layout)
    if slot.offset != kept[0]:
        raise RestoreError(f"{disk.path} holds image-safe data (bytes {kept[0]}.."
                           f"{kept[0] + kept[1] - 1}) that this image's partition table would "
                           f"not leave room for: {slot.reason}; `img isd clear` it first to "
                           "restore this image anyway")
    return kept


def _grow_filesystems(meta: dict[str, Any], disk: Disk, layout: DiskLayout
                      ) -> tuple[GrowOutcome, ...]:
    """After the whole restore (table written, disk synced): grow the filesystem in each
    partition whose entry grew (img/grow.py). Never raises: a failure is in the outcome, and
    the restored data stays as it is."""
    filesystems = {int(s["partition"]): str(s.get("filesystem", "raw")) for s in meta["streams"]
                   if s.get("role") == "partition" and s.get("partition") is not None}
    jobs = grow_jobs(DiskLayout.from_dict(meta["disk"]["layout"]), layout, filesystems)
    if not jobs:
        return ()
    head = [s for s in meta["streams"] if s["role"] == "disk-head"]
    boot_code = disk.read(0, 440) if head else b""
    outcomes = grow_filesystems(disk.path, layout, jobs, disk.write, boot_code)
    disk.sync()
    return outcomes


def _write_disk(reader: ImageReader, disk: Disk, layout: DiskLayout,
                shrunk_files: dict[int, tuple[ShrinkJob, Scratch]], threads: int,
                progress: Progress | None) -> tuple[int, int]:
    """The disk writes in their safe order; shrunk_files (stream -> job, scratch file) are
    copied in place of their streams. Returns (bytes written, chunks)."""
    meta = reader.metadata
    streams = {s["number"]: s for s in meta["streams"] if s["number"] not in shrunk_files}
    # Partitions first, the disk head (with the old table bytes) last, the new table after.
    head_last = layout.partitions != ()
    entries = sorted((e for e in reader.entries() if e.stream in streams),
                     key=lambda e: (head_last and e.stream == 0, e.stream, e.offset))
    total = sum(e.length for e in entries) + sum(j.new_size for j, _ in shrunk_files.values())
    written = 0
    if progress:
        progress(0, total)
    if layout.partitions:
        # Until the new table is written the disk must not show the old one over new data.
        disk.zero(0, min(disk.size, layout.sector_size * 34))
    for number, (job, scratch) in sorted(shrunk_files.items()):
        copy_prefix(scratch, disk, int(_meta_stream(meta, number)["disk_offset"]), job.new_size)
        written += job.new_size
        if progress:
            progress(written, total)
    def done(length: int) -> None:
        nonlocal written
        written += length
        if progress:
            progress(written, total)
    # The head waits for every partition chunk (a barrier), as a crash must not leave the old
    # table's bytes over half-written partitions.
    _put_chunks(reader, [e for e in entries if not (head_last and e.stream == 0)], disk,
                streams, threads, done)
    _put_chunks(reader, [e for e in entries if head_last and e.stream == 0], disk, streams,
                threads, done)
    _zero_uncovered(disk, streams, entries)
    if layout.partitions:
        source = DiskLayout.from_dict(meta["disk"]["layout"])
        if layout.kind == "gpt" and source.sector_size != layout.sector_size:
            # The head holds the GPT as the image's sector size put it: clear it, so no stale
            # header is found where a reader with the old size would look.
            disk.zero(MBR_SIZE, layout.first_usable_lba * layout.sector_size - MBR_SIZE)
        disk.sync()
        head = [s for s in meta["streams"] if s["role"] == "disk-head"]
        boot_code = disk.read(0, 440) if head else b""
        for offset, data in table_writes(layout, boot_code):
            disk.write(offset, data)
    disk.sync()
    return written, len(entries) + len(shrunk_files)


def _put_chunks(reader: ImageReader, entries: list[IndexEntry], disk: Disk,
                streams: dict[int, dict[str, Any]], threads: int,
                done: Callable[[int], None]) -> None:
    """Each chunk read, verified, decompressed and written at its place by the same worker
    thread (positional writes need no order), `threads` at a time, a bounded window ahead;
    done(length) in order. After a failure nothing more is written."""
    def put(entry: IndexEntry) -> int:
        offset = int(streams[entry.stream]["disk_offset"]) + entry.offset
        if entry.kind is ChunkKind.ZERO:
            disk.zero(offset, entry.length)
        else:
            disk.write(offset, reader.read_chunk(entry, frame_checksum_suffices=True))
            behind.wrote(entry.length)
        return entry.length

    with SyncBehind(disk) as behind, concurrent.futures.ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="img-restore") as pool:
        window: collections.deque = collections.deque()
        try:
            for entry in entries:
                window.append(pool.submit(put, entry))
                if len(window) > 2 * threads:
                    done(window.popleft().result())
            while window:
                done(window.popleft().result())
        except BaseException:
            for future in window:
                future.cancel()
            raise


def _meta_stream(meta: dict[str, Any], number: int) -> dict[str, Any]:
    return next(s for s in meta["streams"] if s["number"] == number)


def _scratch_dir(jobs: tuple[ShrinkJob, ...], scratch: str | None
                 ) -> contextlib.AbstractContextManager[str | None]:
    """A temporary directory for the scratch files (removed afterwards), None without jobs."""
    if not jobs:
        return contextlib.nullcontext(None)
    for job in jobs:
        missing = missing_tools(job.filesystem)
        if missing:
            raise RestoreError(f"partition {job.partition} ({job.filesystem}) cannot be shrunk: "
                               f"{', '.join(missing)} not installed")
    directory = scratch or tempfile.gettempdir()
    try:
        check_space(directory, sum(scratch_needed(j.used_bytes) for j in jobs))
        return tempfile.TemporaryDirectory(prefix="img-shrink-", dir=directory)
    except (ShrinkError, OSError) as exc:
        raise RestoreError(f"cannot shrink: {exc}") from None


def _shrink_in_scratch(reader: ImageReader, jobs: tuple[ShrinkJob, ...], work: str | None,
                       threads: int) -> dict[int, tuple[ShrinkJob, Scratch]]:
    """Each job's partition restored into a sparse scratch file, shrunk and checked there;
    stream number -> (job, file). Touches only work, so a failure is a RestoreError."""
    files: dict[int, tuple[ShrinkJob, Scratch]] = {}
    if not jobs or work is None:
        return files
    for job in jobs:
        path = os.path.join(work, f"partition-{job.partition}")
        try:
            scratch = create_scratch(path, job.filesystem, job.old_size)
            _restore_stream(reader, job, scratch, threads)
            _shrink_file(job, scratch)
        except RestoreError:
            raise
        except Exception as exc:
            # Whatever failed (a tool, the scratch disk, a damaged chunk, the imaging server),
            # only scratch files were touched: the disk is as it was, which RestoreError says.
            raise RestoreError(f"partition {job.partition} ({job.filesystem}): shrink failed: "
                               f"{exc}") from None
        files[job.stream] = (job, scratch)
    return files


def _restore_stream(reader: ImageReader, job: ShrinkJob, scratch: Scratch, threads: int) -> None:
    """The partition as the image holds it, into the sparse scratch file: ranges the image does
    not hold (free space, zero chunks) stay holes and read as zeros."""
    with open(scratch.path, "r+b") as out:
        for entry, data in reader.chunks(reader.entries(job.stream), threads=threads,
                                          frame_checksum_suffices=True):
            if entry.kind is not ChunkKind.ZERO:
                os.pwrite(out.fileno(), data, scratch.lead + entry.offset)


def _shrink_file(job: ShrinkJob, scratch: Scratch) -> None:
    """Check the minimum first: a filesystem that cannot get small enough is refused as is."""
    minimum = minimum_size(scratch)
    if minimum > job.new_size:
        raise RestoreError(
            f"partition {job.partition} ({job.filesystem}) would get {job.new_size // MiB} MiB "
            f"but {job.filesystem} needs at least {-(-minimum // MiB)} MiB for its data")
    shrink_filesystem(scratch, job.new_size)
    check_filesystem(scratch, job.new_size)


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
