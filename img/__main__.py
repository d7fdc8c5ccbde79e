"""img, the imaging engine (python -m img).

    img make --disk DISK IMAGE          take a base image of DISK into the file IMAGE
    img restore --disk DISK IMAGE [--grow]   put IMAGE down on DISK (same size or larger)
    img verify IMAGE                    check every chunk of an image
    img dump --disk DISK                the partition table and each partition's filesystem
    img info                            what this machine reports to the imaging server

DISK is a block device or a disk image file. Exit status: 0 done, 1 failed (the message says
why and whether the disk was changed), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common.disklayout import DiskLayoutError, read_layout
from common.imagefile import DEFAULT_LEVEL, ImageReader
from common.imageformat import ImageFormatError

from .hardware import machine_facts
from .make import make_image_file
from .progress import Progress
from .restore import RestoreError, restore_image
from .usedblocks import used_map


def cmd_make(args: argparse.Namespace) -> int:
    if os.path.exists(args.image) and not args.overwrite:
        print(f"img: {args.image} exists (use --overwrite to replace it)", file=sys.stderr)
        return 1
    stats, meta = make_image_file(args.disk, args.image, source=machine_facts(),
                                  level=args.level, threads=args.threads,
                                  progress=Progress("img make"))
    used = sum(s.get("used_bytes", 0) for s in meta["streams"])
    print(f"made {args.image}: {len(meta['streams'])} streams, {used} bytes used, "
          f"{stats.bytes_out} bytes stored, {stats.chunks} chunks, {stats.seconds:.1f} s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        try:
            result = restore_image(reader, args.disk, grow=args.grow, threads=args.threads,
                                   progress=Progress("img restore"))
        except (ImageFormatError, OSError) as exc:
            print(f"img: restore of {args.disk} FAILED part-way: {exc}. The disk is "
                  "incomplete and has no valid partition table; restore again.", file=sys.stderr)
            return 1
    grown = " (last partition grown to fill the disk)" if result.grown else ""
    print(f"restored {args.image} onto {args.disk}: {result.bytes_written} bytes in "
          f"{result.chunks} chunks{grown}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        problems = reader.verify(threads=args.threads)
    for problem in problems:
        print(f"img: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.image}: {len(reader.index.entries)} chunks, all sound")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    layout = read_layout(args.disk)
    print(f"{args.disk}: {layout.kind} table, {layout.disk_size} bytes, "
          f"sector {layout.sector_size}, id {layout.disk_id}")
    for part in layout.partitions:
        offset, size = part.start_lba * layout.sector_size, part.size_lba * layout.sector_size
        mapped = used_map(args.disk, offset, size)
        name = f" '{part.name}'" if part.name else ""
        print(f"  {part.number}: start {offset} size {size} type {part.type}{name} "
              f"fs {mapped.filesystem}, {mapped.used_bytes()} bytes used ({mapped.reason})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    facts = machine_facts()
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
    else:
        for key, value in sorted(facts.items()):
            print(f"{key}: {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="img", description="the imaging engine")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="take a base image of a disk")
    make.add_argument("--disk", required=True)
    make.add_argument("image")
    make.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="zstd level (1-19)")
    make.add_argument("--threads", type=int, default=2)
    make.add_argument("--overwrite", action="store_true")
    make.set_defaults(run=cmd_make)
    restore = commands.add_parser("restore", help="put a base image down on a disk")
    restore.add_argument("--disk", required=True)
    restore.add_argument("image")
    restore.add_argument("--grow", action="store_true",
                         help="grow the last partition's table entry to fill a larger disk")
    restore.add_argument("--threads", type=int, default=2)
    restore.set_defaults(run=cmd_restore)
    verify = commands.add_parser("verify", help="check every chunk of an image")
    verify.add_argument("image")
    verify.add_argument("--threads", type=int, default=2)
    verify.set_defaults(run=cmd_verify)
    dump = commands.add_parser("dump", help="disks and partitions")
    dump.add_argument("--disk", required=True)
    dump.set_defaults(run=cmd_dump)
    info = commands.add_parser("info", help="the hardware this machine reports")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RestoreError as exc:
        print(f"img: {exc} (nothing was written)", file=sys.stderr)
        return 1
    except (ImageFormatError, DiskLayoutError) as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("img: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
