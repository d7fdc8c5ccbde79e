"""preboot-dir images --root DIR [--json]: what an imaging server's image root holds.

One line per file, sorted by path: the path under the root, the size (human and bytes), the
type (base or add-on, from the image header's metadata) and the date (the file's mtime, local
time). Only
the header at the start and the trailer at the end of each file are read, never the chunks, so
listing a root of large images costs two small reads per file. A file that is not a complete
image is listed with the reason ("not an image: bad magic", "incomplete image: no trailer");
imgsrvd's partial uploads (`.NAME.part-<hex>`) are left out.

It reads the folder directly, so it runs on the imaging server host (or wherever the image root
is mounted). imgsrvd has no listing endpoint, so there is no --server: that would need one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass

from common.imaging.imageformat import (HEADER_FIXED, TRAILER, ImageFormatError, decode_header,
                                        decode_trailer, header_length)
from common.units import human

DEFAULT_ROOT = "/var/lib/preboot/images"       # imgsrvd's ImageRoot default
PART_RE = re.compile(r"^\..+\.part-[0-9a-f]{16}$")   # imgsrvd/store.py's partial uploads
TYPES = {"base": "base", "addon": "add-on"}


@dataclass(frozen=True)
class ImageEntry:
    path: str             # relative to the root, with /
    size: int
    size_human: str
    type: str             # base, add-on, or "-" when the file is not a complete image
    date: str             # mtime, ISO 8601 with the UTC offset
    problem: str = ""     # why the file is not a (complete) image


def image_type(path: str, size: int) -> tuple[str, str]:
    """(type, problem) from the header and the trailer only."""
    try:
        with open(path, "rb") as handle:
            fixed = handle.read(HEADER_FIXED.size)
            length = header_length(fixed)
            handle.seek(0)
            header = decode_header(handle.read(length))
            if size < header.length + TRAILER.size:
                raise ImageFormatError("incomplete image: no trailer")
            handle.seek(size - TRAILER.size)
            decode_trailer(handle.read(TRAILER.size), size)
    except ImageFormatError as exc:
        return "-", str(exc)
    except OSError as exc:
        return "-", f"cannot read: {exc.strerror}"
    kind = header.metadata.get("type")
    if kind not in TYPES:
        return "-", f"unknown image type {kind!r}"
    return TYPES[kind], ""


def list_images(root: str) -> list[ImageEntry]:
    entries: list[ImageEntry] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if PART_RE.match(name):
                continue
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue                      # removed meanwhile
            if not stat.S_ISREG(info.st_mode):
                continue                      # symbolic links, sockets: imgsrvd serves none
            kind, problem = image_type(path, info.st_size)
            date = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(info.st_mtime))
            entries.append(ImageEntry(os.path.relpath(path, root).replace(os.sep, "/"),
                                      info.st_size, human(info.st_size), kind, date, problem))
    entries.sort(key=lambda entry: entry.path)
    return entries


def run(args: argparse.Namespace, usage_error) -> int:
    root = args.root
    if not os.path.isdir(root):
        raise usage_error(f"{root}: no such folder (--root names the imaging server's "
                          "ImageRoot)")
    entries = list_images(root)
    if args.json:
        json.dump([asdict(entry) for entry in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not entries:
        print(f"no images under {root}")
        return 0
    width = max(len(entry.path) for entry in entries)
    sizes = [f"{entry.size_human} ({entry.size} bytes)" for entry in entries]
    size_width = max(len(text) for text in sizes)
    for entry, size in zip(entries, sizes):
        date = entry.date[:10] + " " + entry.date[11:16]
        problem = f"  ({entry.problem})" if entry.problem else ""
        print(f"{entry.path:<{width}}  {size:>{size_width}}  {entry.type:<6}  {date}{problem}")
    return 0


def add_command(commands, usage_error) -> None:
    sub = commands.add_parser(
        "images", help="list the images under an imaging server's image root",
        description="List the files under the image root: path, size, type (base or "
                    "add-on, from the image header), date. Reads the folder directly (on the "
                    "imaging server host): imgsrvd has no listing endpoint.")
    sub.add_argument("--root", default=DEFAULT_ROOT,
                     help=f"the image root, imgsrvd's ImageRoot (default {DEFAULT_ROOT})")
    sub.add_argument("--json", action="store_true", help="a JSON list, one object per file")
    sub.set_defaults(run=lambda args: run(args, usage_error))
