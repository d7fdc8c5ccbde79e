"""Which bytes of a partition hold data: the used-block map the imaging engine stores.

Where the filesystem is known, the image keeps only its used blocks; elsewhere it keeps the whole
partition (and the image writer skips all-zero blocks itself). The map comes from partclone's
ddrescue "domain log" (`partclone.X -D`), which lists the filesystem's used blocks as byte ranges.

The module has a pure half and an I/O half:

- pure: `detect_filesystem` (first bytes -> name), `filesystem_unit` (first bytes -> its sector
  or block size), `parse_domain_log` (domain log text -> extents),
  `merge_extents`, `safety_extents` (areas we keep whatever partclone says) and `raw_map`;
- I/O: `used_map` reads the probe, attaches a read-only loop device when the partition sits inside
  a bigger file, runs partclone and always detaches the loop device again.

Every map carries a `reason`. Nothing that can go wrong with the filesystem or the tools (unknown
filesystem, partclone missing, failing or timing out, no loop device) raises: the answer is then a
"raw" map, one extent covering the whole partition, with the reason why. Only bad arguments
(a negative offset, a range beyond the end of the file) raise `ValueError`.

`python -m img.usedblocks PATH [--offset N] [--size N]` prints the map for humans.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

PROBE_BYTES = 128 * 1024
"""How much of the partition's start `detect_filesystem` needs (btrfs's superblock is at 64 KiB)."""

BOOT_AREA = 64 * 1024
"""Always kept: boot sectors, boot loader code and superblocks live here on every filesystem."""

RAW = "raw"
FILESYSTEMS = ("ext2", "ext3", "ext4", "vfat", "ntfs", "xfs", "btrfs")

PARTCLONE_PROGRAMS: dict[str, tuple[str, ...]] = {
    "ext2": ("partclone.ext2", "partclone.extfs"),
    "ext3": ("partclone.ext3", "partclone.extfs"),
    "ext4": ("partclone.ext4", "partclone.extfs"),
    "vfat": ("partclone.fat", "partclone.vfat"),
    "ntfs": ("partclone.ntfs",),
    "xfs": ("partclone.xfs",),
    "btrfs": ("partclone.btrfs",),
}
"""Per filesystem, the partclone programs that can map it, first found on PATH wins."""


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Extent:
    """A byte range relative to the partition start."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class UsedMap:
    """The used bytes of one partition: sorted, non-overlapping, merged extents within [0, size)."""

    filesystem: str
    size: int
    extents: tuple[Extent, ...]
    reason: str

    def __post_init__(self) -> None:
        previous_end = -1
        for extent in self.extents:
            if extent.length <= 0 or extent.offset <= previous_end or extent.offset < 0 \
                    or extent.end > self.size:
                raise ValueError(f"extents not sorted, merged and within {self.size}: "
                                 f"{self.extents[:4]}...")
            previous_end = extent.end

    def used_bytes(self) -> int:
        return sum(extent.length for extent in self.extents)


def merge_extents(extents: Iterable[Extent], size: int) -> tuple[Extent, ...]:
    """Clip to [0, size), drop empty ranges, sort and merge overlapping or touching ranges."""
    clipped = sorted(
        (max(0, e.offset), min(size, e.end)) for e in extents if min(size, e.end) > max(0, e.offset)
    )
    merged: list[list[int]] = []
    for start, end in clipped:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple(Extent(start, end - start) for start, end in merged)


def raw_map(size: int, reason: str) -> UsedMap:
    """The whole partition as one extent: what we store when we cannot trust a used map."""
    return UsedMap(RAW, size, merge_extents([Extent(0, size)], size), reason)


# --------------------------------------------------------------------------------------------
# Filesystem detection (pure)

