"""Unit tests for img restore --shrink: the planning and refusal messages in img.restore (pure,
from image metadata) and the tool calls in img.shrink, run on real ext4 and NTFS filesystems
made here on sparse files (no root needed); a test skips when its tools are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from img.disklayout import DiskLayout, Partition
from img.disk import Disk
from img.restore import RestoreError, _plan_shrink, _shrink_file, _too_small
from img.shrink import (FAT_LEAD, Scratch, ShrinkError, ShrinkJob, check_filesystem,
                        check_space, copy_prefix, create_scratch, minimum_size, refusal,
                        scratch_needed, shrink_filesystem)

MiB = 1 << 20


def needs(*tools: str):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing))


def run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr!r}"
    return done


def mbr_logical_last() -> DiskLayout:
    """64 MiB: partition 1 (16 MiB), extended 2 to the end holding logical 5 to the end."""
    return DiskLayout("mbr", 512, 64 * MiB, "0x00000001", (
        Partition(1, 2048, 32768, "0x83"),
        Partition(2, 34816, 96256, "0x05"),
        Partition(5, 36864, 94208, "0x83"),
    ))


def metadata(layout: DiskLayout, filesystems: dict[int, str], used: dict[int, int]) -> dict:
    streams = [{"number": 0, "role": "disk-head", "size": MiB, "fill": "zero", "disk_offset": 0}]
    for n, part in enumerate((p for p in layout.partitions if not p.is_extended), 1):
        streams.append({"number": n, "role": "partition", "partition": part.number,
                        "filesystem": filesystems[part.number], "size": part.size_bytes(512),
                        "used_bytes": used[part.number], "fill": "free",
                        "disk_offset": part.start_bytes(512)})
    return {"type": "base", "disk": {"size": layout.disk_size, "layout": layout.to_dict()},
            "streams": streams}


# --- planning (pure) -----------------------------------------------------------------------------

def test_plan_shrinks_the_logical_partition_at_the_end():
    layout = mbr_logical_last()
    plan = _plan_shrink(metadata(layout, {1: "ext4", 5: "ext4"}, {1: MiB, 5: 10 * MiB}),
                        layout, 40 * MiB)
    assert plan.reason == ""
    assert plan.jobs == (ShrinkJob(5, 2, "ext4", 94208 * 512, 40 * MiB - 36864 * 512,
                                   10 * MiB),)
    assert plan.layout.partition(2).end_lba == plan.layout.partition(5).end_lba == 81920
    message = _too_small("/dev/x", 40 * MiB, 64 * MiB, plan, shrink=False)
    assert message == ("/dev/x is 40 MiB (41943040 bytes); the image needs at least 64 MiB "
                       "(67108864 bytes, for its partitions and table); the used data (10 MiB) "
                       "would fit in 22 MiB: use --shrink to shrink partition 5 (img auto: a "
                       "rule with shrink = yes)")


@pytest.mark.parametrize("filesystem, why", [
    ("xfs", "partition 5 cannot be shrunk: XFS cannot be shrunk"),
    ("btrfs", "partition 5 cannot be shrunk: btrfs can only be shrunk while mounted"),
    ("raw", "partition 5 cannot be shrunk: it was stored raw"),
])
def test_plan_refuses_filesystems_that_cannot_shrink(filesystem, why):
    layout = mbr_logical_last()
    # a raw partition's used bytes are its whole size: the reason must still be "raw"
    plan = _plan_shrink(metadata(layout, {1: "ext4", 5: filesystem}, {1: MiB, 5: 46 * MiB}),
                        layout, 40 * MiB)
    assert plan.layout is None and plan.reason.startswith(why)
    assert why in _too_small("/dev/x", 40 * MiB, 64 * MiB, plan, shrink=True)
    assert "would not fit even shrunk" in _too_small("/dev/x", 40 * MiB, 64 * MiB, plan, False)


def test_plan_refuses_when_the_used_data_does_not_fit():
    layout = mbr_logical_last()
    plan = _plan_shrink(metadata(layout, {1: "ext4", 5: "ntfs"}, {1: MiB, 5: 30 * MiB}),
                        layout, 40 * MiB)
    assert plan.reason == "partition 5 would get 22 MiB but its data needs at least 30 MiB"


def test_plan_leaves_earlier_partitions_alone_and_never_moves_one():
    layout = mbr_logical_last()
    plan = _plan_shrink(metadata(layout, {1: "xfs", 5: "ext4"}, {1: MiB, 5: MiB}), layout,
                        18 * MiB + 4096)
    assert plan.reason.startswith("partition 5 starts at byte 18874368")
    plan = _plan_shrink(metadata(layout, {1: "xfs", 5: "ext4"}, {1: MiB, 5: MiB}), layout,
                        24 * MiB)
    assert plan.layout.partition(1) == layout.partition(1), "xfs is fine where nothing is cut"


def test_refusal_and_scratch_space():
    assert refusal("ext4", 3) is None and refusal("ntfs", 3) is None
    assert refusal("vfat", 3) is None
    assert refusal("mystery", 3).startswith("partition 3 cannot be shrunk: it was stored raw")
    assert scratch_needed(100 * MiB) == 125 * MiB + 16 * MiB
    with pytest.raises(ShrinkError, match="scratch directory .* needs about"):
        check_space("/", 1 << 62)


# --- the tools on real filesystems ---------------------------------------------------------------

def files(tmp: Path) -> dict[str, bytes]:
    data = {"a.bin": os.urandom(2 * MiB + 5), "b.txt": b"hello\n" * 1000}
    (tmp / "src").mkdir()
    for name, content in data.items():
        (tmp / "src" / name).write_bytes(content)
    return data


@needs("mkfs.ext4", "resize2fs", "e2fsck", "debugfs")
def test_ext4_minimum_shrink_and_check(tmp_path):
    data = files(tmp_path)
    fs = tmp_path / "ext4.fs"
    with open(fs, "wb") as f:
        f.truncate(48 * MiB)
    run("mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "src"), str(fs))
    scratch = Scratch(str(fs), "ext4")
    minimum = minimum_size(scratch)
    assert 2 * MiB < minimum < 20 * MiB
    job = ShrinkJob(1, 1, "ext4", 48 * MiB, minimum - MiB, 0)
    with pytest.raises(RestoreError, match=r"partition 1 \(ext4\) would get .* but ext4 needs"):
        _shrink_file(job, scratch)
    shrink_filesystem(scratch, 20 * MiB)
    assert fs.stat().st_size == 20 * MiB
    check_filesystem(scratch, 20 * MiB)
    for name, content in data.items():
        out = tmp_path / "out"
        run("debugfs", "-R", f"dump /{name} {out}", str(fs))
        assert out.read_bytes() == content


@needs("mkntfs", "ntfscp", "ntfsresize", "ntfsfix", "ntfscat")
def test_ntfs_minimum_shrink_and_check(tmp_path):
    data = files(tmp_path)
    fs = tmp_path / "ntfs.fs"
    with open(fs, "wb") as f:
        f.truncate(32 * MiB)
    run("mkntfs", "-q", "-F", "-Q", str(fs))
    for name in data:
        run("ntfscp", "-q", str(fs), str(tmp_path / "src" / name), f"/{name}")
    scratch = Scratch(str(fs), "ntfs")
    minimum = minimum_size(scratch)
    assert 2 * MiB < minimum < 12 * MiB
    shrink_filesystem(scratch, 12 * MiB)
    assert fs.stat().st_size == 12 * MiB
    check_filesystem(scratch, 12 * MiB)
    for name, content in data.items():
        assert run("ntfscat", "-f", str(fs), f"/{name}").stdout == content


@needs("mkfs.ext4", "e2fsck")
def test_a_broken_filesystem_fails_its_check_with_the_tools_words(tmp_path):
    fs = tmp_path / "broken.fs"
    with open(fs, "wb") as f:
        f.truncate(8 * MiB)
    with pytest.raises(ShrinkError, match=r"^e2fsck failed \(exit status \d+\): "):
        check_filesystem(Scratch(str(fs), "ext4"), 8 * MiB)


def test_copy_prefix_writes_data_and_zeros_holes_only_up_to_the_length(tmp_path):
    scratch = tmp_path / "scratch"
    with open(scratch, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(b"A" * 5000)
        f.seek(9 * MiB)
        f.write(b"B" * MiB)
        f.seek(15 * MiB)
        f.write(b"C" * 10)             # beyond the length copied
    target = tmp_path / "disk"
    target.write_bytes(b"\xff" * (20 * MiB))
    with Disk.open(str(target), writable=True) as disk:
        copy_prefix(Scratch(str(scratch), "ext4"), disk, 2 * MiB, 12 * MiB)
    got = target.read_bytes()
    expected = bytearray(b"\xff" * (20 * MiB))
    expected[2 * MiB:14 * MiB] = scratch.read_bytes()[:12 * MiB]
    assert got == bytes(expected)
    # with a lead (FAT's MBR area) the filesystem's bytes start after it
    with Disk.open(str(target), writable=True) as disk:
        copy_prefix(Scratch(str(scratch), "vfat", MiB), disk, 0, 4 * MiB)
    assert target.read_bytes()[:4 * MiB] == scratch.read_bytes()[MiB:5 * MiB]


@needs("mkfs.vfat", "mcopy", "fatresize", "fsck.fat", "losetup", "sfdisk")
@pytest.mark.skipif(os.geteuid() != 0, reason="fsck.fat reads the shrunk FAT via a loop device")
def test_fat_in_a_scratch_file_with_its_mbr_area(tmp_path):
    data = files(tmp_path)
    size = 400 * MiB            # libparted shrinks FAT32 only while it keeps 65525 clusters
    scratch = create_scratch(str(tmp_path / "fat.scratch"), "vfat", size)
    assert scratch.lead == FAT_LEAD
    assert "start=        2048, size=      819200, type=c" in run(
        "sfdisk", "-d", scratch.path).stdout.decode()
    fs = tmp_path / "fat.fs"
    with open(fs, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-F", "32", str(fs))
    for name in data:
        run("mcopy", "-i", str(fs), str(tmp_path / "src" / name), f"::/{name}")
    with open(scratch.path, "r+b") as out:
        out.seek(FAT_LEAD)
        out.write(fs.read_bytes())
    minimum = minimum_size(scratch)
    assert minimum < 300 * MiB
    shrink_filesystem(scratch, 300 * MiB)
    assert os.path.getsize(scratch.path) == FAT_LEAD + 300 * MiB
    check_filesystem(scratch, 300 * MiB)
    for name, content in data.items():
        out = tmp_path / "out"
        out.unlink(missing_ok=True)
        run("mcopy", "-n", "-i", f"{scratch.path}@@{FAT_LEAD}", f"::/{name}", str(out))
        assert out.read_bytes() == content
