"""Add-on images (docs/image-format.md): making one from a directory tree, and laying one onto a
partition of a disk after its base image has been restored.

An add-on image has one stream, role `files`: a pax tar of the tree. Making streams the tar into
common.imaging.imagefile.ImageWriter in chunk-size pieces, so no add-on is ever held in memory.

Applying reads the chunks back in order (ImageReader verifies each one) and goes over the tar
twice: first every member is checked (`check_member`) without writing anything, so a hostile or
damaged add-on leaves the disk untouched; then the members are written onto the target partition,
each checked again together with tarfile's "data" filter, which also refuses a path that a
symbolic link already on the target filesystem would lead out of its root. The target partition
is mounted by the kernel (ext2/3/4, xfs, btrfs) or by ntfs-3g (NTFS) on a loop device showing
just that partition; FAT, which this kernel cannot mount, gets the tree extracted to a temporary
folder and copied in with mtools. Loop devices and mounts are always undone.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

from common import __version__
from common.fileio import atomic_file
from common.imaging.imagefile import DEFAULT_LEVEL, ImageReader, ImageWriter, WriteStats
from common.imaging.imageformat import DEFAULT_CHUNK_SIZE, ImageFormatError, IndexEntry

from .disk import Disk
from .errors import AddonError, DiskError
from .sectors import table_mismatch
from .usedblocks import PROBE_BYTES, detect_filesystem

FILES_ROLE = "files"
TOOL_TIMEOUT = 120          # mount, umount, losetup: seconds
COPY_TIMEOUT = 3600         # mcopy of a whole add-on onto FAT

# How each filesystem we can write is written: the kernel (on a loop device), ntfs-3g (FUSE, on
# a loop device), or mtools (no mount at all).
WRITERS: dict[str, str] = {"ext2": "kernel", "ext3": "kernel", "ext4": "kernel",
                           "xfs": "kernel", "btrfs": "kernel", "ntfs": "ntfs-3g",
                           "vfat": "mtools"}
KERNEL_TYPES = {"ext2": "ext4", "ext3": "ext4"}     # the ext4 driver mounts them all

Log = Callable[[str], None]


class RefusedMember(AddonError):
    """A tar member that would write outside the target root, or is not a plain file, folder
    or link."""


# -------------------------------------------------------------------------- member checks

def _refuse(member: tarfile.TarInfo, why: str) -> RefusedMember:
    return RefusedMember(f"refused tar member '{member.name}': {why}")


def _escapes(path: str) -> bool:
    """True when the relative POSIX path leaves its root ('..' past the top) or is absolute."""
    if path.startswith("/") or path.startswith("\\"):
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def check_member(member: tarfile.TarInfo, allow_symlinks: bool = True) -> None:
    """Raise RefusedMember unless the member is a regular file, folder, symbolic link or hard
    link whose name and link target stay inside the root. Stricter than tarfile's "data"
    filter: any '..' component is refused, even one that would stay inside."""
    name = member.name
    if not name or "\0" in name or "\0" in member.linkname:
        raise _refuse(member, "empty name or NUL byte")
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":" and name[2:3] in ("", "/", "\\")
    if name.startswith("/") or name.startswith("\\") or drive:
        raise _refuse(member, "absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise _refuse(member, "'..' in the path")
    if member.ischr() or member.isblk():
        raise _refuse(member, "device node")
    if member.isfifo():
        raise _refuse(member, "fifo")
    if member.issym():
        if not allow_symlinks:
            raise _refuse(member, "symbolic links cannot be stored on this filesystem")
        target = posixpath.join(posixpath.dirname(name), member.linkname)
        if member.linkname.startswith("/") or _escapes(target):
            raise _refuse(member, f"symbolic link to '{member.linkname}' leads outside the root")
    elif member.islnk():
        if _escapes(member.linkname) or ".." in member.linkname.split("/"):
            raise _refuse(member, f"hard link to '{member.linkname}' leads outside the root")
    elif not (member.isreg() or member.isdir()):
        raise _refuse(member, f"unsupported member type {member.type!r}")


class MemberChecker:
    """check_member over a whole archive, in order, also refusing any name or link target that
    goes through a symbolic link an earlier member made: links that each stay inside on their
    own can lead out together (a/b -> .. and then c -> a/b/..), and writing through a link is
    never what an add-on needs."""

    def __init__(self, allow_symlinks: bool = True):
        self.allow_symlinks = allow_symlinks
        self._links: set[str] = set()

    def check(self, member: tarfile.TarInfo) -> None:
        check_member(member, self.allow_symlinks)
        name = posixpath.normpath(member.name)        # no '..' left to resolve: drops './'
        self._walk(member, name.split("/"), "path", may_end_on_link=member.issym())
        if member.issym():
            parts = posixpath.dirname(name).split("/") + member.linkname.split("/")
            self._walk(member, parts, "symbolic link target", may_end_on_link=True)
            self._links.add(name)
        elif member.islnk():
            self._walk(member, member.linkname.split("/"), "hard link target",
                       may_end_on_link=True)

    def _walk(self, member: tarfile.TarInfo, parts: list[str], what: str,
              may_end_on_link: bool) -> None:
        parts = [part for part in parts if part not in ("", ".")]
        stack: list[str] = []
        for index, part in enumerate(parts):
            if part == "..":
                if not stack:
                    raise _refuse(member, f"{what} leads outside the root")
                stack.pop()
                continue
            stack.append(part)
            path = "/".join(stack)
            if path in self._links and not (may_end_on_link and index == len(parts) - 1):
                raise _refuse(member, f"{what} goes through the symbolic link '{path}' made "
                                      "by an earlier member")


def _older_data_filter(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo:
    """What tarfile's data filter does, for Pythons before 3.11.4 that lack it (the imaging
    environment runs Debian 12's 3.11.2): the destination, resolved through symbolic links
    already on the target, stays inside root; owners are dropped (files belong to whoever
    extracts); no set-id, sticky or group/other write bits."""
    real_root = os.path.realpath(root)

    def inside(path: str) -> bool:
        return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root

    if not inside(os.path.join(root, member.name)):
        raise _refuse(member, "would be written outside the root through a symbolic link "
                              "already on the target")
    if member.issym() and not inside(os.path.join(root, os.path.dirname(member.name),
                                                  member.linkname)):
        raise _refuse(member, f"symbolic link to '{member.linkname}' leads outside the root")
    if member.islnk() and not inside(os.path.join(root, member.linkname)):
        raise _refuse(member, f"hard link to '{member.linkname}' leads outside the root")
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if member.isreg() or member.islnk():
        member.mode = (member.mode & 0o755) | 0o600
    elif member.isdir():
        member.mode = (member.mode & 0o755) | 0o700
    return member


def _member_filter(allow_symlinks: bool) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    """MemberChecker, then tarfile's data filter (which resolves the destination path on the
    target filesystem, existing symbolic links included, and drops owners and odd modes)."""
    checker = MemberChecker(allow_symlinks)

    def member_filter(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo:
        checker.check(member)
        data_filter = getattr(tarfile, "data_filter", None)
        if data_filter is None:
            return _older_data_filter(member, root)
        try:
            return data_filter(member, root)
        except tarfile.FilterError as exc:
            raise _refuse(member, str(exc)) from None
    return member_filter


# -------------------------------------------------------------------------- making

@dataclass(frozen=True)
class TreeCount:
    files: int           # regular files
    bytes: int           # their total size
    entries: int         # every member: files, folders, links


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(path, name in the tar) for everything under root, parents before children, sorted so
    the same tree always gives the same tar."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        relative = os.path.relpath(folder, root)
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(folder, name)
            yield path, name if relative == "." else f"{relative}/{name}"


def count_tree(root: str) -> TreeCount:
    if not os.path.isdir(root):
        raise AddonError(f"{root} is not a folder")
    files = size = entries = 0
    for path, arcname in _walk(root):
        info = os.lstat(path)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)
                or stat.S_ISLNK(info.st_mode)):
            raise AddonError(f"{path}: only files, folders and links go into an add-on image")
        entries += 1
        if stat.S_ISREG(info.st_mode):
            files += 1
            size += info.st_size
    return TreeCount(files, size, entries)


class _ChunkSink(io.RawIOBase):
    """A write-only file that cuts what tarfile writes into chunk-size pieces of one stream."""

    def __init__(self, writer: ImageWriter, stream: int):
        super().__init__()
        self._writer = writer
        self._stream = stream
        self._buffer = bytearray()
        self.offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        size = self._writer.chunk_size
        while len(self._buffer) >= size:
            self._emit(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return len(data)

    def finish(self) -> int:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()
        return self.offset

    def _emit(self, data: bytes) -> None:
        self._writer.add(self._stream, self.offset, data)
        self.offset += len(data)


def addon_metadata(count: TreeCount, source: dict[str, Any] | None, level: int) -> dict[str, Any]:
    return {
        "format": 1, "type": "addon",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": f"img {__version__}", "source": source or {},
        "compression": {"algorithm": "zstd", "level": level},
        "files": {"count": count.files, "bytes": count.bytes, "entries": count.entries},
        "streams": [{"number": 0, "role": FILES_ROLE, "format": "pax", "fill": "zero"}],
    }


def make_addon(source_dir: str, out: BinaryIO, source: dict[str, Any] | None = None,
               level: int = DEFAULT_LEVEL, threads: int = 2,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[WriteStats, dict[str, Any]]:
    """Write an add-on image of the tree under source_dir to out (a file or a stream)."""
    count = count_tree(source_dir)
    metadata = addon_metadata(count, source, level)
    writer = ImageWriter(out, metadata, chunk_size=chunk_size, level=level, threads=threads)
    try:
        sink = _ChunkSink(writer, 0)
        checker = MemberChecker()
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, arcname in _walk(source_dir):
                member = tar.gettarinfo(path, arcname)
                # refuse now what every apply would refuse, naming the source file
                checker.check(member)
                if member.isreg():
                    with open(path, "rb") as handle:
                        tar.addfile(member, handle)
                else:
                    tar.addfile(member)
        tar_bytes = sink.finish()
        stats = writer.close({"tar_bytes": tar_bytes, "files": count.files})
    except RefusedMember as exc:
        writer.abort()
        raise AddonError(f"{source_dir}: {exc}") from None
    except BaseException:
        writer.abort()
        raise
    return stats, metadata


def make_addon_file(source_dir: str, image_path: str, **kwargs: Any
                    ) -> tuple[WriteStats, dict[str, Any]]:
    """make_addon into a local file under a temporary name, fsynced, then renamed: an
    interrupted run never leaves a partial image under the final name."""
    with atomic_file(image_path) as out:
        return make_addon(source_dir, out, **kwargs)


# -------------------------------------------------------------------------- reading the tar

def files_stream(reader: ImageReader) -> int:
    meta = reader.metadata
    if meta.get("type") != "addon":
        raise AddonError(f"{reader.name} is a {meta.get('type')} image, not an add-on image")
    for stream in meta.get("streams", []):
        if stream.get("role") == FILES_ROLE:
            return int(stream["number"])
    raise AddonError(f"{reader.name}: no '{FILES_ROLE}' stream")


class _ChunkStream(io.RawIOBase):
    """The files stream as a read-only file: verified chunks, in order, without gaps."""

    def __init__(self, reader: ImageReader, entries: list[IndexEntry], threads: int):
        super().__init__()
        self._name = reader.name
        self._chunks = reader.chunks(entries, threads=threads)
        self._current = memoryview(b"")
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current:
            try:
                entry, data = next(self._chunks)
            except StopIteration:
                return 0
            if entry.offset != self._position:
                raise ImageFormatError(f"{self._name}: the files stream has a gap at byte "
                                       f"{self._position}")
            self._current = memoryview(data)
            self._position = entry.end
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size

    def close(self) -> None:
        self._chunks.close()         # stops the reader's threads when a member is refused
        super().close()

    def drain(self) -> None:
        """Read (and so verify) whatever follows the tar's end marker."""
        while self.readinto(bytearray(1 << 20)):
            pass


