"""img on disks with 4096-byte logical sectors (4Kn) and 512-byte ones, through loop devices.

Four source disks, each filesystem made by its own mkfs on a loop device with the disk's sector
size and filled with files through its own driver (tests/sectordisks.py):
- 4kn-gpt: GPT on a 4Kn disk with ext4, xfs, NTFS and FAT;
- 4kn-mbr: MBR on a 4Kn disk, ext4 primary, FAT and NTFS as logical partitions;
- 512-gpt-4k-units: GPT on a 512-byte disk whose filesystems all have 4096-byte sectors or
  blocks (ext4 -b 4096, xfs -s size=4096, mkntfs -s 4096, mkfs.vfat -S 4096): movable to 4Kn;
- 512-mbr-small-units: MBR on a 512-byte disk with an ext4 of 1 KiB blocks and a FAT of
  512-byte sectors: no 4Kn disk can hold them.

Checked: make + restore 4Kn to 4Kn and 512 to 512 with every file identical and every
filesystem passing its own checker; 4Kn to 512 and 512 to 4Kn converted (and then checked the
same way, through loop devices with the target's sector size) or refused with the disk
untouched; a 4Kn disk's image file read as 512 refused, not imaged as "raw"; a block device
whose sector size --sector-size contradicts; a round trip through imgsrvd; add-on images laid
onto a 4Kn disk's ext4 and FAT; a 4Kn restore onto a smaller 4Kn disk, shrunk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.policy.model import Action, ActionKind, Rule
from tests import sectordisks as sd
from tests.integration.test_img_server_modes import Imgsrvd, img, imgsrvd_factory  # noqa: F401

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in sd.TOOLS),
                       reason="needs " + ", ".join(t for t in sd.TOOLS if shutil.which(t) is None)),
]

MiB = sd.MiB
SPECS = {
    "4kn-gpt": sd.DiskSpec("gpt", 4096, 392, (
        sd.Part("ext4", 1, 24), sd.Part("xfs", 25, 304), sd.Part("ntfs", 329, 24),
        sd.Part("vfat", 353, 36))),
    "4kn-mbr": sd.DiskSpec("mbr", 4096, 100, (
        sd.Part("ext4", 1, 32), sd.Part("vfat", 34, 32), sd.Part("ntfs", 67, 32))),
    "512-gpt-4k-units": sd.DiskSpec("gpt", 512, 392, (
        sd.Part("ext4", 1, 24, ("-b", "4096")), sd.Part("xfs", 25, 304, ("-s", "size=4096")),
        sd.Part("ntfs", 329, 24, ("-s", "4096")), sd.Part("vfat", 353, 36, ("-S", "4096")))),
    "512-mbr-small-units": sd.DiskSpec("mbr", 512, 72, (
        sd.Part("ext4", 1, 32, ("-b", "1024")), sd.Part("vfat", 34, 32, ("-S", "512")))),
}
FILES = sd.files_for(11)


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> dict[str, Path]:
    """Each source disk file, built once for the module."""
    tmp = tmp_path_factory.mktemp("sector-disks")
    return {name: sd.build_disk(tmp / f"{name}.disk", spec, FILES) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def images(disks, tmp_path_factory) -> dict[str, Path]:
    """An image of each source disk, made through a loop device with its sector size (what a
    machine with such a disk does): the device's own sector size is asked, not assumed."""
    tmp = tmp_path_factory.mktemp("sector-images")
    made = {}
    for name, disk in disks.items():
        image = tmp / f"{name}.img"
        with sd.loop(disk, SPECS[name].sector_size, read_only=True) as device:
            img("make", "--disk", device, str(image))
        made[name] = image
    return made


def restore_onto_loop(image: Path, target: Path, sector_size: int, *extra: str,
                      expect: int = 0) -> subprocess.CompletedProcess:
    with sd.loop(target, sector_size) as device:
        return img("restore", "--disk", device, str(image), *extra, expect=expect)


@pytest.mark.parametrize("name", list(SPECS))
def test_disk_round_trips_onto_a_disk_with_its_own_sectors(name, images, tmp_path):
    spec = SPECS[name]
    info = img("verify", str(images[name])).stdout
    assert f"with {spec.sector_size}-byte sectors" in info, info
    target = sd.blank_disk(tmp_path / "target.disk", spec.size)
    out = restore_onto_loop(images[name], target, spec.sector_size).stdout
    assert "converted" not in out, out
    sd.check_disk(target, spec, FILES)


@pytest.mark.parametrize("name", ["4kn-gpt", "4kn-mbr"])
def test_4kn_image_is_converted_onto_a_512_byte_disk(name, images, tmp_path):
    spec = SPECS[name]
    target = sd.blank_disk(tmp_path / "target.disk", spec.size)
    out = img("restore", "--disk", str(target), str(images[name])).stdout
    assert "partition table converted from 4096- to 512-byte sectors" in out, out
    sd.check_disk(target, spec, FILES, sector_size=512)
    dump = img("dump", "--disk", str(target)).stdout
    assert "sector 512" in dump and dump.count(" fs raw") == 0, dump


