"""img/disklayout.py against real partitioning tools: sfdisk (util-linux) and sgdisk (gdisk).

Tables made by the tools are parsed and compared with `sfdisk --json`; tables we write (grown onto
a larger blank image) are read back by the tools, which must agree and find no problems.
Everything runs on sparse image files in tmp_path; the 4096-byte sector test needs a loop device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from img.disklayout import DiskLayout, apply_writes, read_layout, table_writes

MiB = 1024 * 1024
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BASIC = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
needs_sgdisk = pytest.mark.skipif(shutil.which("sgdisk") is None or shutil.which("sfdisk") is None,
                                  reason="sgdisk or sfdisk not installed")

MBR_SCRIPT = """label: dos
label-id: 0x1234abcd
,8M,83,*
,8M,7
,40M,5
,4M,83
,4M,82
,6M,83
,,c
"""

# the extended partition ends the disk, so a logical partition is the last one
LOGICAL_LAST_SCRIPT = """label: dos
label-id: 0x0badcafe
,8M,83,*
,8M,7
,,5
,4M,82
,6M,83
,,c
"""


def run(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sfdisk_json(path: Path) -> dict:
    return json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]


def sfdisk_verify(path: Path) -> None:
    """sfdisk --verify exits 0 even when it finds errors; its report tells."""
    result = subprocess.run(["sfdisk", "--verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert "No errors detected" in result.stdout, result.stdout + result.stderr


def restore(layout: DiskLayout, path: Path, boot_code: bytes = b"") -> Path:
    blank(path, layout.disk_size)
    with open(path, "r+b") as f:
        apply_writes(table_writes(layout, boot_code), f)
    return path


def assert_same_as_sfdisk(layout: DiskLayout, table: dict) -> None:
    assert table["label"] == ("dos" if layout.kind == "mbr" else "gpt")
    assert table["id"].lower() == layout.disk_id.lower()
    assert table.get("sectorsize", 512) == layout.sector_size
    theirs = {int(p["node"].rsplit("p", 1)[-1] if p["node"].startswith("/dev/loop")
                  else p["node"].rsplit("img", 1)[-1]): p for p in table["partitions"]}
    assert sorted(theirs) == [p.number for p in layout.partitions]
    for part in layout.partitions:
        their = theirs[part.number]
        assert (their["start"], their["size"]) == (part.start_lba, part.size_lba), part
        if layout.kind == "mbr":
            assert int(their["type"], 16) == int(part.type, 16)
            assert their.get("bootable", False) == part.bootable
        else:
            assert their["type"] == part.type and their["uuid"] == part.guid
            assert their.get("name", "") == part.name
    if layout.kind == "gpt":
        assert (table["firstlba"], table["lastlba"]) == (layout.first_usable_lba,
                                                        layout.last_usable_lba)


def written_regions(layout: DiskLayout, path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[offset:offset + len(chunk)] for offset, chunk in table_writes(layout)]


# --- MBR -----------------------------------------------------------------------------------------

@needs_sfdisk
def test_sfdisk_mbr_with_logical_partitions(tmp_path):
    disk = blank(tmp_path / "mbr.img", 64 * MiB)
    run("sfdisk", "-q", str(disk), stdin=MBR_SCRIPT)
    layout = read_layout(disk)
    assert layout.warnings == ()
    assert [p.number for p in layout.partitions] == [1, 2, 3, 4, 5, 6, 7]
    assert layout.partition(1).bootable and layout.partition(3).is_extended
    assert_same_as_sfdisk(layout, sfdisk_json(disk))
    # restored onto the same size, our writes are byte for byte what sfdisk wrote (CHS included)
    boot_code = disk.read_bytes()[:440]
    copy = restore(layout, tmp_path / "copy.img", boot_code)
    assert written_regions(layout, copy) == [chunk for _, chunk in table_writes(layout, boot_code)]
    assert written_regions(layout, copy) == written_regions(layout, disk)


@needs_sfdisk
def test_mbr_grown_with_a_logical_partition_last(tmp_path):
    disk = blank(tmp_path / "mbr.img", 64 * MiB)
    run("sfdisk", "-q", str(disk), stdin=LOGICAL_LAST_SCRIPT)
    layout = read_layout(disk)
    assert_same_as_sfdisk(layout, sfdisk_json(disk))
    grown = layout.grown(96 * MiB)
    target = restore(grown, tmp_path / "big.img")
    assert_same_as_sfdisk(grown, sfdisk_json(target))
    assert read_layout(target) == grown
    # the last logical partition and its extended container reach the end of the disk
    assert grown.partition(7).end_lba == grown.partition(3).end_lba == 96 * MiB // 512
    assert grown.partition(5) == layout.partition(5)
    sfdisk_verify(target)


@needs_sfdisk
def test_mbr_grown_with_a_primary_partition_last(tmp_path):
    disk = blank(tmp_path / "mbr.img", 64 * MiB)
    run("sfdisk", "-q", str(disk), stdin=MBR_SCRIPT)
    layout = read_layout(disk)
    grown = layout.grown(96 * MiB)
    target = restore(grown, tmp_path / "big.img")
    assert_same_as_sfdisk(grown, sfdisk_json(target))
    assert grown.partition(4).end_lba == 96 * MiB // 512
    assert grown.partition(3) == layout.partition(3)
    assert read_layout(target) == grown
    sfdisk_verify(target)


# --- GPT -----------------------------------------------------------------------------------------

def make_gpt(path: Path, size: int = 64 * MiB) -> Path:
    blank(path, size)
    run("sgdisk", "-U", "11111111-2222-3333-4444-555555555555",
        "-n", "1:2048:+8M", "-t", "1:EF00", "-c", "1:EFI system",
        "-n", "2:0:+16M", "-t", "2:8300", "-c", "2:Linux root", "-A", "2:set:2",
        "-A", "2:set:60", "-A", "2:set:63",
        "-n", "5:0:+4M", "-t", "5:8200", "-c", "5:swap",
        "-n", "3:0:0", "-t", "3:0700", "-c", "3:Données", str(path))
    return path


def sgdisk_attributes(path: Path, number: int) -> int:
    for line in run("sgdisk", "-i", str(number), str(path)).splitlines():
        if line.startswith("Attribute flags:"):
            return int(line.split(":")[1], 16)
    raise AssertionError("no attribute flags line")


def sgdisk_verify(path: Path) -> str:
    out = run("sgdisk", "-v", str(path))
    assert "No problems found" in out, out
    return out


@needs_sgdisk
def test_sgdisk_gpt_with_names_types_attributes(tmp_path):
    disk = make_gpt(tmp_path / "gpt.img")
    layout = read_layout(disk)
    assert layout.warnings == ()
    assert [p.number for p in layout.partitions] == [1, 2, 3, 5]
    assert [p.type for p in layout.partitions][:3] == [ESP, LINUX, BASIC]
    assert layout.partition(3).name == "Données"
    assert layout.partition(2).attributes == (1 << 63) | (1 << 60) | (1 << 2)
    assert_same_as_sfdisk(layout, sfdisk_json(disk))
    for number in (1, 2, 3, 5):
        assert sgdisk_attributes(disk, number) == layout.partition(number).attributes
    copy = restore(layout, tmp_path / "copy.img", disk.read_bytes()[:440])
    assert written_regions(layout, copy) == written_regions(layout, disk)


@needs_sgdisk
def test_gpt_grown_onto_a_larger_disk(tmp_path):
    disk = make_gpt(tmp_path / "gpt.img")
    grown = read_layout(disk).grown(100 * MiB)
    target = restore(grown, tmp_path / "big.img")
    sgdisk_verify(target)
    table = sfdisk_json(target)
    assert_same_as_sfdisk(grown, table)
    assert grown.partition(3).end_lba - 1 == table["lastlba"] == 100 * MiB // 512 - 34
    assert sgdisk_attributes(target, 2) == grown.partition(2).attributes
    assert read_layout(target) == grown


@needs_sgdisk
def test_gpt_relocated_keeps_partitions_and_moves_the_backup(tmp_path):
    disk = make_gpt(tmp_path / "gpt.img")
    layout = read_layout(disk)
    moved = layout.relocated(80 * MiB)
    target = restore(moved, tmp_path / "big.img")
    sgdisk_verify(target)
    assert_same_as_sfdisk(moved, sfdisk_json(target))
    assert read_layout(target).partitions == layout.partitions


@needs_sgdisk
def test_corrupt_primary_gpt_is_read_from_the_backup_and_repaired(tmp_path):
    disk = make_gpt(tmp_path / "gpt.img")
    good = read_layout(disk)
    with open(disk, "r+b") as f:
        f.seek(512 + 24)
        f.write(b"\xff" * 8)            # MyLBA, without fixing the header CRC
    damaged = read_layout(disk)
    assert damaged == good and "primary GPT header invalid" in damaged.warnings[0]
    with open(disk, "r+b") as f:
        apply_writes(table_writes(damaged, disk.read_bytes()[:440]), f)
    sgdisk_verify(disk)
    assert read_layout(disk).warnings == ()


@needs_sgdisk
def test_disk_enlarged_by_copying_then_relocated(tmp_path):
    """dd of a small disk onto a big one: the backup is in the middle; relocated() fixes it."""
    disk = make_gpt(tmp_path / "gpt.img", 32 * MiB)
    big = tmp_path / "big.img"
    shutil.copyfile(disk, big)
    with open(big, "r+b") as f:
        f.truncate(64 * MiB)
    layout = read_layout(big)
    assert any("not at the last LBA" in w for w in layout.warnings)
    with open(big, "r+b") as f:
        apply_writes(table_writes(layout.relocated(64 * MiB), disk.read_bytes()[:440]), f)
    sgdisk_verify(big)
    assert read_layout(big).warnings == ()


# --- no table ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mkfs", [
    ["mkfs.vfat", "-I"], ["mkfs.vfat", "-I", "-F", "32"], ["mkfs.ntfs", "-F", "-f", "-q"],
    ["mkfs.ext4", "-q", "-F"],
])
def test_whole_disk_filesystems_have_no_table(tmp_path, mkfs):
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} not installed")
    disk = blank(tmp_path / "fs.img", 64 * MiB)
    run(*mkfs, str(disk))
    layout = read_layout(disk)
    assert (layout.kind, layout.partitions, layout.warnings) == ("none", (), ())
    assert table_writes(layout) == [] and layout.last_used_byte() == 64 * MiB


# --- 4096-byte sectors, through a loop device ----------------------------------------------------

@pytest.fixture
def loop_4k(tmp_path):
    """A loop device with 4096-byte logical sectors over a 64 MiB sparse image, or skip."""
    if shutil.which("losetup") is None or shutil.which("sgdisk") is None:
        pytest.skip("losetup or sgdisk not installed")
    image = blank(tmp_path / "4k.img", 64 * MiB)
    result = subprocess.run(["losetup", "--sector-size", "4096", "-f", "--show", str(image)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"no loop device: {result.stderr.strip()}")
    device = result.stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], timeout=30)


@pytest.mark.root
def test_gpt_on_4096_byte_sectors(loop_4k, tmp_path):
    run("sgdisk", "-n", "1:0:+8M", "-t", "1:EF00", "-c", "1:esp", "-n", "2:0:0", "-t", "2:8300",
        str(loop_4k))
    layout = read_layout(loop_4k, sector_size=None)
    assert layout.sector_size == 4096 and layout.first_usable_lba == 6
    assert_same_as_sfdisk(layout, sfdisk_json(loop_4k))
    with open(loop_4k, "r+b") as f:
        f.write(bytes(4096))            # wipe the protective MBR and primary header
        f.seek(4096)
        f.write(bytes(4096))
    assert read_layout(loop_4k, sector_size=None).kind == "none"
    with open(loop_4k, "r+b") as f:
        apply_writes(table_writes(layout), f)
    sgdisk_verify(loop_4k)
    assert read_layout(loop_4k, sector_size=None) == layout
