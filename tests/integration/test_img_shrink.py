"""img restore --shrink on real disks: an image whose last partition is ext4 (a logical
partition of an MBR disk) or NTFS (on GPT) restored onto a disk about 40% smaller.

Checked with the filesystems' own tools: e2fsck / ntfsfix clean, every file byte for byte
(debugfs, ntfscat), the table entry shrunk and aligned, the table valid (sfdisk --verify,
sgdisk -v). Refusals (no --shrink, too small even shrunk, XFS) leave the target disk's bytes
exactly as they were. One test restores from a real imgsrvd (--server); another has
`img auto` do it because the imgsrvd policy's rule says `shrink = yes`, and refuse it (disk
untouched) for a machine whose rule does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.policy.model import Action, ActionKind, Rule
from tests.integration.test_img_server_modes import imgsrvd_factory  # noqa: F401 (fixture)
from tests.support import REPO

TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "debugfs", "e2fsck", "resize2fs", "mkfs.vfat",
         "fsck.vfat", "mkntfs", "ntfscp", "ntfscat", "ntfsfix", "ntfsresize", "partclone.ext4",
         "partclone.fat", "partclone.ntfs", "losetup")
pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="partclone reads partitions via loop devices"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs " + ", ".join(t for t in TOOLS if shutil.which(t) is None)),
]

MiB = 1 << 20
DISK_MIB = 96
SMALL_MIB = 56          # about 40% smaller
FIRST_MIB = 16          # the first partition (kept as it is), at 1 MiB
FILES = {
    "readme.txt": b"Preboot imaging shrink test\n" * 300,
    "random.bin": os.urandom(3 * MiB + 17),
    "zeros.bin": bytes(MiB),
    "notes.txt": b"".join(b"note %d\n" % n for n in range(5000)),
}


def run(*args: str, ok: tuple[int, ...] = (0,), **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode in ok, f"{' '.join(args)}: {result.stderr or result.stdout}"
    return result


def img(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "img", *args], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == expect, f"img {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def blank(path: Path, mib: int, marker: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        f.write(marker)
        f.seek(mib * MiB - len(marker))
        f.write(marker)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_fs(kind: str, path: Path, size: int, tmp: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    source = tmp / "files"
    source.mkdir(exist_ok=True)
    for name, data in FILES.items():
        (source / name).write_bytes(data)
    if kind == "ext4":
        run("mkfs.ext4", "-q", "-F", "-d", str(source), str(path))
    elif kind == "vfat":
        # FAT32 wants 65525 clusters; small partitions get what mkfs.vfat picks (FAT16)
        run("mkfs.vfat", *(["-F", "32"] if size >= 128 * MiB else []), str(path))
        for name in FILES:
            run("mcopy", "-i", str(path), str(source / name), f"::/{name}")
    elif kind == "ntfs":
        run("mkntfs", "-q", "-F", "-Q", str(path))
        for name in FILES:
            run("ntfscp", "-q", str(path), str(source / name), f"/{name}")
    elif kind == "xfs":
        run("mkfs.xfs", "-q", "-f", str(path))


def table(disk: Path) -> dict:
    return json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]


def data_partitions(disk: Path) -> list[dict]:
    return [p for p in table(disk)["partitions"] if p["type"] not in ("5", "f")]


def build(tmp: Path, label: str, kinds: tuple[str, str], disk_mib: int = DISK_MIB) -> Path:
    """A disk with two filesystems: kinds[0] at 1 MiB, kinds[1] filling the rest; MBR puts the
    second in a logical partition, so the extended container ends the disk too."""
    disk = blank(tmp / f"{label}.disk", disk_mib)
    first = f"{FIRST_MIB * 2048}"
    if label == "mbr":
        script = (f"label: dos\nstart=2048, size={first}, type=83\n"
                  f"start={2048 + int(first)}, type=5\nstart={4096 + int(first)}, type=83\n")
        run("sfdisk", "-q", str(disk), input=script)
    else:
        run("sgdisk", "-o", "-n", f"1:2048:{2047 + int(first)}", "-t", "1:0700",
            "-n", f"2:{2048 + int(first)}:0", "-t", "2:0700", str(disk))
    for kind, part in zip(kinds, data_partitions(disk)):
        fs = tmp / f"{kind}.fs"
        make_fs(kind, fs, part["size"] * 512, tmp)
        run("dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={part['start'] * 512}",
            "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")
        fs.unlink()
    return disk


def extract(disk: Path, part: dict, out: Path) -> Path:
    run("dd", f"if={disk}", f"of={out}", "bs=1M", f"skip={part['start'] * 512}",
        f"count={part['size'] * 512}", "iflag=skip_bytes,count_bytes", "status=none")
    return out


def check_files(kind: str, fs: Path, tmp: Path) -> None:
    if kind == "ext4":
        run("e2fsck", "-fn", str(fs))
        for name, data in FILES.items():
            out = tmp / "out.bin"
            run("debugfs", "-R", f"dump /{name} {out}", str(fs))
            assert out.read_bytes() == data, f"ext4 {name}"
    elif kind == "ntfs":
        run("ntfsfix", "-n", str(fs))
        for name, data in FILES.items():
            # -f: ntfsresize marks the volume for a chkdsk by Windows, which ntfscat respects
            got = subprocess.run(["ntfscat", "-f", str(fs), f"/{name}"], capture_output=True,
                                 timeout=120).stdout
            assert got == data, f"ntfs {name}"
    elif kind == "vfat":
        run("fsck.vfat", "-n", str(fs))
        for name, data in FILES.items():
            out = tmp / "out.bin"
            out.unlink(missing_ok=True)
            run("mcopy", "-n", "-i", str(fs), f"::/{name}", str(out))
            assert out.read_bytes() == data, f"vfat {name}"


def shrink_and_check(tmp: Path, label: str, kinds: tuple[str, str], server=None,
                     disk_mib: int = DISK_MIB, small_mib: int = SMALL_MIB,
                     by_policy: bool = False) -> None:
    """Refused without shrinking, then shrunk: by hand (--shrink), or, by_policy, by img auto
    as server's rules say (a 2 GB machine's rule does not shrink, an 8 GB one's does)."""
    disk = build(tmp, label, kinds, disk_mib)
    if server:
        img("make", "--disk", str(disk), "--server", server.address, "shrink/base.img")
        source = ["--server", server.address, "shrink/base.img"]
    else:
        img("make", "--disk", str(disk), str(tmp / f"{label}.pbimg"))
        source = [str(tmp / f"{label}.pbimg")]
    if by_policy:
        server.set_policy(
            Rule.from_text("plain", "ram_mb < 4096",
                           Action(ActionKind.RESTORE, "shrink/base.img")),
            Rule.from_text("fit", "ram_mb >= 4096",
                           Action(ActionKind.RESTORE, "shrink/base.img", shrink=True)))
    small = blank(tmp / "small.disk", small_mib, b"OLD CONTENTS")
    before = digest(small)

    if by_policy:
        refused = img("auto", "--disk", str(small), "--server", server.address,
                      "--fact", "mac=52:54:00:00:00:01", "--fact", "ram_mb=2048", expect=1)
    else:
        refused = img("restore", "--disk", str(small), *source, expect=1)
    last = data_partitions(disk)[-1]["node"][-1]
    assert "would fit" in refused.stderr and f"use --shrink to shrink partition {last}" \
        in refused.stderr, refused.stderr
    assert "nothing was written" in refused.stderr or "disk was not changed" in refused.stderr
    assert digest(small) == before, "a refused restore must not touch the disk"

    if by_policy:
        done = img("auto", "--disk", str(small), "--server", server.address, "--scratch",
                   str(tmp), "--fact", "mac=52:54:00:00:00:02", "--fact", "ram_mb=8192")
        assert "restore shrink/base.img (shrink to fit) (rule 'fit'" in done.stdout, done.stdout
    else:
        done = img("restore", "--disk", str(small), "--shrink", "--scratch", str(tmp), *source)
    assert f"shrunk partition {last} ({kinds[1]}): " in done.stdout, done.stdout
    assert not list(tmp.glob("img-shrink-*")), "scratch files removed"
    if label == "gpt":
        out = run("sgdisk", "-v", str(small)).stdout
        assert "No problems found" in out, out
    run("sfdisk", "--verify", str(small))
    old, new = data_partitions(disk), data_partitions(small)
    assert [p["start"] for p in old] == [p["start"] for p in new]
    assert old[0]["size"] == new[0]["size"]
    assert new[1]["size"] < old[1]["size"]
    end = (new[1]["start"] + new[1]["size"]) * 512
    assert end % MiB == 0 and end <= small_mib * MiB
    if label == "mbr":
        extended = [p for p in table(small)["partitions"] if p["type"] == "5"][0]
        assert (extended["start"] + extended["size"]) * 512 == end
    for kind, part in zip(kinds, new):
        check_files(kind, extract(small, part, tmp / f"check-{kind}.fs"), tmp)