@contextlib.contextmanager
def _open_tar(reader: ImageReader, threads: int) -> Iterator[tuple[tarfile.TarFile,
                                                                    _ChunkStream]]:
    entries = sorted(reader.entries(files_stream(reader)), key=lambda e: e.offset)
    raw = _ChunkStream(reader, entries, threads)
    tar = tarfile.open(fileobj=io.BufferedReader(raw, 1 << 20), mode="r|")
    try:
        yield tar, raw
    finally:
        tar.close()
        raw.close()


@dataclass(frozen=True)
class Scan:
    members: int
    files: int
    bytes: int


def scan_addon(reader: ImageReader, allow_symlinks: bool = True, threads: int = 2) -> Scan:
    """Check every member (and every chunk) of the add-on without writing anything."""
    members = files = size = 0
    checker = MemberChecker(allow_symlinks)
    try:
        with _open_tar(reader, threads) as (tar, raw):
            for member in tar:
                checker.check(member)
                members += 1
                if member.isreg():
                    files += 1
                    size += member.size
            raw.drain()
    except tarfile.TarError as exc:
        raise AddonError(f"{reader.name}: the files stream is not a readable tar: {exc}") \
            from None
    return Scan(members, files, size)


def _extract_all(tar: tarfile.TarFile, root: str,
                 member_filter: Callable[[tarfile.TarInfo, str], tarfile.TarInfo]) -> None:
    if hasattr(tarfile, "data_filter"):          # Python 3.11.4 and later: extraction filters
        tar.extractall(root, filter=member_filter)
        return
    for member in tar:                           # a stream: members in order, each once
        tar.extract(member_filter(member, root), root)