_EXT_SUPERBLOCK = 1024
_EXT_MAGIC = 0xEF53
_EXT_COMPAT_HAS_JOURNAL = 0x0004
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008
# Features that ext3 never had: extents, 64bit, MMP, flex_bg, ea_inode, dirdata, csum_seed,
# large_dir, inline_data, encrypt, casefold (incompat); huge_file, gdt_csum, dir_nlink,
# extra_isize, quota, bigalloc, metadata_csum, ... (ro_compat).
_EXT4_INCOMPAT = 0x0040 | 0x0080 | 0x0100 | 0x0200 | 0x0400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 \
    | 0x10000 | 0x20000
_EXT4_RO_COMPAT = 0x0008 | 0x0010 | 0x0020 | 0x0040 | 0x0100 | 0x0200 | 0x0400 | 0x1000 | 0x2000 \
    | 0x8000


def _detect_ext(data: bytes) -> str | None:
    sb = _EXT_SUPERBLOCK
    if len(data) < sb + 0x68:
        return None
    (magic,) = struct.unpack_from("<H", data, sb + 0x38)
    if magic != _EXT_MAGIC:
        return None
    (log_block_size,) = struct.unpack_from("<I", data, sb + 0x18)
    blocks_count, = struct.unpack_from("<I", data, sb + 0x04)
    if log_block_size > 6 or blocks_count == 0:  # blocks of 1 KiB .. 64 KiB
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", data, sb + 0x5C)
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return None  # an external journal, not a filesystem
    if incompat & _EXT4_INCOMPAT or ro_compat & _EXT4_RO_COMPAT:
        return "ext4"
    return "ext3" if compat & _EXT_COMPAT_HAS_JOURNAL else "ext2"


def _has_boot_signature(data: bytes) -> bool:
    return len(data) >= 512 and data[510:512] == b"\x55\xaa"


def _detect_ntfs(data: bytes) -> str | None:
    if not _has_boot_signature(data) or data[3:11] != b"NTFS    ":
        return None
    (bytes_per_sector,) = struct.unpack_from("<H", data, 11)
    return "ntfs" if bytes_per_sector in (256, 512, 1024, 2048, 4096) else None


def _detect_vfat(data: bytes) -> str | None:
    if not _has_boot_signature(data) or data[0] not in (0xEB, 0xE9):
        return None
    bytes_per_sector, per_cluster, reserved, fats = struct.unpack_from("<HBHB", data, 11)
    media = data[21]
    sane = (
        bytes_per_sector in (512, 1024, 2048, 4096)
        and per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
        and reserved >= 1
        and fats in (1, 2)
        and (media == 0xF0 or media >= 0xF8)
    )
    if not sane:
        return None
    if data[54:57] == b"FAT" or data[82:87] == b"FAT32":
        return "vfat"
    return None


def _detect_xfs(data: bytes) -> str | None:
    return "xfs" if data[:4] == b"XFSB" else None


def _detect_btrfs(data: bytes) -> str | None:
    return "btrfs" if data[0x10040:0x10048] == b"_BHRfS_M" else None


# Boot-sector formats first: a FAT or NTFS made over an old ext filesystem may leave its
# superblock at 1 KiB behind, while mke2fs, mkfs.xfs and mkfs.btrfs clear the boot sector.
_DETECTORS = (_detect_xfs, _detect_ntfs, _detect_vfat, _detect_btrfs, _detect_ext)


def detect_filesystem(first_bytes: bytes) -> str | None:
    """Name the filesystem from the partition's first `PROBE_BYTES`, or None when unknown."""
    for detector in _DETECTORS:
        name = detector(first_bytes)
        if name:
            return name
    return None


