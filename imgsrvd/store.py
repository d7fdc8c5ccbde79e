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

Folders: an upload makes the image's missing folders; an upload that is refused or fails
removes them again when empty, unless another upload in progress still works in them
(FolderClaims: made and removed under one lock, so concurrent uploads into a new folder never
see it vanish under them).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
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


class FolderClaims:
    """The folders uploads made and that no image holds yet, with the uploads in progress
    under each; and the one lock under which folders are made, used and removed.

    Making an upload's folders and creating its temporary file in them is one step under the
    lock, and so is removing folders: a refused upload can no longer remove a folder between
    another upload making (or finding) it and creating its file there (that upload's file
    then failed with ENOENT: a 500). A folder an upload made belongs to every upload in
    progress under it: the last one to end removes it if no image landed there, whichever of
    them made it; one that stores its image makes its folders ordinary folders, never
    removed. Folders that existed before (an operator's) are never claimed. One lock per
    process: one imgsrvd owns an ImageRoot.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._uploads: dict[str, int] = {}        # folder an upload made -> uploads under it

    def __len__(self) -> int:
        """How many folders are claimed (0 when no upload is in progress)."""
        return len(self._uploads)

    def make(self, folder: str, top: str) -> tuple[str, ...]:
        """Make `folder` (under the lock); the folders from it up to `top` (excluded) that
        uploads made, deepest first, claimed for one more upload."""
        made = _missing_folders(folder)
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except BaseException:            # a full disk, a file on the way: none of them stays
            for made_folder in made:
                if not _remove_empty(made_folder):
                    break
            raise
        claimed = []
        while _inside(top, folder) and folder != top:
            if folder in made or folder in self._uploads:
                self._uploads[folder] = self._uploads.get(folder, 0) + 1
                claimed.append(folder)
            folder = os.path.dirname(folder)
        return tuple(claimed)

    def release(self, claimed: tuple[str, ...], stored: bool) -> None:
        """An upload under `claimed` (deepest first) ended, its temporary file gone (under the
        lock): a stored image keeps its folders for good; otherwise the folders no other
        upload uses are removed, deepest first, as far as they are empty."""
        removable = True
        for folder in claimed:
            users = self._uploads.get(folder)
            if users is None:                  # an image was stored under it: kept
                removable = False
                continue
            if users > 1 and not stored:
                self._uploads[folder] = users - 1
                removable = False
                continue
            del self._uploads[folder]
            if removable and not stored:
                removable = _remove_empty(folder)


def _remove_empty(folder: str) -> bool:
    """rmdir `folder`; False when it is not empty (or cannot be removed)."""
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


FOLDERS = FolderClaims()


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
    claimed: tuple[str, ...] = ()            # folders uploads made, deepest first (FOLDERS)
    released: bool = False                   # its claim on them given back

    @classmethod
    def begin(cls, root: str, relative: str, overwrite: bool,
              expected_size: int | None = None, allowed_dirs: tuple[str, ...] = ()
              ) -> "Upload":
        """The upload's temporary file, after every check that can refuse it; a refusal
        leaves no folder behind that it made."""
        final = resolve(root, relative)
        with FOLDERS.lock:       # no other upload's refusal removes the folders meanwhile
            claimed: tuple[str, ...] = ()
            try:
                claimed = cls._make_folder(root, relative, final)
                return cls._begin(root, relative, final, overwrite, expected_size,
                                  allowed_dirs, claimed)
            except BaseException:
                FOLDERS.release(claimed, stored=False)
                raise

    @staticmethod
    def _make_folder(root: str, relative: str, final: str) -> tuple[str, ...]:
        """Make the image's folder; the folders claimed (FolderClaims.make)."""
        real_root = os.path.realpath(root)
        try:
            return FOLDERS.make(os.path.dirname(final), real_root)
        except FileExistsError:
            raise Forbidden(f"{relative}: a folder on the way is a file") from None
        except NotADirectoryError:
            raise Forbidden(f"{relative}: a folder on the way is a file") from None
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise DiskFull(disk_full_message(real_root)) from None
            raise

    @classmethod
    def _begin(cls, root: str, relative: str, final: str, overwrite: bool,
               expected_size: int | None, allowed_dirs: tuple[str, ...],
               claimed: tuple[str, ...]) -> "Upload":
        folder, name = os.path.split(final)
        real_root = os.path.realpath(root)
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
                   claimed=claimed)

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
            self._release(stored=True)
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
        self._release(stored=False)

    def _release(self, stored: bool) -> None:
        """Give back the claim on the folders once (abort may follow finish, or itself)."""
        with FOLDERS.lock:
            if not self.released:
                self.released = True
                FOLDERS.release(self.claimed, stored)


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
