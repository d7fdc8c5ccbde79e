"""Test support: real disks with 512- or 4096-byte logical sectors, made and checked through loop
devices (`losetup --sector-size`), as a 4Kn or a 512-byte disk shows itself to the kernel.

A disk is described by a DiskSpec (table, sector size, partitions with their filesystem); the
partition table is written by sfdisk on a loop device with the disk's sector size, and every
filesystem by its own mkfs on a loop device showing just its partition, so each mkfs sees the
sector size a real disk would give it. Files are written through the filesystem's own driver
(kernel mount, ntfs-3g, mtools for FAT, which this kernel cannot mount). check_disk() reads a
disk back the same way: the table through sfdisk, each filesystem through its own checker and
a read-only mount with the disk's sector size, every file compared byte for byte.

Used by the integration tests of img's sector-size handling and by the 4Kn e2e boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

MiB = 1 << 20
TOOLS = ("losetup", "sfdisk", "mkfs.ext4", "e2fsck", "mkfs.xfs", "xfs_repair", "mkntfs",
         "ntfs-3g", "ntfsfix", "mkfs.vfat", "fsck.fat", "mcopy", "mmd", "partclone.ext4",
         "partclone.xfs", "partclone.ntfs", "partclone.fat")
# sfdisk type per table; MBR 0x07 for NTFS, 0x0c for FAT32 LBA
TYPES = {
    "gpt": {"ext4": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "xfs": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "vfat": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"},
    "mbr": {"ext4": "83", "xfs": "83", "ntfs": "7", "vfat": "c"},
}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
        "ntfs": ["mkntfs", "-q", "-F", "-Q"], "vfat": ["mkfs.vfat"]}
CHECK = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"], "ntfs": ["ntfsfix", "--no-action"],
         "vfat": ["fsck.fat", "-n"]}
MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


@dataclass(frozen=True)
class Part:
    """One partition: its filesystem, where it starts and its size (MiB), extra mkfs options
    (e.g. a block or sector size other than the one mkfs takes from the device)."""

    fs: str
    start_mib: int
    size_mib: int
    mkfs_options: tuple[str, ...] = ()

    @property
    def offset(self) -> int:
        return self.start_mib * MiB

    @property
    def size(self) -> int:
        return self.size_mib * MiB


@dataclass(frozen=True)
class DiskSpec:
    """table "gpt", or "mbr" (the first partition primary, the others logical partitions 5, 6, ...
    in an extended container from 1 MiB before the second one to the end of the last)."""

    table: str
    sector_size: int
    size_mib: int
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return self.size_mib * MiB

    def numbered(self) -> list[tuple[int, Part]]:
        """(partition number as Linux numbers it, part) for each data partition."""
        if self.table == "gpt":
            return list(enumerate(self.parts, 1))
        return [(1, self.parts[0])] + [(4 + i, p) for i, p in enumerate(self.parts[1:], 1)]


def files_for(seed: int) -> dict[str, bytes]:
    """A small tree whose bytes differ per seed: text, random data, a nested folder."""
    rng = random.Random(seed)
    return {
        "readme.txt": b"4Kn imaging test %d\n" % seed * 300,
        "data/random.bin": rng.randbytes(MiB + seed),
        "data/deep/small.dat": rng.randbytes(4097),
    }


def run(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr or result.stdout}"
    return result


@contextlib.contextmanager
def loop(path: Path, sector_size: int, offset: int = 0, size: int | None = None,
         read_only: bool = False) -> Iterator[str]:
    """A loop device over path (or [offset, offset+size) of it) with sector_size-byte sectors."""
    args = ["losetup", "--find", "--show", "--sector-size", str(sector_size)]
    if read_only:
        args.append("--read-only")
    if offset:
        args += ["--offset", str(offset)]
    if size is not None:
        args += ["--sizelimit", str(size)]
    device = run(args + [str(path)], 60).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


def blank_disk(path: Path, size: int, fill: bytes = b"") -> Path:
    """A sparse disk file; `fill` written at its start and 1 MiB in (to tell if it changed)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        if fill:
            handle.write(fill)
            handle.seek(MiB)
            handle.write(fill)
    return path


def _sfdisk_script(spec: DiskSpec) -> str:
    ss = spec.sector_size
    types = TYPES[spec.table]
    lines = ["label: gpt" if spec.table == "gpt" else "label: dos"]
    for index, part in enumerate(spec.parts):
        if spec.table == "mbr" and index == 1:
            end = spec.parts[-1].offset + spec.parts[-1].size
            lines.append(f"start={(part.offset - MiB) // ss}, size={(end - part.offset + MiB) // ss}"
                         ", type=5")
        lines.append(f"start={part.offset // ss}, size={part.size // ss}, type={types[part.fs]}")
    return "\n".join(lines) + "\n"