def extract_addon(reader: ImageReader, root: str, allow_symlinks: bool = True,
                  threads: int = 2) -> None:
    """Write the add-on's members under root, overwriting files that are there."""
    try:
        with _open_tar(reader, threads) as (tar, _raw):
            _extract_all(tar, root, _member_filter(allow_symlinks))
    except RefusedMember as exc:
        raise AddonError(str(exc), changed=True) from None
    except Exception as exc:  # noqa: BLE001 (whatever broke, and a lost server connection
        # is not ours to name, files may already have been written: the caller must say so)
        raise AddonError(f"writing {reader.name} failed: {exc}", changed=True) from None


# -------------------------------------------------------------------------- the target

@dataclass(frozen=True)
class Target:
    disk: str
    partition: int           # 0: a disk without a partition table, the filesystem fills it
    offset: int
    size: int
    filesystem: str          # as img.usedblocks.detect_filesystem names it, or "unknown"
    sector_size: int = 512   # the disk's logical sectors; the loop device shows the same

    @property
    def writable(self) -> bool:
        return self.filesystem in WRITERS

    def __str__(self) -> str:
        return f"{self.disk} partition {self.partition} ({self.filesystem})"


def _detect(disk: Disk, offset: int, size: int) -> str:
    probe = disk.read(offset, min(PROBE_BYTES, size))
    return detect_filesystem(probe) or "unknown"


