"""The upload check (StreamChecker) holds a small, fixed amount of memory whatever a client
sends, and still accepts exactly what the full check of a finished file (ImageReader)
accepts. Issue 13: a valid header then 100 MiB of empty chunks took 769 MiB; bytes that are not
a chunk were buffered as the "index", up to 256 MiB per upload."""

import io
import json
import random
import tracemalloc

import pytest

from common.imaging.imagefile import ImageReader, ImageWriter
from common.imaging.imageformat import (CHUNK_HEADER, MAX_SUMMARY, TRAILER, ChunkKind,
                                        ImageFormatError, StreamChecker, encode_chunk_header,
                                        encode_header, encode_trailer, index_length_limit)

META = {"format": 1, "type": "base", "streams": [{"number": 0, "role": "partition"}]}
CHUNK = 4096
HELD_BOUND = 2 << 20          # bytes the checker may hold, measured by tracemalloc


def _peak_while(feed) -> tuple[int, str | None]:
    """(peak bytes allocated, the refusal) while `feed(checker)` runs."""
    checker = StreamChecker("up.img")
    tracemalloc.start()
    try:
        feed(checker)
        checker.finish()
        problem = None
    except ImageFormatError as exc:
        problem = str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, problem


def test_a_flood_of_empty_chunks_is_not_remembered_one_by_one():
    # 120,000 chunks of 48 bytes (made before measuring); the old checker kept each one
    blocks = [_empty_chunks_from(n * 20000, 20000) for n in range(6)]

    def feed(checker):
        checker.feed(encode_header(META, CHUNK))
        for block in blocks:
            checker.feed(block)
    peak, problem = _peak_while(feed)
    assert problem is not None and "trailer" in problem
    assert peak < HELD_BOUND, peak


def _empty_chunks_from(first: int, count: int) -> bytes:
    return b"".join(encode_chunk_header(ChunkKind.ZERO, 0, (first + n) * CHUNK, CHUNK, b"")
                    for n in range(count))


@pytest.mark.parametrize("junk", [b"x" * (1 << 20), b'{"chunks":[' + b" " * (1 << 20),
                                  b'{"chunks":[],"summary":{"a":"' + b"y" * (1 << 20)])
def test_bytes_after_the_header_that_are_no_chunk_are_not_buffered(junk):
    def feed(checker):
        checker.feed(encode_header(META, CHUNK))
        for _ in range(16):                 # 16 MiB; the old checker held up to 256 MiB
            checker.feed(junk)
    peak, problem = _peak_while(feed)
    assert problem is not None and "index" in problem
    assert peak < HELD_BOUND + 2 * len(junk), peak


def test_the_index_may_be_no_longer_than_the_chunks_seen_allow():
    image = io.BytesIO()
    writer = ImageWriter(image, META, chunk_size=CHUNK)
    writer.add(0, 0, b"abc" * 1000)
    writer.close({"pad": "z" * (MAX_SUMMARY - 100)})          # the longest summary allowed
    data = image.getvalue()
    checker = StreamChecker("up.img")
    checker.feed(data)
    checker.finish()                                          # accepted: within the limit
    assert index_length_limit(1) < 2 * MAX_SUMMARY


class _Bytes:
    """Bytes as the positional reader ImageReader takes."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]


def _image_with_index(rows_order) -> bytes:
    """Three chunks; the index lists them in `rows_order` (a permutation)."""
    out = io.BytesIO()
    writer = ImageWriter(out, META, chunk_size=CHUNK)
    rng = random.Random(3)
    for n in range(3):
        writer.add(n, 0, rng.randbytes(CHUNK))
    writer.close()
    data = out.getvalue()
    reader = ImageReader(_Bytes(data))
    entries = [reader.index.entries[i] for i in rows_order]
    rows = [[e.stream, e.offset, e.length, int(e.kind), e.position, e.payload_length,
             e.checksum.hex()] for e in entries]
    index = json.dumps({"chunks": rows, "summary": {}}, separators=(",", ":")).encode()
    at = reader.index.entries[-1].position + CHUNK_HEADER.size + \
        reader.index.entries[-1].payload_length
    return data[:at] + index + encode_trailer(at, index, 3)


def _both(data: bytes) -> tuple[str | None, str | None]:
    try:
        reader = ImageReader(_Bytes(data), "up.img")
        for entry in reader.index.entries:
            reader.read_payload(entry)
        full = None
    except ImageFormatError as exc:
        full = str(exc)
    checker = StreamChecker("up.img")
    try:
        for start in range(0, len(data), 1000):
            checker.feed(data[start:start + 1000])
        checker.finish()
        streamed = None
    except ImageFormatError as exc:
        streamed = str(exc)
    return full, streamed


def test_the_index_in_file_order_is_accepted_by_both_checks():
    assert _both(_image_with_index([0, 1, 2])) == (None, None)


def test_an_index_out_of_file_order_is_refused_by_both_checks():
    full, streamed = _both(_image_with_index([1, 0, 2]))
    assert full and "file order" in full
    assert streamed and "file order" in streamed


def test_a_row_longer_than_any_real_row_is_refused():
    out = io.BytesIO()
    header = encode_header(META, CHUNK)
    chunk = encode_chunk_header(ChunkKind.ZERO, 0, 0, CHUNK, b"")
    index = ('{"chunks":[[0,0,%d,2,%d,0,"%s"%s]],"summary":{}}' % (
        CHUNK, len(header), chunk[32:48].hex(), " " * 200)).encode()
    out.write(header + chunk + index + encode_trailer(len(header) + 48, index, 1))
    full, streamed = _both(out.getvalue())
    assert full and streamed and "row" in streamed
