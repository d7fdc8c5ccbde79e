"""Image-safe data on real disks (img/isdstore.py, `img isd`, img make and img restore): disk
files partitioned by sfdisk and sgdisk through loop devices with 512- and 4096-byte logical
sectors (`losetup --sector-size`), an ext4 in each partition, every img run the real command.

Checked: set/show/clear on a loop device and on a disk file; no room (a first partition at
sector 63), foreign bytes and a damaged record refused with the reason; an image of a disk with
a record holds none of its bytes; a restore onto a disk with its own record keeps it byte for
byte (same sector size, converted 512 -> 4096, grown, shrunk) and one onto a disk without a
record leaves none; an image that would leave no room for the target's record is refused
before a write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from common.identity import IpSettings, MachineIdentity
from common.imaging.imagefile import ImageReader
from img.isd import MAGIC, SLOT_BYTES
from img.isdstore import SLOT_OFFSET, clear_identity, read_identity, write_identity
from tests import sectordisks as sd
from tests.integration.test_img_server_modes import img

TOOLS = ("losetup", "sfdisk", "sgdisk", "mkfs.ext4", "e2fsck", "resize2fs", "partclone.ext4")
pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs " + ", ".join(t for t in TOOLS if shutil.which(t) is None)),
]

MiB = sd.MiB
LAB = MachineIdentity("lab-pc-07", "lab.example.com", "LAB",
                      IpSettings("10.20.0.7", 24, "10.20.0.1", ("10.20.0.2",)))
OTHER = MachineIdentity("other-3")


def partition(device: str, tool: str, table: str, parts: list[tuple[int, int]]) -> None:
    """Partitions (start MiB, size MiB) on a loop device, written by sfdisk or sgdisk."""
    if tool == "sgdisk":
        args = ["sgdisk", "-Z", "-o"]
        for number, (start, size) in enumerate(parts, 1):
            args += ["-n", f"{number}:{start}M:+{size}M", "-t", f"{number}:8300"]
        sd.run(args + [device])
        return
    lines = [f"label: {'gpt' if table == 'gpt' else 'dos'}"]
    lines += [f"start={start}MiB, size={size}MiB, type={'L' if table == 'gpt' else '83'}"
              for start, size in parts]
    sd.run(["sfdisk", "-q", "--wipe", "always", device], input="\n".join(lines) + "\n")


def make_disk(path: Path, size_mib: int, sector: int, tool: str, table: str,
              parts: list[tuple[int, int]], mkfs: bool = True) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size_mib * MiB)
    with sd.loop(path, sector) as device:
        partition(device, tool, table, parts)
    for start, size in parts if mkfs else []:
        with sd.loop(path, sector, start * MiB, size * MiB) as device:
            sd.run(["mkfs.ext4", "-q", "-F", "-b", "4096", device])
            sd.run(["debugfs", "-w", "-R", "mkdir kept", device])
    return path


def slot(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(SLOT_OFFSET)
        return handle.read(SLOT_BYTES)


def fsck(path: Path, sector: int, start_mib: int, size_mib: int) -> None:
    with sd.loop(path, sector, start_mib * MiB, size_mib * MiB) as device:
        sd.run(["e2fsck", "-fn", device])


def image_holds_no_record(image: Path) -> None:
    with open(image, "rb") as handle:
        reader = ImageReader(handle)
        assert not any(s.get("role") == "whole-disk" for s in reader.metadata["streams"])
        for entry in reader.entries():
            assert MAGIC not in reader.read_chunk(entry), entry
        head = [e for e in reader.entries(0) if e.offset <= SLOT_OFFSET < e.end]
        assert not head, f"the head's chunks cover the record's bytes: {head}"


CASES = [("sfdisk", "gpt", 512), ("sfdisk", "mbr", 512), ("sgdisk", "gpt", 512),
         ("sfdisk", "gpt", 4096), ("sfdisk", "mbr", 4096), ("sgdisk", "gpt", 4096)]


@pytest.mark.parametrize("tool, table, sector", CASES,
                         ids=[f"{t}-{k}-{s}" for t, k, s in CASES])
def test_make_leaves_it_out_and_restore_keeps_it(tmp_path: Path, tool: str, table: str,
                                                 sector: int) -> None:
    parts = [(1, 12), (14, 8)]
    source = make_disk(tmp_path / "source.disk", 24, sector, tool, table, parts)
    with sd.loop(source, sector) as device:
        img("isd", "set", device, "--name", "lab-pc-07", "--dns-suffix", "lab.example.com",
            "--workgroup", "LAB", "--ip", "10.20.0.7/24", "--gateway", "10.20.0.1",
            "--dns", "10.20.0.2")
        shown = json.loads(img("isd", "show", "--json", device).stdout)
        assert shown["offset"] == SLOT_OFFSET and shown["identity"]["name"] == "lab-pc-07"
        assert read_identity(device) == LAB
        image = tmp_path / "source.img"
        img("make", "--disk", device, str(image))
    image_holds_no_record(image)
    assert slot(source).startswith(MAGIC), "img make changed the source"

    # onto a disk with its own record: kept, byte for byte
    target = make_disk(tmp_path / "target.disk", 24, sector, tool, table, [(1, 4)], mkfs=False)
    with sd.loop(target, sector) as device:
        write_identity(device, OTHER)
        before = slot(target)
        img("restore", "--disk", device, str(image))
        assert read_identity(device) == OTHER
    assert slot(target) == before
    fsck(target, sector, 1, 12)
    fsck(target, sector, 14, 8)

    # onto a disk without one: still none
    blank = tmp_path / "blank.disk"
    sd.blank_disk(blank, 24 * MiB)
    with sd.loop(blank, sector) as device:
        img("restore", "--disk", device, str(image))
        assert read_identity(device) is None
        assert "no image-safe data" in img("isd", "show", device).stdout
    assert slot(blank) == bytes(SLOT_BYTES)
    fsck(blank, sector, 1, 12)


def test_kept_through_conversion_grow_and_shrink(tmp_path: Path) -> None:
    """512 -> 4096 converted, a larger disk grown, a smaller one shrunk: the record stays."""
    source = make_disk(tmp_path / "s.disk", 40, 512, "sgdisk", "gpt", [(1, 8), (10, 28)])
    image = tmp_path / "s.img"
    img("make", "--disk", str(source), str(image))
    for name, size_mib, sector, extra in (
            ("converted", 40, 4096, ()), ("grown", 64, 512, ("--grow",)),
            ("shrunk", 30, 512, ("--shrink", "--scratch", str(tmp_path)))):
        target = make_disk(tmp_path / f"{name}.disk", size_mib, sector, "sfdisk", "gpt",
                           [(1, 2)], mkfs=False)
        with sd.loop(target, sector) as device:
            write_identity(device, LAB)
            before = slot(target)
            img("restore", "--disk", device, str(image), *extra)
            assert read_identity(device) == LAB, name
        assert slot(target) == before, name
        with sd.loop(target, sector) as device:
            table = json.loads(sd.run(["sfdisk", "--json", device]).stdout)["partitiontable"]
        last = table["partitions"][-1]
        fsck(target, sector, 10, last["size"] * sector // MiB)


def test_file_with_4096_byte_sectors_is_read_as_such(tmp_path: Path) -> None:
    """A 4Kn MBR disk's image file: its partitions read with 512 would start at 128 KiB; img
    finds that the table reads right only with 4096 and uses it (or is told so)."""
    disk = make_disk(tmp_path / "4k.disk", 24, 4096, "sfdisk", "mbr", [(1, 12)])
    write_identity(str(disk), LAB)
    assert read_identity(str(disk)) == LAB
    assert read_identity(str(disk), sector_size=4096) == LAB
    assert "LBA 255 of 4096-byte sectors" in img("isd", "show", str(disk)).stdout
    assert clear_identity(str(disk)) and not clear_identity(str(disk))
    assert slot(disk) == bytes(SLOT_BYTES)


def test_refusals_name_the_reason(tmp_path: Path) -> None:
    # a first partition at sector 63: no room, nothing written
    old = tmp_path / "old.disk"
    sd.blank_disk(old, 16 * MiB)
    sd.run(["sfdisk", "-q", str(old)], input="start=63, size=20000, type=83\n")
    before = old.read_bytes()
    result = img("isd", "set", str(old), "--name", "pc", "--dhcp", expect=1)
    assert "no room for image-safe data: partition 1 starts at sector 63" in result.stderr
    assert old.read_bytes() == before
    assert read_identity(str(old)) is None

    # foreign bytes in the slot: never overwritten; clear leaves them too
    disk = make_disk(tmp_path / "d.disk", 16, 512, "sfdisk", "gpt", [(1, 4)], mkfs=False)
    with open(disk, "r+b") as handle:
        handle.seek(SLOT_OFFSET)
        handle.write(b"someone else's")
    result = img("isd", "set", str(disk), "--name", "pc", "--dhcp", expect=1)
    assert "hold something else" in result.stderr and "nothing was written" in result.stderr
    assert not clear_identity(str(disk))
    assert slot(disk).startswith(b"someone else's")

    # a damaged record: reading says so; set replaces it, clear removes it
    with open(disk, "r+b") as handle:
        handle.seek(SLOT_OFFSET)
        handle.write(bytes(SLOT_BYTES))
    write_identity(str(disk), LAB)
    with open(disk, "r+b") as handle:
        handle.seek(SLOT_OFFSET + 60)
        handle.write(b"X")
    result = img("isd", "show", str(disk), expect=1)
    assert "is damaged: SHA-256 checksum mismatch" in result.stderr
    img("isd", "set", str(disk), "--name", "pc-2", "--dhcp")
    assert read_identity(str(disk)) == MachineIdentity("pc-2")
    assert "removed" in img("isd", "clear", str(disk)).stdout

    # bad options: a usage error naming the option
    result = img("isd", "set", str(disk), "--name", "pc", "--ip", "10.0.0.5", expect=2)
    assert "--ip '10.0.0.5': expected ADDRESS/PREFIX" in result.stderr
    result = img("isd", "set", str(disk), "--name", "pc", "--ip", "10.0.0.5/24",
                 "--gateway", "10.1.0.1", expect=2)
    assert "ip.gateway" in result.stderr


def test_restore_refused_when_the_image_leaves_no_room(tmp_path: Path) -> None:
    """An image whose first partition starts at sector 63 onto a disk with a record: refused
    before any write, the disk as it was."""
    source = tmp_path / "xp.disk"
    sd.blank_disk(source, 16 * MiB)
    sd.run(["sfdisk", "-q", str(source)], input="start=63, size=20000, type=83\n")
    image = tmp_path / "xp.img"
    img("make", "--disk", str(source), str(image))
    target = make_disk(tmp_path / "t.disk", 16, 512, "sfdisk", "mbr", [(1, 4)], mkfs=False)
    write_identity(str(target), LAB)
    before = target.read_bytes()
    result = img("restore", "--disk", str(target), str(image), expect=1)
    assert "holds image-safe data" in result.stderr and "img isd clear" in result.stderr
    assert "nothing was written" in result.stderr
    assert target.read_bytes() == before
    img("isd", "clear", str(target))
    img("restore", "--disk", str(target), str(image))
    assert read_identity(str(target)) is None
