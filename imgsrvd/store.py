"""The image store: where images live under ImageRoot, and how an upload becomes an image.

Every function here blocks (file system calls); the server runs them on worker threads.

Path rules: a clean relative path (protocol.clean_relative) joined to the root, then resolved
with realpath: a symlink anywhere on the way that leads out of the root is refused (403).

An upload is written to a temporary name in the image's own folder (`.NAME.part-<random>`, a
hidden name no client can ask for), checked as a complete image (the header and every chunk's
checksum as they arrive, then the index and trailer: common.imaging.imageformat.StreamChecker),
fsynced, and only then given its final name:
os.link when overwriting is off (atomic: an image that appeared meanwhile is never replaced,
the link fails instead) or a rename when it is on; then the folder is fsynced (both steps:
common.fileio.publish). Whatever goes wrong (a client gone, a bad image, a full disk, a crash)
leaves nothing under the final name;
a crash can leave a `.part-` file, which clean_partials() removes when the server starts.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass

from common.fileio import publish
from common.imaging.protocol import upload_allowed
from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import ImageFormatError, StreamChecker

log = logging.getLogger("preboot.imgsrvd.store")

PART_RE = re.compile(r"^\..+\.part-[0-9a-f]{16}$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NAME_MAX = 255                    # bytes of one name (Linux file systems)
PART_SUFFIX_BYTES = len(".part-") + 16


def temp_name(name: str) -> str:
    """The hidden name an upload is written to: `.NAME.part-<16 hex>`; a name too long to
    take 23 more bytes is replaced by its hash (the final name is what the client sees)."""
    stem = name
    if 1 + len(name.encode()) + PART_SUFFIX_BYTES > NAME_MAX:
        stem = hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
    return f".{stem}.part-{secrets.token_hex(8)}"


def _missing_folders(folder: str) -> list[str]:
    """The folders makedirs(folder) would create, deepest first."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def remove_folders(folders: list[str]) -> None:
    """Remove folders an upload created (deepest first), unless something else is in them
    meanwhile (another upload's, for example)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status, str() the reason."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Forbidden(StoreError):
    status = 403


class NotFound(StoreError):
    status = 404


class Exists(StoreError):
    status = 409


class BadImage(StoreError):
    status = 422


class DiskFull(StoreError):
    status = 507


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(root: str, relative: str) -> str:
    """The absolute path of `relative` (already clean) under `root`; Forbidden when a symlink
    on the way leads out of the root."""
    real_root = os.path.realpath(root)
    candidate = os.path.join(real_root, relative)
    real = os.path.realpath(candidate)
    if not _inside(real_root, real) or real == real_root:
        raise Forbidden(f"{relative}: leads outside the image root (symbolic link)")
    return candidate


def open_for_reading(root: str, relative: str) -> tuple[str, int]:
    """(path, size) of an existing image file; NotFound or Forbidden otherwise."""
    path = resolve(root, relative)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{relative}: no such image") from None
    except NotADirectoryError:
        raise NotFound(f"{relative}: no such image") from None
    import stat as _stat
    if not _stat.S_ISREG(info.st_mode):
        raise NotFound(f"{relative}: not an image file")
    return path, info.st_size


def disk_full_message(folder: str) -> str:
    return f"no space left on the image store ({folder}); the upload was discarded"


@dataclass(eq=False)
class Upload:
    """One upload in progress: the temporary file and where it goes."""

    relative: str
    final: str
    temp: str
    fd: int
    overwrite: bool
    checker: StreamChecker
    written: int = 0
    closed: bool = False
    image_type: str | None = None           # the stored image's metadata type, once checked
    created: tuple[str, ...] = ()            # folders this upload made, deepest first

    @classmethod
    def begin(cls, root: str, relative: str, overwrite: bool,
              expected_size: int | None = None, allowed_dirs: tuple[str, ...] = ()
              ) -> "Upload":
        """The upload's temporary file, after every check that can refuse it; a refusal
        leaves no folder behind."""
        final = resolve(root, relative)
        created = _missing_folders(os.path.dirname(final))
        try:
            return cls._begin(root, relative, final, overwrite, expected_size, allowed_dirs,
                              created)
        except BaseException:
            remove_folders(created)
            raise

    @classmethod
    def _begin(cls, root: str, relative: str, final: str, overwrite: bool,
               expected_size: int | None, allowed_dirs: tuple[str, ...],
               created: list[str]) -> "Upload":
        folder, name = os.path.split(final)
        real_root = os.path.realpath(root)
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except FileExistsError:
            raise Forbidden(f"{relative}: a folder on the way is a file") from None
        except NotADirectoryError:
            raise Forbidden(f"{relative}: a folder on the way is a file") from None
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise DiskFull(disk_full_message(real_root)) from None
            raise
        # makedirs may have followed a link made meanwhile: check again where we landed.
        real_folder = os.path.realpath(folder)
        if not _inside(real_root, real_folder):
            raise Forbidden(f"{relative}: leads outside the image root (symbolic link)")
        # AllowedUploadDirs names where images land, so it is checked where the links lead
        real_relative = os.path.relpath(os.path.join(real_folder, name), real_root)
        if not upload_allowed(real_relative, allowed_dirs):
            raise Forbidden(f"uploads to {os.path.dirname(real_relative) or '/'} are not "
                            f"allowed (AllowedUploadDirs: {', '.join(allowed_dirs)}; "
                            f"{relative} leads there through a symbolic link)")
        if os.path.isdir(final):
            raise Forbidden(f"{relative}: is a folder")
        if not overwrite and os.path.lexists(final):
            raise Exists(f"{relative}: the image exists and overwriting is not allowed "
                         "(AllowOverwrite = NO)")
        if expected_size is not None:
            usage = shutil.disk_usage(folder)
            if expected_size > usage.free:
                raise DiskFull(f"no space left on the image store ({real_root}): the image "
                               f"is {expected_size} bytes, {usage.free} are free")
        temp = os.path.join(folder, temp_name(name))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return cls(relative, final, temp, fd, overwrite, StreamChecker(relative),
                   created=tuple(created))

    def write(self, data: bytes) -> None:
        """Check and append the next bytes. A damaged image is refused (BadImage) at the first
        bad chunk, not after the whole upload."""
        try:
            self.checker.feed(data)
        except ImageFormatError as exc:
            self.abort()
            raise BadImage(str(exc)) from None
        view = memoryview(data)
        try:
            while view:
                done = os.write(self.fd, view)
                view = view[done:]
                self.written += done
        except OSError as exc:
            if exc.errno in DISK_FULL:
                self.abort()
                raise DiskFull(disk_full_message(os.path.dirname(self.final))) from None
            raise

    def finish(self) -> int:
        """Check the image, make it durable and give it its final name; returns its size.
        On any failure the temporary file is gone and the final name untouched."""
        try:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise DiskFull(disk_full_message(os.path.dirname(self.final))) from None
                raise
            try:              # the chunks were checked as they came: now the index
                header = self.checker.finish()
                self.image_type = str(header.metadata.get("type") or "") or None
            except ImageFormatError as exc:
                raise BadImage(str(exc)) from None
            os.close(self.fd)
            self.closed = True
            try:
                publish(self.temp, self.final, replace=self.overwrite)
            except FileExistsError:
                raise Exists(f"{self.relative}: the image exists and overwriting is not "
                             "allowed (AllowOverwrite = NO)") from None
            return self.written
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.temp, exc.strerror)
        remove_folders(list(self.created))       # only the empty ones this upload made


def check_image(path: str, name: str) -> str | None:
    """None if `path` holds a complete, sound image; else the reason (for a 422)."""
    try:
        with open(path, "rb") as handle:
            reader = ImageReader(handle, name)
            for entry in reader.index.entries:
                reader.read_payload(entry)
    except ImageFormatError as exc:
        text = str(exc)
        return text if text.startswith(name) else f"{name}: {text}"
    except (ValueError, OSError) as exc:
        return f"{name}: not a complete image: {exc}"
    return None


def clean_partials(root: str) -> list[str]:
    """Remove the `.NAME.part-*` files that a crash left under `root`; returns their paths."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for folder, dirs, files in os.walk(root):
        for name in files:
            if PART_RE.match(name):
                path = os.path.join(folder, name)
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError as exc:
                    log.warning("cannot remove the partial upload %s: %s", path, exc.strerror)
    return removed
