"""Growing the last partition's filesystem, for `img restore --grow` (and img auto's grow, and a
multicast session's).

DiskLayout.grown() (img/disklayout.py) extends the table entry; this module then grows the
filesystem inside it to fill the entry, after the restore has written the whole disk and its
table, as the mirror of img/shrink.py. It owns which tool grows which filesystem (`method`,
the decision table), running them, and reading each filesystem's own size from its superblock
so every growth is printed as old size -> new size.

| filesystem | grown by | how |
|---|---|---|
| ext2/3/4 | `e2fsck -f -y`, then `resize2fs` | on a loop device of the partition |
| XFS | `xfs_growfs` | only while mounted: the loop device mounted on a temporary directory |
| btrfs | `btrfs filesystem resize max` | only while mounted, likewise |
| NTFS | `ntfsresize` (no size: the device's) | on a loop device, not mounted |
| FAT16/32 | `fatresize` (libparted) | on the disk: libparted resizes a partition of a partitioned device, so the entry is put back at its old size for it, and the grown table rewritten afterwards |
| anything else | nothing | the entry grows, the filesystem is left at its size (said so) |

libparted grows FAT32; it refuses to grow many FAT16 volumes ("GNU Parted cannot resize this
partition to this size": a FAT16's cluster count is bounded), which img reports as the reason.

A failure here comes after a complete restore: the data on the disk is the image's, only the
filesystem stays at its old size inside the larger entry. grow_filesystems() therefore never
raises; each GrowOutcome says what happened, and `img` exits with EXIT_NOT_GROWN (errors.py).
Loop devices are detached and temporary mounts unmounted on every path.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

from .disklayout import DiskLayout, table_writes
from .tools import run_tool
from common.units import human

TIMEOUT_S = 1800.0
MiB = 1 << 20


@dataclass(frozen=True)
class GrowMethod:
    """How a filesystem grows: the tools it needs and whether it must be mounted; or, when
    tools is empty, why it is left at its size."""

    filesystem: str
    tools: tuple[str, ...]
    mounted: bool = False
    reason: str = ""

    @property
    def supported(self) -> bool:
        return bool(self.tools)


_METHODS: dict[str, GrowMethod] = {
    "ext2": GrowMethod("ext2", ("losetup", "e2fsck", "resize2fs")),
    "ext3": GrowMethod("ext3", ("losetup", "e2fsck", "resize2fs")),
    "ext4": GrowMethod("ext4", ("losetup", "e2fsck", "resize2fs")),
    "xfs": GrowMethod("xfs", ("losetup", "mount", "umount", "xfs_growfs"), mounted=True),
    "btrfs": GrowMethod("btrfs", ("losetup", "mount", "umount", "btrfs"), mounted=True),
    "ntfs": GrowMethod("ntfs", ("losetup", "ntfsresize")),
    "vfat": GrowMethod("vfat", ("fatresize",)),
}


def method(filesystem: str) -> GrowMethod:
    """The decision table: which tools grow filesystem (see the module docstring)."""
    known = _METHODS.get(filesystem)
    if known is not None:
        return known
    if filesystem in ("raw", "", "none"):
        why = "img did not recognise its filesystem (stored raw), so it has no tool to grow it"
    else:
        why = f"img has no tool to grow {filesystem}"
    return GrowMethod(filesystem, (), reason=why)


@dataclass(frozen=True)
class GrowJob:
    """One partition whose table entry grew: where it is and its entry's sizes in bytes."""

    partition: int
    filesystem: str
    offset: int
    old_size: int
    new_size: int


@dataclass(frozen=True)
class GrowOutcome:
    """status: "grown", "left" (no tool for this filesystem: not a failure) or "failed".
    before/after: the filesystem's own size in bytes (None where it cannot be read)."""

    job: GrowJob
    status: str
    before: int | None = None
    after: int | None = None
    message: str = ""

    def line(self) -> str:
        """The one line img prints for it."""
        job = self.job
        what = f"partition {job.partition} ({job.filesystem})"
        entry = f"{human(job.old_size)} -> {human(job.new_size)}"
        if self.status == "grown":
            before = self.before if self.before is not None else job.old_size
            after = self.after if self.after is not None else job.new_size
            return (f"grew {what}: filesystem {human(before)} -> {human(after)} "
                    f"({before} -> {after} bytes), partition entry {entry}")
        if self.status == "left":
            return (f"grew {what}: partition entry {entry}; the filesystem was left at its "
                    f"size ({human(self.before or job.old_size)}): {self.message}")
        return (f"img: partition {job.partition} ({job.filesystem}): the restore is complete, "
                f"but growing its filesystem FAILED: {self.message}; the partition entry is "
                f"{human(job.new_size)}, the filesystem stays {human(self.before or job.old_size)}"
                " with its data intact")


