"""Add-on images on real filesystems: `img addon make` from a nested folder, `img addon apply`
onto the ext4, FAT and NTFS partitions of a GPT disk (checked with each filesystem's own fsck
and tools: debugfs, mtools, ntfscat), a hostile add-on refused before anything is written,
`img restore --addon`, and `img auto` against a real imgsrvd whose rule restores a base image
plus two add-ons (applied in order, each reported to the results log).

The disk builders and the imgsrvd fixtures are those of test_img_roundtrip.py and
test_img_server_modes.py.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from common.imaging.imagefile import ImageWriter
from common.policy.model import Action, ActionKind, Rule
from img.addon import AddonError, TreeCount, addon_metadata, choose_target
from tests.integration.test_img_roundtrip import build_disk, img, partition, run
from tests.integration.test_img_server_modes import (  # noqa: F401 (fixtures)
    EXT4, FILES, blank, check_restored, imgsrvd_factory, source_disk, wait_for)
from tests.support import disk_tool_marks

TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "debugfs", "e2fsck", "mkfs.vfat", "mcopy", "mmd",
         "fsck.vfat", "mkntfs", "ntfscp", "ntfscat", "ntfsfix", "ntfs-3g", "partclone.ext4",
         "partclone.fat", "partclone.ntfs", "losetup", "mount", "umount")
pytestmark = disk_tool_marks(TOOLS, fuse=True)

MiB = 1 << 20
# GPT partitions of build_disk(..., "gpt"): 1 ext4, 2 FAT, 3 NTFS, 4 unknown
PARTITIONS = {"ext4": 1, "vfat": 2, "ntfs": 3}

ADDON = {
    "readme.txt": b"replaced by the add-on\n",             # the base disk has one: overwritten
    "Program Files/App/app.exe": random.Random(7).randbytes(MiB + 333),
    "Program Files/App/settings.ini": b"[app]\nlicensed=yes\n",
    "Program Files/App/empty.log": b"",
    "drivers/net/deep/er/e1000.inf": b"driver\r\n" * 500,
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_file(kind: str, fs: Path, name: str, tmp: Path) -> bytes:
    """A file's bytes read with the filesystem's own tools, not a mount."""
    out = tmp / "out.bin"
    out.unlink(missing_ok=True)
    if kind == "ext4":
        run("debugfs", "-R", f'dump "/{name}" {out}', str(fs))
    elif kind == "vfat":
        run("mcopy", "-n", "-i", str(fs), f"::/{name}", str(out))
    else:
        out.write_bytes(subprocess.run(["ntfscat", str(fs), f"/{name}"], capture_output=True,
                                       timeout=120, check=True).stdout)
    return out.read_bytes()


def fsck(kind: str, fs: Path) -> None:
    if kind == "ext4":
        run("e2fsck", "-fn", str(fs))
    elif kind == "vfat":
        run("fsck.vfat", "-n", str(fs))
    else:
        run("ntfsfix", "-n", str(fs))


def partition_of(disk: Path, number: int, tmp: Path) -> Path:
    table = json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]
    part = [p for p in table["partitions"] if p["node"].endswith(str(number))][0]
    return partition(disk, part, tmp / f"part{number}.fs")


def test_apply_onto_ext4_fat_and_ntfs(tmp_path: Path) -> None:
    disk, base_files = build_disk(tmp_path, "gpt")
    source = write_tree(tmp_path / "addon-src", ADDON)
    image = tmp_path / "apps.add"
    made = img("addon", "make", "--from", str(source), str(image))
    assert "made add-on" in made.stdout and "5 files" in made.stdout
    verified = img("verify", str(image)).stdout
    assert "add-on image, 5 files" in verified and "all sound" in verified

    assert choose_target(str(disk)).partition == 1, "the first writable partition"
    with pytest.raises(AddonError, match="cannot be written"):
        choose_target(str(disk), 4)

    unknown_before = partition_of(disk, 4, tmp_path).read_bytes()
    for kind, number in PARTITIONS.items():
        done = img("addon", "apply", "--disk", str(disk), "--partition", str(number), str(image))
        assert f"partition {number} ({kind})" in done.stdout and "5 files" in done.stdout
    for kind, number in PARTITIONS.items():
        fs = partition_of(disk, number, tmp_path)
        fsck(kind, fs)
        for name, data in ADDON.items():
            assert read_file(kind, fs, name, tmp_path) == data, f"{kind} {name}"
        # the base files the add-on does not replace are still there
        for name, data in base_files.items():
            if name != "readme.txt" and (kind != "ntfs" or "/" not in name):
                assert read_file(kind, fs, name, tmp_path) == data, f"{kind} base {name}"
        fs.unlink()
    assert partition_of(disk, 4, tmp_path).read_bytes() == unknown_before
    assert str(disk) not in run("losetup", "--list").stdout, "no loop device left attached"


def test_a_hostile_addon_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    disk, _ = build_disk(tmp_path, "gpt")
    escape = f"escape-{uuid.uuid4().hex}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("harmless.txt", f"../{escape}", "after.txt"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"owned"))
    image = tmp_path / "evil.add"
    with open(image, "wb") as out:
        writer = ImageWriter(out, addon_metadata(TreeCount(3, 15, 3), {}, 1))
        writer.add(0, 0, buffer.getvalue())
        writer.close()
    before = disk.read_bytes()
    for number in PARTITIONS.values():
        result = img("addon", "apply", "--disk", str(disk), "--partition", str(number),
                     str(image), expect=1)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"../{escape}" in lines[0] and "not changed" in lines[0]
    assert disk.read_bytes() == before
    for folder in ("/tmp", tempfile.gettempdir(), str(tmp_path), "/"):
        assert not os.path.exists(os.path.join(folder, escape))


def test_no_writable_partition_is_a_clear_error(tmp_path: Path) -> None:
    disk = blank(tmp_path / "raw.disk", 8 * MiB)
    run("sfdisk", "-q", str(disk), input="label: dos\nstart=2048, size=8192, type=da\n")
    image = tmp_path / "a.add"
    img("addon", "make", "--from", str(write_tree(tmp_path / "src", {"a.txt": b"a"})),
        str(image))
    result = img("addon", "apply", "--disk", str(disk), str(image), expect=1)
    assert "no partition an add-on can be written to" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def ext4_file(disk: Path, name: str, tmp: Path) -> bytes:
    with open(disk, "rb") as f:
        f.seek(EXT4[0])
        fs_bytes = f.read(EXT4[1])
    fs = tmp / "ext4-check.fs"
    fs.write_bytes(fs_bytes)
    run("e2fsck", "-fn", str(fs))
    return read_file("ext4", fs, name, tmp)


def test_restore_with_addons_from_a_file(source_disk, tmp_path):  # noqa: F811
    base = tmp_path / "base.img"
    img("make", "--disk", str(source_disk), str(base))
    first = tmp_path / "first.add"
    second = tmp_path / "second.add"
    img("addon", "make", "--from", str(write_tree(tmp_path / "one", {"a/x.txt": b"first",
                                                                       "one.txt": b"1"})),
        str(first))
    img("addon", "make", "--from", str(write_tree(tmp_path / "two", {"a/x.txt": b"second"})),
        str(second))
    target = blank(tmp_path / "target.disk")
    result = img("restore", "--disk", str(target), str(base), "--addon", str(first),
                 "--addon", str(second))
    assert result.stdout.count("applied add-on") == 2
    check_restored(target, tmp_path)
    assert ext4_file(target, "a/x.txt", tmp_path) == b"second", "add-ons apply in order"
    assert ext4_file(target, "one.txt", tmp_path) == b"1"


def test_auto_restores_the_base_and_both_addons(imgsrvd_factory, source_disk,  # noqa: F811
                                                tmp_path):
    server = imgsrvd_factory()
    img("make", "--disk", str(source_disk), "--server", server.address, "lab/base.img")
    apps = write_tree(tmp_path / "apps", {"Apps/office/word.exe": random.Random(1).randbytes(
        700_000), "Apps/office/empty.dat": b"", "readme.txt": b"apps replaced this\n"})
    drivers = write_tree(tmp_path / "drivers", {"Drivers/nic/e1000.sys": b"sys" * 1000,
                                                "readme.txt": b"drivers came last\n"})
    for folder, path in ((apps, "lab/apps.add"), (drivers, "lab/drivers.add")):
        made = img("addon", "make", "--from", str(folder), "--server", server.address, path)
        assert "made add-on //" in made.stdout
        assert (server.root / path).is_file()
    server.set_policy(Rule.from_text(
        "lab", "", Action(ActionKind.RESTORE, "lab/base.img",
                          ("lab/apps.add", "lab/drivers.add"))))

    target = blank(tmp_path / "target.disk")
    result = img("auto", "--disk", str(target), "--server", server.address,
                 "--fact", "mac=52:54:00:00:00:21")
    assert "restored //" in result.stdout
    assert result.stdout.count("applied add-on //") == 2, result.stdout
    assert result.stdout.index("apps.add") < result.stdout.index("applied add-on //"
                                                                  f"{server.address}/lab/drivers")
    for name, data in FILES.items():
        if name != "readme.txt":
            assert ext4_file(target, name, tmp_path) == data, name
    assert ext4_file(target, "Apps/office/word.exe", tmp_path) == \
        (apps / "Apps/office/word.exe").read_bytes()
    assert ext4_file(target, "Apps/office/empty.dat", tmp_path) == b""
    assert ext4_file(target, "Drivers/nic/e1000.sys", tmp_path) == b"sys" * 1000
    assert ext4_file(target, "readme.txt", tmp_path) == b"drivers came last\n"

    def addon_results() -> list:
        return [e for e in server.results("download") if e.image_type == "addon"]
    assert wait_for(lambda: len(addon_results()) == 2), server.results()
    assert [(e.image_path, e.status) for e in addon_results()] == [
        ("lab/apps.add", "success"), ("lab/drivers.add", "success")]
    assert wait_for(lambda: any(e.image_type == "addon" and e.status == "success"
                                for e in server.results("upload")))

    # an add-on that is missing on the server fails the auto run, and says so in the log
    server.set_policy(Rule.from_text(
        "lab", "", Action(ActionKind.RESTORE, "lab/base.img", ("lab/gone.add",))))
    result = img("auto", "--disk", str(target), "--server", server.address,
                 "--fact", "mac=52:54:00:00:00:21", expect=1)
    assert "lab/gone.add" in result.stderr and "404" in result.stderr
    assert wait_for(lambda: any(e.image_path == "lab/gone.add" and e.status == "failure"
                                for e in addon_results()))


@pytest.mark.parametrize("kind, size_mb, partitioned", [("xfs", 320, False),
                                                        ("btrfs", 128, True)])
def test_apply_onto_xfs_and_btrfs(kind: str, size_mb: int, partitioned: bool,
                                  tmp_path: Path) -> None:
    """xfs on a whole disk (no partition table: "partition 0"), btrfs in a partition."""
    tools = {"xfs": ("mkfs.xfs", "xfs_repair"), "btrfs": ("mkfs.btrfs", "btrfs")}[kind]
    if any(shutil.which(t) is None for t in tools):
        pytest.skip(f"needs {' and '.join(tools)}")
    fs = blank(tmp_path / f"{kind}.fs", size_mb * MiB)
    run(f"mkfs.{kind}", "-q", "-f", str(fs))
    if partitioned:
        disk = blank(tmp_path / f"{kind}.disk", (size_mb + 2) * MiB)
        run("sfdisk", "-q", str(disk), input=f"label: gpt\nstart=2048, size={size_mb * 2048}\n")
        run("dd", f"if={fs}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse",
            "status=none")
        number = 1
    else:
        disk, number = fs, 0
    image = tmp_path / "apps.add"
    img("addon", "make", "--from", str(write_tree(tmp_path / "src", ADDON)), str(image))
    done = img("addon", "apply", "--disk", str(disk), str(image))
    assert f"partition {number} ({kind})" in done.stdout
    if partitioned:
        fs = partition_of(disk, 1, tmp_path)
    if kind == "xfs":
        run("xfs_repair", "-n", str(fs))
    else:
        run("btrfs", "check", "--readonly", str(fs))
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    loop = run("losetup", "--find", "--show", "--read-only", str(fs)).stdout.strip()
    try:
        run("mount", "-o", "ro", loop, str(mount_point))
        try:
            for name, data in ADDON.items():
                assert (mount_point / name).read_bytes() == data, name
        finally:
            run("umount", str(mount_point))
    finally:
        run("losetup", "--detach", loop)


def test_auto_applies_addons_from_the_referred_server(imgsrvd_factory, source_disk,  # noqa: F811
                                                      tmp_path):
    first = imgsrvd_factory()
    second = imgsrvd_factory()
    img("make", "--disk", str(source_disk), "--server", second.address, "lab/base.img")
    img("addon", "make", "--from", str(write_tree(tmp_path / "a", {"a.txt": b"from second"})),
        "--server", second.address, "lab/a.add")
    first.set_policy(Rule.from_text("elsewhere", "", Action(
        ActionKind.RESTORE, f"//{second.address}/lab/base.img", ("lab/a.add",))))
    target = blank(tmp_path / "target.disk")
    result = img("auto", "--disk", str(target), "--server", first.address,
                 "--fact", "mac=52:54:00:00:00:31")
    assert "referral" in result.stdout
    assert f"applied add-on //{second.address}/lab/a.add" in result.stdout
    assert ext4_file(target, "a.txt", tmp_path) == b"from second"
    assert wait_for(lambda: any(e.image_type == "addon" and e.status == "success"
                                and e.image_path == f"//{second.address}/lab/a.add"
                                for e in first.results("download")))

    # and by hand: img addon apply --server, img restore --server --addon
    manual = blank(tmp_path / "manual.disk")
    img("restore", "--disk", str(manual), "--server", second.address, "lab/base.img",
        "--addon", "lab/a.add")
    assert ext4_file(manual, "a.txt", tmp_path) == b"from second"
    img("addon", "make", "--from", str(write_tree(tmp_path / "b", {"a.txt": b"again"})),
        "--server", second.address, "lab/b.add")
    done = img("addon", "apply", "--disk", str(manual), "--partition", "1",
               "--server", second.address, "lab/b.add")
    assert "partition 1 (ext4)" in done.stdout
    assert ext4_file(manual, "a.txt", tmp_path) == b"again"
    wrong = img("addon", "apply", "--disk", str(manual), "--server", second.address,
                "lab/base.img", expect=1)
    assert "not an add-on image" in wrong.stderr and "not changed" in wrong.stderr


def test_a_block_device_disk_and_a_mounted_one(source_disk, tmp_path):  # noqa: F811
    """The disk as a block device (a loop device over the disk file) works like a file; a
    mounted filesystem on it is refused, not mounted a second time."""
    disk = tmp_path / "disk"
    shutil.copyfile(source_disk, disk)
    image = tmp_path / "a.add"
    img("addon", "make", "--from", str(write_tree(tmp_path / "src", {"x/y.txt": b"block"})),
        str(image))
    device = run("losetup", "--find", "--show", str(disk)).stdout.strip()
    try:
        done = img("addon", "apply", "--disk", device, str(image))
        assert "partition 1 (ext4)" in done.stdout
    finally:
        run("losetup", "--detach", device)
    assert ext4_file(disk, "x/y.txt", tmp_path) == b"block"

    whole = tmp_path / "whole.fs"
    with open(disk, "rb") as f:
        f.seek(EXT4[0])
        whole.write_bytes(f.read(EXT4[1]))
    device = run("losetup", "--find", "--show", str(whole)).stdout.strip()
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    try:
        run("mount", device, str(mount_point))
        try:
            result = img("addon", "apply", "--disk", device, str(image), expect=1)
            assert f"{device} is mounted" in result.stderr
        finally:
            run("umount", str(mount_point))
    finally:
        run("losetup", "--detach", device)
