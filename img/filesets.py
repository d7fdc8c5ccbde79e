"""Applying a file set after a restore (docs/image-format.md, "File sets"): the image's blocks
are all on the disk; this removes, from each filesystem a set's patterns name, the paths they
match, and then has the filesystem's own checker look at it read-only.

Our images hold used blocks, not files, so a set cannot be "restored without" its files: the
restore writes everything and the set's exclusions are removed afterwards, through the
filesystem's own driver, which keeps it consistent. How each filesystem is written (the
add-on images' table, img/addon.py):

| filesystem | removed through | checked by (read-only) |
|---|---|---|
| ext2/3/4 | the kernel, mounted from a loop device | `e2fsck -f -n` |
| XFS | the kernel, likewise | `xfs_repair -n` |
| btrfs | the kernel, likewise | `btrfs check --readonly` |
| NTFS | ntfs-3g (FUSE) on a loop device | `ntfsfix -n` |
| FAT | mtools (`mdir -/ -b -a` lists, `mdeltree`/`mdel` remove; no kernel vfat here) | `fsck.fat -n` |

Names on NTFS and FAT match without regard to case (as Windows sees them). A walk never follows
a symbolic link: a matching link is removed, not what it points to. apply_fileset() never
raises: it comes after a complete restore, and its outcome says what happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from common.imaging.filesets import FileSet, Pattern

from .addon import WRITERS, Target, disk_targets, loop_device, mounted, refuse_mounted
from .errors import AddonError
from .tools import run_tool

TIMEOUT_S = 1800.0
CHECKERS: dict[str, tuple[str, ...]] = {
    "ext2": ("e2fsck", "-f", "-n"), "ext3": ("e2fsck", "-f", "-n"),
    "ext4": ("e2fsck", "-f", "-n"), "xfs": ("xfs_repair", "-n"),
    "btrfs": ("btrfs", "check", "--readonly"), "ntfs": ("ntfsfix", "-n"),
    "vfat": ("fsck.fat", "-n"),
}
FOLD_CASE = frozenset({"ntfs", "vfat"})


class FilesetApplyError(Exception):
    """Removing a set's paths or checking the filesystem afterwards failed."""


@dataclass(frozen=True)
class Removed:
    partition: int
    filesystem: str
    paths: int               # entries the patterns matched (a folder counts once)
    files: int               # regular files removed, those inside matched folders included


@dataclass(frozen=True)
class FilesetOutcome:
    number: int
    name: str
    status: str              # applied | failed
    removed: tuple[Removed, ...] = ()
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def line(self) -> str:
        where = "; ".join(f"partition {r.partition} ({r.filesystem}): removed "
                          f"{_count(r.paths, 'path')}, {_count(r.files, 'file')}, checked clean"
                          for r in self.removed)
        if self.failed:
            done = f" (done before: {where})" if where else ""
            return (f"the restore is complete, but applying file set {self.number} "
                    f"({self.name}) FAILED: {self.detail}{done}; files the set leaves out may "
                    "still be on the disk: restore again")
        return f"file set {self.number} ({self.name}): {where}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def apply_fileset(disk_path: str, fileset: FileSet, sector_size: int | None = None
                  ) -> FilesetOutcome:
    """Remove what `fileset` excludes from the restored disk, each filesystem checked after."""
    done: list[Removed] = []
    try:
        refuse_mounted(disk_path)
        targets = {t.partition: t for t in disk_targets(disk_path, sector_size)}
        for partition in fileset.partitions():
            target = targets.get(partition)
            if target is None or not target.writable:
                found = target.filesystem if target else "no such partition"
                raise FilesetApplyError(f"partition {partition}: {found}; file sets edit "
                                        f"{', '.join(sorted(WRITERS))}")
            done.append(_apply_one(target, fileset.patterns_for(partition)))
    except (FilesetApplyError, AddonError, OSError) as exc:
        return FilesetOutcome(fileset.number, fileset.name, "failed", tuple(done), str(exc))
    return FilesetOutcome(fileset.number, fileset.name, "applied", tuple(done))


def _apply_one(target: Target, patterns: tuple[Pattern, ...]) -> Removed:
    fold = target.filesystem in FOLD_CASE
    if WRITERS[target.filesystem] == "mtools":
        paths, files = _remove_fat(target, patterns)
    else:
        with mounted(target) as root:
            paths, files = remove_matching(root, patterns, fold)
    check(target)
    return Removed(target.partition, target.filesystem, paths, files)


def remove_matching(root: str, patterns: tuple[Pattern, ...], fold_case: bool = False
                    ) -> tuple[int, int]:
    """Remove every entry under root a pattern matches (a folder with what it holds); walk
    only into folders a pattern may match below; never follow a symbolic link. Returns
    (entries matched, regular files removed)."""
    paths = files = 0
    stack: list[tuple[str, ...]] = [()]
    while stack:
        folder = stack.pop()
        with os.scandir(os.path.join(root, *folder)) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        for entry in entries:
            parts = folder + (entry.name,)
            is_dir = entry.is_dir(follow_symlinks=False)
            if any(p.matches(parts, fold_case) for p in patterns):
                paths += 1
                files += _remove(entry.path, is_dir)
            elif is_dir and any(p.may_match_below(parts, fold_case) for p in patterns):
                stack.append(parts)
    return paths, files


def _remove(path: str, is_dir: bool) -> int:
    if not is_dir:
        os.unlink(path)
        return 1
    count = sum(1 for _, _, names in os.walk(path) for _ in names)
    shutil.rmtree(path)
    return count


def _remove_fat(target: Target, patterns: tuple[Pattern, ...]) -> tuple[int, int]:
    """FAT through mtools: list every entry, match in Python, remove the top-most matches."""
    image = f"{target.disk}@@{target.offset}"
    listing = _fat_listing(image)
    matched: list[tuple[tuple[str, ...], bool]] = []
    for parts, is_dir in listing:
        if any(parts[:len(m)] == m for m, _ in matched if len(m) < len(parts)):
            continue                                     # inside a folder already matched
        if any(p.matches(parts, True) for p in patterns):
            matched.append((parts, is_dir))
    files = 0
    for parts, is_dir in matched:
        inside = sum(1 for other, other_dir in listing
                     if not other_dir and other[:len(parts)] == parts)
        files += inside if is_dir else 1
        tool = "mdeltree" if is_dir else "mdel"
        run_tool([tool, "-i", image, "::/" + "/".join(parts)], TIMEOUT_S, FilesetApplyError)
    return len(matched), files


def _fat_listing(image: str) -> list[tuple[tuple[str, ...], bool]]:
    """Every entry of the FAT (hidden and system ones too), parents first: (parts, folder)."""
    try:
        done = subprocess.run(["mdir", "-/", "-b", "-a", "-i", image, "::/"],
                              capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FilesetApplyError(f"mdir: {exc}") from None
    entries = []
    for line in done.stdout.splitlines():
        if not line.startswith("::/"):
            continue
        path = line[3:]
        is_dir = path.endswith("/")
        parts = tuple(part for part in path.split("/") if part)
        if parts:
            entries.append((parts, is_dir))
    if done.returncode != 0 and entries:
        raise FilesetApplyError(f"mdir failed (exit status {done.returncode}): "
                                f"{done.stderr.strip()[:200]}")
    return sorted(entries, key=lambda e: (len(e[0]), e[0]))


def check(target: Target) -> None:
    """The filesystem's own read-only check, on a loop device of the partition."""
    with loop_device(target) as device:
        run_tool([*CHECKERS[target.filesystem], device], TIMEOUT_S, FilesetApplyError)
