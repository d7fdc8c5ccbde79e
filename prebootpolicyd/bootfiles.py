"""Boot files over HTTP: GET and HEAD /boot/<path> serve the files under BootFilesRoot (tftpd's
Root by default), read-only, so iPXE fetches the imaging kernel and initrd (about 29 MB) over
HTTP instead of lock-step TFTP (one round trip per 1.4 KB block).

Why here: policyd is the HTTP service iPXE already talks to (boot.ipxe, /policy); its listener,
AllowedClients, TLS option, status socket and logs serve the files too, and one port stays open
instead of two. This module owns the config keys (bootfile_keys), the route, the limits and the
counters; server.py only adds the route and merges the counters.

A request goes: bootpath.parse_path (pure: '..', absolute, backslash, NUL ... refused) ->
open_inside (the file system: a symlink that leads out of the root is refused, the opened
descriptor is proven inside the root through /proc/self/fd) -> bootpath.parse_range (206/416)
-> the bytes with sendfile(2): what the socket buffer takes at once from the handler, the rest
from the one sender thread (filesender.py: a download costs the event loop one hand-over and
one hand-back), under an idle watch: a transfer whose client takes nothing for
BootFileIdleTimeout seconds is cut off. Over TLS the file is read
and written through the response instead (the transport encrypts). At most
MaxBootFileTransfers GETs run at once; more get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiohttp import web

from common.daemon.config import Key
from common.daemon.counters import StatusCounters

from .bootpath import UNSATISFIABLE, ByteRange, Refusal, parse_path, parse_range
from .filesender import Download, FileSenders, Stalled

PREFIX = "/boot/"
ROUTE = "/boot/{path:.*}"
DEFAULT_ROOT = "/srv/tftp"
RETRY_AFTER_S = 5                # told to a client refused with 503

log = logging.getLogger("preboot.policyd.bootfiles")


def bootfile_keys() -> tuple[Key, ...]:
    return (
        Key("BootFilesRoot", "path", DEFAULT_ROOT,
            "Folder served read-only over HTTP under /boot/ (the imaging kernel and initrd, "
            "any large boot file): tftpd's Root, so one folder holds every boot file. Nothing "
            "outside it is read; a symlink that leads out of it is refused."),
        Key("MaxBootFileTransfers", "integer(min=0, max=100000)", "1000",
            "Boot file downloads at once; more get 503 (iPXE does not retry: such a machine "
            "boots its disk, so allow every machine that boots at once). 0: /boot/ is off "
            "(404)."),
        Key("BootFileIdleTimeout", "integer(min=1, max=3600)", "30",
            "Seconds a boot file download may go without the client taking any of it; then "
            "the connection is closed."),
    )


@dataclass(frozen=True)
class BootFileSettings:
    root: str
    max_transfers: int               # 0: off
    idle_timeout_s: int


def bootfile_settings(values: dict[str, Any]) -> BootFileSettings:
    return BootFileSettings(os.path.abspath(values["BootFilesRoot"]),
                            values["MaxBootFileTransfers"], values["BootFileIdleTimeout"])


@dataclass
class BootFileCounters(StatusCounters):
    """What `zmgmcast -status` shows for /boot/ (all start at zero):

    boot_files_sent        downloads completed (whole files and ranges)
    boot_bytes_sent        their bytes
    boot_files_refused     requests refused: a path that would leave the root or is malformed
                           (400, 403, 414), a range that cannot be served (416)
    boot_files_not_found   404 (no such file, or /boot/ off)
    boot_files_busy        refused with 503: MaxBootFileTransfers downloads were running
    boot_files_aborted     downloads cut short: the client went away or stalled
    boot_transfers_active  downloads running now (a gauge, not a counter)
    """

    boot_files_sent: int = 0
    boot_bytes_sent: int = 0
    boot_files_refused: int = 0
    boot_files_not_found: int = 0
    boot_files_busy: int = 0
    boot_files_aborted: int = 0
    boot_transfers_active: int = 0


ROOT_RECHECK_S = 1.0     # how long /boot/ trusts its last look at where BootFilesRoot leads


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# File systems whose open() is answered from the kernel's own memory or a local disk; on any
# other (nfs, cifs, 9p, ceph, fuse.*, ...) /boot/ opens its files in a thread.
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs",
                                "f2fs", "jfs", "reiserfs", "bcachefs", "zfs", "overlay",
                                "squashfs", "erofs", "iso9660", "vfat", "exfat", "ntfs3"})


def on_local_file_system(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether PATH lies on a local file system (LOCAL_FILE_SYSTEMS), by the longest mount
    point above it in MOUNTINFO; False when that cannot be told."""
    real = os.path.realpath(path)
    best, fstype = "", None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                point = fields[4].replace("\\040", " ")
                if _within(point, real) and len(point) >= len(best):
                    best, fstype = point, line.split(" - ", 1)[1].split()[0]
    except OSError:
        return False
    return fstype in LOCAL_FILE_SYSTEMS


