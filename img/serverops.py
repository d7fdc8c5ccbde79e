"""img with an imaging server: open an image there following 307 referrals (at most MAX_HOPS),
restore from it, make onto it, make and apply add-on images there, and report each result.
The manual-mode commands (`img make|restore|addon ... --server`) are here; `img auto`
(auto.py) runs the same operations in auto mode.

Every failure is a Failure whose one-line message names the server, what failed and whether
the disk was changed; the commands print it, report it, and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator

from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import ImageFormatError
from common.imaging.protocol import split_server

from .client import ImagingClient, Referral, ServerError, reports_to
from .credentials import NO_ACCESS, ServerAccess, server_access
from .disklayout import DiskLayoutError
from .errors import EXIT_FAILED, AddonError, DiskError, Failure, RestoreError
from .local import apply_one, grow_status, print_grown, print_shrunk, restore_notes
from .progress import Progress
from .remote import RemoteImage
from .restore import restore_image
from .results import identity, report, server_facts
from common.units import human_exact, ratio

MAX_HOPS = 3


def check_server(server: str) -> None:
    """A HOST[:PORT] img can connect to, or Failure."""
    try:
        split_server(server)
    except ValueError as exc:
        raise Failure(str(exc)) from None


def where(server: str, path: str) -> str:
    """An image's name in messages: //server/path, or the path itself when it already names
    its server (a //other/path the server will refer or deny)."""
    return path if path.startswith("//") else f"//{server}/{path}"


@contextlib.contextmanager
def remote_image(server: str, path: str, workstation: str, mode: str, what: str,
                 access: ServerAccess = NO_ACCESS
                 ) -> Iterator[tuple[str, RemoteImage, ImageReader]]:
    """The image //server/path open for reading, following 307 referrals (at most MAX_HOPS):
    (where it is, the remote file, its reader). Raises Failure when it cannot be opened."""
    for _hop in range(MAX_HOPS + 1):
        label = where(server, path)
        with ImagingClient(server, workstation, mode, access=access) as client:
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


@contextlib.contextmanager
def server_upload(server: str, path: str, workstation: str, mode: str, unchanged: str,
                  access: ServerAccess = NO_ACCESS) -> Iterator[tuple[str, Any]]:
    """A store onto //server/path under way, following 307 referrals: (where, the upload to
    write the image into). Any exception from the body aborts the upload (the server keeps
    nothing). `unchanged` ends the messages of failures before the first byte."""
    for _hop in range(MAX_HOPS + 1):
        label = where(server, path)
        client = ImagingClient(server, workstation, mode, access=access)
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


# ------------------------------------------------------------------ base images

def restore_remote(server: str, path: str, disk: str, grow: bool, threads: int,
                   workstation: str, mode: str, shrink: bool = False,
                   scratch: str | None = None, sector_size: int | None = None,
                   access: ServerAccess = NO_ACCESS, fileset: int = 1) -> tuple[str, Any]:
    """Restore //server/path onto disk, following 307 referrals; returns where the image came
    from (//server/path) and the RestoreResult. Raises Failure (also when the file set
    `fileset` could not be applied after a complete restore)."""
    with remote_image(server, path, workstation, mode, "restore of", access) as (
            label, remote, reader):
        batches = remote.plan(reader.entries())
        try:
            result = restore_image(reader, disk, grow=grow, threads=threads,
                                   progress=Progress("img restore"), shrink=shrink,
                                   scratch=scratch, sector_size=sector_size, fileset=fileset)
        except RestoreError as exc:
            raise Failure(f"restore of {label}: {exc}; the disk was not changed") from None
        except (ServerError, ImageFormatError, OSError) as exc:
            raise Failure(f"restore of {label} onto {disk} FAILED part-way: {exc}. The "
                          "disk was changed: it is incomplete and has no valid partition "
                          "table; restore again.") from None
    retried = f", {remote.retried} retried" if remote.retried else ""
    print(f"restored {label} onto {disk}: {human_exact(result.bytes_written)} in "
          f"{result.chunks} chunks, {remote.requests} requests in {batches} batches{retried}"
          f"{restore_notes(result)}")
    print_shrunk(result)
    print_grown(result)
    if result.fileset is not None:
        if result.fileset.failed:
            raise Failure(result.fileset.line())
        print(result.fileset.line())
    return label, result


def make_remote(server: str, path: str, disk: str, facts: dict[str, Any], level: int,
                threads: int, workstation: str, mode: str, sector_size: int | None = None,
                access: ServerAccess = NO_ACCESS, filesets: Any = None) -> str:
    """Make an image of disk straight onto //server/path (chunked PUT); raises Failure.
    filesets: the FileSets to declare (img make --fileset), None for none."""
    from common.imaging.filesets import FileSets
    from .make import make_image
    unchanged = " (the disk was not changed)"
    with server_upload(server, path, workstation, mode, unchanged, access) as (label, upload):
        try:
            stats, meta = make_image(disk, upload, source=facts, level=level, threads=threads,
                                     progress=Progress("img make"), sector_size=sector_size,
                                     filesets=filesets or FileSets())
            answer = upload.finish()
        except (ServerError, DiskError, DiskLayoutError) as exc:
            raise Failure(f"make onto {label} failed: {exc}{unchanged}") from None
    used = sum(s.get("used_bytes", 0) for s in meta["streams"])
    stored = answer.get("size")
    print(f"made {label}: {len(meta['streams'])} streams, {human_exact(used)} used, "
          f"{human_exact(stats.bytes_out)} sent (compression {ratio(used, stats.bytes_out)}), "
          f"{stats.chunks} chunks, {stats.seconds:.1f} s; the server stored "
          f"{human_exact(stored) if isinstance(stored, int) else '? bytes'}")
    return label


def server_operation(kind: str, args: argparse.Namespace, server: str, path: str,
                     facts: dict[str, Any], mode: str, report_to: str,
                     shrink: bool = False, access: ServerAccess = NO_ACCESS,
                     fileset: int = 0,
                     after_restore: Callable[[], str] | None = None) -> int:
    """A restore or make with the server, its result reported to report_to; shrink: the work
    answer asks a restore to shrink filesystems to fit a smaller disk (as --shrink does by
    hand); fileset: the work answer's file set (0: --fileset, else 1, the whole image). A restore
    whose grown filesystem could not be grown returns EXIT_NOT_GROWN (the restore itself is
    reported as done: the image is on the disk). after_restore runs after a restore that wrote
    the disk (img auto: apply the machine's identity); its text goes into the report's
    `identity` field, and a Failure it raises fails the operation."""
    workstation, _ = identity(facts)
    reports_to(report_to)
    operation = "download" if kind == "restore" else "upload"
    status = 0
    try:
        if kind == "restore":
            label, result = restore_remote(server, path, args.disk, args.grow, args.threads,
                                   workstation, mode,
                                   shrink=shrink or getattr(args, "shrink", False),
                                   scratch=getattr(args, "scratch", None),
                                   sector_size=args.sector_size, access=access,
                                   fileset=fileset or getattr(args, "fileset", None) or 1)
            status = grow_status(result)
            applied = after_restore() if after_restore is not None else ""
        else:
            label = make_remote(server, path, args.disk, facts, args.level, args.threads,
                                workstation, mode, args.sector_size, access,
                                getattr(args, "filesets", None))
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        report(report_to, facts, operation, path if server == report_to
               else where(server, path), str(exc), access=access)
        return 1
    report(report_to, facts, operation, label if server != report_to or
           not label.startswith(f"//{report_to}/") else path, "", access=access,
           applied_identity=applied if kind == "restore" else "")
    return status


# ------------------------------------------------------------------ add-on images

def apply_remote(server: str, path: str, disk: str, partition: int | None, threads: int,
                 workstation: str, mode: str, sector_size: int | None,
                 access: ServerAccess = NO_ACCESS) -> str:
    """Apply the add-on //server/path, following 307 referrals; returns where it came from."""
    with remote_image(server, path, workstation, mode, "add-on", access) as (
            label, remote, reader):
        remote.plan(reader.entries())
        apply_one(reader, label, disk, partition, threads, sector_size)
    return label


def apply_addons_remote(server: str, paths: list[str], disk: str, partition: int | None,
                        threads: int, facts: dict[str, Any], mode: str, report_to: str,
                        sector_size: int | None = None,
                        access: ServerAccess = NO_ACCESS) -> int:
    """Apply each add-on in order from server (a //other/path is fetched there), reporting
    each to report_to; the first failure stops the rest."""
    workstation, _ = identity(facts)
    reports_to(report_to)
    for path in paths:
        shown = path if server == report_to or path.startswith("//") else f"//{server}/{path}"
        try:
            label = apply_remote(server, path, disk, partition, threads, workstation, mode,
                                 sector_size, access)
        except Failure as exc:
            print(f"img: {exc}", file=sys.stderr)
            report(report_to, facts, "download", shown, str(exc), image_type="addon",
                   access=access)
            return 1
        at = label if not label.startswith(f"//{report_to}/") else shown
        report(report_to, facts, "download", at, "", image_type="addon", access=access)
    return 0


def make_addon_remote(server: str, path: str, source_dir: str, facts: dict[str, Any],
                      level: int, threads: int, workstation: str,
                      access: ServerAccess = NO_ACCESS) -> str:
    """An add-on image of source_dir straight onto //server/path; raises Failure."""
    from .addon import make_addon
    with server_upload(server, path, workstation, "manual", "", access) as (label, upload):
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


# ------------------------------------------------------------------ the manual-mode commands

def _manual_start(args: argparse.Namespace, disk: str
                  ) -> tuple[dict[str, Any], ServerAccess] | None:
    """The facts a manual-mode command reports with and the run's ServerAccess; None (the
    message printed) when the server name or an access option is bad."""
    try:
        check_server(args.server)
        return server_facts(disk, []), server_access(args)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return None


def restore(args: argparse.Namespace) -> int:
    """img restore --disk DISK --server HOST[:PORT] PATH [--addon PATH ...]."""
    started = _manual_start(args, args.disk)
    if started is None:
        return 1
    facts, access = started
    status = server_operation("restore", args, args.server, args.image, facts, "manual",
                              args.server, access=access)
    if status == EXIT_FAILED:
        return status
    return apply_addons_remote(args.server, args.addon, args.disk, None, args.threads, facts,
                               "manual", args.server, args.sector_size, access) or status


def make(args: argparse.Namespace) -> int:
    """img make --disk DISK --server HOST[:PORT] PATH."""
    started = _manual_start(args, args.disk)
    if started is None:
        return 1
    facts, access = started
    return server_operation("make", args, args.server, args.image, facts, "manual",
                            args.server, access=access)


def addon_make(args: argparse.Namespace) -> int:
    """img addon make --from DIR --server HOST[:PORT] PATH."""
    try:
        check_server(args.server)
        facts = server_facts("", [])
        workstation, _ = identity(facts)
        access = server_access(args)
        reports_to(args.server)
        label = make_addon_remote(args.server, args.image, args.source, facts, args.level,
                                  args.threads, workstation, access)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    shown = args.image if label.startswith(f"//{args.server}/") else label
    report(args.server, facts, "upload", shown, "", image_type="addon", access=access)
    return 0


def addon_apply(args: argparse.Namespace) -> int:
    """img addon apply --disk DISK [--partition N] --server HOST[:PORT] PATH."""
    started = _manual_start(args, args.disk)
    if started is None:
        return 1
    facts, access = started
    return apply_addons_remote(args.server, [args.image], args.disk, args.partition,
                               args.threads, facts, "manual", args.server, args.sector_size,
                               access)
