"""img.usedblocks against real partclone: the used map must hold every byte the filesystem needs.

For each filesystem we build a small image with files in it, once as a whole file and once as
the second partition of a partitioned disk image (read through a loop device at an offset). The
proof that the map is complete: on a copy where everything OUTSIDE the used extents is zeroed,
the filesystem's own checker passes and every file reads back identical. And the map must be
much smaller than the partition for a mostly-empty filesystem.

Tests skip when a tool is missing; those that need loop devices or mounts are marked root.
Loop devices and mounts made here are released at teardown even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from img.usedblocks import BOOT_AREA, UsedMap, used_map

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
SECTOR = 512
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")


def run(*command: str | Path, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([str(part) for part in command], capture_output=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} failed ({done.returncode}):\n"
                             f"{done.stdout.decode(errors='replace')[-2000:]}\n"
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def make_files(nested: bool = True) -> dict[str, bytes]:
    rng = random.Random(20240611)
    files = {
        "big.bin": rng.randbytes(3 * MiB),
        "small.txt": b"hello imaging\n" * 100,
        "odd.bin": rng.randbytes(12345),
        "empty.txt": b"",
    }
    if nested:
        files["sub/nested.bin"] = rng.randbytes(200_000)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@contextlib.contextmanager
def mounted(image: Path, where: Path, *options: str):
    """Mount image on a loop device (autoclear) and always unmount it."""
    where.mkdir(exist_ok=True)
    run("mount", "-o", ",".join(("loop",) + options), image, where)
    try:
        yield where
    finally:
        run("umount", where, check=False)


# --- per filesystem: build an image with files, then check a (zeroed) copy -----------------------

def build_ext(kind: str, block: int) -> Callable[[Path, Path], dict[str, bytes]]:
    def build(image: Path, work: Path) -> dict[str, bytes]:
        need(f"mkfs.{kind}", "e2fsck", "debugfs")
        files = make_files()
        tree = write_tree(work / "tree", files)
        sparse_file(image, 64 * MiB)
        run(f"mkfs.{kind}", "-q", "-F", "-b", str(block), "-d", tree, image)
        return files
    return build


def check_ext(image: Path, files: dict[str, bytes], work: Path) -> None:
    run("e2fsck", "-fn", image)
    for name, data in files.items():
        out = work / "out.bin"
        out.unlink(missing_ok=True)
        run("debugfs", "-R", f"dump /{name} {out}", image)
        assert out.read_bytes() == data, name


def build_vfat(bits: int) -> Callable[[Path, Path], dict[str, bytes]]:
    def build(image: Path, work: Path) -> dict[str, bytes]:
        need("mkfs.vfat", "fsck.vfat", "mcopy", "mmd")
        files = make_files()
        sparse_file(image, 64 * MiB)
        run("mkfs.vfat", "-F", str(bits), image)
        tree = write_tree(work / "tree", files)
        run("mmd", "-i", image, "::/sub", env=MTOOLS_ENV)
        for name in files:
            run("mcopy", "-i", image, tree / name, f"::/{name}", env=MTOOLS_ENV)
        return files
    return build


def check_vfat(image: Path, files: dict[str, bytes], work: Path) -> None:
    run("fsck.vfat", "-n", image)
    for name, data in files.items():
        out = work / "out.bin"
        out.unlink(missing_ok=True)
        run("mcopy", "-n", "-i", image, f"::/{name}", out, env=MTOOLS_ENV)
        assert out.read_bytes() == data, name


def build_ntfs(image: Path, work: Path) -> dict[str, bytes]:
    need("mkntfs", "ntfscp", "ntfscat", "ntfsfix")
    files = make_files(nested=False)  # ntfscp cannot make folders
    tree = write_tree(work / "tree", files)
    sparse_file(image, 64 * MiB)
    run("mkntfs", "-F", "-Q", "-q", image)
    for name in files:
        run("ntfscp", image, tree / name, f"/{name}")
    return files


def check_ntfs(image: Path, files: dict[str, bytes], work: Path) -> None:
    run("ntfsfix", "-n", image)
    for name, data in files.items():
        assert run("ntfscat", image, f"/{name}").stdout == data, name


def build_mounted(mkfs: list[str], size: int, fs_tools: tuple[str, ...]):
    def build(image: Path, work: Path) -> dict[str, bytes]:
        need_root()
        need(mkfs[0], *fs_tools)
        files = make_files()
        sparse_file(image, size)
        run(*mkfs, image)
        with mounted(image, work / "mnt") as mnt:
            write_tree(mnt, files)
            run("sync")
        return files
    return build


def check_xfs(image: Path, files: dict[str, bytes], work: Path) -> None:
    run("xfs_repair", "-n", "-f", image)
    with mounted(image, work / "check-mnt", "ro", "norecovery", "nouuid") as mnt:
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name


def check_btrfs(image: Path, files: dict[str, bytes], work: Path) -> None:
    run("btrfs", "check", "--readonly", image)
    out = work / "restored"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    run("btrfs", "restore", image, out)  # userspace: no clash with the original's fsid
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


@dataclass(frozen=True)
class Kind:
    filesystem: str
    build: Callable[[Path, Path], dict[str, bytes]]
    check: Callable[[Path, dict[str, bytes], Path], None]
    root: bool = False


KINDS = {
    "ext2": Kind("ext2", build_ext("ext2", 1024), check_ext),
    "ext3": Kind("ext3", build_ext("ext3", 1024), check_ext),
    "ext4-1k": Kind("ext4", build_ext("ext4", 1024), check_ext),
    "ext4-4k": Kind("ext4", build_ext("ext4", 4096), check_ext),
    "fat16": Kind("vfat", build_vfat(16), check_vfat),
    "fat32": Kind("vfat", build_vfat(32), check_vfat),
    "ntfs": Kind("ntfs", build_ntfs, check_ntfs),
    "xfs": Kind("xfs", build_mounted(["mkfs.xfs", "-q", "-f"], 300 * MiB, ("xfs_repair",)),
                check_xfs, root=True),
    "btrfs": Kind("btrfs", build_mounted(["mkfs.btrfs", "-q", "-f"], 256 * MiB, ("btrfs",)),
                  check_btrfs, root=True),
}


@dataclass(frozen=True)
class Built:
    image: Path
    files: dict[str, bytes]


_built: dict[str, Built] = {}


def built(name: str, tmp_path_factory) -> Built:
    """Each filesystem image is built (and checked) once per session."""
    if name not in _built:
        work = tmp_path_factory.mktemp(f"fs-{name}")
        kind = KINDS[name]
        image = work / "fs.img"
        files = kind.build(image, work)
        kind.check(image, files, work)  # the original itself is sound
        _built[name] = Built(image, files)
    return _built[name]


def partitioned_disk(fs_image: Path, disk: Path) -> tuple[int, int]:
    """A DOS-labelled disk: partition 1 (junk), partition 2 = fs_image. Returns p2 offset, size."""
    need("sfdisk")
    size = fs_image.stat().st_size
    p1_start, p1_sectors = 2048, 16384
    p2_start = p1_start + p1_sectors + 2048  # a gap, so offsets are not round numbers of p1
    p2_sectors = size // SECTOR
    sparse_file(disk, (p2_start + p2_sectors + 2048) * SECTOR)
    script = (f"label: dos\nstart={p1_start}, size={p1_sectors}, type=83\n"
              f"start={p2_start}, size={p2_sectors}, type=83\n")
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True,
                   capture_output=True)
    layout = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]["partitions"]
    assert [p["start"] for p in layout] == [p1_start, p2_start]
    with open(disk, "r+b") as out:
        out.seek(p1_start * SECTOR)
        out.write(random.Random(1).randbytes(MiB))  # partition 1 is not empty
        copy_range(fs_image, out, 0, size, p2_start * SECTOR)
    return p2_start * SECTOR, size


def copy_range(source: Path, out, start: int, length: int, to: int) -> None:
    """Copy [start, start+length) of source to offset `to` of the open file out, skipping zeros."""
    chunk = MiB
    zero = bytes(chunk)
    with open(source, "rb") as src:
        src.seek(start)
        done = 0
        while done < length:
            data = src.read(min(chunk, length - done))
            if not data:
                break
            if data != zero[:len(data)]:
                out.seek(to + done)
                out.write(data)
            done += len(data)


def zeroed_copy(source: Path, target: Path, result: UsedMap, base: int = 0) -> Path:
    """A copy of source that keeps only the used extents (shifted by base); the rest is zero."""
    sparse_file(target, source.stat().st_size)
    with open(target, "r+b") as out:
        for extent in result.extents:
            copy_range(source, out, base + extent.offset, extent.length, base + extent.offset)
    return target


def extract(source: Path, target: Path, offset: int, size: int) -> Path:
    sparse_file(target, size)
    with open(target, "r+b") as out:
        copy_range(source, out, offset, size, 0)
    return target


def loops_on(path: Path) -> list[str]:
    listed = run("losetup", "--list", "--json", check=False).stdout or b'{"loopdevices": []}'
    return [d["name"] for d in json.loads(listed)["loopdevices"]
            if (d.get("back-file") or "").startswith(str(path))]


@pytest.fixture(autouse=True)
def release_loops(tmp_path_factory):
    """Whatever happens in a test, no loop device onto our files survives it."""
    yield
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return
    base = tmp_path_factory.getbasetemp()
    for line in run("findmnt", "-rn", "-o", "TARGET", check=False).stdout.decode().splitlines():
        if line.startswith(str(base)):
            run("umount", line, check=False)
    for device in loops_on(base):
        run("losetup", "--detach", device, check=False)


def assert_sound_map(result: UsedMap, kind: Kind, files: dict[str, bytes]) -> None:
    assert result.filesystem == kind.filesystem, result.reason
    assert result.reason.startswith("partclone."), result.reason
    assert result.extents[0].offset == 0 and result.extents[0].length >= BOOT_AREA
    assert sum(len(data) for data in files.values()) < result.used_bytes() < result.size // 2


def case_params():
    return [pytest.param(name, marks=[pytest.mark.root] if kind.root else [], id=name)
            for name, kind in KINDS.items()]


@pytest.mark.parametrize("name", case_params())
def test_whole_file_map_keeps_every_file(name, tmp_path, tmp_path_factory):
    need("partclone.extfs" if name.startswith("ext") else "partclone.dd")
    kind = KINDS[name]
    fs = built(name, tmp_path_factory)
    result = used_map(str(fs.image))
    assert_sound_map(result, kind, fs.files)
    kind.check(zeroed_copy(fs.image, tmp_path / "zeroed.img", result), fs.files, tmp_path)


@pytest.mark.root
@pytest.mark.parametrize("name", case_params())
def test_partition_map_keeps_every_file(name, tmp_path, tmp_path_factory):
    need("losetup", "partclone.dd")
    kind = KINDS[name]
    fs = built(name, tmp_path_factory)
    disk = tmp_path / "disk.img"
    offset, size = partitioned_disk(fs.image, disk)

    result = used_map(str(disk), offset=offset, size=size)

    assert loops_on(disk) == [], "the loop device must be detached"
    assert_sound_map(result, kind, fs.files)
    assert result.extents == used_map(str(fs.image)).extents  # relative to the partition
    zeroed = zeroed_copy(disk, tmp_path / "zeroed-disk.img", result, base=offset)
    kind.check(extract(zeroed, tmp_path / "p2.img", offset, size), fs.files, tmp_path)


def test_ext_1k_blocks_offsets_are_bytes(tmp_path_factory):
    """With 1 KiB blocks, group 1 starts at block 8193: partclone says 0x800400, in bytes."""
    need("partclone.extfs")
    fs = built("ext4-1k", tmp_path_factory)
    result = used_map(str(fs.image))
    starts = [extent.offset for extent in result.extents]
    assert 8193 * 1024 in starts  # backup superblock + group descriptors of group 1
    assert result.extents[0].offset == 0 and result.extents[0].length > 2048  # superblock
    assert "first 64 KiB" not in result.reason  # partclone's map had the start already


def test_ntfs_backup_boot_sector_is_added(tmp_path_factory):
    need("partclone.ntfs")
    fs = built("ntfs", tmp_path_factory)
    result = used_map(str(fs.image))
    assert "NTFS backup boot sector" in result.reason
    assert result.extents[-1].end == result.size


# --- raw fallbacks ------------------------------------------------------------------------------

def random_image(path: Path, size: int = 4 * MiB) -> Path:
    path.write_bytes(random.Random(99).randbytes(size))
    return path


def test_unknown_filesystem_is_raw(tmp_path):
    image = random_image(tmp_path / "junk.img")
    result = used_map(str(image))
    assert (result.filesystem, result.used_bytes()) == ("raw", 4 * MiB)
    assert result.reason.startswith("unknown filesystem")
    part = used_map(str(image), offset=MiB, size=2 * MiB)
    assert (part.size, part.used_bytes(), part.extents[0].offset) == (2 * MiB, 2 * MiB, 0)


def test_range_outside_the_file_is_an_error(tmp_path):
    image = random_image(tmp_path / "junk.img", MiB)
    with pytest.raises(ValueError):
        used_map(str(image), offset=MiB // 2, size=MiB)
    with pytest.raises(ValueError):
        used_map(str(image), offset=-1)


def test_missing_partclone_is_raw(tmp_path, tmp_path_factory, monkeypatch):
    fs = built("ext4-4k", tmp_path_factory)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = used_map(str(fs.image))
    assert result.filesystem == "raw" and result.used_bytes() == result.size
    assert "partclone not found" in result.reason and "ext4" in result.reason


def test_failing_partclone_is_raw_with_its_last_log_line(tmp_path_factory):
    need("partclone.xfs")
    fs = built("ext4-4k", tmp_path_factory)
    result = used_map(str(fs.image), filesystem="xfs")
    assert result.filesystem == "raw" and result.used_bytes() == result.size
    assert result.reason.startswith("partclone.xfs failed: ") and result.reason.endswith("; raw")
    assert len(result.reason) > len("partclone.xfs failed: (xfs); raw")


def fake_tool(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


FIND_OUTPUT = 'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'


def test_partclone_timeout_is_raw(tmp_path, tmp_path_factory, monkeypatch):
    fs = built("ext4-4k", tmp_path_factory)
    fake_tool(tmp_path / "bin", "partclone.ext4", "exec sleep 30\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = used_map(str(fs.image), timeout_s=0.5)
    assert result.filesystem == "raw" and "timed out" in result.reason


def test_bad_domain_log_is_raw(tmp_path, tmp_path_factory, monkeypatch):
    fs = built("ext4-4k", tmp_path_factory)
    fake_tool(tmp_path / "bin", "partclone.ext4", FIND_OUTPUT + 'echo "0x0 ?\nnonsense" > "$out"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = used_map(str(fs.image))
    assert result.filesystem == "raw" and "bad domain log" in result.reason
    assert "line 2" in result.reason


def test_map_without_boot_area_gets_it_added(tmp_path, tmp_path_factory, monkeypatch):
    fs = built("ext4-4k", tmp_path_factory)
    fake_tool(tmp_path / "bin", "partclone.ext4",
              FIND_OUTPUT + 'printf "0x0 ?\\n0x100000 0x1000 +\\n" > "$out"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = used_map(str(fs.image))
    assert result.filesystem == "ext4"
    assert result.reason == "partclone.ext4 domain log + first 64 KiB"
    assert [(e.offset, e.length) for e in result.extents] == [(0, BOOT_AREA), (0x100000, 0x1000)]


@pytest.mark.root
def test_no_loop_device_is_raw(tmp_path, tmp_path_factory, monkeypatch):
    """As when not root: losetup refuses, so a partition inside a file cannot be mapped."""
    fs = built("ext4-4k", tmp_path_factory)
    disk = tmp_path / "disk.img"
    offset, size = partitioned_disk(fs.image, disk)
    fake_tool(tmp_path / "bin", "losetup", 'echo "losetup: cannot find an unused loop device: '
              'Permission denied" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = used_map(str(disk), offset=offset, size=size)
    assert result.filesystem == "raw" and result.size == size
    assert "cannot attach loop device" in result.reason and "Permission denied" in result.reason


def test_cli_prints_the_map(tmp_path_factory):
    need("partclone.extfs")
    fs = built("ext4-4k", tmp_path_factory)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "img.usedblocks", str(fs.image)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "filesystem: ext4" in done.stdout and "partclone.ext4 domain log" in done.stdout
    assert "0x000000000000" in done.stdout


def test_the_check_notices_a_missing_extent(tmp_path, tmp_path_factory):
    """Negative control: drop the biggest used extent and the zeroed copy must fail the check."""
    need("partclone.extfs")
    fs = built("ext4-4k", tmp_path_factory)
    result = used_map(str(fs.image))
    biggest = max(result.extents, key=lambda extent: extent.length)
    holed = UsedMap(result.filesystem, result.size,
                    tuple(e for e in result.extents if e != biggest), "test")
    with pytest.raises(AssertionError):
        KINDS["ext4-4k"].check(zeroed_copy(fs.image, tmp_path / "holed.img", holed), fs.files,
                               tmp_path)
