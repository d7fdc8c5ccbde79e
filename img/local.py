"""img on files, without a server: make an image file of a disk, restore one onto a disk, make
and apply add-on image files, verify an image, dump a disk's table. Also the console lines a
finished restore prints and the one add-on application step, which the server workflows
(serverops.py) share.

Each workflow imports the modules only it needs (make, add-ons, the used-blocks probe) where it
runs: the process start is part of every restore's time.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import ImageFormatError

from .client import ServerError
from .disklayout import DiskLayoutError
from .errors import EXIT_NOT_GROWN, AddonError, Failure
from .hardware import machine_facts
from .progress import Progress
from .restore import restore_image
from common.units import human, human_exact, ratio


def make(args: argparse.Namespace) -> int:
    """img make --disk DISK IMAGE: a base image of DISK into the file IMAGE."""
    from .make import make_image_file
    if os.path.exists(args.image) and not args.overwrite:
        print(f"img: {args.image} exists (use --overwrite to replace it)", file=sys.stderr)
        return 1
    stats, meta = make_image_file(args.disk, args.image, source=machine_facts(),
                                  level=args.level, threads=args.threads,
                                  progress=Progress("img make"), sector_size=args.sector_size,
                                  filesets=args.filesets)
    print(f"made {args.image}: {make_summary(stats, meta)}")
    for line in fileset_lines(meta)[1:]:
        print(f"  file set {line}")
    return 0


def make_summary(stats: Any, meta: dict[str, Any]) -> str:
    """What a make read and stored, in human sizes (exact bytes in parentheses), with the
    compression ratio (the used data read against the bytes stored)."""
    used = sum(s.get("used_bytes", 0) for s in meta["streams"])
    return (f"{len(meta['streams'])} streams, {human_exact(used)} used, "
            f"{human_exact(stats.bytes_out)} stored (compression {ratio(used, stats.bytes_out)})"
            f", {stats.chunks} chunks, {stats.seconds:.1f} s")


def restore(args: argparse.Namespace) -> int:
    """img restore --disk DISK IMAGE [--addon FILE ...]: the file IMAGE onto DISK, then each
    add-on image file."""
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        try:
            result = restore_image(reader, args.disk, grow=args.grow, threads=args.threads,
                                   shrink=args.shrink, scratch=args.scratch,
                                   progress=Progress("img restore"),
                                   sector_size=args.sector_size, fileset=args.fileset)
        except (ImageFormatError, OSError) as exc:
            print(f"img: restore of {args.disk} FAILED part-way: {exc}. The disk is "
                  "incomplete and has no valid partition table; restore again.", file=sys.stderr)
            return 1
    print(f"restored {args.image} onto {args.disk}: {human_exact(result.bytes_written)} in "
          f"{result.chunks} chunks{restore_notes(result)}")
    print_shrunk(result)
    print_grown(result)
    if print_fileset(result):
        return 1
    status = apply_addons(args.addon, args.disk, None, args.threads, args.sector_size)
    return status or grow_status(result)


def print_fileset(result: Any) -> bool:
    """The file set a restore applied (img/filesets.py), one line; True when it failed (the
    line then goes to stderr: files the set leaves out may still be on the disk)."""
    outcome = getattr(result, "fileset", None)
    if outcome is None:
        return False
    if outcome.failed:
        print(f"img: {outcome.line()}", file=sys.stderr)
        return True
    print(outcome.line())
    return False


def restore_notes(result: Any) -> str:
    """What a restore did to the table besides writing it: grown, converted."""
    notes = []
    if result.grown:
        notes.append("last partition grown to fill the disk")
    if result.converted_from:
        notes.append(f"partition table converted from {result.converted_from}- to "
                     f"{result.layout.sector_size}-byte sectors")
    return f" ({'; '.join(notes)})" if notes else ""


def print_shrunk(result: Any) -> None:
    """What --shrink cut: one line per partition, old size -> new size."""
    for job in result.shrunk:
        note = "; Windows will check it once on its next boot" if job.filesystem == "ntfs" else ""
        print(f"shrunk partition {job.partition} ({job.filesystem}): {human(job.old_size)} "
              f"-> {human(job.new_size)}{note}")


def print_grown(result: Any) -> None:
    """What --grow did to each grown partition's filesystem: one line each, old size -> new
    size; a failure goes to stderr (the restore itself is complete)."""
    for outcome in getattr(result, "grew", ()):
        print(outcome.line(), file=sys.stderr if outcome.status == "failed" else sys.stdout)


def grow_status(result: Any) -> int:
    """0, or EXIT_NOT_GROWN when a grown partition's filesystem could not be grown."""
    return EXIT_NOT_GROWN if getattr(result, "grow_failed", False) else 0


# ------------------------------------------------------------------ add-on images

def apply_one(reader: ImageReader, label: str, disk: str, partition: int | None,
              threads: int, sector_size: int | None) -> None:
    """apply_addon with every failure turned into a one-line Failure saying whether the
    disk was changed."""
    from .addon import apply_addon
    try:
        result = apply_addon(reader, disk, partition, threads=threads, sector_size=sector_size)
    except AddonError as exc:
        if exc.changed:
            raise Failure(f"add-on {label} onto {disk} FAILED part-way: {exc}. The partition "
                          "was changed (some files written); apply the add-on again") from None
        raise Failure(f"add-on {label}: {exc}; the disk was not changed") from None
    except (ServerError, ImageFormatError, DiskLayoutError, OSError) as exc:
        raise Failure(f"add-on {label}: {exc}; the disk was not changed") from None
    print(f"applied add-on {label} onto {disk} partition {result.target.partition} "
          f"({result.target.filesystem}): {result.files} files, {human_exact(result.bytes)}")