def test_512_image_of_4k_unit_filesystems_is_converted_onto_a_4kn_disk(images, tmp_path):
    spec = SPECS["512-gpt-4k-units"]
    target = sd.blank_disk(tmp_path / "target.disk", spec.size)
    out = restore_onto_loop(images["512-gpt-4k-units"], target, 4096).stdout
    assert "partition table converted from 512- to 4096-byte sectors" in out, out
    sd.check_disk(target, spec, FILES, sector_size=4096)
    # no stale 512-byte GPT header is left at byte 512 for a reader with the old size
    with open(target, "rb") as disk:
        disk.seek(512)
        assert disk.read(8) != b"EFI PART"


def test_512_image_of_small_unit_filesystems_is_refused_on_a_4kn_disk(images, tmp_path):
    target = sd.blank_disk(tmp_path / "target.disk", SPECS["512-mbr-small-units"].size,
                           fill=b"UNTOUCHED" * 100)
    before = sd.digest(target)
    result = restore_onto_loop(images["512-mbr-small-units"], target, 4096, expect=1)
    assert "has 4096-byte logical sectors but the image's disk had 512-byte ones" in \
        result.stderr, result.stderr
    assert "partition 1 (ext4) has 1024-byte sectors or blocks" in result.stderr, result.stderr
    assert "nothing was written" in result.stderr, result.stderr
    assert sd.digest(target) == before, "a refused restore changed the disk"


def test_512_image_with_a_misaligned_partition_is_refused_on_a_4kn_disk(tmp_path):
    """A partition that does not start on a 4 KiB boundary cannot be put on a 4Kn disk."""
    source = sd.blank_disk(tmp_path / "odd.disk", 40 * MiB)
    sd.run(["sfdisk", "-q", str(source)], input="label: dos\nstart=2049, size=40000, type=83\n")
    image = tmp_path / "odd.img"
    img("make", "--disk", str(source), str(image))
    target = sd.blank_disk(tmp_path / "target.disk", 40 * MiB, fill=b"UNTOUCHED")
    before = sd.digest(target)
    result = restore_onto_loop(image, target, 4096, expect=1)
    assert "partition 1 (bytes 1049088..21529088) does not start and end on a 4096-byte " \
           "sector boundary" in result.stderr, result.stderr
    assert sd.digest(target) == before


@pytest.mark.parametrize("name, message", [
    ("4kn-gpt", "protective MBR but no valid GPT"),
    ("4kn-mbr", "its partition table reads right only with 4096-byte sectors"),
])
def test_4kn_disk_file_read_as_512_is_refused_not_imaged_raw(name, message, disks, tmp_path):
    image = tmp_path / "wrong.img"
    result = img("make", "--disk", str(disks[name]), str(image), expect=1)
    assert message in result.stderr and "4096" in result.stderr, result.stderr
    assert not image.exists() and not list(tmp_path.glob(".wrong.img.part-*"))
    # told the sector size, the same file images like the device does
    img("make", "--disk", str(disks[name]), "--sector-size", "4096", str(image))
    dump = img("dump", "--disk", str(disks[name]), "--sector-size", "4096").stdout
    assert "sector 4096 (disk image file)" in dump and " fs raw" not in dump, dump
    target = sd.blank_disk(tmp_path / "target.disk", SPECS[name].size)
    restore_onto_loop(image, target, 4096)
    sd.check_disk(target, SPECS[name], FILES)


def test_dump_warns_about_a_4kn_mbr_file_read_as_512(disks):
    result = img("dump", "--disk", str(disks["4kn-mbr"]), expect=1)
    assert "fs raw" in result.stdout, result.stdout
    assert "pass --sector-size 4096" in result.stderr, result.stderr


def test_block_device_sector_size_cannot_be_contradicted(disks, tmp_path):
    with sd.loop(disks["4kn-mbr"], 4096, read_only=True) as device:
        result = img("make", "--disk", device, "--sector-size", "512",
                     str(tmp_path / "x.img"), expect=1)
        assert f"{device} is a block device with 4096-byte logical sectors" in result.stderr
        dump = img("dump", "--disk", device).stdout
    assert "sector 4096 (block device)" in dump, dump
    assert not (tmp_path / "x.img").exists()


