"""Shrinking one partition's filesystem offline, for `img restore --shrink`.

This module owns the filesystem tools: which filesystems can be shrunk and why the others
cannot (`refusal`), the scratch space check, each tool's minimum size, the shrink itself, the
check afterwards, and copying the shrunk filesystem's first bytes onto the disk. It works on a
scratch file (a sparse copy of the partition as the image holds it), never on the target disk,
so everything here happens before the restore writes its first byte. Where partitions go is
DiskLayout.shrunk()'s business (img/disklayout.py); the order of disk writes is
img/restore.py's.

Shrinkable: ext2/3/4 (resize2fs, `resize2fs -P` for the minimum), NTFS (ntfsresize, `--info`
for the minimum; ntfsresize schedules a chkdsk, so Windows checks the volume once on its next
boot) and FAT16/32 (fatresize, `--info` for the minimum; it is libparted's FAT code and wants
the filesystem inside a partition table, so a FAT scratch file starts with a 1 MiB MBR area:
Scratch.lead; libparted will not shrink small FAT32 volumes much, and its minimum says so).
Refused, with the reason: XFS (cannot shrink), btrfs (shrinks only while mounted), and
partitions stored raw.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass

from .disk import Disk
from .disklayout import DiskLayout, Partition, apply_writes, table_writes
from .tools import run_tool

TIMEOUT_S = 1800.0          # resizing moves data: generous, but never unbounded
SCRATCH_SLACK = 16 << 20    # tool logs, journals replayed, rounding
COPY_BLOCK = 4 << 20

_TOOLS: dict[str, tuple[str, ...]] = {
    "ext2": ("e2fsck", "resize2fs"),
    "ext3": ("e2fsck", "resize2fs"),
    "ext4": ("e2fsck", "resize2fs"),
    "ntfs": ("ntfsresize", "ntfsfix"),
    "vfat": ("fatresize", "fsck.fat", "losetup"),
}
_REFUSED: dict[str, str] = {
    "xfs": "XFS cannot be shrunk",
    "btrfs": "btrfs can only be shrunk while mounted, which img does not do",
}
FAT_LEAD = 1 << 20          # the MBR area in front of a FAT scratch filesystem (see Scratch)


class ShrinkError(Exception):
    """A filesystem that cannot be shrunk here; the message says which tool said what."""


@dataclass(frozen=True)
class ShrinkJob:
    """One partition to shrink: its stream in the image and its sizes in bytes."""

    partition: int
    stream: int
    filesystem: str
    old_size: int
    new_size: int
    used_bytes: int


@dataclass(frozen=True)
class Scratch:
    """A scratch file holding one filesystem, which starts lead bytes into the file.

    lead is 0 but for FAT: fatresize (libparted) only resizes a partition of a partitioned
    device, so the file gets an MBR with one partition at FAT_LEAD holding the filesystem.
    """

    path: str
    filesystem: str
    lead: int = 0


def create_scratch(path: str, filesystem: str, size: int) -> Scratch:
    """A new sparse scratch file for a size-byte filesystem (all zeros, with the MBR FAT needs)."""
    lead = FAT_LEAD if filesystem == "vfat" else 0
    with open(path, "xb") as out:
        out.truncate(lead + size)
    scratch = Scratch(path, filesystem, lead)
    _write_lead_table(scratch, size)
    return scratch


def _write_lead_table(scratch: Scratch, size: int) -> None:
    """The MBR in the lead area: one FAT32 (LBA) partition, the filesystem, size bytes."""
    if not scratch.lead:
        return
    layout = DiskLayout("mbr", 512, scratch.lead + size, "0x00000000",
                        (Partition(1, scratch.lead // 512, size // 512, "0x0c"),))
    with open(scratch.path, "r+b") as out:
        apply_writes(table_writes(layout), out)


def refusal(filesystem: str, partition: int) -> str | None:
    """Why partition's filesystem cannot be shrunk, or None when it can (tools aside)."""
    if filesystem in _TOOLS:
        return None
    why = _REFUSED.get(filesystem)
    if why is None:
        why = ("it was stored raw (img did not recognise or could not map its filesystem), "
               "so img cannot tell what it may cut off")
    return f"partition {partition} cannot be shrunk: {why}"


def missing_tools(filesystem: str) -> list[str]:
    return [tool for tool in _TOOLS.get(filesystem, ()) if shutil.which(tool) is None]


