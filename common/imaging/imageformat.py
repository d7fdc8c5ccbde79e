"""The image file format, version 1 (docs/image-format.md): pure encoding and decoding of the
header, chunk headers, index and trailer. Bytes in, typed values out; no files, no clock.

img (which writes and restores images) and imgsrvd (which stores, verifies and serves them) both
use this module, so they cannot disagree about the format.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MAGIC = b"\x89PBIM\r\n\x1a"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_FIXED = struct.Struct("<8sHHIII8x")          # 32 bytes
CHUNK_HEADER = struct.Struct("<4sB3xIIQQ16s")        # 48 bytes
CHUNK_MAGIC = b"PBCK"
TRAILER = struct.Struct("<8sQIII4x")                 # 32 bytes
TRAILER_MAGIC = b"PBIMGEND"
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_CHUNK_SIZE = 64 << 20
MAX_METADATA = 16 << 20
MAX_INDEX = 256 << 20
DIGEST_SIZE = 16


class ImageFormatError(ValueError):
    """A file that is not a valid image, or a damaged part of one (the message says which)."""


class ChunkKind(IntEnum):
    ZSTD = 1
    ZERO = 2
    STORED = 3


def digest(payload: bytes) -> bytes:
    """The chunk checksum: BLAKE2b-128 of the payload as stored."""
    return hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest()


# -- header ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    version: tuple[int, int]
    chunk_size: int
    metadata: dict[str, Any]
    length: int                      # header bytes including the metadata


def encode_header(metadata: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    if not 4096 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is outside 4 KiB..64 MiB")
    body = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8")
    fixed = HEADER_FIXED.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, len(body),
                              zlib.crc32(body), chunk_size)
    return fixed + body


def header_length(fixed: bytes) -> int:
    """The whole header's length, from its first 32 bytes (so a reader knows how much to read)."""
    return HEADER_FIXED.size + _fixed_fields(fixed)[2]


