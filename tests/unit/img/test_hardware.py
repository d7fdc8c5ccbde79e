"""img.hardware's disk list, read from a sysfs tree made here."""

from __future__ import annotations

from pathlib import Path

from img.hardware import disks


def _disk(base: Path, name: str, sectors_512: int, logical: int | None, model: str = "") -> None:
    (base / name / "queue").mkdir(parents=True)
    (base / name / "size").write_text(f"{sectors_512}\n")
    if logical is not None:
        (base / name / "queue" / "logical_block_size").write_text(f"{logical}\n")
    if model:
        (base / name / "device").mkdir()
        (base / name / "device" / "model").write_text(model + "\n")


def test_disks_report_size_and_logical_sector_size(tmp_path):
    # /sys/block/*/size counts 512-byte units even on a 4Kn disk
    _disk(tmp_path, "sda", 2 * 1024 * 1024, 4096, "QEMU HARDDISK")
    _disk(tmp_path, "vda", 81920, 512)
    _disk(tmp_path, "nvme0n1", 204800, None)
    _disk(tmp_path, "loop0", 2048, 512)
    _disk(tmp_path, "sdb", 0, 512)
    assert disks(tmp_path) == [
        {"name": "nvme0n1", "size_mb": 100, "sector_size": 512, "model": ""},
        {"name": "sda", "size_mb": 1024, "sector_size": 4096, "model": "QEMU HARDDISK"},
        {"name": "vda", "size_mb": 40, "sector_size": 512, "model": ""},
    ]


def test_no_sysfs_is_no_disks(tmp_path):
    assert disks(tmp_path / "absent") == []
