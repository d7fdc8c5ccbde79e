"""img/grow.py without tools: the decision table (which tool grows which filesystem), which
partitions a grown layout hands to it, the printed lines, and human sizes."""

from __future__ import annotations

import pytest

from img.disklayout import DiskLayout, Partition
from img.grow import GrowJob, GrowOutcome, grow_filesystems, grow_jobs, method
from common.units import human, human_exact, ratio

MiB = 1 << 20


@pytest.mark.parametrize("filesystem, tool, mounted", [
    ("ext2", "resize2fs", False), ("ext3", "resize2fs", False), ("ext4", "resize2fs", False),
    ("xfs", "xfs_growfs", True), ("btrfs", "btrfs", True), ("ntfs", "ntfsresize", False),
    ("vfat", "fatresize", False),
])
def test_decision_table(filesystem: str, tool: str, mounted: bool) -> None:
    chosen = method(filesystem)
    assert chosen.supported and tool in chosen.tools and chosen.mounted is mounted
    if filesystem.startswith("ext"):
        assert "e2fsck" in chosen.tools
    if mounted:
        assert {"mount", "umount", "losetup"} <= set(chosen.tools)


@pytest.mark.parametrize("filesystem", ["raw", "swap", "hfsplus", ""])
def test_other_filesystems_are_left_with_a_reason(filesystem: str) -> None:
    chosen = method(filesystem)
    assert not chosen.supported and chosen.reason


def test_grow_jobs_are_the_grown_data_partitions_in_bytes() -> None:
    source = DiskLayout("mbr", 512, 100 * MiB, "0x1", (
        Partition(1, 2048, 2048, "0x83"), Partition(2, 4096, 100000, "0x05"),
        Partition(5, 6144, 97952, "0x83")))
    target = source.grown(300 * MiB)
    jobs = grow_jobs(source, target, {1: "vfat", 5: "ext4"})
    assert jobs == (GrowJob(5, "ext4", 6144 * 512, 97952 * 512,
                            target.partition(5).size_bytes(512)),)
    assert grow_jobs(source, source.relocated(300 * MiB), {5: "ext4"}) == ()
    converted = target.converted(4096)
    assert grow_jobs(source, converted, {5: "ext4"})[0].new_size == jobs[0].new_size


def test_an_unknown_filesystem_is_left_and_nothing_runs(tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MiB))
    job = GrowJob(2, "raw", 0, MiB // 2, MiB)
    writes = []
    (outcome,) = grow_filesystems(str(disk), DiskLayout("none", 512, MiB, "", ()), (job,),
                                  lambda offset, data: writes.append(offset))
    assert outcome.status == "left" and not writes
    assert "the filesystem was left at its size" in outcome.line()
    assert "512.0 KiB -> 1.0 MiB" in outcome.line()


def test_outcome_lines() -> None:
    job = GrowJob(2, "ext4", 0, 80 * MiB, 176 * MiB)
    grown = GrowOutcome(job, "grown", 80 * MiB, 176 * MiB).line()
    assert grown.startswith("grew partition 2 (ext4): filesystem 80.0 MiB -> 176.0 MiB "
                            f"({80 * MiB} -> {176 * MiB} bytes)")
    failed = GrowOutcome(job, "failed", 80 * MiB, 80 * MiB, "resize2fs failed").line()
    assert "restore is complete" in failed and "FAILED: resize2fs failed" in failed
    assert "data intact" in failed


def test_human_sizes() -> None:
    assert human(512) == "512 B" and human(1536) == "1.5 KiB" and human(3 << 30) == "3.0 GiB"
    assert human_exact(MiB) == f"1.0 MiB ({MiB} bytes)"
    assert ratio(300, 100) == "3.0:1" and ratio(1, 0) == "-"