def filesystem_unit(first_bytes: bytes) -> int | None:
    """The filesystem's own sector or block size in bytes, from its first `PROBE_BYTES`; None
    when the filesystem is unknown.

    It is the largest logical sector size of a disk the filesystem can live on: Linux mounts no
    filesystem whose unit is smaller than the device's logical sector (ext's block size, FAT's
    and NTFS's bytes per sector in the boot sector, XFS's sb_sectsize, btrfs's sectorsize), and
    neither does Windows. Restoring onto a disk with other sectors checks it.
    """
    name = detect_filesystem(first_bytes)
    where = {"ntfs": ("<H", 11), "vfat": ("<H", 11), "xfs": (">H", 102),
             "btrfs": ("<I", 0x10000 + 0x90), "ext2": ("<I", _EXT_SUPERBLOCK + 0x18)}
    field = where.get("ext2" if name in ("ext3", "ext4") else name or "")
    if field is None or len(first_bytes) < field[1] + struct.calcsize(field[0]):
        return None
    (value,) = struct.unpack_from(field[0], first_bytes, field[1])
    return 1024 << value if field == where["ext2"] else value


FAT12_MAX_CLUSTERS = 4084
"""Fewer clusters than 4085 make a FAT FAT12 (Microsoft's FAT specification, "FAT type
determination"): the cluster count alone decides, not the type string."""


def fat_cluster_count(first_bytes: bytes) -> int | None:
    """The number of data clusters of a FAT from its BIOS Parameter Block; None when it is no FAT
    (the computation of Microsoft's FAT specification)."""
    if detect_filesystem(first_bytes) != "vfat":
        return None
    bytes_per_sector, per_cluster, reserved, fats, root_entries, total16, _media, fat16 = \
        struct.unpack_from("<HBHBHHBH", first_bytes, 11)
    total32, fat32 = struct.unpack_from("<II", first_bytes, 32)
    root_sectors = -(-root_entries * 32 // bytes_per_sector)
    data = (total16 or total32) - (reserved + fats * (fat16 or fat32) + root_sectors)
    return max(0, data) // per_cluster


def partclone_distrusted(filesystem: str, first_bytes: bytes) -> str:
    """Why partclone's map of this filesystem must not be trusted, or "".

    partclone.fat (0.3.x) maps FAT12 short: it leaves out clusters in use (a FAT12 with 6 MB of
    files mapped as 4.6 MB), so an image made from its map loses files. FAT12 volumes are small
    (at most 4084 clusters), so they are stored whole instead.
    """
    if filesystem == "vfat":
        clusters = fat_cluster_count(first_bytes)
        if clusters is not None and clusters <= FAT12_MAX_CLUSTERS:
            return (f"FAT12 ({clusters} clusters): partclone.fat maps FAT12 short, so it is "
                    "stored whole; raw")
    return ""


# --------------------------------------------------------------------------------------------
# Areas kept regardless of partclone's map (pure)


def _ntfs_backup_boot_sectors(first_bytes: bytes, size: int) -> list[Extent]:
    """NTFS keeps a copy of its boot sector in the sector just past the volume.

    The volume (and partclone's map, which counts whole clusters) ends one sector short of the
    partition; the copy lives in that sector and ntfsfix/chkdsk check it. Where the boot sector
    says the volume ends and where the partition ends normally agree; we keep both to be safe.
    """
    if len(first_bytes) < 0x30:
        return []
    (bytes_per_sector,) = struct.unpack_from("<H", first_bytes, 11)
    (total_sectors,) = struct.unpack_from("<Q", first_bytes, 0x28)
    return [Extent(total_sectors * bytes_per_sector, bytes_per_sector),
            Extent(size - bytes_per_sector, bytes_per_sector)]


def safety_extents(filesystem: str, first_bytes: bytes,
                   size: int) -> tuple[tuple[Extent, ...], str]:
    """Areas we store whatever partclone says, and a note saying which.

    The first 64 KiB hold boot sectors, boot loader code and superblocks on every filesystem we
    know (ext's boot block and superblock, FAT's reserved sectors, the NTFS boot sector, XFS's
    first AG headers, btrfs's superblock at 64 KiB). partclone maps most of that as used already
    but not all of it (NTFS leaves free clusters in between; boot loaders may hide code in space
    a filesystem calls free), so keeping it all is cheap insurance. For NTFS we also keep the
    backup boot sector, which lies past the end of the volume and so outside partclone's map.
    """
    extents = [Extent(0, BOOT_AREA)]
    note = "first 64 KiB"
    if filesystem == "ntfs":
        backups = _ntfs_backup_boot_sectors(first_bytes, size)
        if backups:
            extents.extend(backups)
            note += " and NTFS backup boot sector"
    return merge_extents(extents, size), note


# --------------------------------------------------------------------------------------------
# Domain log (pure)

_NUMBER = r"(?:0[xX][0-9a-fA-F]+|[0-9]+)"
_STATUS_LINE = re.compile(rf"({_NUMBER})[ \t]+([?*/\-FG+])(?:[ \t]+([0-9]+))?", re.ASCII)
_BLOCK_LINE = re.compile(rf"({_NUMBER})[ \t]+({_NUMBER})[ \t]+([?*/\-+])", re.ASCII)


def _number(text: str) -> int:
    return int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)