def scratch_needed(used_bytes: int) -> int:
    """Free scratch space a shrink needs: the used data, plus room for what the tool moves."""
    return used_bytes + used_bytes // 4 + SCRATCH_SLACK


def check_space(directory: str, needed: int) -> None:
    info = os.statvfs(directory)
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise ShrinkError(f"scratch directory {directory} has {free >> 20} MiB free, the shrink "
                          f"needs about {-(-needed >> 20)} MiB (use --scratch DIR)")


def _run(args: list[str], timeout_s: float, ok: tuple[int, ...] = (0,)
         ) -> subprocess.CompletedProcess:
    return run_tool(args, timeout_s, ShrinkError, ok)


# --- per filesystem ------------------------------------------------------------------------------

def _ext_block_size(path: str) -> int:
    """The block size from the ext superblock (1024 << s_log_block_size at byte 1024+24)."""
    with open(path, "rb") as handle:
        handle.seek(1024 + 0x18)
        (log_size,) = struct.unpack("<I", handle.read(4))
    return 1024 << log_size


def _ext_minimum(path: str, timeout_s: float) -> int:
    # resize2fs insists on a freshly checked filesystem; -y repairs what a clean image lacks
    # (e2fsck exit 1: errors corrected, which for an imaged live system is normal: orphans).
    _run(["e2fsck", "-f", "-y", path], timeout_s, ok=(0, 1))
    done = _run(["resize2fs", "-P", path], timeout_s)
    match = re.search(r"minimum size of the filesystem:\s*(\d+)", done.stdout)
    if not match:
        raise ShrinkError(f"resize2fs -P gave no minimum size: {done.stdout.strip()[-200:]}")
    return int(match.group(1)) * _ext_block_size(path)


def _ntfs_minimum(path: str, timeout_s: float) -> int:
    done = _run(["ntfsresize", "--info", "--no-progress-bar", path], timeout_s)
    match = re.search(r"You might resize at (\d+) bytes", done.stdout)
    if not match:
        tail = [line for line in done.stdout.splitlines() if line.strip()][-1:]
        raise ShrinkError(f"ntfsresize --info gave no minimum size: {' '.join(tail)}")
    return int(match.group(1))


def _fat_minimum(scratch: Scratch, timeout_s: float) -> int:
    sector_size = _fat_sector_size(scratch)
    if sector_size != 512:
        # libparted reads a file as 512-byte sectors and fails on such a FAT ("part(start=...")
        raise ShrinkError(f"this FAT has {sector_size}-byte sectors (made on a 4Kn disk), and "
                          "fatresize (libparted) shrinks only FAT with 512-byte sectors")
    done = _run(["fatresize", "--info", "-n", "1", scratch.path], timeout_s)
    match = re.search(r"Min size:\s*(\d+)", done.stdout)
    if not match:
        raise ShrinkError(f"fatresize --info gave no minimum size: {done.stdout.strip()[-200:]}")
    return int(match.group(1))


def _fat_boot_sector(scratch: Scratch) -> bytes:
    with open(scratch.path, "rb") as handle:
        handle.seek(scratch.lead)
        return handle.read(512)


def _fat_sector_size(scratch: Scratch) -> int:
    """The FAT's bytes per sector (BPB)."""
    return struct.unpack_from("<H", _fat_boot_sector(scratch), 11)[0]


def _fat_size(scratch: Scratch) -> int:
    """The FAT filesystem's own size in bytes, from its boot sector (BPB total sectors)."""
    boot = _fat_boot_sector(scratch)
    (small_total,) = struct.unpack_from("<H", boot, 19)
    (large_total,) = struct.unpack_from("<I", boot, 32)
    return (small_total or large_total) * _fat_sector_size(scratch)


def _fat_shrink(scratch: Scratch, new_size: int, timeout_s: float) -> None:
    # libparted rounds the size it is asked for, sometimes up: ask again for less by what it
    # overshot (plus 1 MiB) until the filesystem fits; the MBR area's table is thrown away.
    request = new_size
    for _attempt in range(3):
        _run(["fatresize", "-f", "-n", "1", "-s", str(request), scratch.path], timeout_s)
        size = _fat_size(scratch)
        if size <= new_size:
            return
        request -= size - new_size + (1 << 20)
    raise ShrinkError(f"fatresize left the FAT filesystem at {size} bytes, more than the "
                      f"{new_size} it was asked for")