def build_disk(path: Path, spec: DiskSpec, files: Mapping[str, bytes]) -> Path:
    """The disk file of spec, every filesystem holding `files`."""
    blank_disk(path, spec.size)
    with loop(path, spec.sector_size) as device:
        run(["sfdisk", "-q", "--no-reread", device], 60, input=_sfdisk_script(spec))
    for _number, part in spec.numbered():
        with loop(path, spec.sector_size, part.offset, part.size) as device:
            run([*MKFS[part.fs], *part.mkfs_options, device], 300)
            write_files(device, part.fs, files)
    return path


@contextlib.contextmanager
def mounted(device: str, fs: str, read_only: bool) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="sectordisk-"))
    if fs == "ntfs":
        command = ["ntfs-3g", "-o", "ro" if read_only else "rw", device, str(where)]
    else:
        options = {"ext4": "ro,noload", "xfs": "ro,norecovery"}[fs] if read_only else "rw"
        command = ["mount", "-t", fs, "-o", options, device, str(where)]
    run(command, 60)
    try:
        yield where
    finally:
        subprocess.run(["sync"], timeout=60)
        run(["umount", str(where)], 60)
        where.rmdir()


def write_files(device: str, fs: str, files: Mapping[str, bytes]) -> None:
    if fs == "vfat":
        with tempfile.TemporaryDirectory(prefix="sectordisk-fat-") as staging:
            for name, data in files.items():
                folder = ""
                for piece in name.split("/")[:-1]:
                    folder += f"/{piece}"
                    subprocess.run(["mmd", "-i", device, f"::{folder}"], capture_output=True,
                                   env=MTOOLS_ENV, timeout=60)
                source = Path(staging) / name.replace("/", "_")
                source.write_bytes(data)
                run(["mcopy", "-i", device, str(source), f"::/{name}"], 60, env=MTOOLS_ENV)
        return
    with mounted(device, fs, read_only=False) as root:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)


def read_file(device: str, fs: str, root: Path | None, name: str) -> bytes:
    if fs == "vfat":
        with tempfile.TemporaryDirectory(prefix="sectordisk-fat-") as staging:
            out = Path(staging) / "out"
            run(["mcopy", "-n", "-i", device, f"::/{name}", str(out)], 60, env=MTOOLS_ENV)
            return out.read_bytes()
    assert root is not None
    return (root / name).read_bytes()


def partition_table(path: Path, sector_size: int) -> list[tuple[int, int, int, str]]:
    """(number, start byte, size in bytes, type) of each partition as sfdisk reads the disk with
    sector_size-byte sectors (the extended container of an MBR included)."""
    with loop(path, sector_size, read_only=True) as device:
        run(["sfdisk", "--verify", device], 60)
        table = json.loads(run(["sfdisk", "--json", device], 60).stdout)["partitiontable"]
    assert table["sectorsize"] == sector_size, table
    return [(int(p["node"].rsplit("p", 1)[1]), p["start"] * sector_size, p["size"] * sector_size,
             p["type"].upper()) for p in table["partitions"]]


def check_disk(path: Path, spec: DiskSpec, files: Mapping[str, bytes],
               sector_size: int | None = None, extra: Mapping[int, Mapping[str, bytes]] = {}
               ) -> None:
    """Assert the disk, read with sector_size-byte sectors (default the spec's), has spec's
    partitions at the same bytes, each filesystem passes its own checker and holds every file
    of `files` (and of extra[partition number]) byte for byte."""
    ss = sector_size or spec.sector_size
    found = {number: (start, size, kind) for number, start, size, kind in partition_table(path, ss)}
    for number, part in spec.numbered():
        assert found.get(number, ())[:2] == (part.offset, part.size), (number, found)
        assert found[number][2] == TYPES[spec.table][part.fs].upper(), (number, found)
        with loop(path, ss, part.offset, part.size, read_only=True) as device:
            run([*CHECK[part.fs], device], 300)
            expected = {**files, **extra.get(number, {})}
            with (contextlib.nullcontext(None) if part.fs == "vfat"
                  else mounted(device, part.fs, read_only=True)) as root:
                for name, data in expected.items():
                    assert read_file(device, part.fs, root, name) == data, \
                        f"{name} differs on partition {number} ({part.fs})"


def digest(path: Path) -> str:
    """SHA-256 of a whole disk file (sparse-aware enough for a few hundred MiB)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * MiB), b""):
            sha.update(block)
    return sha.hexdigest()