def parse_domain_log(text: str, size: int) -> tuple[Extent, ...]:
    """The used ('+') ranges of a ddrescue domain log, clipped to [0, size) and merged.

    Lines starting with '#' are comments. The first other line is "current_pos current_status
    [current_pass]"; each later one is "pos size status", where only '+' (finished, here: used)
    counts. Anything else raises ValueError naming the line.
    """
    used: list[Extent] = []
    seen_status = False
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        if not seen_status:
            if not _STATUS_LINE.fullmatch(line):
                raise ValueError(f"domain log line {number}: expected 'current_pos status': "
                                 f"{line[:80]!r}")
            seen_status = True
            continue
        match = _BLOCK_LINE.fullmatch(line)
        if not match:
            raise ValueError(f"domain log line {number}: expected 'pos size status': {line[:80]!r}")
        if match.group(3) == "+":
            used.append(Extent(_number(match.group(1)), _number(match.group(2))))
    if not seen_status:
        raise ValueError("domain log has no 'current_pos status' line")
    return merge_extents(used, size)


# --------------------------------------------------------------------------------------------
# I/O


class _Unmappable(Exception):
    """A reason to fall back to a raw map (carried as the message)."""


def _file_size(path: str) -> int:
    with open(path, "rb") as handle:
        return handle.seek(0, os.SEEK_END)  # works for block devices too, unlike st_size


def _read_probe(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(min(PROBE_BYTES, size))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1] if lines else ""


def _find_partclone(filesystem: str) -> str:
    for program in PARTCLONE_PROGRAMS[filesystem]:
        found = shutil.which(program)
        if found:
            return found
    raise _Unmappable(f"partclone not found: {' or '.join(PARTCLONE_PROGRAMS[filesystem])}")


def _attach_loop(path: str, offset: int, size: int) -> str:
    """A read-only loop device showing just [offset, offset+size) of path."""
    command = ["losetup", "--find", "--show", "--read-only",
               "--offset", str(offset), "--sizelimit", str(size), path]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _Unmappable(f"cannot attach loop device: {exc}") from exc
    if done.returncode != 0 or not done.stdout.strip():
        detail = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise _Unmappable(f"cannot attach loop device: {detail}")
    return done.stdout.strip()


def _detach_loop(device: str) -> None:
    # The kernel defers detaching a device that is still open (autoclear), so one try is enough;
    # a failure here must not hide the map or the error we are returning.
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


