"""img, the imaging engine (python -m img).

    img make --disk DISK IMAGE          take a base image of DISK into the file IMAGE
        [--fileset 'NAME:PART:/GLOB[,PART:/GLOB...]' ...]   declare file sets 2, 3, ... (variants
        that leave the matching paths out; docs/image-format.md, "File sets")
    img restore --disk DISK IMAGE [--grow]   put IMAGE down on DISK (same size or larger;
        --grow grows the last partition and its filesystem: img/grow.py)
    img restore --disk DISK IMAGE --shrink [--scratch DIR]   ... onto a smaller disk, shrinking
        the filesystem(s) at the end (ext2/3/4, NTFS, FAT) in scratch files under DIR first
    img make --disk DISK --server HOST[:PORT] PATH      ... onto an imaging server
    img restore --disk DISK --server HOST[:PORT] PATH [--grow]   ... from an imaging server
    img auto --disk DISK --server HOST[:PORT] [--fact KEY=VALUE ...]   ask the server what to do
        (a multicast session's work included: join it, restore, report)
    img session NAME [master|client] [clients=N [t=M]] --disk DISK --server HOST[:PORT]
        a multicast session every workstation names alike (img/session.py, docs/multicast.md)
    img restore ... --fileset N         restore file set N (1, the default: everything)
    img verify IMAGE                    check every chunk of an image
    img show IMAGE                      what an image's header says: streams, file sets
    img addon make --from DIR IMAGE     an add-on image of the files under DIR
    img addon apply --disk DISK [--partition N] IMAGE   lay an add-on image onto a partition
        (both also with --server HOST[:PORT] PATH; `img restore ... --addon PATH` applies
        add-on images after the base image, from the same place)
    img dump --disk DISK                the partition table and each partition's filesystem
    img isd show|set|clear DISK         the image-safe data on DISK: the machine's identity
        (name, DNS suffix, workgroup, IP settings) that restores keep (img/isdcmd.py)
    img info                            what this machine reports to the imaging server
    img identity apply --disk DISK --name NAME [--dns-suffix S] [--ip A/P --gateway G --dns X,Y]
        set the host name and network settings of the disk's installed systems, offline
        (Linux, Windows: img/identity_apply.py, docs/identity.md)

DISK is a block device or a disk image file. A device's partition table counts in its own
logical sectors (512 or 4096 bytes, asked of the kernel); a disk image file has none to ask for:
`--sector-size 512|4096` says it (default 512). A restore onto a disk whose sectors differ from
the image's converts the table where it can and refuses, writing nothing, where it cannot.

With --server: --token, --token-file or $PREBOOT_TOKEN is the capability img presents;
--server-pin SHA256 (or $PREBOOT_SERVER_PIN) or --server-ca FILE makes it talk TLS and trust only
that certificate, or certificates that CA signed (docs/security.md).

Exit status: 0 done, 1 failed (the message says why and whether the disk was changed), 2 usage,
3 restored, but --grow could not grow the last partition's filesystem (errors.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common.imaging.filesets import MAX_SETS, FilesetError, build
from common.imaging.imagefile import DEFAULT_LEVEL
from common.imaging.imageformat import ImageFormatError

from . import auto, identity_cmd, isdcmd, local, results, serverops, session
from .credentials import access_arguments
from .disklayout import SECTOR_SIZES, DiskLayoutError
from .errors import (EXIT_FAILED, EXIT_NOT_GROWN, EXIT_OK, EXIT_USAGE, AddonError, DiskError,
                     Failure, IdentityError, IsdError,
                     RestoreError)

THREADS_HELP = "worker threads for reading, checking and (de)compressing chunks (default 2)"
EXIT_CODES = f"""exit status:
  {EXIT_OK}  done
  {EXIT_FAILED}  failed; the message says why and whether the disk was changed
  {EXIT_USAGE}  bad arguments
  {EXIT_NOT_GROWN}  restored completely, but --grow could not grow the last partition's
     filesystem (its entry was grown; the data is intact; the message says why)"""

# Only arguments here: each command runs a workflow (local.py on files, serverops.py with a
# server, auto.py, results.py). Each workflow imports the modules only it needs (make, add-ons,
# the used-blocks probe) where it runs: the process start is part of every restore's time.


FILESET_HELP = ("declare a file set: NAME:PATTERN[,PATTERN...], each PATTERN a partition "
                "number and a glob from that filesystem's root, e.g. "
                "'lean:2:/home/*/Downloads,2:/var/cache/**' (* ? [...] within a name, ** any "
                f"depth); repeatable: sets 2 to {MAX_SETS} in order (set 1 is everything)")


def cmd_make(args: argparse.Namespace) -> int:
    args.filesets = build(args.fileset)       # FilesetError before the disk is read
    return serverops.make(args) if args.server else local.make(args)


def _fileset_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SETS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a file set number 1 to {MAX_SETS}")
    return int(text)


def cmd_restore(args: argparse.Namespace) -> int:
    return serverops.restore(args) if args.server else local.restore(args)


def cmd_addon_make(args: argparse.Namespace) -> int:
    return serverops.addon_make(args) if args.server else local.addon_make(args)


def cmd_addon_apply(args: argparse.Namespace) -> int:
    return serverops.addon_apply(args) if args.server else local.addon_apply(args)


def _image_arguments(parser: argparse.ArgumentParser, making: bool = False) -> None:
    """The arguments every command that reads or writes one image takes."""
    parser.add_argument("image", help="an image file, or with --server the image's path there")
    parser.add_argument("--server", help="HOST[:PORT] of an imaging server (port 998)")
    access_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help=THREADS_HELP)
    if making:
        parser.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                            help=f"zstd level (1-19, default {DEFAULT_LEVEL})")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an image file that exists (without --server)")


def _disk_arguments(parser: argparse.ArgumentParser) -> None:
    """--disk and, for a disk image file, the logical sector size its table counts in."""
    parser.add_argument("--disk", required=True, help="a block device or a disk image file")
    parser.add_argument("--sector-size", type=int, choices=SECTOR_SIZES, metavar="512|4096",
                        help="a disk image file's logical sector size (default 512); a block "
                             "device's own is asked of the kernel")


def _addon_parser(commands: Any) -> None:
    addon = commands.add_parser("addon", help="make or apply add-on images")
    actions = addon.add_subparsers(dest="addon_command", required=True)
    make = actions.add_parser("make", help="an add-on image of a directory tree")
    make.add_argument("--from", dest="source", required=True, metavar="DIR",
                      help="the directory tree whose files the add-on image holds")
    _image_arguments(make, making=True)
    make.set_defaults(run=cmd_addon_make)
    apply = actions.add_parser("apply", help="lay an add-on image onto a partition of a disk")
    _disk_arguments(apply)
    apply.add_argument("--partition", type=int, metavar="N",
                       help="the partition (default: the first one whose filesystem img "
                            "can write)")
    _image_arguments(apply)
    apply.set_defaults(run=cmd_addon_apply)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="img", description="the imaging engine", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="take a base image of a disk")
    _disk_arguments(make)
    _image_arguments(make, making=True)
    make.add_argument("--fileset", action="append", default=[], metavar="SPEC",
                      help=FILESET_HELP)
    make.set_defaults(run=cmd_make)
    restore = commands.add_parser("restore", help="put a base image down on a disk")
    _disk_arguments(restore)
    _image_arguments(restore)
    restore.add_argument("--grow", action="store_true",
                         help="on a larger disk, grow the last partition's table entry and "
                              "its filesystem to fill it (ext2/3/4, XFS, btrfs, NTFS, FAT32; "
                              "any other filesystem is left at its size)")
    restore.add_argument("--shrink", action="store_true",
                         help="on a smaller disk, shrink the filesystem(s) at the end to fit "
                              "(ext2/3/4, NTFS, FAT)")
    restore.add_argument("--scratch", metavar="DIR",
                         help="where --shrink keeps its scratch files (about the partition's "
                              "used size; default: the temporary directory)")
    restore.add_argument("--addon", action="append", default=[], metavar="PATH",
                         help="an add-on image to apply after the base image (repeatable; "
                              "a file, or with --server a path there)")
    restore.add_argument("--fileset", type=_fileset_number, default=1, metavar="N",
                         help="the image's file set to restore (default 1: everything); the "
                              "paths set N leaves out are removed after the restore and each "
                              "filesystem checked (img show lists an image's sets)")
    restore.set_defaults(run=cmd_restore)
    _addon_parser(commands)
    ask = commands.add_parser("auto", help="ask an imaging server what to do, and do it")
    _disk_arguments(ask)
    ask.add_argument("--server", required=True, help="HOST[:PORT] (port 998)")
    access_arguments(ask)
    ask.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE",
                     help="override a machine fact (mac, ram_mb, manufacturer, ...)")
    ask.add_argument("--grow", action="store_true",
                     help="on a restore, grow the last partition and its filesystem to fill "
                          "a larger disk")
    ask.add_argument("--scratch", metavar="DIR",
                     help="where a restore the server asks to shrink keeps its scratch files "
                          "(default: the temporary directory)")
    ask.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                     help=f"when the server asks for an image: zstd level (1-19, default "
                          f"{DEFAULT_LEVEL})")
    ask.add_argument("--threads", type=int, default=2, help=THREADS_HELP)
    ask.set_defaults(run=auto.run)
    session.add_parser(commands)
    isdcmd.add_parser(commands, SECTOR_SIZES)
    identity_cmd.add_parser(commands, _disk_arguments)
    verify = commands.add_parser("verify", help="check every chunk of an image")
    verify.add_argument("image", help="the image file to check")
    verify.add_argument("--threads", type=int, default=2, help=THREADS_HELP)
    verify.set_defaults(run=local.verify)
    show = commands.add_parser("show", help="what an image's header says, file sets included")
    show.add_argument("image", help="the image file")
    show.set_defaults(run=local.show)
    dump = commands.add_parser("dump", help="disks and partitions")
    _disk_arguments(dump)
    dump.set_defaults(run=local.dump)
    info = commands.add_parser("info", help="the hardware this machine reports")
    info.add_argument("--json", action="store_true",
                      help="print the facts as one JSON object (default: one per line)")
    info.set_defaults(run=results.info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RestoreError as exc:
        print(f"img: {exc} (nothing was written)", file=sys.stderr)
        return 1
    except (AddonError, DiskError, Failure, IdentityError, IsdError) as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    except (ImageFormatError, DiskLayoutError, FilesetError) as exc:
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
