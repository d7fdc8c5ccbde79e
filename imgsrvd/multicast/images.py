"""What the control plane needs to know of a session's image: where its file is, its size, its
image digest (the name every packet of the session carries, docs/multicast-protocol.md) and
how many chunks a receiver must verify. Blocking (file reads); run on a worker thread.

The digest is made from the header, index and trailer only (a few KiB to a few MiB), so a
work answer naming a 50 GB image costs no more than one naming a small one; facts are kept per
(file, size, modification time) in a small table, so an image replaced under the same name is
read again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from common.imaging.imageformat import (HEADER_FIXED, TRAILER, ImageFormatError,
                                        decode_trailer, header_length)
from common.imaging.multicast import image_digest

from .. import store

MAX_REMEMBERED = 64


@dataclass(frozen=True)
class ImageFacts:
    image: str                  # relative to ImageRoot, as clients name it
    file_path: str              # the file, resolved under ImageRoot
    size: int
    digest: bytes               # common.imaging.multicast.image_digest
    chunks: int                 # chunks in the index: what a receiver verifies

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()


class ImageFactsError(Exception):
    """The image cannot be sent: missing, outside the root, not a complete image."""


def read_image_facts(root: str, image: str) -> ImageFacts:
    """The facts of `image` (relative to root); ImageFactsError with the reason."""
    try:
        path, size = store.open_for_reading(root, image)
        with open(path, "rb") as handle:
            fixed = handle.read(HEADER_FIXED.size)
            head_bytes = header_length(fixed)
            handle.seek(0)
            head = handle.read(head_bytes)
            handle.seek(max(0, size - TRAILER.size))
            trailer = decode_trailer(handle.read(TRAILER.size), size)
            handle.seek(trailer.index_offset)
            tail = handle.read(size - trailer.index_offset)
    except store.StoreError as exc:
        raise ImageFactsError(str(exc)) from None
    except ImageFormatError as exc:
        raise ImageFactsError(f"{image}: not a complete image ({exc})") from None
    except OSError as exc:
        raise ImageFactsError(f"{image}: cannot read it: {exc.strerror}") from None
    if len(head) != head_bytes or len(tail) != size - trailer.index_offset:
        raise ImageFactsError(f"{image}: changed while it was read")
    return ImageFacts(image, path, size, image_digest(head, tail), trailer.chunk_count)


class ImageFactsCache:
    """read_image_facts, remembered per (file, size, modification time); bounded."""

    def __init__(self, limit: int = MAX_REMEMBERED):
        self._limit = limit
        self._known: OrderedDict[tuple[str, str], tuple[tuple[int, int], ImageFacts]] = \
            OrderedDict()

    def get(self, root: str, image: str) -> ImageFacts:
        key = (root, image)
        try:
            info = os.stat(store.resolve(root, image))
            stamp = (info.st_size, info.st_mtime_ns)
        except (OSError, store.StoreError):
            stamp = (-1, -1)
        known = self._known.get(key)
        if known is not None and known[0] == stamp:
            self._known.move_to_end(key)
            return known[1]
        facts = read_image_facts(root, image)
        self._known[key] = (stamp, facts)
        while len(self._known) > self._limit:
            self._known.popitem(last=False)
        return facts
