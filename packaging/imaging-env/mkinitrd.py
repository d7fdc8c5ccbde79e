"""Write a folder as a reproducible initramfs: a gzip-compressed "newc" cpio archive.

    python3 mkinitrd.py ROOT OUT [--epoch SECONDS]

This module owns the bytes of the imaging environment's initrd (build.sh runs it with the
pinned interpreter, so the zlib that compresses is the pinned one too). The same tree gives the
same bytes whatever the host, the umask, the file system or the time of the build:

- entries in byte order of their paths (a folder before what it holds), inode numbers counted
  from 1 in that order, no device numbers;
- every entry owned by 0:0 with the modification time `--epoch` (SOURCE_DATE_EPOCH);
- modes normalised: folders 0755, files 0755 when the tree has any execute bit, else 0644,
  links 0777 (the tree's own bits depend on the umask of whoever built it);
- hard links stored as separate files (nlink 1), so no entry depends on inode numbers;
- gzip without a name and with mtime 0 (RFC 1952 section 2.3: MTIME 0 means "no time").

The format is the kernel's (Documentation/driver-api/early-userspace/buffer-format.rst): a
110-byte ASCII header per entry, the name NUL-terminated, name and data each padded to 4 bytes,
and a final entry named TRAILER!!!. Only folders, regular files and symbolic links are written;
anything else in the tree is an error (the kernel's devtmpfs makes /dev at boot).
"""

from __future__ import annotations

import argparse
import gzip
import os
import stat
import sys
from typing import BinaryIO, Iterator

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
GZIP_LEVEL = 6      # the kernel unpacks -6 and -9 at the same speed; -9 only costs build time


class TreeError(ValueError):
    """A tree that cannot be archived reproducibly; str() says which entry and why."""


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def header(ino: int, mode: int, nlink: int, mtime: int, size: int, name: bytes) -> bytes:
    """One newc header with its name (NUL-terminated, padded to 4 bytes), owner 0:0."""
    namesize = len(name) + 1
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, 0, 0, namesize, 0)
    head = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields) + name + b"\0"
    return head + _pad(len(head))


def normal_mode(st_mode: int, path: str) -> int:
    """The archived mode of an entry of the tree (see the module docstring)."""
    if stat.S_ISDIR(st_mode):
        return stat.S_IFDIR | 0o755
    if stat.S_ISLNK(st_mode):
        return stat.S_IFLNK | 0o777
    if stat.S_ISREG(st_mode):
        return stat.S_IFREG | (0o755 if st_mode & 0o111 else 0o644)
    raise TreeError(f"{path}: not a folder, file or link (mode {st_mode:o})")


def walk(root: str) -> list[str]:
    """Every path under root, relative, sorted bytewise (a folder precedes its contents)."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in dirs + files:
            found.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found, key=os.fsencode)


def entries(root: str, epoch: int) -> Iterator[bytes]:
    """The archive's bytes, entry by entry, ending with the trailer."""
    ino = 0
    for ino, rel in enumerate(walk(root), start=1):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        mode = normal_mode(st.st_mode, rel)
        if stat.S_ISLNK(mode):
            data = os.fsencode(os.readlink(path))
        elif stat.S_ISREG(mode):
            with open(path, "rb") as handle:
                data = handle.read()
        else:
            data = b""
        nlink = 2 if stat.S_ISDIR(mode) else 1
        yield header(ino, mode, nlink, epoch, len(data), os.fsencode(rel))
        if data:
            yield data + _pad(len(data))
    yield header(ino + 1, 0, 1, 0, 0, TRAILER.encode())


def write_initrd(root: str, out: BinaryIO, epoch: int) -> None:
    """Write root as a gzip newc archive to the binary stream out."""
    if not os.path.isdir(root):
        raise TreeError(f"{root}: not a folder")
    # filename="" and mtime=0: no build path and no build time in the gzip header
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL,
                       mtime=0) as packed:
        for chunk in entries(root, epoch):
            packed.write(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write ROOT as a reproducible gzip newc cpio.")
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--epoch", type=int,
                        default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
                        help="modification time of every entry (default: $SOURCE_DATE_EPOCH)")
    args = parser.parse_args(argv)
    if args.epoch < 0 or args.epoch > 0xFFFFFFFF:
        print(f"mkinitrd: epoch {args.epoch} does not fit newc's 32-bit field", file=sys.stderr)
        return 2
    try:
        with open(args.out, "wb") as out:
            write_initrd(args.root, out, args.epoch)
    except (TreeError, OSError) as exc:
        print(f"mkinitrd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
