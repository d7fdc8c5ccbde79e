"""img restore --grow on real filesystems: a small image whose last partition holds ext4, XFS,
btrfs, NTFS or FAT32 restored onto a larger disk file; the partition entry and the filesystem
inside it both grow (the filesystem's own tools say its new size), the files are intact and the
filesystem checks clean. A partition stored raw grows its entry only, and img says the
filesystem was left at its size.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.test_img_shrink import (FILES, MiB, blank, build, data_partitions,
                                               extract, img, run, check_files)
from tests.support import disk_tool_marks

TOOLS = ("sfdisk", "sgdisk", "losetup", "mount", "umount", "mkfs.ext4", "debugfs", "e2fsck",
         "resize2fs", "dumpe2fs", "mkntfs", "ntfscp", "ntfscat", "ntfsfix", "ntfsresize",
         "mkfs.vfat", "mcopy", "fsck.vfat", "fatresize", "partclone.ext4", "partclone.ntfs",
         "partclone.fat")
pytestmark = disk_tool_marks(TOOLS)


def fs_size(kind: str, fs: Path) -> int:
    """The filesystem's size in bytes, as its own tools say."""
    if kind == "ext4":
        out = run("dumpe2fs", "-h", str(fs)).stdout
        count = int(re.search(r"Block count:\s+(\d+)", out).group(1))
        return count * int(re.search(r"Block size:\s+(\d+)", out).group(1))
    if kind == "ntfs":
        out = run("ntfsresize", "--info", "--no-progress-bar", "-f", str(fs)).stdout
        return int(re.search(r"Current volume size:\s*(\d+) bytes", out).group(1))
    if kind == "vfat":
        out = run("minfo", "-i", str(fs), "::").stdout
        sectors = int(re.search(r"big size:\s*(\d+) sectors", out).group(1))
        return sectors * int(re.search(r"sector size:\s*(\d+)", out).group(1))
    with loop(fs) as device, mounted(device, kind) as point:
        if kind == "xfs":
            out = run("xfs_info", point).stdout
            match = re.search(r"^data\s+=\s+bsize=(\d+)\s+blocks=(\d+)", out, re.M)
            return int(match.group(1)) * int(match.group(2))
        out = run("btrfs", "filesystem", "show", "--raw", point).stdout
        return int(re.search(r"devid\s+1 size (\d+)", out).group(1))


class loop:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        self.device = run("losetup", "--find", "--show", str(self.path)).stdout.strip()
        return self.device

    def __exit__(self, *exc: object) -> None:
        run("losetup", "--detach", self.device)


class mounted:
    def __init__(self, device: str, kind: str):
        self.device, self.kind = device, kind

    def __enter__(self) -> str:
        self.point = tempfile.mkdtemp(prefix="grow-test-")
        run("mount", "-t", self.kind, self.device, self.point)
        return self.point

    def __exit__(self, *exc: object) -> None:
        run("umount", self.point)
        os.rmdir(self.point)


def fill(kind: str, fs: Path) -> None:
    """Put FILES into an XFS or btrfs filesystem (mounted), the kinds make_fs leaves empty."""
    with loop(fs) as device, mounted(device, kind) as point:
        for name, data in FILES.items():
            Path(point, name).write_bytes(data)


def check(kind: str, fs: Path, tmp: Path) -> None:
    if kind in ("ext4", "ntfs", "vfat"):
        check_files(kind, fs, tmp)
        return
    if kind == "xfs":
        run("xfs_repair", "-n", str(fs))
    else:
        run("btrfs", "check", "--readonly", str(fs))
    with loop(fs) as device, mounted(device, kind) as point:
        for name, data in FILES.items():
            assert Path(point, name).read_bytes() == data, f"{kind} {name}"