def disk_targets(disk_path: str, sector_size: int | None = None) -> list[Target]:
    """Every data partition of the disk with its filesystem, in partition-number order.
    sector_size: a disk image file's logical sector size (Disk.open)."""
    try:
        disk = Disk.open(disk_path, sector_size=sector_size)
    except DiskError as exc:
        raise AddonError(str(exc)) from None
    with disk:
        layout = disk.read_layout()
        mismatch = table_mismatch(disk, layout)
        if mismatch:
            raise AddonError(mismatch)
        sector = layout.sector_size
        if not layout.partitions:
            return [Target(disk_path, 0, 0, disk.size, _detect(disk, 0, disk.size), sector)]
        targets = []
        for part in sorted(layout.partitions, key=lambda p: p.number):
            if part.is_extended:
                continue
            offset, size = part.start_lba * sector, part.size_lba * sector
            targets.append(Target(disk_path, part.number, offset, size,
                                  _detect(disk, offset, size), sector))
        return targets


def _mounted_sources() -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
            return [line.split(" ", 1)[0] for line in handle]
    except OSError:
        return []


def refuse_mounted(disk_path: str) -> None:
    """A block device with a partition mounted already must not be mounted a second time
    through a loop device: two filesystem drivers writing one filesystem destroy it."""
    if not stat.S_ISBLK(os.stat(disk_path).st_mode):
        return
    device = os.path.realpath(disk_path)
    for source in _mounted_sources():
        if source == device or (source.startswith(device) and
                                source[len(device):].lstrip("p").isdigit()):
            raise AddonError(f"{source} is mounted; unmount the disk's partitions first")


def choose_target(disk_path: str, partition: int | None = None,
                  sector_size: int | None = None) -> Target:
    """--partition N, else the first partition with a filesystem we can write."""
    refuse_mounted(disk_path)
    targets = disk_targets(disk_path, sector_size)
    if partition is not None:
        for target in targets:
            if target.partition == partition:
                if not target.writable:
                    raise AddonError(f"{target}: add-on images cannot be written to this "
                                     f"filesystem (writable: {', '.join(sorted(WRITERS))})")
                return target
        raise AddonError(f"{disk_path} has no partition {partition} "
                         f"(partitions: {', '.join(str(t.partition) for t in targets)})")
    for target in targets:
        if target.writable:
            return target
    found = ", ".join(f"{t.partition}: {t.filesystem}" for t in targets) or "none"
    raise AddonError(f"{disk_path} has no partition an add-on can be written to (found {found}; "
                     f"writable: {', '.join(sorted(WRITERS))})")


