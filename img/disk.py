"""The disk the engine works on: a block device or a disk image file, opened once.

Block devices report their size by seeking to the end; files by stat. Writes go through
os.pwrite; `punch` gives zeros back to a sparse file cheaply (fallocate PUNCH_HOLE) and falls
back to writing zeros on devices, where BLKZEROOUT would need root and a real device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
from dataclasses import dataclass

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(1 << 20)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass
class Disk:
    path: str
    fd: int
    size: int
    is_device: bool

    @classmethod
    def open(cls, path: str, writable: bool = False) -> "Disk":
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            is_device = stat.S_ISBLK(info.st_mode)
            if not (is_device or stat.S_ISREG(info.st_mode)):
                raise OSError(f"{path}: neither a block device nor a disk image file")
            size = os.lseek(fd, 0, os.SEEK_END) if is_device else info.st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, is_device)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path}: short read at byte {offset}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros."""
        if length <= 0:
            return
        if not self.is_device:
            result = _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                     ctypes.c_long(offset), ctypes.c_long(length))
            if result == 0:
                return
        end = offset + length
        while offset < end:
            size = min(len(_ZEROS), end - offset)
            self.write(offset, _ZEROS[:size])
            offset += size

    def write_behind(self, offset: int, length: int) -> None:
        """Start writing [offset, offset+length) to the device now, without waiting, and drop
        it from the page cache once written: a restore's final sync then finds little left
        to do (the disk works while the CPU decompresses), and restoring a whole disk does not
        push everything else out of memory. Advice only: errors are ignored here and any real
        write error still surfaces at sync()."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

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