def _run_partclone(program: str, source: str, size: int, timeout_s: float) -> tuple[Extent, ...]:
    """Run `program -D` on source and parse its domain log; failures become _Unmappable."""
    name = os.path.basename(program)
    with tempfile.TemporaryDirectory(prefix="usedblocks-") as work:
        domain, log = os.path.join(work, "domain"), os.path.join(work, "log")
        command = [program, "-D", "-s", source, "-o", domain, "-L", log, "-q"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise _Unmappable(f"{name} timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise _Unmappable(f"{name} could not start: {exc}") from exc
        log_text = _read_text(log)
        if done.returncode != 0:
            detail = (_last_line(log_text) or _last_line(done.stderr)
                      or f"exit status {done.returncode}")
            raise _Unmappable(f"{name} failed: {detail}")
        try:
            return parse_domain_log(_read_text(domain), size)
        except ValueError as exc:
            raise _Unmappable(f"{name} wrote a bad domain log: {exc}") from exc


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _partclone_map(path: str, offset: int, size: int, whole_file: bool, filesystem: str,
                   probe: bytes, timeout_s: float) -> UsedMap:
    program = _find_partclone(filesystem)
    loop = None if whole_file else _attach_loop(path, offset, size)
    try:
        extents = _run_partclone(program, loop or path, size, timeout_s)
    finally:
        if loop:
            _detach_loop(loop)
    if not extents:
        raise _Unmappable(f"{os.path.basename(program)} mapped no used blocks")
    extras, note = safety_extents(filesystem, probe, size)
    merged = merge_extents(extents + extras, size)
    reason = f"{os.path.basename(program)} domain log"
    if merged != extents:
        reason += f" + {note}"
    return UsedMap(filesystem, size, merged, reason)


def used_map(path: str, offset: int = 0, size: int | None = None, filesystem: str | None = None,
             timeout_s: float = 600) -> UsedMap:
    """The used-block map of the partition at [offset, offset+size) of path (a file or device).

    `filesystem` skips detection. Never raises for unknown filesystems or tool failures: the
    answer is then a raw map with the reason. Raises ValueError for a range outside the file and
    OSError when path cannot be read at all.
    """
    file_size = _file_size(path)
    if size is None:
        size = file_size - offset
    if offset < 0 or size < 0 or offset + size > file_size:
        raise ValueError(f"range {offset}+{size} lies outside {path} ({file_size} bytes)")
    probe = _read_probe(path, offset, size)
    if filesystem is None:
        filesystem = detect_filesystem(probe)
    if filesystem not in FILESYSTEMS:
        return raw_map(size, f"unknown filesystem: {filesystem or 'not recognised'}; raw")
    distrusted = partclone_distrusted(filesystem, probe)
    if distrusted:
        return UsedMap(filesystem, size, merge_extents([Extent(0, size)], size), distrusted)
    whole_file = offset == 0 and size == file_size
    try:
        return _partclone_map(path, offset, size, whole_file, filesystem, probe, timeout_s)
    except _Unmappable as exc:
        return raw_map(size, f"{exc} ({filesystem}); raw")


# --------------------------------------------------------------------------------------------
# CLI


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"


def format_map(result: UsedMap, limit: int = 10) -> str:
    """A few lines for humans: filesystem, reason, used bytes and the first extents."""
    share = result.used_bytes() / result.size * 100 if result.size else 0.0
    lines = [
        f"filesystem: {result.filesystem}",
        f"reason:     {result.reason}",
        f"size:       {result.size} ({_human(result.size)})",
        f"used:       {result.used_bytes()} ({_human(result.used_bytes())}, {share:.1f}%)"
        f" in {len(result.extents)} extents",
    ]
    for extent in result.extents[:limit]:
        lines.append(f"  0x{extent.offset:012X}  0x{extent.length:012X}")
    if len(result.extents) > limit:
        lines.append(f"  ... {len(result.extents) - limit} more")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m img.usedblocks",
                                     description="Show which bytes of a partition hold data.")
    parser.add_argument("path", help="disk image, partition image or block device")
    parser.add_argument("--offset", type=int, default=0, help="partition start in bytes")
    parser.add_argument("--size", type=int, default=None, help="partition size in bytes")
    parser.add_argument("--filesystem", choices=FILESYSTEMS, default=None,
                        help="skip detection")
    parser.add_argument("--extents", type=int, default=10, help="how many extents to list")
    args = parser.parse_args(argv)
    try:
        result = used_map(args.path, args.offset, args.size, args.filesystem)
    except (OSError, ValueError) as exc:
        print(f"usedblocks: {exc}", file=sys.stderr)
        return 1
    print(format_map(result, args.extents))
    return 0


if __name__ == "__main__":
    sys.exit(main())