def _fat_check(scratch: Scratch, size: int, timeout_s: float) -> None:
    """fsck.fat has no offset option: check the filesystem through a loop device.

    libparted leaves the dirty bit set, which alone makes `fsck.fat -n` fail: `fsck.fat -a`
    clears it (and repairs what it safely can, as e2fsck -y does before resize2fs), then the
    read-only check must pass.
    """
    done = _run(["losetup", "--find", "--show", "--offset", str(scratch.lead),
                 "--sizelimit", str(size), scratch.path], 60)
    device = done.stdout.strip()
    try:
        _run(["fsck.fat", "-a", device], timeout_s, ok=(0, 1))
        _run(["fsck.fat", "-n", device], timeout_s)
    finally:
        try:
            subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass    # a stuck detach must not hide the check's own result


def minimum_size(scratch: Scratch, timeout_s: float = TIMEOUT_S) -> int:
    """The smallest partition, in bytes, the filesystem in scratch can be shrunk into."""
    if scratch.filesystem.startswith("ext"):
        return _ext_minimum(scratch.path, timeout_s)
    if scratch.filesystem == "ntfs":
        return _ntfs_minimum(scratch.path, timeout_s)
    if scratch.filesystem == "vfat":
        return _fat_minimum(scratch, timeout_s)
    raise ShrinkError(refusal(scratch.filesystem, 0) or f"{scratch.filesystem}: no shrink tool")


def shrink_filesystem(scratch: Scratch, new_size: int, timeout_s: float = TIMEOUT_S) -> None:
    """Shrink the filesystem to fit new_size bytes, then cut the file there, so the check
    afterwards sees exactly what goes onto the disk (ntfsfix looks for NTFS's backup boot
    sector in the file's last sector)."""
    filesystem = scratch.filesystem
    if filesystem.startswith("ext"):
        # resize2fs takes K units; it rounds down to whole blocks, so it never exceeds new_size.
        _run(["resize2fs", scratch.path, f"{new_size // 1024}K"], timeout_s)
    elif filesystem == "ntfs":
        # -f: no interactive question; the size is the partition's, the backup boot sector
        # goes into its last sector.
        _run(["ntfsresize", "-f", "--no-progress-bar", "-s", str(new_size), scratch.path],
             timeout_s)
    elif filesystem == "vfat":
        _fat_shrink(scratch, new_size, timeout_s)
    else:
        raise ShrinkError(refusal(filesystem, 0) or f"{filesystem}: no shrink tool")
    os.truncate(scratch.path, scratch.lead + new_size)
    _write_lead_table(scratch, new_size)       # libparted may have left it a little larger


def check_filesystem(scratch: Scratch, size: int, timeout_s: float = TIMEOUT_S) -> None:
    """The filesystem's own read-only check of its first size bytes; failing is a ShrinkError."""
    if scratch.filesystem.startswith("ext"):
        _run(["e2fsck", "-f", "-n", scratch.path], timeout_s)
    elif scratch.filesystem == "ntfs":
        _run(["ntfsfix", "-n", scratch.path], timeout_s)
    elif scratch.filesystem == "vfat":
        _fat_check(scratch, size, timeout_s)


# --- scratch file to disk ------------------------------------------------------------------------

def _data_ranges(fd: int, begin: int, stop: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of [begin, stop) that hold data; the rest are holes (zeros)."""
    ranges, position = [], begin
    while position < stop:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:          # ENXIO: no data after position
            break
        if start >= stop:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), stop)
        ranges.append((start, end))
        position = end
    return ranges


def copy_prefix(scratch: Scratch, disk: Disk, disk_offset: int, length: int) -> None:
    """Put the scratch filesystem's first length bytes on disk at disk_offset.

    Holes are written as zeros too (disk.zero punches them in a disk image file, writes them on
    a device): a hole is space neither the image nor the tool wrote, and the shrunk filesystem
    may have read it as zeros, so zeros it must be.
    """
    fd = os.open(scratch.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    lead = scratch.lead
    try:
        position = 0
        for start, end in _data_ranges(fd, lead, lead + length):
            disk.zero(disk_offset + position, start - lead - position)
            while start < end:
                size = min(COPY_BLOCK, end - start)
                data = os.pread(fd, size, start)
                if len(data) != size:
                    raise OSError(f"{scratch.path}: short read at byte {start}")
                disk.write(disk_offset + start - lead, data)
                start += size
            position = end - lead
        disk.zero(disk_offset + position, length - position)
    finally:
        os.close(fd)