def open_inside(root: str, name: str, real_root: str | None = None
                ) -> tuple[int, os.stat_result] | Refusal:
    """Open NAME (from parse_path) under ROOT for reading: the descriptor and its stat, or why
    not. Symlinks inside the root are followed while they stay inside. REAL_ROOT is ROOT as
    os.path.realpath resolved it, when the caller has that at hand.

    The kernel resolves the path once, into an O_PATH descriptor (which opens nothing: a
    device or FIFO is not touched); where that descriptor leads (/proc/self/fd) must be inside
    the root and a regular file; then that same inode is opened for reading through it, so a
    symlink swapped in meanwhile changes nothing. (os.path.realpath, an lstat per component
    in Python, was a seventh of a boot file's CPU.)"""
    if real_root is None:
        real_root = os.path.realpath(root)
    try:
        path_fd = os.open(os.path.join(real_root, name), os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return Refusal(404, "not found")
    except PermissionError:
        return Refusal(403, "permission denied")
    except OSError as exc:           # ELOOP, ENOTDIR, ENAMETOOLONG ...
        return Refusal(403, f"cannot open ({exc.strerror})")
    try:
        through = f"/proc/self/fd/{path_fd}"
        if not _within(real_root, os.readlink(through)):
            return Refusal(403, "path leads outside the boot files root")
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return Refusal(403, "not a regular file")
        fd = os.open(through, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        return Refusal(403, "permission denied")
    except OSError as exc:
        return Refusal(403, f"cannot open ({exc.strerror})")
    finally:
        os.close(path_fd)
    return fd, os.fstat(fd)


class BootFiles:
    """The /boot/ route of the policy service, its limits and its counters."""

    def __init__(self, settings: BootFileSettings):
        self.settings = settings
        self.stats = BootFileCounters()
        self._senders = FileSenders()
        self._open_in_thread = True          # until prepare() has looked at the root's mount
        self._real_root: tuple[str, str, float] | None = None   # (root, its realpath, when)

    def close(self) -> None:
        """The service stops: downloads still running end now."""
        self._senders.close()

    def configure(self, settings: BootFileSettings) -> list[str]:
        """A reload: new downloads use the new settings; running ones finish under the old."""
        self.settings = settings
        return self.prepare()

    def prepare(self) -> list[str]:
        """Warnings for the log at start and reload."""
        settings = self.settings
        self._open_in_thread = not on_local_file_system(settings.root)
        if settings.max_transfers and not os.path.isdir(settings.root):
            return [f"BootFilesRoot {settings.root} is not a folder: /boot/ answers 404"]
        return []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(ROUTE, self.handle)          # and HEAD

    def counters(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def _refuse(self, request: web.Request, refusal: Refusal, shown: str) -> web.Response:
        if refusal.status == 404:
            self.stats.boot_files_not_found += 1
        else:
            self.stats.boot_files_refused += 1
        log.info("boot file %s refused to %s: %d %s", shown[:200], request.remote,
                 refusal.status, refusal.reason)
        return web.Response(status=refusal.status, text=f"{refusal.reason}\n")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        raw = request.rel_url.raw_path
        if not settings.max_transfers:
            return self._refuse(request, Refusal(404, "boot files are off"), raw)
        if not raw.startswith(PREFIX):       # routed by its decoded spelling: not ours to guess
            return self._refuse(request, Refusal(400, "path must start with /boot/"), raw)
        name = parse_path(raw[len(PREFIX):])
        if isinstance(name, Refusal):
            return self._refuse(request, name, raw)
        is_get = request.method == "GET"
        if is_get and self.stats.boot_transfers_active >= settings.max_transfers:
            self.stats.boot_files_busy += 1
            log.warning("boot file %s refused to %s: %d downloads running "
                        "(MaxBootFileTransfers)", name, request.remote, settings.max_transfers)
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                text=f"busy: {settings.max_transfers} downloads running\n")
        if self._open_in_thread:     # NFS and the like may take their time: off the loop
            opened = await asyncio.get_running_loop().run_in_executor(
                None, open_inside, settings.root, name)
        else:                        # microseconds; a thread hop costs more, in a storm much
            opened = open_inside(settings.root, name, self._resolved_root(settings.root))
        if isinstance(opened, Refusal):
            return self._refuse(request, opened, name)
        fd, info = opened
        with os.fdopen(fd, "rb", buffering=0) as file:
            return await self._answer(request, name, file, info, settings)

    def _resolved_root(self, root: str) -> str:
        """ROOT's realpath, looked up again at most once a second (a root that is a symlink
        re-pointed to a new tree is followed within a second; an lstat per path component
        on every request cost as much as the rest of the open)."""
        now = time.monotonic()
        cached = self._real_root
        if cached is None or cached[0] != root or now - cached[2] >= ROOT_RECHECK_S:
            cached = self._real_root = (root, os.path.realpath(root), now)
        return cached[1]

    async def _answer(self, request: web.Request, name: str, file: Any, info: os.stat_result,
                      settings: BootFileSettings) -> web.StreamResponse:
        size = info.st_size
        etag = f'"{info.st_mtime_ns:x}-{size:x}"'
        modified = _http_date(info.st_mtime)
        wanted = parse_range(request.headers.get("Range"), size, request.headers.get("If-Range"),
                             (etag, modified))
        headers = {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": modified,
                   "Content-Type": "application/octet-stream"}
        if wanted is UNSATISFIABLE:
            return self._refuse_range(request, name, size, headers)
        span = wanted if isinstance(wanted, ByteRange) else ByteRange(0, size - 1)
        response = web.StreamResponse(status=206 if isinstance(wanted, ByteRange) else 200,
                                      headers=headers)
        if isinstance(wanted, ByteRange):
            response.headers["Content-Range"] = wanted.content_range(size)
        response.content_length = span.length
        if request.method != "GET" or span.length <= 0:     # HEAD, or an empty file
            await response.prepare(request)
            await response.write_eof()
            if request.method == "GET":
                self.stats.boot_files_sent += 1
                log.info("sent boot file %s to %s: 0 bytes", name, request.remote)
            return response
        self.stats.boot_transfers_active += 1
        started = time.monotonic()
        progress = _Progress()
        try:
            await response.prepare(request)
            await self._send(request, response, file, span, settings.idle_timeout_s,
                             progress)
            await response.write_eof()
        except ConnectionError as exc:
            # the connection is closed (or was cut by the idle watch): aiohttp finds it so
            # and logs nothing more; an exception from here would be an "internal error"
            self.stats.boot_files_aborted += 1
            self.stats.boot_bytes_sent += progress.sent
            why = str(exc) if isinstance(exc, Stalled) else "the client went away"
            log.info("boot file %s to %s cut short after %d of %d bytes: %s", name,
                     request.remote, progress.sent, span.length, why)
            if request.transport is not None:
                request.transport.abort()
            return response
        except asyncio.CancelledError:       # the service stops (or aiohttp cancelled us)
            self.stats.boot_files_aborted += 1
            self.stats.boot_bytes_sent += progress.sent
            raise
        finally:
            self.stats.boot_transfers_active -= 1
        self.stats.boot_files_sent += 1
        self.stats.boot_bytes_sent += progress.sent
        part = f" (bytes {span.start}-{span.end} of {size})" if isinstance(wanted, ByteRange) \
            else ""
        log.info("sent boot file %s to %s: %d bytes in %.2f s%s", name, request.remote,
                 progress.sent, time.monotonic() - started, part)
        return response

    def _refuse_range(self, request: web.Request, name: str, size: int,
                      headers: dict[str, str]) -> web.Response:
        self.stats.boot_files_refused += 1
        log.info("boot file %s refused to %s: 416 range %s of %d bytes", name, request.remote,
                 request.headers.get("Range", "")[:100], size)
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"},
                            text="range not satisfiable\n")

    async def _send(self, request: web.Request, response: web.StreamResponse, file: Any,
                    span: ByteRange, idle_timeout_s: float, progress: "_Progress") -> None:
        """SPAN of FILE to the client with sendfile(2): what the socket buffer takes at once
        from here, the rest from the sender thread (filesender.py). PROGRESS counts what went.
        aiohttp's FileResponse would wait for ever on a client that stops reading, and opens
        the file by name (a symlink swapped in would be followed): hence this."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        if transport.get_extra_info("ssl_object") is not None:
            await _send_through_tls(transport, response, file, span, idle_timeout_s, progress)
            return
        await _flushed(transport, idle_timeout_s)      # the headers go out first
        sock = transport.get_extra_info("socket")
        # a boot program usually fits whole: no hand-over then
        first = _send_at_once(sock.fileno(), file.fileno(), span)
        progress.sent = first
        if first == span.length:
            return
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def on_done(_: Download) -> None:               # in the sender thread
            loop.call_soon_threadsafe(_settle, finished)

        download = Download(sock.fileno(), file.fileno(), span.start + first,
                            span.length - first, idle_timeout_s, on_done)
        transport.pause_reading()                       # as loop.sendfile does
        self._senders.send(download)
        try:
            await asyncio.shield(finished)
        except BaseException:                           # cancelled: the service stops
            download.stop()
            transport.abort()
            raise
        finally:
            progress.sent = first + download.sent
        if download.error is not None:
            transport.abort()
            if isinstance(download.error, ConnectionError):
                raise download.error
            raise ConnectionAbortedError(f"cannot send: {download.error}") from download.error
        if not transport.is_closing():
            transport.resume_reading()


TLS_PIECE_BYTES = 256 << 10      # read and written at a time over TLS


async def _send_through_tls(transport: asyncio.WriteTransport, response: web.StreamResponse,
                            file: Any, span: ByteRange, idle_timeout_s: float,
                            progress: "_Progress") -> None:
    """Over TLS the bytes must pass the transport's encryption, so no sendfile: a piece is
    read and written through the response; a piece the client does not take within the idle
    timeout cuts the connection."""
    offset, remaining = span.start, span.length
    while remaining > 0:
        piece = os.pread(file.fileno(), min(remaining, TLS_PIECE_BYTES), offset)
        if not piece:
            raise ConnectionAbortedError("the file ended early (it shrank while sent)")
        try:
            await asyncio.wait_for(response.write(piece), idle_timeout_s)
        except asyncio.TimeoutError:
            transport.abort()
            raise Stalled(f"the client took less than {len(piece)} bytes in "
                          f"{idle_timeout_s:g} s (BootFileIdleTimeout)") from None
        offset += len(piece)
        remaining -= len(piece)
        progress.sent += len(piece)


def _send_at_once(sock_fd: int, file_fd: int, span: ByteRange) -> int:
    """Bytes of SPAN sendfile(2) hands to the (non-blocking) socket without waiting: as many as
    its buffer has room for; 0 when it has none or the connection failed (the sender thread
    then meets the same and says why)."""
    try:                             # one call: a short count means the buffer is full
        return os.sendfile(sock_fd, file_fd, span.start, span.length)
    except OSError:                  # full (EAGAIN), or reset: for the thread to find out
        return 0


@functools.lru_cache(maxsize=256)
def _http_date(mtime: float) -> str:
    """Last-Modified for a file's mtime (the few boot files are asked for again and again:
    email.utils.formatdate costs 30 us)."""
    return formatdate(mtime, usegmt=True)


def _settle(finished: asyncio.Future) -> None:
    if not finished.done():
        finished.set_result(None)


async def _flushed(transport: asyncio.WriteTransport, idle_timeout_s: float) -> None:
    """Wait until the transport has handed everything it holds to the kernel: the sender
    writes on the socket directly. The headers nearly always go at once (an empty socket
    buffer); a client that takes none of them is cut off after the idle timeout."""
    waited = 0.0
    while transport.get_write_buffer_size():
        if waited >= idle_timeout_s:
            transport.abort()
            raise Stalled(f"the client took nothing for {idle_timeout_s:g} s "
                          "(BootFileIdleTimeout)")
        await asyncio.sleep(0.01)
        waited += 0.01
        if transport.is_closing():
            raise ConnectionResetError("connection lost")


@dataclass
class _Progress:
    sent: int = 0