def apply_addons(images: list[str], disk: str, partition: int | None,
                 threads: int, sector_size: int | None) -> int:
    """Apply each add-on image file in order; the first failure stops the rest."""
    for image in images:
        try:
            with open(image, "rb") as handle:
                apply_one(ImageReader(handle, image), image, disk, partition, threads,
                          sector_size)
        except Failure as exc:
            print(f"img: {exc}", file=sys.stderr)
            return 1
        except (ImageFormatError, OSError) as exc:
            print(f"img: add-on {image}: {exc}; the disk was not changed", file=sys.stderr)
            return 1
    return 0


def addon_make(args: argparse.Namespace) -> int:
    """img addon make --from DIR IMAGE: an add-on image file of the files under DIR."""
    if os.path.exists(args.image) and not args.overwrite:
        print(f"img: {args.image} exists (use --overwrite to replace it)", file=sys.stderr)
        return 1
    from .addon import make_addon_file
    stats, meta = make_addon_file(args.source, args.image, source=machine_facts(),
                                  level=args.level, threads=args.threads)
    raw = int(meta['files']['bytes'])
    print(f"made add-on {args.image}: {meta['files']['count']} files, {human_exact(raw)}, "
          f"{human_exact(stats.bytes_out)} stored (compression {ratio(raw, stats.bytes_out)})")
    return 0


def addon_apply(args: argparse.Namespace) -> int:
    """img addon apply --disk DISK [--partition N] IMAGE: the add-on image file onto DISK."""
    return apply_addons([args.image], args.disk, args.partition, args.threads,
                        args.sector_size)


# ------------------------------------------------------------------ inspection

def fileset_lines(meta: dict[str, Any]) -> list[str]:
    """The image's file sets, one line each, set 1 first (common/imaging/filesets.py); a
    header whose sets cannot be read says so instead of failing the listing."""
    from common.imaging.filesets import FilesetError, from_metadata
    try:
        return from_metadata(meta).describe()
    except FilesetError as exc:
        return [f"unreadable: {exc}"]


def show(args: argparse.Namespace) -> int:
    """img show IMAGE: what the image's header says (type, disk, streams, file sets), without
    reading its chunks (img verify reads them all)."""
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        meta = reader.metadata
        count = len(reader.index.entries)
    print(f"{args.image}: {describe_image(meta)}, {count} chunks, made "
          f"{meta.get('created', '?')} by {meta.get('tool', '?')}")
    for stream in meta.get("streams", []):
        where = (f"partition {stream['partition']}" if stream.get("partition") is not None
                 else stream.get("role", "?"))
        print(f"  stream {stream.get('number')}: {where} {stream.get('filesystem', '')} "
              f"{human_exact(int(stream.get('used_bytes', 0)))} used".rstrip())
    if meta.get("type") == "base":
        for line in fileset_lines(meta):
            print(f"  file set {line}")
    return 0


def describe_image(meta: dict[str, Any]) -> str:
    """One phrase: what kind of image, of what."""
    if meta.get("type") == "addon":
        from .addon import describe
        return describe(meta)
    disk = meta.get("disk") or {}
    return (f"base image of a {disk.get('size', '?')}-byte disk with "
            f"{disk.get('sector_size', '?')}-byte sectors")


def verify(args: argparse.Namespace) -> int:
    """img verify IMAGE: check every chunk; say what the image is."""
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        problems = reader.verify(threads=args.threads)
    for problem in problems:
        print(f"img: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.image}: {describe_image(reader.metadata)}; {len(reader.index.entries)} "
          "chunks, all sound")
    if reader.metadata.get("type") == "base" and reader.metadata.get("filesets"):
        for line in fileset_lines(reader.metadata):
            print(f"  file set {line}")
    return 0


def dump(args: argparse.Namespace) -> int:
    """img dump --disk DISK: the partition table and each partition's filesystem."""
    from .disk import Disk
    from .sectors import table_mismatch
    from .usedblocks import used_map
    with Disk.open(args.disk, sector_size=args.sector_size) as disk:
        layout = disk.read_layout()
        mismatch = table_mismatch(disk, layout)
    kind = "block device" if disk.is_device else "disk image file"
    print(f"{args.disk}: {layout.kind} table, {layout.disk_size} bytes, "
          f"sector {layout.sector_size} ({kind}), id {layout.disk_id}")
    for warning in layout.warnings:
        print(f"  warning: {warning}")
    for part in layout.partitions:
        offset, size = part.start_lba * layout.sector_size, part.size_lba * layout.sector_size
        name = f" '{part.name}'" if part.name else ""
        if part.is_extended:
            print(f"  {part.number}: start {offset} size {size} type {part.type} extended "
                  "(holds the logical partitions)")
            continue
        mapped = used_map(args.disk, offset, size)
        print(f"  {part.number}: start {offset} size {size} type {part.type}{name} "
              f"fs {mapped.filesystem}, {mapped.used_bytes()} bytes used ({mapped.reason})")
    if mismatch:
        print(f"img: warning: {mismatch}", file=sys.stderr)
        return 1
    return 0
