"""img make / img restore on real disks: disk image files with MBR and GPT partition tables
holding real ext4, FAT and NTFS filesystems full of files, plus a partition of unknown type.

Each disk is imaged, restored onto a blank disk of the same size and onto a larger one (with
--grow), and then: the partition table is what sfdisk says it was (grown where asked), every
filesystem passes its own fsck, every file reads back byte for byte with the filesystem's own
tools (debugfs, mtools, ntfs-3g's ntfscat), and the unknown partition is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "debugfs", "e2fsck", "mkfs.vfat", "mcopy", "fsck.vfat",
         "mkntfs", "ntfscp", "ntfscat", "ntfsfix", "partclone.ext4", "partclone.fat",
         "partclone.ntfs", "losetup")
pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="partclone reads partitions via loop devices"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs " + ", ".join(t for t in TOOLS if shutil.which(t) is None)),
]

MiB = 1 << 20
DISK_SIZE = 200 * MiB
# (name, start MiB, size MiB, sfdisk MBR type, sgdisk GPT type code)
PARTS = (("ext4", 1, 64, "83", "8300"), ("vfat", 65, 48, "c", "0700"),
         ("ntfs", 113, 48, "7", "0700"), ("unknown", 162, 16, "da", "8300"))


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr or result.stdout}"
    return result


def make_files(root: Path, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        "readme.txt": b"Preboot imaging test\n" * 200,
        "random.bin": rng.randbytes(3 * MiB + 17),
        "zeros.bin": bytes(2 * MiB),
        "docs/notes.txt": b"".join(b"note %d\n" % n for n in range(5000)),
        "docs/deep/small.dat": rng.randbytes(4097),
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def build_filesystem(kind: str, path: Path, size: int, files: dict[str, bytes], tmp: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    if kind == "ext4":
        source = tmp / "ext4-src"
        make_files(source, 1)
        run("mkfs.ext4", "-q", "-F", "-d", str(source), str(path))
    elif kind == "vfat":
        run("mkfs.vfat", "-F", "32", str(path))
        run("mmd", "-i", str(path), "::/docs", "::/docs/deep")
        for name, data in files.items():
            source = tmp / f"vfat-{name.replace('/', '_')}"
            source.write_bytes(data)
            run("mcopy", "-i", str(path), str(source), f"::/{name}")
    elif kind == "ntfs":
        run("mkntfs", "-q", "-F", "-Q", str(path))
        for name, data in files.items():
            if "/" in name:
                continue           # ntfscp cannot make folders; the top-level files will do
            source = tmp / f"ntfs-{name}"
            source.write_bytes(data)
            run("ntfscp", "-q", str(path), str(source), f"/{name}")
    else:
        with open(path, "r+b") as f:
            f.write(random.Random(9).randbytes(MiB))


def build_disk(tmp: Path, table: str) -> tuple[Path, dict[str, bytes]]:
    files = make_files(tmp / "expected", 1)
    disk = tmp / f"{table}.disk"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    if table == "mbr":
        script = "label: dos\n" + "".join(
            f"start={start * 2048}, size={size * 2048}, type={mbr}"
            f"{', bootable' if n == 0 else ''}\n"
            for n, (_, start, size, mbr, _) in enumerate(PARTS))
        # four primaries fill the MBR: make the last one a logical partition instead
        script = script.rsplit("\n", 2)[0] + "\n"
        last = PARTS[-1]
        script += (f"start={last[1] * 2048 - 2048}, size={(last[2] + 1) * 2048}, type=5\n"
                   f"start={last[1] * 2048}, size={last[2] * 2048}, type={last[3]}\n")
        run("sfdisk", "-q", str(disk), input=script)
    else:
        args = ["sgdisk", "-o"]
        for n, (name, start, size, _, code) in enumerate(PARTS, 1):
            args += ["-n", f"{n}:{start * 2048}:{(start + size) * 2048 - 1}", "-t", f"{n}:{code}",
                     "-c", f"{n}:{name} data"]
        run(*args, str(disk))
    layout = json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]
    data_parts = [p for p in layout["partitions"] if p["type"] not in ("5", "f")]
    for (kind, _, size, _, _), part in zip(PARTS, data_parts):
        fs = tmp / f"{table}-{kind}.fs"
        build_filesystem(kind, fs, part["size"] * 512, files, tmp)
        run("dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={part['start'] * 512}",
            "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")
        fs.unlink()
    # a disk-head marker in the boot-loader gap, which the image must carry
    with open(disk, "r+b") as f:
        f.seek(64 * 1024)
        f.write(b"BOOTLOADER-GAP-MARKER")
    return disk, files


def img(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "img", *args], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == expect, f"img {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def partition(disk: Path, part: dict, out: Path) -> Path:
    run("dd", f"if={disk}", f"of={out}", "bs=1M", f"skip={part['start'] * 512}",
        f"count={part['size'] * 512}", "iflag=skip_bytes,count_bytes", "status=none")
    return out


def check_restored(original: Path, restored: Path, files: dict[str, bytes], tmp: Path,
                   grown: bool) -> None:
    before = json.loads(run("sfdisk", "--json", str(original)).stdout)["partitiontable"]
    after = json.loads(run("sfdisk", "--json", str(restored)).stdout)["partitiontable"]
    assert before["label"] == after["label"]
    assert len(before["partitions"]) == len(after["partitions"])
    for old, new in zip(before["partitions"], after["partitions"]):
        assert (old["start"], old["type"], old.get("uuid"), old.get("name")) == (
            new["start"], new["type"], new.get("uuid"), new.get("name"))
    last_old, last_new = before["partitions"][-1], after["partitions"][-1]
    if grown:
        assert last_new["size"] > last_old["size"]
    else:
        assert last_new["size"] == last_old["size"]
    with open(restored, "rb") as f:
        f.seek(64 * 1024)
        assert f.read(21) == b"BOOTLOADER-GAP-MARKER"
    data_parts = [p for p in after["partitions"] if p["type"] not in ("5", "f")]
    old_parts = [p for p in before["partitions"] if p["type"] not in ("5", "f")]
    for (kind, *_), part, old in zip(PARTS, data_parts, old_parts):
        fs = partition(restored, old if kind != "unknown" else part, tmp / f"check-{kind}.fs")
        if kind == "ext4":
            run("e2fsck", "-fn", str(fs))
            for name, data in files.items():
                out = tmp / "out.bin"
                run("debugfs", "-R", f"dump /{name} {out}", str(fs))
                assert out.read_bytes() == data, f"ext4 {name}"
        elif kind == "vfat":
            run("fsck.vfat", "-n", str(fs))
            for name, data in files.items():
                out = tmp / "out.bin"
                out.unlink(missing_ok=True)
                run("mcopy", "-n", "-i", str(fs), f"::/{name}", str(out))
                assert out.read_bytes() == data, f"vfat {name}"
        elif kind == "ntfs":
            run("ntfsfix", "-n", str(fs))
            for name, data in files.items():
                if "/" not in name:
                    got = subprocess.run(["ntfscat", str(fs), f"/{name}"], capture_output=True,
                                         timeout=120).stdout
                    assert got == data, f"ntfs {name}"
        else:
            source = partition(original, old, tmp / "orig-unknown.fs")
            assert hashlib.sha256(fs.read_bytes()[:old["size"] * 512]).digest() == \
                hashlib.sha256(source.read_bytes()).digest()
        fs.unlink()


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_make_and_restore_real_filesystems(table: str, tmp_path: Path) -> None:
    disk, files = build_disk(tmp_path, table)
    image = tmp_path / f"{table}.pbimg"
    made = img("make", "--disk", str(disk), str(image))
    assert "made" in made.stdout
    assert image.stat().st_size < DISK_SIZE // 4, "used blocks only, compressed"
    dump = img("dump", "--disk", str(disk)).stdout
    assert "ext4" in dump and "vfat" in dump and "ntfs" in dump and "raw" in dump
    assert "all sound" in img("verify", str(image)).stdout
    assert not list(tmp_path.glob(".*.part-*")), "no temporary image left behind"

    same = tmp_path / "same.disk"
    with open(same, "wb") as f:
        f.truncate(DISK_SIZE)
    img("restore", "--disk", str(same), str(image))
    check_restored(disk, same, files, tmp_path, grown=False)

    larger = tmp_path / "larger.disk"
    with open(larger, "wb") as f:
        f.truncate(DISK_SIZE + 64 * MiB)
    img("restore", "--disk", str(larger), "--grow", str(image))
    check_restored(disk, larger, files, tmp_path, grown=True)
    if table == "gpt":
        run("sgdisk", "-v", str(larger))


def test_a_smaller_disk_is_refused_and_left_untouched(tmp_path: Path) -> None:
    disk, _ = build_disk(tmp_path, "gpt")
    image = tmp_path / "gpt.pbimg"
    img("make", "--disk", str(disk), str(image))
    small = tmp_path / "small.disk"
    with open(small, "wb") as f:
        f.truncate(100 * MiB)
        f.seek(0)
        f.write(b"OLD CONTENTS")
    result = img("restore", "--disk", str(small), str(image), expect=1)
    assert "needs at least" in result.stderr and "nothing was written" in result.stderr
    assert small.read_bytes()[:12] == b"OLD CONTENTS"


def test_a_corrupted_chunk_is_detected_before_it_reaches_the_disk(tmp_path: Path) -> None:
    disk, _ = build_disk(tmp_path, "mbr")
    image = tmp_path / "mbr.pbimg"
    img("make", "--disk", str(disk), str(image))
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(data)
    verify = img("verify", str(image), expect=1)
    assert "checksum mismatch" in verify.stderr or "cannot decompress" in verify.stderr
    target = tmp_path / "target.disk"
    with open(target, "wb") as f:
        f.truncate(DISK_SIZE)
    restore = img("restore", "--disk", str(target), str(image), expect=1)
    assert "FAILED" in restore.stderr and "no valid partition table" in restore.stderr
