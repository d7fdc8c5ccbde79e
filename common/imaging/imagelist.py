"""What an image root holds, read from the image files' headers and trailers only: one
`ImageEntry` per file (path, size, type, date, why it is not a complete image). Shared by
`preboot-dir images --root` (reads the folder) and imgsrvd's `GET /v1/images` (the same list
over the imaging protocol). Only the header at the start and the trailer at the end of each file
are read, never the chunks; imgsrvd's partial uploads (`.NAME.part-<hex>`) are left out.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass

from common.imaging.imageformat import (HEADER_FIXED, TRAILER, ImageFormatError, decode_header,
                                        decode_trailer, header_length)
from common.units import human

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