def decode_header(data: bytes) -> Header:
    major, minor, meta_len, meta_crc, chunk_size = _fixed_fields(data[:HEADER_FIXED.size])
    end = HEADER_FIXED.size + meta_len
    if len(data) < end:
        raise ImageFormatError(f"header: metadata cut short ({len(data) - HEADER_FIXED.size} of "
                               f"{meta_len} bytes)")
    body = data[HEADER_FIXED.size:end]
    if zlib.crc32(body) != meta_crc:
        raise ImageFormatError("header: metadata checksum mismatch (damaged header)")
    try:
        metadata = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageFormatError(f"header: metadata is not JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise ImageFormatError("header: metadata is not a JSON object")
    return Header((major, minor), chunk_size, metadata, end)


def _fixed_fields(fixed: bytes) -> tuple[int, int, int, int, int]:
    if len(fixed) < HEADER_FIXED.size:
        raise ImageFormatError("not an image: shorter than its header")
    magic, major, minor, meta_len, meta_crc, chunk_size = HEADER_FIXED.unpack(
        fixed[:HEADER_FIXED.size])
    if magic != MAGIC:
        raise ImageFormatError("not an image: bad magic")
    if major != VERSION_MAJOR:
        raise ImageFormatError(f"image format version {major}.{minor} is not supported "
                               f"(this release reads {VERSION_MAJOR}.x)")
    if meta_len > MAX_METADATA:
        raise ImageFormatError(f"header: metadata length {meta_len} is implausible")
    if not 4096 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ImageFormatError(f"header: chunk size {chunk_size} is implausible")
    return major, minor, meta_len, meta_crc, chunk_size


# -- chunks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkHeader:
    kind: ChunkKind
    stream: int
    payload_length: int
    offset: int                      # of the range in its stream
    length: int                      # uncompressed bytes of the range
    checksum: bytes

    @property
    def size(self) -> int:
        """Bytes the chunk takes in the file."""
        return CHUNK_HEADER.size + self.payload_length


def encode_chunk_header(kind: ChunkKind, stream: int, offset: int, length: int,
                        payload: bytes) -> bytes:
    if kind is ChunkKind.ZERO and payload:
        raise ValueError("a zero chunk has no payload")
    return CHUNK_HEADER.pack(CHUNK_MAGIC, int(kind), stream, len(payload), offset, length,
                             digest(payload))


def decode_chunk_header(data: bytes, chunk_size: int, where: int = -1) -> ChunkHeader:
    label = f"chunk at byte {where}" if where >= 0 else "chunk"
    if len(data) < CHUNK_HEADER.size:
        raise ImageFormatError(f"{label}: header cut short")
    magic, kind, stream, payload_length, offset, length, checksum = CHUNK_HEADER.unpack(
        data[:CHUNK_HEADER.size])
    if magic != CHUNK_MAGIC:
        raise ImageFormatError(f"{label}: bad chunk magic")
    try:
        chunk_kind = ChunkKind(kind)
    except ValueError:
        raise ImageFormatError(f"{label}: unknown kind {kind}") from None
    if not 0 < length <= chunk_size:
        raise ImageFormatError(f"{label}: range length {length} is outside 1..{chunk_size}")
    limit = length + (length >> 4) + 1024        # zstd's worst case is far below this
    if payload_length > limit or (chunk_kind is ChunkKind.ZERO and payload_length):
        raise ImageFormatError(f"{label}: payload length {payload_length} is implausible")
    if chunk_kind is ChunkKind.STORED and payload_length != length:
        raise ImageFormatError(f"{label}: a stored chunk's payload must equal its range")
    return ChunkHeader(chunk_kind, stream, payload_length, offset, length, checksum)


def check_payload(header: ChunkHeader, payload: bytes, where: int = -1) -> None:
    label = f"chunk at byte {where}" if where >= 0 else "chunk"
    if len(payload) != header.payload_length:
        raise ImageFormatError(f"{label}: payload cut short ({len(payload)} of "
                               f"{header.payload_length} bytes)")
    if digest(payload) != header.checksum:
        raise ImageFormatError(f"{label} (stream {header.stream}, offset {header.offset}): "
                               "checksum mismatch: the image is damaged")


# -- index and trailer --------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexEntry:
    stream: int
    offset: int
    length: int
    kind: ChunkKind
    position: int                    # of the chunk header in the file
    payload_length: int
    checksum: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Index:
    entries: tuple[IndexEntry, ...]
    summary: dict[str, Any]


def encode_index(entries: list[IndexEntry], summary: dict[str, Any]) -> bytes:
    rows = [[e.stream, e.offset, e.length, int(e.kind), e.position, e.payload_length,
             e.checksum.hex()] for e in entries]
    return json.dumps({"chunks": rows, "summary": summary}, separators=(",", ":")).encode()


def decode_index(data: bytes, chunk_size: int, data_end: int) -> Index:
    """Parse and check an index: every entry well-formed, inside the chunk area, and each
    stream's ranges in increasing, non-overlapping order."""
    try:
        document = json.loads(data.decode("utf-8"))
        rows, summary = document["chunks"], document.get("summary", {})
        entries = tuple(IndexEntry(int(s), int(o), int(n), ChunkKind(int(k)), int(p), int(pl),
                                   bytes.fromhex(c))
                        for s, o, n, k, p, pl, c in rows)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ImageFormatError(f"index: not readable: {exc}") from None
    last_end: dict[int, int] = {}
    for number, entry in enumerate(entries):
        if not 0 < entry.length <= chunk_size or entry.offset < 0:
            raise ImageFormatError(f"index: chunk {number} has a bad range")
        if entry.position < 0 or entry.position + CHUNK_HEADER.size + entry.payload_length > data_end:
            raise ImageFormatError(f"index: chunk {number} lies outside the chunk area")
        if entry.offset < last_end.get(entry.stream, 0):
            raise ImageFormatError(f"index: chunk {number} overlaps or goes back in stream "
                                   f"{entry.stream}")
        if len(entry.checksum) != DIGEST_SIZE:
            raise ImageFormatError(f"index: chunk {number} has a bad checksum field")
        last_end[entry.stream] = entry.end
    if not isinstance(summary, dict):
        raise ImageFormatError("index: summary is not an object")
    return Index(entries, summary)


@dataclass(frozen=True)
class Trailer:
    index_offset: int
    index_length: int
    index_crc: int
    chunk_count: int


def encode_trailer(index_offset: int, index: bytes, chunk_count: int) -> bytes:
    return TRAILER.pack(TRAILER_MAGIC, index_offset, len(index), zlib.crc32(index), chunk_count)


def decode_trailer(data: bytes, file_size: int) -> Trailer:
    if len(data) != TRAILER.size:
        raise ImageFormatError("incomplete image: no trailer")
    magic, offset, length, crc, count = TRAILER.unpack(data)
    if magic != TRAILER_MAGIC:
        raise ImageFormatError("incomplete image: no trailer (an interrupted upload?)")
    if length > MAX_INDEX or offset + length + TRAILER.size != file_size:
        raise ImageFormatError("trailer: the index does not end where the trailer starts")
    return Trailer(offset, length, crc, count)


def check_index_bytes(trailer: Trailer, index: bytes) -> None:
    if zlib.crc32(index) != trailer.index_crc:
        raise ImageFormatError("index: checksum mismatch (damaged index)")


# -- checking an image as it arrives ------------------------------------------------------------

class StreamChecker:
    """Checks an image whose bytes arrive in order (an upload), without keeping them: the
    header, then every chunk (header decoded, payload hashed piece by piece as it comes), then
    the index and trailer, which must list exactly the chunks seen, where they were seen.

    It accepts only what a full check of the finished file accepts (every index entry's chunk
    header and payload checksum), and is stricter in one way: bytes between chunks that no
    index entry names are refused, since our writer never leaves any. The imaging server feeds
    it on the thread that writes the upload, so the check costs no second pass over the file.
    """

    def __init__(self, name: str = "image"):
        self.name = name
        self.position = 0                    # bytes fed so far
        self._pending = bytearray()          # header bytes not parsed yet
        self._header: Header | None = None
        self._chunk: ChunkHeader | None = None
        self._chunk_at = 0
        self._left = 0                       # payload bytes of the current chunk still to come
        self._hasher: Any = None
        self._seen: dict[int, ChunkHeader] = {}
        self._tail_at = -1                   # where the index starts, once chunks are over
        self._tail = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes; ImageFormatError as soon as they cannot be a sound image."""
        try:
            self._feed(data)
        except ImageFormatError as exc:
            text = str(exc)
            raise ImageFormatError(text if text.startswith(self.name) else
                                   f"{self.name}: {text}") from None

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.position += len(view)
        while view:
            if self._tail_at >= 0:
                if len(self._tail) + len(view) > MAX_INDEX + TRAILER.size:
                    raise ImageFormatError(f"{self.name}: index: implausibly long")
                self._tail += view
                return
            if self._left:
                view = self._take_payload(view)
                continue
            view = self._take_header_bytes(view)

    def finish(self) -> Header:
        """The image is complete and sound (ImageFormatError says why not); its header."""
        try:
            return self._finish()
        except ImageFormatError as exc:
            text = str(exc)
            raise ImageFormatError(text if text.startswith(self.name) else
                                   f"{self.name}: {text}") from None

    def _finish(self) -> Header:
        if self._header is None:
            raise ImageFormatError(f"{self.name}: not an image: shorter than its header")
        if self._left or (self._tail_at < 0 and self._pending):
            raise self._error(self._chunk_at, "cut short (an interrupted upload?)")
        tail_at = self._tail_at if self._tail_at >= 0 else self.position
        tail = bytes(self._tail)
        trailer = decode_trailer(tail[-TRAILER.size:] if len(tail) >= TRAILER.size else b"",
                                 self.position)
        if trailer.index_offset != tail_at:
            raise ImageFormatError(f"{self.name}: the index does not start where the chunks "
                                   f"end (byte {tail_at})")
        index_bytes = tail[:-TRAILER.size]
        check_index_bytes(trailer, index_bytes)
        index = decode_index(index_bytes, self._header.chunk_size, tail_at)
        if len(index.entries) != trailer.chunk_count or len(index.entries) != len(self._seen):
            raise ImageFormatError(f"{self.name}: the index lists {len(index.entries)} chunks, "
                                   f"the trailer {trailer.chunk_count}, the file holds "
                                   f"{len(self._seen)}")
        for entry in index.entries:
            seen = self._seen.get(entry.position)
            if seen is None or (seen.stream, seen.offset, seen.length, seen.kind,
                                seen.payload_length, seen.checksum) != (
                    entry.stream, entry.offset, entry.length, entry.kind, entry.payload_length,
                    entry.checksum):
                raise self._error(entry.position, "does not match its index entry")
        return self._header

    def _take_header_bytes(self, view: memoryview) -> memoryview:
        """Gather the image header, or the next chunk header; decide when chunks are over."""
        if self._header is None:
            need = HEADER_FIXED.size if len(self._pending) < HEADER_FIXED.size else \
                header_length(bytes(self._pending[:HEADER_FIXED.size]))
        else:
            need = len(CHUNK_MAGIC) if len(self._pending) < len(CHUNK_MAGIC) else CHUNK_HEADER.size
        take = min(len(view), need - len(self._pending))
        self._pending += view[:take]
        view = view[take:]
        if len(self._pending) < need:
            return view
        at = self.position - len(view) - len(self._pending)
        if self._header is None:
            if need > HEADER_FIXED.size or header_length(bytes(self._pending)) == need:
                self._header = decode_header(bytes(self._pending))
                self._pending.clear()
            return view
        if need == len(CHUNK_MAGIC):
            if bytes(self._pending) != CHUNK_MAGIC:      # the index begins here
                self._tail_at = at
                self._tail += self._pending
                self._pending.clear()
            return view
        self._start_chunk(decode_chunk_header(bytes(self._pending), self._header.chunk_size,
                                              at), at)
        self._pending.clear()
        return view

    def _start_chunk(self, chunk: ChunkHeader, at: int) -> None:
        self._chunk, self._chunk_at = chunk, at
        self._hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._left = chunk.payload_length
        if not self._left:
            self._end_chunk()

    def _take_payload(self, view: memoryview) -> memoryview:
        take = min(len(view), self._left)
        self._hasher.update(view[:take])
        self._left -= take
        if not self._left:
            self._end_chunk()
        return view[take:]

    def _end_chunk(self) -> None:
        assert self._chunk is not None
        if self._hasher.digest() != self._chunk.checksum:
            raise self._error(self._chunk_at, f"(stream {self._chunk.stream}, offset "
                                              f"{self._chunk.offset}): checksum mismatch: the "
                                              "image is damaged")
        self._seen[self._chunk_at] = self._chunk
        self._chunk = None

    def _error(self, at: int, what: str) -> ImageFormatError:
        return ImageFormatError(f"{self.name}: chunk at byte {at} {what}")
