"""img, the imaging engine (python -m img).

    img make --disk DISK IMAGE          take a base image of DISK into the file IMAGE
    img restore --disk DISK IMAGE [--grow]   put IMAGE down on DISK (same size or larger)
    img restore --disk DISK IMAGE --shrink [--scratch DIR]   ... onto a smaller disk, shrinking
        the filesystem(s) at the end (ext2/3/4, NTFS, FAT) in scratch files under DIR first
    img make --disk DISK --server HOST[:PORT] PATH      ... onto an imaging server
    img restore --disk DISK --server HOST[:PORT] PATH [--grow]   ... from an imaging server
    img auto --disk DISK --server HOST[:PORT] [--fact KEY=VALUE ...]   ask the server what to do
    img verify IMAGE                    check every chunk of an image
    img addon make --from DIR IMAGE     an add-on image of the files under DIR
    img addon apply --disk DISK [--partition N] IMAGE   lay an add-on image onto a partition
        (both also with --server HOST[:PORT] PATH; `img restore ... --addon PATH` applies
        add-on images after the base image, from the same place)
    img dump --disk DISK                the partition table and each partition's filesystem
    img info                            what this machine reports to the imaging server

DISK is a block device or a disk image file. A device's partition table counts in its own
logical sectors (512 or 4096 bytes, asked of the kernel); a disk image file has none to ask for:
`--sector-size 512|4096` says it (default 512). A restore onto a disk whose sectors differ from
the image's converts the table where it can and refuses, writing nothing, where it cannot. Exit status: 0 done, 1 failed (the message says
why and whether the disk was changed), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Iterator

from img.disklayout import SECTOR_SIZES, DiskLayoutError
from common.machine import ATTRIBUTE_KINDS, normalize_mac
from common.imaging.imagefile import DEFAULT_LEVEL, ImageReader
from common.imaging.imageformat import ImageFormatError

from .client import ImagingClient, Referral, ServerError, split_server
from .errors import AddonError, DiskError, RestoreError
from .hardware import machine_facts
from .remote import RemoteImage
from .progress import Progress
from .restore import restore_image

# Each command imports the modules only it needs (make, restore, add-ons, the used-blocks
# probe) where it runs: the process start is part of every restore's time.


def cmd_make(args: argparse.Namespace) -> int:
    if args.server:
        return cmd_make_remote(args)
    from .make import make_image_file
    if os.path.exists(args.image) and not args.overwrite:
        print(f"img: {args.image} exists (use --overwrite to replace it)", file=sys.stderr)
        return 1
    stats, meta = make_image_file(args.disk, args.image, source=machine_facts(),
                                  level=args.level, threads=args.threads,
                                  progress=Progress("img make"), sector_size=args.sector_size)
    used = sum(s.get("used_bytes", 0) for s in meta["streams"])
    print(f"made {args.image}: {len(meta['streams'])} streams, {used} bytes used, "
          f"{stats.bytes_out} bytes stored, {stats.chunks} chunks, {stats.seconds:.1f} s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.server:
        return cmd_restore_remote(args)
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        try:
            result = restore_image(reader, args.disk, grow=args.grow, threads=args.threads,
                                   shrink=args.shrink, scratch=args.scratch,
                                   progress=Progress("img restore"),
                                   sector_size=args.sector_size)
        except (ImageFormatError, OSError) as exc:
            print(f"img: restore of {args.disk} FAILED part-way: {exc}. The disk is "
                  "incomplete and has no valid partition table; restore again.", file=sys.stderr)
            return 1
    print(f"restored {args.image} onto {args.disk}: {result.bytes_written} bytes in "
          f"{result.chunks} chunks{_how(result)}")
    _print_shrunk(result)
    return _apply_addons_local(args.addon, args.disk, None, args.threads, args.sector_size)


# ------------------------------------------------------------------ server modes

MAX_HOPS = 3
MiB = 1 << 20


class Failure(Exception):
    """A server-mode operation that failed; str() is the one-line message (server, what failed,
    whether the disk was changed)."""


def _facts(disk_path: str, overrides: list[str]) -> dict[str, Any]:
    facts = {k: v for k, v in machine_facts().items() if k in ATTRIBUTE_KINDS}
    try:
        from .disk import Disk
        with Disk.open(disk_path) as disk:
            facts["disk_mb"] = disk.size // MiB
    except OSError:
        pass
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ATTRIBUTE_KINDS:
            raise Failure(f"--fact {item}: expected KEY=VALUE with KEY one of "
                          f"{', '.join(ATTRIBUTE_KINDS)}")
        facts[key] = value.strip()
    return facts


def _print_disk(path: str, sector_size: int | None) -> None:
    """The disk as img sees it, for the console of an unattended machine."""
    from .disk import Disk
    try:
        with Disk.open(path, sector_size=sector_size) as disk:
            print(f"disk {path}: {disk.size} bytes, {disk.sector_size}-byte logical sectors")
    except (OSError, DiskError) as exc:
        print(f"img: warning: disk {path}: {exc}", file=sys.stderr)


def _where(server: str, path: str) -> str:
    """An image's name in messages: //server/path, or the path itself when it already names
    its server (a //other/path the server will refer or deny)."""
    return path if path.startswith("//") else f"//{server}/{path}"


def _identity(facts: dict[str, Any]) -> tuple[str, str]:
    mac = normalize_mac(str(facts.get("mac") or "")) or ""
    return str(facts.get("hostname") or mac), mac


def _report(server: str, facts: dict[str, Any], operation: str, image: str, error: str,
            image_type: str = "base") -> None:
    """POST /v1/results; a failure to report is a warning, not a failed operation."""
    workstation, mac = _identity(facts)
    if not workstation and not mac:
        print(f"img: warning: no workstation name or MAC to report the result to {server}",
              file=sys.stderr)
        return
    body = {"workstation": workstation, "mac": mac, "operation": operation,
            "image_type": image_type, "image_path": image,
            "status": "failure" if error else "success", "error_message": error[:4000]}
    try:
        with ImagingClient(server, workstation, timeout=15) as client:
            answer = client.result(body)
        if answer.get("cleared"):
            print(f"{server}: the workstation's 'image on next boot' flag was cleared")
    except (ServerError, ValueError) as exc:
        print(f"img: warning: result not reported: {exc}", file=sys.stderr)


def _how(result: Any) -> str:
    """What a restore did to the table besides writing it: grown, converted."""
    notes = []
    if result.grown:
        notes.append("last partition grown to fill the disk")
    if result.converted_from:
        notes.append(f"partition table converted from {result.converted_from}- to "
                     f"{result.layout.sector_size}-byte sectors")
    return f" ({'; '.join(notes)})" if notes else ""


def _print_shrunk(result: Any) -> None:
    """What --shrink cut: one line per partition, old size -> new size."""
    for job in result.shrunk:
        note = "; Windows will check it once on its next boot" if job.filesystem == "ntfs" else ""
        print(f"shrunk partition {job.partition} ({job.filesystem}): {job.old_size // MiB} MiB "
              f"-> {job.new_size // MiB} MiB{note}")


@contextlib.contextmanager
def _remote_image(server: str, path: str, workstation: str, mode: str, what: str
                  ) -> Iterator[tuple[str, RemoteImage, ImageReader]]:
    """The image //server/path open for reading, following 307 referrals (at most MAX_HOPS):
    (where it is, the remote file, its reader). Raises Failure when it cannot be opened."""
    for _hop in range(MAX_HOPS + 1):
        label = _where(server, path)
        with ImagingClient(server, workstation, mode) as client:
            try:
                remote = RemoteImage(client, path, log=lambda m: print(m, file=sys.stderr))
                reader = ImageReader(remote, label)
            except Referral as exc:
                print(f"img: {exc}")
                server, path = exc.server, exc.path
                continue
            except (ServerError, ImageFormatError) as exc:
                raise Failure(f"{what} {label} failed: {exc}; the disk was not "
                              "changed") from None
            with remote:
                yield label, remote, reader
            return
    raise Failure(f"{what} {path}: more than {MAX_HOPS} referrals; the disk was not changed")


def _restore_remote(server: str, path: str, disk: str, grow: bool, threads: int,
                    workstation: str, mode: str, shrink: bool = False,
                    scratch: str | None = None, sector_size: int | None = None) -> str:
    """Restore //server/path onto disk, following 307 referrals; returns where the image came
    from (//server/path). Raises Failure."""
    with _remote_image(server, path, workstation, mode, "restore of") as (label, remote, reader):
        batches = remote.plan(reader.entries())
        try:
            result = restore_image(reader, disk, grow=grow, threads=threads,
                                   progress=Progress("img restore"), shrink=shrink,
                                   scratch=scratch, sector_size=sector_size)
        except RestoreError as exc:
            raise Failure(f"restore of {label}: {exc}; the disk was not changed") from None
        except (ServerError, ImageFormatError, OSError) as exc:
            raise Failure(f"restore of {label} onto {disk} FAILED part-way: {exc}. The "
                          "disk was changed: it is incomplete and has no valid partition "
                          "table; restore again.") from None
    retried = f", {remote.retried} retried" if remote.retried else ""
    print(f"restored {label} onto {disk}: {result.bytes_written} bytes in {result.chunks} "
          f"chunks, {remote.requests} requests in {batches} batches{retried}{_how(result)}")
    _print_shrunk(result)
    return label


@contextlib.contextmanager
def _server_upload(server: str, path: str, workstation: str, mode: str, unchanged: str
                   ) -> Iterator[tuple[str, Any]]:
    """A store onto //server/path under way, following 307 referrals: (where, the upload to
    write the image into). Any exception from the body aborts the upload (the server keeps
    nothing). `unchanged` ends the messages of failures before the first byte."""
    for _hop in range(MAX_HOPS + 1):
        label = _where(server, path)
        client = ImagingClient(server, workstation, mode)
        try:
            upload = client.upload(path)
        except Referral as exc:
            print(f"img: {exc}")
            server, path = exc.server, exc.path
            continue
        except ServerError as exc:
            raise Failure(f"make onto {label} failed: {exc}{unchanged}") from None
        try:
            yield label, upload
        except BaseException:
            upload.abort()
            raise
        return
    raise Failure(f"make onto {path}: more than {MAX_HOPS} referrals{unchanged}")


def _make_remote(server: str, path: str, disk: str, facts: dict[str, Any], level: int,
                 threads: int, workstation: str, mode: str, sector_size: int | None = None
                 ) -> str:
    """Make an image of disk straight onto //server/path (chunked PUT); raises Failure."""
    from .make import make_image
    unchanged = " (the disk was not changed)"
    with _server_upload(server, path, workstation, mode, unchanged) as (label, upload):
        try:
            stats, meta = make_image(disk, upload, source=facts, level=level, threads=threads,
                                     progress=Progress("img make"), sector_size=sector_size)
            answer = upload.finish()
        except (ServerError, DiskError, DiskLayoutError) as exc:
            raise Failure(f"make onto {label} failed: {exc}{unchanged}") from None
    print(f"made {label}: {len(meta['streams'])} streams, {stats.bytes_out} bytes sent, "
          f"{stats.chunks} chunks, {stats.seconds:.1f} s; the server stored "
          f"{answer.get('size', '?')} bytes")
    return label


def _server_operation(kind: str, args: argparse.Namespace, server: str, path: str,
                      facts: dict[str, Any], mode: str, report_to: str,
                      shrink: bool = False) -> int:
    """A restore or make with the server; shrink: the work answer asks a restore to shrink
    filesystems to fit a smaller disk (as --shrink does by hand)."""
    workstation, _ = _identity(facts)
    operation = "download" if kind == "restore" else "upload"
    try:
        if kind == "restore":
            label = _restore_remote(server, path, args.disk, args.grow, args.threads,
                                    workstation, mode,
                                    shrink=shrink or getattr(args, "shrink", False),
                                    scratch=getattr(args, "scratch", None),
                                    sector_size=args.sector_size)
        else:
            label = _make_remote(server, path, args.disk, facts, args.level, args.threads,
                                 workstation, mode, args.sector_size)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        _report(report_to, facts, operation, path if server == report_to
                else _where(server, path), str(exc))
        return 1
    _report(report_to, facts, operation, label if server != report_to or
            not label.startswith(f"//{report_to}/") else path, "")
    return 0


def _check_server(server: str) -> None:
    try:
        split_server(server)
    except ValueError as exc:
        raise Failure(str(exc)) from None


def cmd_restore_remote(args: argparse.Namespace) -> int:
    try:
        _check_server(args.server)
        facts = _facts(args.disk, [])
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    status = _server_operation("restore", args, args.server, args.image, facts, "manual",
                               args.server)
    if status:
        return status
    return _apply_addons_remote(args.server, args.addon, args.disk, None, args.threads, facts,
                                "manual", args.server, args.sector_size)


def cmd_make_remote(args: argparse.Namespace) -> int:
    try:
        _check_server(args.server)
        facts = _facts(args.disk, [])
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    return _server_operation("make", args, args.server, args.image, facts, "manual",
                             args.server)


def cmd_auto(args: argparse.Namespace) -> int:
    try:
        _check_server(args.server)
        facts = _facts(args.disk, args.fact)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    _print_disk(args.disk, args.sector_size)
    workstation, _ = _identity(facts)
    server = args.server
    try:
        with ImagingClient(server, workstation, "auto") as client:
            answer = client.work(facts, "auto")
    except ServerError as exc:
        print(f"img: work request to {server} failed: {exc}; the disk was not changed",
              file=sys.stderr)
        return 1
    work, reason = answer.get("work"), answer.get("reason", "")
    image = answer.get("image", "")
    shrink = answer.get("shrink") is True
    if work == "referral":
        action, other, path = answer.get("action"), answer.get("server"), answer.get("path")
        print(f"{server}: referral: {action} //{other}/{path} ({reason})")
        if action not in ("restore", "make") or not other or not path:
            print(f"img: {server} sent a referral img cannot follow ({answer}); the disk "
                  "was not changed", file=sys.stderr)
            return 1
        status = _server_operation(action, args, other, path, facts, "auto", args.server,
                                   shrink)
        if status or action != "restore":
            return status
        return _apply_addons_remote(other, _addon_paths(answer), args.disk, None, args.threads,
                                    facts, "auto", args.server, args.sector_size)
    fit = " (shrink to fit)" if shrink else ""
    print(f"{server}: {work}{' ' + image if image else ''}{fit} ({reason})")
    if work == "none":
        print(f"no work for this machine: {reason}")
        return 0
    if work == "restore":
        status = _server_operation("restore", args, server, image, facts, "auto", args.server,
                                   shrink)
        if status:
            return status
        return _apply_addons_remote(server, _addon_paths(answer), args.disk, None, args.threads,
                                    facts, "auto", args.server, args.sector_size)
    if work == "make":
        return _server_operation("make", args, server, image, facts, "auto", args.server)
    print(f"img: {server} asks for '{work}', which this engine does not do yet; the disk "
          "was not changed", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ add-on images

def _addon_paths(answer: dict[str, Any]) -> list[str]:
    addons = answer.get("addons") or []
    return [str(addon) for addon in addons] if isinstance(addons, list) else []


def _apply(reader: ImageReader, label: str, disk: str, partition: int | None,
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
          f"({result.target.filesystem}): {result.files} files, {result.bytes} bytes")


def _apply_addons_local(images: list[str], disk: str, partition: int | None,
                        threads: int, sector_size: int | None) -> int:
    for image in images:
        try:
            with open(image, "rb") as handle:
                _apply(ImageReader(handle, image), image, disk, partition, threads, sector_size)
        except Failure as exc:
            print(f"img: {exc}", file=sys.stderr)
            return 1
        except (ImageFormatError, OSError) as exc:
            print(f"img: add-on {image}: {exc}; the disk was not changed", file=sys.stderr)
            return 1
    return 0


def _apply_remote(server: str, path: str, disk: str, partition: int | None, threads: int,
                  workstation: str, mode: str, sector_size: int | None) -> str:
    """Apply the add-on //server/path, following 307 referrals; returns where it came from."""
    with _remote_image(server, path, workstation, mode, "add-on") as (label, remote, reader):
        remote.plan(reader.entries())
        _apply(reader, label, disk, partition, threads, sector_size)
    return label


def _apply_addons_remote(server: str, paths: list[str], disk: str, partition: int | None,
                         threads: int, facts: dict[str, Any], mode: str, report_to: str,
                         sector_size: int | None = None) -> int:
    """Apply each add-on in order from server (a //other/path is fetched there), reporting
    each to report_to; the first failure stops the rest."""
    workstation, _ = _identity(facts)
    for path in paths:
        shown = path if server == report_to or path.startswith("//") else f"//{server}/{path}"
        try:
            label = _apply_remote(server, path, disk, partition, threads, workstation, mode,
                                  sector_size)
        except Failure as exc:
            print(f"img: {exc}", file=sys.stderr)
            _report(report_to, facts, "download", shown, str(exc), image_type="addon")
            return 1
        where = label if not label.startswith(f"//{report_to}/") else shown
        _report(report_to, facts, "download", where, "", image_type="addon")
    return 0


def _make_addon_remote(server: str, path: str, source_dir: str, facts: dict[str, Any],
                       level: int, threads: int, workstation: str) -> str:
    from .addon import make_addon
    with _server_upload(server, path, workstation, "manual", "") as (label, upload):
        try:
            stats, meta = make_addon(source_dir, upload, source=facts, level=level,
                                     threads=threads)
            answer = upload.finish()
        except (ServerError, AddonError) as exc:
            raise Failure(f"make onto {label} failed: {exc}") from None
    print(f"made add-on {label}: {meta['files']['count']} files, "
          f"{meta['files']['bytes']} bytes, {stats.bytes_out} bytes sent; the server "
          f"stored {answer.get('size', '?')} bytes")
    return label


def cmd_addon_make(args: argparse.Namespace) -> int:
    if not args.server:
        if os.path.exists(args.image) and not args.overwrite:
            print(f"img: {args.image} exists (use --overwrite to replace it)", file=sys.stderr)
            return 1
        from .addon import make_addon_file
        stats, meta = make_addon_file(args.source, args.image, source=machine_facts(),
                                      level=args.level, threads=args.threads)
        print(f"made add-on {args.image}: {meta['files']['count']} files, "
              f"{meta['files']['bytes']} bytes, {stats.bytes_out} bytes stored")
        return 0
    try:
        _check_server(args.server)
        facts = _facts("", [])
        workstation, _ = _identity(facts)
        label = _make_addon_remote(args.server, args.image, args.source, facts, args.level,
                                   args.threads, workstation)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    shown = args.image if label.startswith(f"//{args.server}/") else label
    _report(args.server, facts, "upload", shown, "", image_type="addon")
    return 0


def cmd_addon_apply(args: argparse.Namespace) -> int:
    if not args.server:
        return _apply_addons_local([args.image], args.disk, args.partition, args.threads,
                                   args.sector_size)
    try:
        _check_server(args.server)
        facts = _facts(args.disk, [])
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    return _apply_addons_remote(args.server, [args.image], args.disk, args.partition,
                                args.threads, facts, "manual", args.server, args.sector_size)


def _image_arguments(parser: argparse.ArgumentParser, making: bool = False) -> None:
    """The arguments every command that reads or writes one image takes."""
    parser.add_argument("image", help="an image file, or with --server the image's path there")
    parser.add_argument("--server", help="HOST[:PORT] of an imaging server (port 998)")
    parser.add_argument("--threads", type=int, default=2)
    if making:
        parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="zstd level (1-19)")
        parser.add_argument("--overwrite", action="store_true")


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
    make.add_argument("--from", dest="source", required=True, metavar="DIR")
    _image_arguments(make, making=True)
    make.set_defaults(run=cmd_addon_make)
    apply = actions.add_parser("apply", help="lay an add-on image onto a partition of a disk")
    _disk_arguments(apply)
    apply.add_argument("--partition", type=int, metavar="N",
                       help="the partition (default: the first one whose filesystem img "
                            "can write)")
    _image_arguments(apply)
    apply.set_defaults(run=cmd_addon_apply)


def cmd_verify(args: argparse.Namespace) -> int:
    with open(args.image, "rb") as handle:
        reader = ImageReader(handle, args.image)
        problems = reader.verify(threads=args.threads)
    for problem in problems:
        print(f"img: {problem}", file=sys.stderr)
    if problems:
        return 1
    from .addon import describe
    if reader.metadata.get("type") == "addon":
        kind = f"{describe(reader.metadata)}; "
    else:
        disk = reader.metadata.get("disk") or {}
        kind = (f"base image of a {disk.get('size', '?')}-byte disk with "
                f"{disk.get('sector_size', '?')}-byte sectors; ")
    print(f"{args.image}: {kind}{len(reader.index.entries)} chunks, all sound")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
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
    _disk_arguments(make)
    _image_arguments(make, making=True)
    make.set_defaults(run=cmd_make)
    restore = commands.add_parser("restore", help="put a base image down on a disk")
    _disk_arguments(restore)
    _image_arguments(restore)
    restore.add_argument("--grow", action="store_true",
                         help="grow the last partition's table entry to fill a larger disk")
    restore.add_argument("--shrink", action="store_true",
                         help="on a smaller disk, shrink the filesystem(s) at the end to fit "
                              "(ext2/3/4, NTFS, FAT)")
    restore.add_argument("--scratch", metavar="DIR",
                         help="where --shrink keeps its scratch files (about the partition's "
                              "used size; default: the temporary directory)")
    restore.add_argument("--addon", action="append", default=[], metavar="PATH",
                         help="an add-on image to apply after the base image (repeatable; "
                              "a file, or with --server a path there)")
    restore.set_defaults(run=cmd_restore)
    _addon_parser(commands)
    auto = commands.add_parser("auto", help="ask an imaging server what to do, and do it")
    _disk_arguments(auto)
    auto.add_argument("--server", required=True, help="HOST[:PORT] (port 998)")
    auto.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE",
                      help="override a machine fact (mac, ram_mb, manufacturer, ...)")
    auto.add_argument("--grow", action="store_true",
                      help="on a restore, grow the last partition to fill a larger disk")
    auto.add_argument("--scratch", metavar="DIR",
                      help="where a restore the server asks to shrink keeps its scratch files "
                           "(default: the temporary directory)")
    auto.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    auto.add_argument("--threads", type=int, default=2)
    auto.set_defaults(run=cmd_auto)
    verify = commands.add_parser("verify", help="check every chunk of an image")
    verify.add_argument("image")
    verify.add_argument("--threads", type=int, default=2)
    verify.set_defaults(run=cmd_verify)
    dump = commands.add_parser("dump", help="disks and partitions")
    _disk_arguments(dump)
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
    except (AddonError, DiskError) as exc:
        print(f"img: {exc}", file=sys.stderr)
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