def test_shrink_an_ext4_logical_partition_at_the_end_of_an_mbr_disk(tmp_path: Path) -> None:
    shrink_and_check(tmp_path, "mbr", ("ext4", "ext4"))


def test_shrink_an_ntfs_partition_at_the_end_of_a_gpt_disk(tmp_path: Path) -> None:
    shrink_and_check(tmp_path, "gpt", ("vfat", "ntfs"))


@pytest.mark.skipif(shutil.which("fatresize") is None or shutil.which("mcopy") is None,
                    reason="needs fatresize and mcopy")
def test_shrink_a_fat32_partition_at_the_end_of_a_gpt_disk(tmp_path: Path) -> None:
    # libparted keeps FAT32 above its cluster-count floor: a larger (sparse) FAT32 than above
    shrink_and_check(tmp_path, "gpt", ("ext4", "vfat"), disk_mib=400, small_mib=240)


def test_shrink_when_restoring_from_an_imaging_server(imgsrvd_factory, tmp_path: Path) -> None:
    shrink_and_check(tmp_path, "mbr", ("ext4", "ext4"), server=imgsrvd_factory())


def test_auto_shrinks_where_the_rule_says_so(imgsrvd_factory, tmp_path: Path) -> None:
    shrink_and_check(tmp_path, "gpt", ("vfat", "ntfs"), server=imgsrvd_factory(), by_policy=True)