def test_4kn_round_trip_through_the_imaging_server(disks, imgsrvd_factory, tmp_path):
    server = imgsrvd_factory()
    spec = SPECS["4kn-mbr"]
    with sd.loop(disks["4kn-mbr"], 4096, read_only=True) as device:
        img("make", "--disk", device, "--server", server.address, "lab/4kn.img")
    server.set_policy(Rule.from_text("4Kn lab", "ram_mb >= 1024",
                                     Action(ActionKind.RESTORE, "lab/4kn.img")))
    target = sd.blank_disk(tmp_path / "target.disk", spec.size)
    with sd.loop(target, 4096) as device:
        out = img("auto", "--disk", device, "--server", server.address,
                  "--fact", "mac=52:54:00:4b:00:01", "--fact", "ram_mb=2048").stdout
    assert "restored //" in out and "converted" not in out, out
    sd.check_disk(target, spec, FILES)
    # onto a 512-byte disk from the server: converted the same way
    small = sd.blank_disk(tmp_path / "small.disk", spec.size)
    out = img("restore", "--disk", str(small), "--server", server.address, "lab/4kn.img").stdout
    assert "converted from 4096- to 512-byte sectors" in out, out
    sd.check_disk(small, spec, FILES, sector_size=512)
    downloads = server.results("download")
    assert [e.status for e in downloads].count("assigned") == 1, downloads
    assert {e.status for e in downloads} == {"assigned", "success"}, downloads
    assert server.counters()["images_sent"] == 2


def test_addons_are_laid_onto_a_4kn_disk(images, tmp_path):
    spec = SPECS["4kn-mbr"]
    target = sd.blank_disk(tmp_path / "target.disk", spec.size)
    tree = {"drivers/net.inf": b"[Version]\n" * 50, "readme.txt": b"replaced by the add-on\n"}
    folder = tmp_path / "tree"
    for name, data in tree.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    addon = tmp_path / "drivers.add"
    img("addon", "make", "--from", str(folder), str(addon))
    with sd.loop(target, 4096) as device:
        img("restore", "--disk", device, str(images["4kn-mbr"]), "--addon", str(addon))
        out = img("addon", "apply", "--disk", device, "--partition", "5", str(addon)).stdout
        assert "partition 5 (vfat)" in out, out
    sd.check_disk(target, spec, FILES, extra={1: tree, 5: tree})


def test_4kn_image_is_shrunk_onto_a_smaller_4kn_disk(images, tmp_path):
    spec = SPECS["4kn-mbr"]
    target = sd.blank_disk(tmp_path / "target.disk", 86 * MiB)
    out = restore_onto_loop(images["4kn-mbr"], target, 4096, "--shrink",
                            "--scratch", str(tmp_path)).stdout
    assert "shrunk partition 6 (ntfs)" in out, out
    parts = {n: (start, size) for n, start, size, _ in sd.partition_table(target, 4096)}
    assert parts[6][0] == 67 * MiB and parts[6][0] + parts[6][1] <= 86 * MiB, parts
    shrunk = sd.DiskSpec("mbr", 4096, 86, spec.parts[:2] + (
        sd.Part("ntfs", 67, parts[6][1] // MiB),))
    sd.check_disk(target, shrunk, FILES)


def test_a_4kn_fat_at_the_end_is_refused_a_shrink_with_the_reason(tmp_path):
    """fatresize (libparted) shrinks only FAT with 512-byte sectors: refused, disk untouched."""
    # 72 MiB: a FAT16 (FAT12, stored whole, would be refused for its size before any tool)
    spec = sd.DiskSpec("mbr", 4096, 108, (sd.Part("ext4", 1, 32), sd.Part("vfat", 34, 72)))
    source = sd.build_disk(tmp_path / "fat-last.disk", spec, FILES)
    image = tmp_path / "fat-last.img"
    with sd.loop(source, 4096, read_only=True) as device:
        img("make", "--disk", device, str(image))
    target = sd.blank_disk(tmp_path / "target.disk", 90 * MiB, fill=b"UNTOUCHED")
    before = sd.digest(target)
    result = restore_onto_loop(image, target, 4096, "--shrink", "--scratch", str(tmp_path),
                               expect=1)
    assert "partition 5 (vfat): shrink failed: this FAT has 4096-byte sectors" in \
        result.stderr, result.stderr
    assert sd.digest(target) == before


def test_512_image_with_a_raw_partition_is_refused_on_a_4kn_disk(tmp_path):
    """A partition without a filesystem img knows: nobody can say it works on 4096-byte
    sectors, so it is refused (going to 512-byte sectors it would be converted)."""
    source = sd.blank_disk(tmp_path / "raw.disk", 40 * MiB)
    sd.run(["sfdisk", "-q", str(source)], input="label: dos\nstart=2048, size=40960, type=da\n")
    with open(source, "r+b") as disk:
        disk.seek(MiB)
        disk.write(os.urandom(2 * MiB))
    image = tmp_path / "raw.img"
    img("make", "--disk", str(source), str(image))
    target = sd.blank_disk(tmp_path / "target.disk", 40 * MiB, fill=b"UNTOUCHED")
    before = sd.digest(target)
    result = restore_onto_loop(image, target, 4096, expect=1)
    assert "partition 1 (unknown filesystem) has no unit img knows" in result.stderr, \
        result.stderr
    assert sd.digest(target) == before
