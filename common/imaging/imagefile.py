"""Reading and writing image files (docs/image-format.md) over file objects.

ImageWriter streams: it never seeks, so its output may be a pipe or an HTTP upload. Chunks are
compressed on a small thread pool (zstandard releases the GIL) and written in order. ImageReader
needs a seekable file: it reads the header, then the trailer and index at the end, and hands out
chunks by index entry, decompressing and verifying each one alone, so a restore can start at any
chunk and run chunks in parallel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import zstandard

from .imageformat import (CHUNK_HEADER, DEFAULT_CHUNK_SIZE, TRAILER, ChunkKind, Header, Index,
                          IndexEntry, ImageFormatError, check_index_bytes, check_payload,
                          decode_chunk_header, decode_header, decode_index, decode_trailer, digest,
                          encode_chunk_header, encode_header, encode_index, encode_trailer,
                          header_length, index_length_limit)

DEFAULT_LEVEL = 1          # fast: the disk or the network, not the compressor, should limit


@dataclass(frozen=True)
class WriteStats:
    chunks: int
    bytes_in: int            # uncompressed bytes given to add()
    bytes_out: int           # the image file's size
    zero_chunks: int
    seconds: float


class ImageWriter:
    def __init__(self, out: BinaryIO, metadata: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE,
                 level: int = DEFAULT_LEVEL, threads: int = 2):
        self._out = out
        self.chunk_size = chunk_size
        self._level = level
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads),
                                                           thread_name_prefix="img-compress")
        self._pending: collections.deque = collections.deque()
        self._window = max(2, 2 * threads)
        self._entries: list[IndexEntry] = []
        self._position = 0
        self._bytes_in = 0
        self._zero = 0
        self._started = time.monotonic()
        self._closed = False
        self._write(encode_header(metadata, chunk_size))

    def add(self, stream: int, offset: int, data: bytes) -> None:
        """One chunk: `data` (at most chunk_size bytes) at `offset` of `stream`. Chunks of a
        stream must come in increasing offset order."""
        if not 0 < len(data) <= self.chunk_size:
            raise ValueError(f"a chunk holds 1..{self.chunk_size} bytes, not {len(data)}")
        self._submit(len(data), self._encode, stream, offset, data)

    def add_range(self, stream: int, source: BinaryIO | int, source_offset: int, offset: int,
                  length: int) -> None:
        """Copy `length` bytes from `source` (a file or a descriptor, read with pread) at
        `source_offset` into `stream` at `offset`, as as many chunks as it takes. The worker
        threads read as well as compress, so reading the disk overlaps compressing."""
        fd = source if isinstance(source, int) else source.fileno()
        done = 0
        while done < length:
            size = min(self.chunk_size, length - done)
            self._submit(size, self._read_and_encode, fd, source_offset + done, size, stream,
                         offset + done)
            done += size

    def _submit(self, length: int, fn: Any, *args: Any) -> None:
        self._bytes_in += length
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._window:
            self._write_chunk(*self._pending.popleft().result())

    def close(self, summary: dict[str, Any] | None = None) -> WriteStats:
        """Write the remaining chunks, the index and the trailer. The image is complete (and
        restorable) only once this returns."""
        try:
            while self._pending:
                self._write_chunk(*self._pending.popleft().result())
            seconds = time.monotonic() - self._started
            stats = {"chunks": len(self._entries), "bytes_in": self._bytes_in,
                     "zero_chunks": self._zero, "seconds": round(seconds, 3)}
            stats.update(summary or {})
            index = encode_index(self._entries, stats)
            index_offset = self._position
            self._write(index)
            self._write(encode_trailer(index_offset, index, len(self._entries)))
            return WriteStats(len(self._entries), self._bytes_in, self._position, self._zero,
                              seconds)
        finally:
            self._shutdown()

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _read_and_encode(self, fd: int, source_offset: int, size: int, stream: int,
                         offset: int) -> tuple[int, int, int, ChunkKind, bytes, bytes]:
        data = os.pread(fd, size, source_offset)
        if len(data) != size:
            raise OSError(f"short read at byte {source_offset} of the source")
        return self._encode(stream, offset, data)

    def _encode(self, stream: int, offset: int, data: bytes
                ) -> tuple[int, int, int, ChunkKind, bytes, bytes]:
        """(stream, offset, length, kind, payload, chunk header), on a worker thread: the
        checksum in the header costs as much as compressing, so it is made here too."""
        kind, payload = self._compress(data)
        header = encode_chunk_header(kind, stream, offset, len(data), payload)
        return stream, offset, len(data), kind, payload, header

    def _compress(self, data: bytes) -> tuple[ChunkKind, bytes]:
        if data.count(0) == len(data):
            return ChunkKind.ZERO, b""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:   # zstandard compressors are not thread-safe: one per thread
            compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=True,
                                                  write_content_size=True)
            self._local.compressor = compressor
        payload = compressor.compress(data)
        # Incompressible data stays a zstd frame (raw blocks: 3 bytes per 128 KiB, plus the
        # frame header and checksum) so a restore can verify it with the frame's XXH64 instead
        # of a BLAKE2b; stored raw only if zstd ever made it larger than that.
        if len(payload) > len(data) + len(data) // 4096 + 64:
            return ChunkKind.STORED, data
        return ChunkKind.ZSTD, payload

    def _write_chunk(self, stream: int, offset: int, length: int, kind: ChunkKind,
                     payload: bytes, header: bytes) -> None:
        self._entries.append(IndexEntry(stream, offset, length, kind, self._position,
                                        len(payload), header[32:48]))
        if kind is ChunkKind.ZERO:
            self._zero += 1
        self._write(header)
        if payload:
            self._write(payload)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._out.write(view)
            if written is None:          # raw non-blocking files; ours are blocking
                written = len(view)
            view = view[written:]
        self._position += len(data)


class _FilePread:
    """A seekable file as a positional reader."""

    def __init__(self, source: BinaryIO | int):
        self._fd = source if isinstance(source, int) else source.fileno()
        self.size = os.fstat(self._fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)


class ImageReader:
    """A complete image on a seekable file, or on any "positional reader": an object with
    `pread(length, offset) -> bytes` (safe to call from several threads) and `size` (e.g.
    img.remote.RemoteImage, an image on an imaging server read with HTTP Range requests)."""

    def __init__(self, source: Any, name: str = "image"):
        self._file = source
        self.name = name
        if hasattr(source, "pread") and hasattr(source, "size"):
            self._source = source
        else:
            self._source = _FilePread(source)
        self.size = self._source.size
        self._local = threading.local()
        fixed = self._pread(32, 0)
        self.header: Header = decode_header(self._pread(header_length(fixed), 0))
        if self.size < self.header.length + TRAILER.size:
            raise ImageFormatError(f"{name}: incomplete image: no trailer")
        trailer = decode_trailer(self._pread(TRAILER.size, self.size - TRAILER.size),
                                 self.size)
        if trailer.index_length > index_length_limit(trailer.chunk_count):
            # checked before the index is read: a server cannot make a restore hold more
            raise ImageFormatError(f"{name}: index: longer than {trailer.chunk_count} chunks "
                                   "allow")
        index_bytes = self._pread(trailer.index_length, trailer.index_offset)
        check_index_bytes(trailer, index_bytes)
        self.index: Index = decode_index(index_bytes, self.header.chunk_size,
                                         trailer.index_offset)
        if len(self.index.entries) != trailer.chunk_count:
            raise ImageFormatError(f"{name}: the index lists {len(self.index.entries)} chunks, "
                                   f"the trailer {trailer.chunk_count}")

    def _pread(self, length: int, offset: int) -> bytes:
        return self._source.pread(length, offset)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    def entries(self, stream: int | None = None) -> list[IndexEntry]:
        return [e for e in self.index.entries if stream is None or e.stream == stream]

    def read_payload(self, entry: IndexEntry, check_digest: bool = True) -> memoryview:
        """The stored payload, checked against its chunk header and (unless told otherwise)
        its checksum; no decompression: what the imaging server does to verify or serve a
        chunk."""
        raw = self._pread(CHUNK_HEADER.size + entry.payload_length, entry.position)
        header = decode_chunk_header(raw, self.header.chunk_size, entry.position)
        if (header.stream, header.offset, header.length, header.kind) != (
                entry.stream, entry.offset, entry.length, entry.kind) or \
                header.checksum != entry.checksum:
            raise ImageFormatError(f"{self.name}: chunk at byte {entry.position} does not match "
                                   "its index entry")
        payload = memoryview(raw)[CHUNK_HEADER.size:]     # no copy of a 4 MiB payload
        if check_digest:
            check_payload(header, payload, entry.position)
        elif len(payload) != header.payload_length:
            raise ImageFormatError(f"{self.name}: chunk at byte {entry.position} is cut short")
        return payload

    def read_chunk(self, entry: IndexEntry, frame_checksum_suffices: bool = False) -> bytes:
        """The chunk's uncompressed data, verified: the payload's BLAKE2b, then zstd's content
        checksum. With frame_checksum_suffices (what a restore asks for), a zstd chunk whose
        frame carries a content checksum (XXH64 of the very bytes that go to the disk, checked
        by the decompressor, with the exact length) skips the BLAKE2b, which costs as much as
        decompressing; every other chunk is still checked by its BLAKE2b."""
        if entry.kind is not ChunkKind.ZSTD:
            payload = self.read_payload(entry)
            return bytes(entry.length) if entry.kind is ChunkKind.ZERO else bytes(payload)
        payload = self.read_payload(entry, check_digest=not frame_checksum_suffices)
        if frame_checksum_suffices and not _has_content_checksum(payload) and \
                digest(payload) != entry.checksum:
            raise ImageFormatError(f"{self.name}: chunk at byte {entry.position}: checksum "
                                   "mismatch: the image is damaged")
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.decompressor = decompressor
        try:
            # a frame that declares more than the index's length is damaged: refuse it before
            # the decompressor allocates what it declares (a flipped bit can claim exabytes)
            declared = zstandard.frame_content_size(payload)
            if declared > entry.length:
                raise ImageFormatError(f"{self.name}: chunk at byte {entry.position}: its frame "
                                       f"declares {declared} bytes, the index {entry.length}: "
                                       "the image is damaged")
            data = decompressor.decompress(payload, max_output_size=entry.length)
        except zstandard.ZstdError as exc:
            raise ImageFormatError(f"{self.name}: chunk at byte {entry.position}: "
                                   f"cannot decompress: {exc}") from None
        if len(data) != entry.length:
            raise ImageFormatError(f"{self.name}: chunk at byte {entry.position}: "
                                   f"{len(data)} bytes, expected {entry.length}")
        return data

    def chunks(self, entries: list[IndexEntry], threads: int = 2,
               frame_checksum_suffices: bool = False) -> Iterator[tuple[IndexEntry, bytes]]:
        """(entry, data) in the given order, decompressed `threads` at a time."""
        with concurrent.futures.ThreadPoolExecutor(max(1, threads),
                                                   thread_name_prefix="img-read") as pool:
            window: collections.deque = collections.deque()
            for entry in entries:
                window.append((entry, pool.submit(self.read_chunk, entry,
                                                  frame_checksum_suffices)))
                if len(window) > 2 * threads:
                    first, future = window.popleft()
                    yield first, future.result()
            while window:
                first, future = window.popleft()
                yield first, future.result()

    def verify(self, threads: int = 2) -> list[str]:
        """Every chunk read, checked and decompressed; the problems found (empty: sound)."""
        problems = []
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            futures = {pool.submit(self.read_chunk, e): e for e in self.index.entries}
            for future in concurrent.futures.as_completed(futures):
                try:
                    future.result()
                except ImageFormatError as exc:
                    problems.append(str(exc))
        return sorted(problems)


def _has_content_checksum(payload: bytes) -> bool:
    try:
        return bool(zstandard.get_frame_parameters(payload).has_checksum)
    except zstandard.ZstdError:
        return False          # not even a frame header: the BLAKE2b check will say so


def payload_digest(payload: bytes) -> bytes:
    return digest(payload)