def grow_and_check(tmp: Path, kind: str, disk_mib: int, large_mib: int,
                   label: str = "gpt") -> None:
    first = "ext4" if kind != "ext4" else "vfat"
    disk = build(tmp, label, (first, kind if kind not in ("xfs", "btrfs") else "raw"), disk_mib)
    part = data_partitions(disk)[-1]
    if kind in ("xfs", "btrfs"):
        fs = tmp / f"{kind}.fs"
        with open(fs, "wb") as f:
            f.truncate(part["size"] * 512)
        run(f"mkfs.{kind}", "-q", "-f", str(fs))
        fill(kind, fs)
        run("dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={part['start'] * 512}",
            "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")
    before = fs_size(kind, extract(disk, part, tmp / "before.fs"))
    image = tmp / "small.pbimg"
    made = img("make", "--disk", str(disk), str(image))
    assert "compression" in made.stdout and "MiB" in made.stdout, made.stdout
    large = blank(tmp / "large.disk", large_mib)
    done = img("restore", "--disk", str(large), "--grow", str(image))
    new = data_partitions(large)[-1]
    assert new["start"] == part["start"] and new["size"] > part["size"]
    grown = extract(large, new, tmp / "after.fs")
    after = fs_size(kind, grown)
    assert after > before + (large_mib - disk_mib - 3) * MiB, (before, after)
    assert after <= new["size"] * 512
    number = data_partitions(large)[-1]["node"][-1]
    said = re.search(rf"grew partition {number} \({kind}\): filesystem [\d.]+ MiB -> "
                     rf"[\d.]+ MiB \((\d+) -> (\d+) bytes\)", done.stdout)
    assert said, done.stdout
    # img reads the superblock; NTFS's tools count whole clusters: a few sectors apart at most
    assert abs(int(said.group(1)) - before) < 64 * 1024 and abs(int(said.group(2)) - after) < \
        64 * 1024, (said.group(0), before, after)
    if label == "gpt":
        assert "No problems found" in run("sgdisk", "-v", str(large)).stdout
    run("sfdisk", "--verify", str(large))
    check(kind, grown, tmp)
    old_first = data_partitions(disk)[0]
    check(first, extract(large, data_partitions(large)[0], tmp / "first.fs"), tmp)
    assert data_partitions(large)[0] == {**old_first, "node": data_partitions(large)[0]["node"]}


def test_grow_ext4_in_a_logical_partition_of_an_mbr_disk(tmp_path: Path) -> None:
    grow_and_check(tmp_path, "ext4", 96, 200, label="mbr")


def test_grow_ntfs(tmp_path: Path) -> None:
    grow_and_check(tmp_path, "ntfs", 96, 200)


def test_grow_fat32(tmp_path: Path) -> None:
    # FAT32 wants 65525 clusters: a (sparse) 400 MiB disk makes one
    grow_and_check(tmp_path, "vfat", 400, 600)


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None or shutil.which("partclone.xfs") is None,
                    reason="needs mkfs.xfs and partclone.xfs")
def test_grow_xfs(tmp_path: Path) -> None:
    # recent mkfs.xfs refuses filesystems under 300 MiB; the disk files are sparse
    grow_and_check(tmp_path, "xfs", 340, 500)


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None or
                    shutil.which("partclone.btrfs") is None,
                    reason="needs mkfs.btrfs and partclone.btrfs")
def test_grow_btrfs(tmp_path: Path) -> None:
    grow_and_check(tmp_path, "btrfs", 200, 400)


def test_a_raw_partition_grows_its_entry_and_says_the_filesystem_was_left(
        tmp_path: Path) -> None:
    disk = build(tmp_path, "gpt", ("ext4", "raw"))
    with open(disk, "r+b") as f:          # something no tool recognises
        f.seek(data_partitions(disk)[-1]["start"] * 512)
        f.write(os.urandom(MiB))
    image = tmp_path / "raw.pbimg"
    img("make", "--disk", str(disk), str(image))
    large = blank(tmp_path / "large.disk", 160)
    done = img("restore", "--disk", str(large), "--grow", str(image))
    assert "grew partition 2 (raw): partition entry" in done.stdout, done.stdout
    assert "the filesystem was left at its size" in done.stdout, done.stdout
    assert data_partitions(large)[-1]["size"] > data_partitions(disk)[-1]["size"]


def test_a_failing_grow_tool_leaves_the_restore_whole_and_exits_3(tmp_path: Path) -> None:
    disk = build(tmp_path, "gpt", ("vfat", "ext4"))
    image = tmp_path / "small.pbimg"
    img("make", "--disk", str(disk), str(image))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "resize2fs").write_text("#!/bin/sh\necho 'resize2fs: error: simulated' >&2\nexit 1\n")
    (fake / "resize2fs").chmod(0o755)
    large = blank(tmp_path / "large.disk", 200)
    from tests.support import REPO
    import sys
    done = subprocess.run([sys.executable, "-m", "img", "restore", "--disk", str(large),
                           "--grow", str(image)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO),
                                             PATH=f"{fake}:{os.environ['PATH']}"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the restore is complete, but growing its filesystem FAILED: resize2fs failed " \
           "(exit status 1): resize2fs: error: simulated" in done.stderr, done.stderr
    new = data_partitions(large)[-1]
    assert new["size"] > data_partitions(disk)[-1]["size"]
    check_files("ext4", extract(large, new, tmp_path / "after.fs"), tmp_path)