def test_too_small_even_shrunk_is_refused_before_any_write(tmp_path: Path) -> None:
    disk = build(tmp_path, "gpt", ("vfat", "ntfs"))
    image = tmp_path / "gpt.pbimg"
    img("make", "--disk", str(disk), str(image))
    tiny = blank(tmp_path / "tiny.disk", FIRST_MIB + 4, b"OLD CONTENTS")
    before = digest(tiny)
    for args in ((), ("--shrink",)):
        result = img("restore", "--disk", str(tiny), *args, str(image), expect=1)
        assert "needs at least" in result.stderr and "nothing was written" in result.stderr
        assert "data needs at least" in result.stderr, result.stderr
        assert digest(tiny) == before
    assert "would not fit even shrunk" in img("restore", "--disk", str(tiny), str(image),
                                              expect=1).stderr


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None or shutil.which("partclone.xfs") is None,
                    reason="needs mkfs.xfs and partclone.xfs")
def test_an_xfs_partition_at_the_end_is_refused_with_its_reason(tmp_path: Path) -> None:
    # recent mkfs.xfs refuses filesystems under 300 MiB; the disk files are sparse
    disk = build(tmp_path, "gpt", ("vfat", "xfs"), disk_mib=340)
    image = tmp_path / "xfs.pbimg"
    img("make", "--disk", str(disk), str(image))
    small = blank(tmp_path / "small.disk", 200, b"OLD CONTENTS")
    before = digest(small)
    result = img("restore", "--disk", str(small), "--shrink", str(image), expect=1)
    assert "partition 2 cannot be shrunk: XFS cannot be shrunk" in result.stderr, result.stderr
    assert digest(small) == before