def _run(command: list[str], what: str, timeout: float = TOOL_TIMEOUT) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AddonError(f"{what}: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise AddonError(f"{what}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout.strip()


@contextlib.contextmanager
def loop_device(target: Target) -> Iterator[str]:
    device = _run(["losetup", "--find", "--show", "--offset", str(target.offset),
                   "--sizelimit", str(target.size), "--sector-size", str(target.sector_size),
                   target.disk],
                  f"{target}: cannot attach a loop device")
    try:
        yield device
    finally:
        # a device still open (a slow FUSE exit) is detached by the kernel once closed
        with contextlib.suppress(AddonError):
            _run(["losetup", "--detach", device], f"detach {device}")


@contextlib.contextmanager
def _mount_point() -> Iterator[str]:
    # Never TemporaryDirectory: its cleanup would delete the target's files if the unmount
    # had failed. rmdir only removes an empty, unmounted folder.
    path = tempfile.mkdtemp(prefix="img-addon-")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def mounted(target: Target) -> Iterator[str]:
    """The target's filesystem mounted read-write (kernel or ntfs-3g) on a temporary folder."""
    with loop_device(target) as device, _mount_point() as where:
        if WRITERS[target.filesystem] == "ntfs-3g":
            command = ["ntfs-3g", "-o", "nodev,nosuid", device, where]
        else:
            kind = KERNEL_TYPES.get(target.filesystem, target.filesystem)
            command = ["mount", "-t", kind, "-o", "nodev,nosuid", device, where]
        _run(command, f"{target}: cannot mount")
        try:
            yield where
        finally:
            os.sync()
            _unmount(target, where)


def _unmount(target: Target, where: str) -> None:
    try:
        _run(["umount", where], f"{target}: cannot unmount {where}")
    except AddonError:
        # Busy (a stray process in the folder): detach it lazily so the loop device goes
        # once it is idle, and fail, since the writes may not all be on the disk yet.
        with contextlib.suppress(AddonError):
            _run(["umount", "--lazy", where], f"umount --lazy {where}")
        raise


def _mtools_copy(target: Target, folder: str) -> None:
    names = sorted(os.listdir(folder))
    if not names:
        return
    image = f"{target.disk}@@{target.offset}"
    # -s: recursive, -o / -D o: overwrite existing files without asking (add-ons replace files)
    command = ["mcopy", "-s", "-o", "-D", "o", "-i", image,
               *[os.path.join(folder, name) for name in names], "::/"]
    _run(command, f"{target}: mcopy failed", timeout=COPY_TIMEOUT)


# -------------------------------------------------------------------------- applying

@dataclass(frozen=True)
class ApplyResult:
    target: Target
    files: int
    bytes: int
    members: int


def apply_addon(reader: ImageReader, disk_path: str, partition: int | None = None,
                threads: int = 2, sector_size: int | None = None) -> ApplyResult:
    """Lay the add-on image onto the chosen partition of disk_path (sector_size: a disk image
    file's logical sector size). Raises AddonError (with `changed` set once the partition may
    have been written) or ImageFormatError."""
    files_stream(reader)
    target = choose_target(disk_path, partition, sector_size)
    allow_symlinks = WRITERS[target.filesystem] != "mtools"
    scan = scan_addon(reader, allow_symlinks, threads)
    if WRITERS[target.filesystem] == "mtools":
        staging = tempfile.mkdtemp(prefix="img-addon-fat-")
        try:
            try:
                extract_addon(reader, staging, allow_symlinks, threads)
            except AddonError as exc:      # only the staging folder was written
                raise AddonError(str(exc), changed=False) from None
            try:
                _mtools_copy(target, staging)
            except AddonError as exc:
                raise AddonError(str(exc), changed=True) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with Disk.open(disk_path, writable=True, sector_size=sector_size) as disk:
            disk.sync()
    else:
        with mounted(target) as root:
            extract_addon(reader, root, allow_symlinks, threads)
    return ApplyResult(target, scan.files, scan.bytes, scan.members)


def describe(metadata: dict[str, Any]) -> str:
    """One line about an add-on image's contents, for img verify."""
    files = metadata.get("files") or {}
    return (f"add-on image, {files.get('count', '?')} files, {files.get('bytes', '?')} bytes, "
            f"made {metadata.get('created', '?')}")