class GrowError(Exception):
    """A tool that failed; the message says which and what it said."""


def grow_jobs(source: DiskLayout, target: DiskLayout, filesystems: dict[int, str]
              ) -> tuple[GrowJob, ...]:
    """The partitions (not extended containers) whose entry is larger in target than in source,
    in bytes (the two may count in different sector sizes). filesystems: number -> name."""
    jobs = []
    for part in target.partitions:
        if part.is_extended:
            continue
        try:
            old = source.partition(part.number).size_bytes(source.sector_size)
        except KeyError:
            continue
        new = part.size_bytes(target.sector_size)
        if new > old:
            jobs.append(GrowJob(part.number, filesystems.get(part.number, "raw"),
                                part.start_bytes(target.sector_size), old, new))
    return tuple(jobs)


# --- running tools -------------------------------------------------------------------------------

def _run(args: list[str], timeout_s: float = TIMEOUT_S, ok: tuple[int, ...] = (0,)
         ) -> subprocess.CompletedProcess:
    # libparted's tools (fatresize) print udevadm chatter that explains nothing
    return run_tool(args, timeout_s, GrowError, ok, noise=("udevadm",),
                    telling=("error", "cannot"))


class _Loop:
    """A loop device over [offset, offset+size) of path, detached on exit."""

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size
        self.device = ""

    def __enter__(self) -> str:
        done = _run(["losetup", "--find", "--show", "--offset", str(self.offset),
                     "--sizelimit", str(self.size), self.path], 60)
        self.device = done.stdout.strip()
        return self.device

    def __exit__(self, *exc: object) -> None:
        try:
            subprocess.run(["losetup", "--detach", self.device], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass     # a stuck detach must not hide the grow's own result


def _mounted(device: str, filesystem: str, grow: Callable[[str], None]) -> None:
    """Mount device on a temporary directory, grow(mount point), unmount (also on failure)."""
    with tempfile.TemporaryDirectory(prefix="img-grow-") as point:
        _run(["mount", "-t", filesystem, "-o", "nodev,nosuid,noexec", device, point], 300)
        try:
            grow(point)
        finally:
            try:
                _run(["umount", point], 300)
            except GrowError:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
                raise


def _grow_on_loop(disk_path: str, job: GrowJob, timeout_s: float) -> None:
    with _Loop(disk_path, job.offset, job.new_size) as device:
        if job.filesystem.startswith("ext"):
            # resize2fs insists on a freshly checked filesystem (exit 1: errors corrected,
            # normal for an imaged live system); without a size it fills the device.
            _run(["e2fsck", "-f", "-y", device], timeout_s, ok=(0, 1))
            _run(["resize2fs", device], timeout_s)
        elif job.filesystem == "ntfs":
            # without -s the new size is the device's; -f: no interactive question
            _run(["ntfsresize", "-f", "--no-progress-bar", device], timeout_s)
        elif job.filesystem == "xfs":
            _mounted(device, "xfs", lambda point: _run(["xfs_growfs", point], timeout_s))
        elif job.filesystem == "btrfs":
            _mounted(device, "btrfs", lambda point: _run(
                ["btrfs", "filesystem", "resize", "max", point], timeout_s))


def _grow_fat(disk_path: str, layout: DiskLayout, job: GrowJob,
              write: Callable[[int, bytes], None], boot_code: bytes, timeout_s: float) -> None:
    """fatresize grows a partition and its FAT together: the entry goes back to its old size
    for it, fatresize grows both, and img's grown table is written again (in `finally`, so the
    disk ends with img's table whatever fatresize did to it)."""
    if layout.sector_size != 512:
        raise GrowError(f"the disk counts in {layout.sector_size}-byte sectors, and fatresize "
                        "(libparted) reads a disk image file as 512-byte sectors")
    boot = _read(disk_path, job.offset, 512)
    if struct.unpack_from("<H", boot, 11)[0] != 512:
        raise GrowError("this FAT has 4096-byte sectors, and fatresize (libparted) grows only "
                        "FAT with 512-byte sectors")
    old_lba = job.old_size // layout.sector_size
    before = dataclasses.replace(layout, partitions=tuple(
        dataclasses.replace(p, size_lba=old_lba) if p.number == job.partition else p
        for p in layout.partitions))
    # libparted rounds the size it is asked for, sometimes up by some sectors: ask for 1 MiB
    # less (a whole MiB), so the filesystem it makes stays inside the entry.
    request = (job.new_size - MiB) // MiB * MiB
    if request <= job.old_size:
        raise GrowError("the partition grew by less than the 1 MiB fatresize needs to work in")
    try:
        for offset, data in table_writes(before, boot_code):
            write(offset, data)
        _run(["fatresize", "-f", "-n", str(job.partition), "-s", str(request), disk_path],
             timeout_s)
    finally:
        for offset, data in table_writes(layout, boot_code):
            write(offset, data)
    size = filesystem_size(disk_path, job.offset, "vfat")
    if size is not None and size > job.new_size:
        raise GrowError(f"fatresize made the FAT {size} bytes, larger than its partition")
    with _Loop(disk_path, job.offset, job.new_size) as device:
        # libparted leaves the dirty bit set: -a clears it, then the read-only check must pass
        _run(["fsck.fat", "-a", device], timeout_s, ok=(0, 1))
        _run(["fsck.fat", "-n", device], timeout_s)


def grow_filesystems(disk_path: str, layout: DiskLayout, jobs: tuple[GrowJob, ...],
                     write: Callable[[int, bytes], None], boot_code: bytes = b"",
                     timeout_s: float = TIMEOUT_S) -> tuple[GrowOutcome, ...]:
    """Grow each job's filesystem to fill its (already grown, already written) entry. Never
    raises: what failed is in the outcome. write(offset, data) writes the disk (the FAT path
    rewrites the table); layout is the table on the disk; boot_code its first 440 bytes."""
    outcomes = []
    for job in jobs:
        chosen = method(job.filesystem)
        before = filesystem_size(disk_path, job.offset, job.filesystem)
        if not chosen.supported:
            outcomes.append(GrowOutcome(job, "left", before, before, chosen.reason))
            continue
        missing = [tool for tool in chosen.tools if shutil.which(tool) is None]
        if missing:
            outcomes.append(GrowOutcome(job, "failed", before, before,
                                        f"{', '.join(missing)} not installed"))
            continue
        try:
            if job.filesystem == "vfat":
                _grow_fat(disk_path, layout, job, write, boot_code, timeout_s)
            else:
                _grow_on_loop(disk_path, job, timeout_s)
        except (GrowError, OSError) as exc:
            outcomes.append(GrowOutcome(job, "failed", before,
                                        filesystem_size(disk_path, job.offset, job.filesystem),
                                        str(exc)))
            continue
        after = filesystem_size(disk_path, job.offset, job.filesystem)
        outcomes.append(GrowOutcome(job, "grown", before, after))
    return tuple(outcomes)


# --- each filesystem's own size ------------------------------------------------------------------

def _read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def filesystem_size(disk_path: str, offset: int, filesystem: str) -> int | None:
    """The filesystem's size in bytes as its superblock says, None when it cannot be read."""
    try:
        return _size_from(lambda at, n: _read(disk_path, offset + at, n), filesystem)
    except (OSError, struct.error, ValueError):
        return None


def _size_from(read: Callable[[int, int], bytes], filesystem: str) -> int | None:
    if filesystem.startswith("ext"):
        sb = read(1024, 1024)
        blocks = struct.unpack_from("<I", sb, 0x04)[0]
        if struct.unpack_from("<I", sb, 0x60)[0] & 0x80:          # INCOMPAT_64BIT
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        return blocks * (1024 << struct.unpack_from("<I", sb, 0x18)[0])
    if filesystem == "xfs":
        sb = read(0, 16)
        return struct.unpack_from(">I", sb, 4)[0] * struct.unpack_from(">Q", sb, 8)[0]
    if filesystem == "btrfs":
        return struct.unpack_from("<Q", read(0x10000, 0x78), 0x70)[0]
    if filesystem == "ntfs":
        boot = read(0, 512)
        return struct.unpack_from("<H", boot, 11)[0] * struct.unpack_from("<Q", boot, 0x28)[0]
    if filesystem == "vfat":
        boot = read(0, 512)
        total = struct.unpack_from("<H", boot, 19)[0] or struct.unpack_from("<I", boot, 32)[0]
        return total * struct.unpack_from("<H", boot, 11)[0]
    return None
