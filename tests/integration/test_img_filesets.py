"""File sets on real filesystems (docs/image-format.md, "File sets"): a GPT disk file with ext4,
XFS, FAT and NTFS partitions holding the same tree; `img make --fileset` declares two sets;
`img show` lists them; `img restore --fileset 2` leaves out exactly the paths the set names
(read back through the filesystem, every other file byte for byte, each filesystem's own
check clean); `img restore` (set 1) brings everything; an unknown set and a set naming a
partition the disk lacks are refused before a byte is written; `img auto` against a real
imgsrvd whose rule says `fileset = 2` restores that set, and one naming a set the image lacks
fails without writing, in the results log.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from common.policy.model import Action, ActionKind, Rule
from img.addon import Target, disk_targets, loop_device, mounted
from tests.integration.test_img_roundtrip import img, run
from tests.integration.test_img_server_modes import imgsrvd_factory, wait_for  # noqa: F401
from tests.support import disk_tool_marks

TOOLS = ("sgdisk", "mkfs.ext4", "mkfs.xfs", "mkfs.vfat", "mkntfs", "ntfs-3g", "mcopy", "mdir",
         "mdeltree", "e2fsck", "xfs_repair", "fsck.fat", "ntfsfix", "partclone.ext4",
         "partclone.xfs", "partclone.fat", "partclone.ntfs", "losetup", "mount", "umount")
pytestmark = disk_tool_marks(TOOLS, fuse=True)

MiB = 1 << 20
# partition number -> (filesystem, start MiB, size MiB); recent mkfs.xfs wants 300 MiB
PARTS = {1: ("ext4", 1, 64), 2: ("xfs", 65, 320), 3: ("vfat", 385, 48), 4: ("ntfs", 433, 48)}
DISK_MIB = 484
rng = random.Random(17)
TREE = {
    "readme.txt": b"kept everywhere\n",
    "home/alice/Downloads/big.iso": rng.randbytes(3 * MiB),
    "home/alice/Downloads/sub/more.bin": rng.randbytes(5000),
    "home/alice/Documents/cv.txt": b"curriculum\n" * 100,
    "home/bob/Downloads/x.bin": rng.randbytes(70000),
    "home/bob/notes.txt": b"notes\n",
    "var/cache/apt/pkg.deb": rng.randbytes(200000),
    "var/cache/fonts/f.cache": b"cache",
    "var/lib/keep.db": rng.randbytes(9000),
    "tmp/a.tmp": b"temporary",
    "deep/x/y/z.tmp": b"deep temporary",
    "deep/x/y/z.txt": b"deep kept",
}
# Set 2 in NTFS's and FAT's patterns is spelt in another case: those match regardless of it.
LEAN = {1: "/home/*/Downloads,{p}:/var/cache/**,{p}:/**/*.tmp",
        2: "/home/*/Downloads,{p}:/var/cache/**,{p}:/**/*.tmp",
        3: "/HOME/*/downloads,{p}:/VAR/cache/**,{p}:/**/*.TMP",
        4: "/HOME/*/downloads,{p}:/VAR/cache/**,{p}:/**/*.TMP"}
GONE = {"home/alice/Downloads/big.iso", "home/alice/Downloads/sub/more.bin",
        "home/bob/Downloads/x.bin", "var/cache/apt/pkg.deb", "var/cache/fonts/f.cache",
        "tmp/a.tmp", "deep/x/y/z.tmp"}


def lean_spec() -> str:
    return "lean:" + ",".join(f"{p}:" + LEAN[p].format(p=p) for p in PARTS)


def write_tree(root: Path) -> None:
    for name, data in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def build_disk(tmp: Path) -> Path:
    disk = tmp / "source.disk"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB * MiB)
    codes = {"ext4": "8300", "xfs": "8300", "vfat": "0700", "ntfs": "0700"}
    args = ["sgdisk", "-o"]
    for n, (kind, start, size) in PARTS.items():
        args += ["-n", f"{n}:{start * 2048}:{(start + size) * 2048 - 1}", "-t", f"{n}:{codes[kind]}"]
    run(*args, str(disk))
    source = tmp / "tree"
    write_tree(source)
    for target in disk_targets(str(disk)):
        kind = PARTS[target.partition][0]
        with loop_device(target) as device:
            mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
                    "vfat": ["mkfs.vfat", "-F", "32"], "ntfs": ["mkntfs", "-q", "-F", "-Q"]}
            run(*mkfs[kind], device)
    for target in disk_targets(str(disk)):
        if target.filesystem == "vfat":
            image = f"{disk}@@{target.offset}"
            run("mcopy", "-s", "-i", image, *[str(source / n) for n in os.listdir(source)],
                "::/")
        else:
            with mounted(target) as root:
                shutil.copytree(source, root, dirs_exist_ok=True)
    return disk


def read_tree(target: Target) -> dict[str, bytes]:
    """Every regular file of the partition, read through its filesystem."""
    with tempfile.TemporaryDirectory() as scratch:
        if target.filesystem == "vfat":
            run("mcopy", "-s", "-n", "-i", f"{target.disk}@@{target.offset}", "::/*", scratch)
            return _files(Path(scratch))
        with mounted(target) as root:
            return _files(Path(root))


def _files(root: Path) -> dict[str, bytes]:
    found = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = path.read_bytes()
    return {k: v for k, v in found.items() if not k.startswith("System Volume Information")}


def check_clean(target: Target) -> None:
    command = {"ext4": ["e2fsck", "-f", "-n"], "xfs": ["xfs_repair", "-n"],
               "vfat": ["fsck.fat", "-n"], "ntfs": ["ntfsfix", "-n"]}[target.filesystem]
    with loop_device(target) as device:
        run(*command, device)


def blank(tmp: Path, name: str) -> Path:
    disk = tmp / name
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB * MiB)
    return disk


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("filesets")
    disk = build_disk(tmp)
    image = tmp / "base.img"
    done = img("make", "--disk", str(disk), "--fileset", lean_spec(),
               "--fileset", "no-alice:1:/home/alice", str(image))
    assert "file set 2 lean" in done.stdout and "file set 3 no-alice" in done.stdout
    return disk, image


def test_show_lists_the_sets(made: tuple[Path, Path]) -> None:
    _disk, image = made
    shown = img("show", str(image)).stdout
    assert "file set 1 (everything): excludes nothing" in shown
    assert "file set 2 lean: excludes 1:/home/*/Downloads, 1:/var/cache/**" in shown
    assert "file set 3 no-alice: excludes 1:/home/alice" in shown
    assert "file set 2 lean" in img("verify", str(image)).stdout


def test_restore_with_a_set_leaves_its_paths_out(made: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    _disk, image = made
    target_disk = blank(tmp_path, "lean.disk")
    done = img("restore", "--disk", str(target_disk), "--fileset", "2", str(image))
    for number, (kind, _, _) in PARTS.items():
        assert f"partition {number} ({kind}): removed 6 paths, 7 files, checked clean" in \
            done.stdout
    targets = disk_targets(str(target_disk))
    assert [t.filesystem for t in targets] == [PARTS[n][0] for n in PARTS]
    for target in targets:
        check_clean(target)
        files = read_tree(target)
        kept = {name: data for name, data in TREE.items() if name not in GONE}
        assert files == kept, target
    # set 3 on another disk: only partition 1 loses alice; the others are whole
    other = blank(tmp_path, "no-alice.disk")
    img("restore", "--disk", str(other), "--fileset", "3", str(image))
    for target in disk_targets(str(other)):
        check_clean(target)
        files = read_tree(target)
        if target.partition == 1:
            assert files == {n: d for n, d in TREE.items() if not n.startswith("home/alice/")}
        else:
            assert files == TREE


def test_set_1_restores_everything(made: tuple[Path, Path], tmp_path: Path) -> None:
    _disk, image = made
    target_disk = blank(tmp_path, "whole.disk")
    done = img("restore", "--disk", str(target_disk), str(image))
    assert "file set" not in done.stdout
    for target in disk_targets(str(target_disk)):
        check_clean(target)
        assert read_tree(target) == TREE, target


def test_an_unknown_set_is_refused_before_any_write(made: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    _disk, image = made
    target_disk = blank(tmp_path, "untouched.disk")
    with open(target_disk, "r+b") as f:
        f.write(b"OLD DATA")
    refused = img("restore", "--disk", str(target_disk), "--fileset", "4", str(image),
                  expect=1)
    assert "file set 4: the image has no such set (it has 1 (everything), 2 (lean), " \
           "3 (no-alice))" in refused.stderr and "nothing was written" in refused.stderr
    with open(target_disk, "rb") as f:
        assert f.read(8) == b"OLD DATA"


def test_make_refuses_a_set_naming_a_partition_the_disk_lacks(made: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    disk, _image = made
    out = tmp_path / "never.img"
    refused = img("make", "--disk", str(disk), "--fileset", "x:9:/home", str(out), expect=1)
    assert "the disk has no partition 9 (partitions: 1, 2, 3, 4" in refused.stderr
    assert not out.exists()
    refused = img("make", "--disk", str(disk), "--fileset", "x:2:/home,2:/", str(out), expect=1)
    assert "pattern '2:/': an empty component" in refused.stderr
    assert not out.exists()


def test_auto_restores_the_set_the_rule_names(made: tuple[Path, Path], tmp_path: Path,
                                              imgsrvd_factory) -> None:  # noqa: F811 (fixture)
    disk, _image = made
    server = imgsrvd_factory()
    made_remote = img("make", "--disk", str(disk), "--server", server.address,
                      "--fileset", "no-alice:1:/home/alice", "lab/base.img")
    assert "made //" in made_remote.stdout
    assert "file set 2 no-alice" in img("show", str(server.root / "lab/base.img")).stdout
    server.set_policy(Rule.from_text("lab", "", Action(ActionKind.RESTORE, "lab/base.img",
                                                       fileset=2)))
    target_disk = blank(tmp_path, "auto.disk")
    done = img("auto", "--disk", str(target_disk), "--server", server.address,
               "--fact", "mac=52:54:00:00:00:41")
    assert "restore lab/base.img file set 2" in done.stdout
    assert "file set 2 (no-alice): partition 1 (ext4): removed 1 path, 3 files" in done.stdout
    for target in disk_targets(str(target_disk)):
        files = read_tree(target)
        if target.partition == 1:
            check_clean(target)
            assert files == {n: d for n, d in TREE.items() if not n.startswith("home/alice/")}
        else:
            assert files == TREE

    # a set the image lacks: refused before a byte is written, and reported as a failure
    server.set_policy(Rule.from_text("lab", "", Action(ActionKind.RESTORE, "lab/base.img",
                                                       fileset=9)))
    untouched = blank(tmp_path, "untouched.disk")
    refused = img("auto", "--disk", str(untouched), "--server", server.address,
                  "--fact", "mac=52:54:00:00:00:42", expect=1)
    assert "file set 9: the image has no such set" in refused.stderr
    assert "the disk was not changed" in refused.stderr
    with open(untouched, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
    assert wait_for(lambda: any(e.status == "failure" and "file set 9" in e.error_message
                                for e in server.results("download"))), server.results()


def test_a_set_that_cannot_be_applied_is_an_outcome_not_an_exception(made: tuple[Path, Path]
                                                                      ) -> None:
    from common.imaging.filesets import make_set
    from img.filesets import apply_fileset
    disk, _image = made
    before = disk.stat().st_mtime_ns
    outcome = apply_fileset(str(disk), make_set(2, "ghost", ["9:/x"]))
    assert outcome.failed and "partition 9: no such partition" in outcome.detail
    assert "FAILED" in outcome.line() and "restore again" in outcome.line()
    assert disk.stat().st_mtime_ns == before
