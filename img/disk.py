"""The disk the engine works on: a block device or a disk image file, opened once.

Block devices report their size by seeking to the end; files by stat. The logical sector size,
in which the partition table counts, comes from the device (BLKSSZGET); a disk image file has
none to ask for, so it is what the caller says (`--sector-size`), 512 by default. Writes go through
os.pwrite; `punch` gives zeros back to a sparse file cheaply (fallocate PUNCH_HOLE) and falls
back to writing zeros on devices, where BLKZEROOUT would need root and a real device.

SyncBehind flushes a disk being restored in the background, a step at a time, so the disk
writes while the CPU decompresses instead of all at the final sync.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from dataclasses import dataclass

from .disklayout import SECTOR_SIZES, DiskLayout, device_sector_size, read_layout
from .errors import DiskError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(1 << 20)
SYNC_STEP_BYTES = 64 << 20     # how much a restore writes between two syncs behind
# The C library Python itself runs on (find_library would run ldconfig at every start).
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Disk:
    path: str
    fd: int
    size: int
    is_device: bool
    sector_size: int = 512
    # Bytes (offset, length) no write() or zero() touches: a restore keeps the target's
    # image-safe data so (img/isdstore.py), whatever the image holds there.
    keep: tuple[int, int] | None = None

    @classmethod
    def open(cls, path: str, writable: bool = False, sector_size: int | None = None
             ) -> "Disk":
        """sector_size: for a disk image file, the logical sector size its table counts in
        (default 512); for a block device None, or the device's own (anything else is a
        DiskError: the device knows better)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            is_device = stat.S_ISBLK(info.st_mode)
            if not (is_device or stat.S_ISREG(info.st_mode)):
                raise OSError(f"{path}: neither a block device nor a disk image file")
            size = os.lseek(fd, 0, os.SEEK_END) if is_device else info.st_size
            logical = _sector_size(path, device_sector_size(fd) if is_device else None,
                                   sector_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, is_device, logical)

    def read_layout(self) -> DiskLayout:
        """The disk's partition table, read in its logical sector size."""
        return read_layout(self.path, self.sector_size)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path}: short read at byte {offset}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for start, end in _outside(offset, len(view), self.keep):
            self._write(start, view[start - offset:end - offset])

    def _write(self, offset: int, view: memoryview) -> None:
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (but for the bytes kept)."""
        for start, end in _outside(offset, length, self.keep):
            self._zero(start, end - start)

    def _zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if not self.is_device:
            if self._is_hole(offset, length):
                return
            result = _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                     ctypes.c_long(offset), ctypes.c_long(length))
            if result == 0:
                return
        end = offset + length
        while offset < end:
            size = min(len(_ZEROS), end - offset)
            self._write(offset, memoryview(_ZEROS)[:size])
            offset += size

    def _is_hole(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) of the file is a hole already (a blank disk file):
        punching it again would cost a journal transaction and the file's lock, which the
        writers on the other threads wait for. Where SEEK_DATA is not supported the whole file
        counts as data, so the range is punched."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as exc:
            return exc.errno == errno.ENXIO          # no data from offset to the end

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Disk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _outside(offset: int, length: int, keep: tuple[int, int] | None
             ) -> list[tuple[int, int]]:
    """The (start, end) pieces of [offset, offset+length) that lie outside keep."""
    end = offset + length
    if length <= 0:
        return []
    if keep is None or keep[0] >= end or keep[0] + keep[1] <= offset:
        return [(offset, end)]
    pieces = [(offset, keep[0])] if offset < keep[0] else []
    if keep[0] + keep[1] < end:
        pieces.append((keep[0] + keep[1], end))
    return pieces


def _sector_size(path: str, device: int | None, requested: int | None) -> int:
    if requested is not None and requested not in SECTOR_SIZES:
        raise DiskError(f"--sector-size {requested}: expected one of "
                        f"{', '.join(map(str, SECTOR_SIZES))}")
    if device is None:
        return requested or 512
    if requested is not None and requested != device:
        raise DiskError(f"{path} is a block device with {device}-byte logical sectors; "
                        f"--sector-size {requested} is for disk image files, which have no "
                        "sector size to ask for")
    return device


class SyncBehind:
    """A thread that fdatasyncs the disk after every `step_bytes` written (wrote() counts
    them), while the writers go on.

    Why: the kernel keeps a restore's writes in the page cache until the final sync (a large
    machine's dirty limits hold a whole disk image), so a restore would decompress first and
    then wait for the disk with the CPU idle. Syncing behind overlaps the two; the final sync
    finds little left. A sync that fails is raised by wrote() and by close() (the kernel reports
    a write error once per open file, so it must not be dropped here). close() stops the thread;
    use it as a context manager."""

    def __init__(self, disk: Disk, step_bytes: int = SYNC_STEP_BYTES):
        self.disk = disk
        self.step_bytes = step_bytes
        self.syncs = 0
        self._pending = 0
        self._due = threading.Event()
        self._stop = False
        self._error: OSError | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="img-sync-behind", daemon=True)
        self._thread.start()

    def wrote(self, length: int) -> None:
        """Count length bytes written; wake the thread after every step."""
        self._raise_failure()
        with self._lock:
            self._pending += length
            if self._pending >= self.step_bytes:
                self._pending = 0
                self._due.set()

    def close(self) -> None:
        """Stop the thread (after the sync under way, if any); raise a sync that failed."""
        self._stop = True
        self._due.set()
        self._thread.join()
        self._raise_failure()

    def __enter__(self) -> "SyncBehind":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise OSError(self._error.errno, f"{self.disk.path}: writing to the disk failed: "
                                             f"{self._error.strerror}")

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stop:
                return
            try:
                os.fdatasync(self.disk.fd)
                self.syncs += 1
            except OSError as exc:
                self._error = exc
                return
