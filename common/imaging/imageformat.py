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
VERSION_MINOR = 1               # the highest minor written: 1 adds "filesets" (below)
FILESETS_MINOR = 1
HEADER_FIXED = struct.Struct("<8sHHIII8x")          # 32 bytes
CHUNK_HEADER = struct.Struct("<4sB3xIIQQ16s")        # 48 bytes
CHUNK_MAGIC = b"PBCK"
TRAILER = struct.Struct("<8sQIII4x")                 # 32 bytes
TRAILER_MAGIC = b"PBIMGEND"
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_CHUNK_SIZE = 64 << 20
MAX_METADATA = 1 << 20           # held while an upload's header arrives; ours are KiB
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
    # 1.1 only when the image declares file sets, so every other image stays 1.0 as before;
    # a 1.0 reader takes 1.1 (a higher minor only adds) and restores the whole image.
    minor = FILESETS_MINOR if "filesets" in metadata else 0
    fixed = HEADER_FIXED.pack(MAGIC, VERSION_MAJOR, minor, len(body),
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
    """Parse and check an index: every entry well-formed, inside the chunk area, listed in file
    order, and each stream's ranges in increasing, non-overlapping order. The same parser
    (IndexParser) checks an upload's index as it arrives, so both accept the same indexes."""
    parser = IndexParser(chunk_size, data_end)
    entries = list(parser.feed(data))
    return Index(tuple(entries), parser.finish())


# The index's layout, as ImageWriter writes it (json.dumps with compact separators). Parsing
# this layout row by row is what lets an upload's index be checked in bounded memory.
INDEX_OPEN = b'{"chunks":['
INDEX_SUMMARY = b',"summary":'
ROW_MAX = 128                    # bytes of one row: 7 numbers and 32 hex digits fit in ~110
MAX_SUMMARY = 256 << 10          # our summaries are a few hundred bytes
MAX_STREAMS = 4096               # a stream per partition (GPT has 128) plus the disk head
_ROW_RECORD = struct.Struct("<QIQQBI16s")       # what the index and the chunk headers share


def index_length_limit(chunk_count: int) -> int:
    """The longest index that can list `chunk_count` chunks: checked before an index is read
    or held, so a client or a server cannot make the other side hold more than its chunks
    warrant."""
    return (len(INDEX_OPEN) + chunk_count * (ROW_MAX + 1) + len(INDEX_SUMMARY) + MAX_SUMMARY
            + 2)


def chunk_record(position: int, chunk: "ChunkHeader | IndexEntry") -> bytes:
    """A chunk as the index describes it, packed: hashed in file order on both sides."""
    try:
        return _ROW_RECORD.pack(position, chunk.stream, chunk.offset, chunk.length,
                                int(chunk.kind), chunk.payload_length, chunk.checksum)
    except struct.error:
        raise ImageFormatError(f"index: the chunk at byte {position} has a field out of "
                               "range") from None


class IndexParser:
    """The index, parsed as its bytes arrive, in bounded memory: one row (at most ROW_MAX
    bytes) at a time, then the summary (at most MAX_SUMMARY bytes). feed() yields the entries
    its bytes complete; finish() checks the end and returns the summary."""

    def __init__(self, chunk_size: int, data_end: int):
        self._chunk_size = chunk_size
        self._data_end = data_end
        self._state = "open"
        self._buf = bytearray()
        self.count = 0
        self._last_end: dict[int, int] = {}
        self._file_end = 0                       # where the previous chunk ends in the file

    def feed(self, data: bytes | bytearray | memoryview):
        self._buf += data
        while True:
            entry = self._step()
            if entry is None:
                break
            if entry is not _NOTHING:
                yield entry

    def finish(self) -> dict[str, Any]:
        if self._state == "summary":
            text = bytes(self._buf)
            if not text.endswith(b"}"):
                raise ImageFormatError("index: cut short")
            try:
                summary = json.loads(text[:-1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ImageFormatError(f"index: summary not readable: {exc}") from None
            if not isinstance(summary, dict):
                raise ImageFormatError("index: summary is not an object")
            return summary
        if self._state != "done" or self._buf:
            raise ImageFormatError("index: cut short or not readable")
        return {}

    def _step(self) -> Any:
        """Consume one piece of the buffer: an entry, _NOTHING (progress), None (need more)."""
        buf, state = self._buf, self._state
        if state == "open":
            return self._expect(INDEX_OPEN, "first_row")
        if state in ("first_row", "row"):
            if state == "first_row" and buf[:1] == b"]":
                del buf[:1]
                self._state = "after_rows"
                return _NOTHING
            return self._row()
        if state == "after_row":
            if not buf:
                return None
            separator = buf[0]
            del buf[:1]
            if separator == ord(","):
                self._state = "row"
            elif separator == ord("]"):
                self._state = "after_rows"
            else:
                raise ImageFormatError("index: not readable (after a row)")
            return _NOTHING
        if state == "after_rows":
            if buf[:1] == b"}":
                del buf[:1]
                self._state = "done"
                return _NOTHING
            return self._expect(INDEX_SUMMARY, "summary")
        if state == "summary":
            if len(buf) > MAX_SUMMARY + 1:
                raise ImageFormatError(f"index: summary longer than {MAX_SUMMARY} bytes")
            return None
        if buf:                                   # done: nothing may follow
            raise ImageFormatError("index: bytes after its end")
        return None

    def _expect(self, literal: bytes, then: str) -> Any:
        have = bytes(self._buf[:len(literal)])
        if not literal.startswith(have):
            raise ImageFormatError("index: not readable (not an index)")
        if len(have) < len(literal):
            return None
        del self._buf[:len(literal)]
        self._state = then
        return _NOTHING

    def _row(self) -> Any:
        end = self._buf.find(b"]", 0, ROW_MAX)
        if end < 0:
            if len(self._buf) >= ROW_MAX or self._buf[:1] not in (b"", b"["):
                raise ImageFormatError(f"index: chunk {self.count} is not a row of at most "
                                       f"{ROW_MAX} bytes")
            return None
        text = bytes(self._buf[:end + 1])
        del self._buf[:end + 1]
        self._state = "after_row"
        entry = self._entry(text)
        self.count += 1
        return entry

    def _entry(self, text: bytes) -> IndexEntry:
        number = self.count
        try:
            s, o, n, k, p, pl, c = json.loads(text.decode("utf-8"))
            entry = IndexEntry(int(s), int(o), int(n), ChunkKind(int(k)), int(p), int(pl),
                               bytes.fromhex(c))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ImageFormatError(f"index: chunk {number} not readable: {exc}") from None
        if not 0 < entry.length <= self._chunk_size or entry.offset < 0:
            raise ImageFormatError(f"index: chunk {number} has a bad range")
        end = entry.position + CHUNK_HEADER.size + entry.payload_length
        if entry.position < self._file_end or entry.payload_length < 0 or end > self._data_end:
            raise ImageFormatError(f"index: chunk {number} lies outside the chunk area or out "
                                   "of file order")
        if entry.offset < self._last_end.get(entry.stream, 0):
            raise ImageFormatError(f"index: chunk {number} overlaps or goes back in stream "
                                   f"{entry.stream}")
        if len(entry.checksum) != DIGEST_SIZE:
            raise ImageFormatError(f"index: chunk {number} has a bad checksum field")
        if entry.stream not in self._last_end and len(self._last_end) >= MAX_STREAMS:
            raise ImageFormatError(f"index: more than {MAX_STREAMS} streams")
        self._last_end[entry.stream] = entry.end
        self._file_end = end
        return entry


_NOTHING = object()


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

    Memory is bounded whatever the client sends: the chunks seen are kept only as a count and
    a running BLAKE2b of their headers in file order; the index is parsed row by row as it
    arrives (IndexParser, the parser every reader uses) and its rows hashed the same way, so
    the two digests agree exactly when the index lists the chunks seen, in file order (as
    ImageWriter writes it, and as decode_index requires of every index). The index may be no
    longer than the chunks seen warrant (index_length_limit), checked as its bytes arrive;
    the last TRAILER.size bytes are held back, since they may be the trailer. Held at most:
    the header (MAX_METADATA), one row, the summary (MAX_SUMMARY), the trailer.

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
        self._seen_count = 0
        self._seen_digest = hashlib.blake2b(digest_size=32)   # chunk_record()s in file order
        self._tail_at = -1                   # where the index starts, once chunks are over
        self._tail_length = 0
        self._held = b""                     # the last TRAILER.size bytes: maybe the trailer
        self._index: IndexParser | None = None
        self._index_crc = 0
        self._index_digest = hashlib.blake2b(digest_size=32)

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
                self._take_tail(view)
                return
            if self._left:
                view = self._take_payload(view)
                continue
            view = self._take_header_bytes(view)

    def _begin_tail(self, at: int, first: bytes) -> None:
        assert self._header is not None
        self._tail_at = at
        self._index = IndexParser(self._header.chunk_size, at)
        self._take_tail(memoryview(first))

    def _take_tail(self, view: memoryview) -> None:
        """Index bytes: length checked before anything is held, then parsed and hashed; the
        last TRAILER.size bytes wait, since the trailer is not part of the index."""
        assert self._index is not None
        self._tail_length += len(view)
        limit = index_length_limit(self._seen_count)
        if self._tail_length > limit + TRAILER.size:
            raise ImageFormatError(f"index: longer than {self._seen_count} chunks allow "
                                   f"({limit} bytes)")
        data = self._held + bytes(view)
        ready, self._held = data[:-TRAILER.size], data[-TRAILER.size:]
        if len(data) <= TRAILER.size:
            ready, self._held = b"", data
        if ready:
            self._index_crc = zlib.crc32(ready, self._index_crc)
            for entry in self._index.feed(ready):
                self._index_digest.update(chunk_record(entry.position, entry))

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
        trailer = decode_trailer(self._held if len(self._held) == TRAILER.size else b"",
                                 self.position)
        if trailer.index_offset != tail_at or self._index is None:
            raise ImageFormatError(f"{self.name}: the index does not start where the chunks "
                                   f"end (byte {tail_at})")
        if self._index_crc != trailer.index_crc:
            raise ImageFormatError("index: checksum mismatch (damaged index)")
        self._index.finish()
        listed = self._index.count
        if listed != trailer.chunk_count or listed != self._seen_count:
            raise ImageFormatError(f"{self.name}: the index lists {listed} chunks, "
                                   f"the trailer {trailer.chunk_count}, the file holds "
                                   f"{self._seen_count}")
        if self._index_digest.digest() != self._seen_digest.digest():
            raise ImageFormatError(f"{self.name}: the index does not list the chunks the file "
                                   "holds, where they are (a chunk does not match its index "
                                   "entry)")
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
                first = bytes(self._pending)
                self._pending.clear()
                self._begin_tail(at, first)
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
        self._seen_count += 1
        self._seen_digest.update(chunk_record(self._chunk_at, self._chunk))
        self._chunk = None

    def _error(self, at: int, what: str) -> ImageFormatError:
        return ImageFormatError(f"{self.name}: chunk at byte {at} {what}")
