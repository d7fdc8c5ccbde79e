"""The image file format (common/imaging/imageformat.py) and its reader and writer
(common/imaging/imagefile.py)."""

import io
import os
import random
import struct
import threading

import pytest
from hypothesis import example, given, settings, strategies as st

from common.imaging.imagefile import ImageReader, ImageWriter
from common.imaging.imageformat import (CHUNK_HEADER, TRAILER, ChunkKind, ImageFormatError,
                                        decode_chunk_header, decode_header, decode_index,
                                        decode_trailer, encode_header)

CHUNK = 64 * 1024
META = {"format": 1, "type": "base", "streams": [{"number": 0, "role": "partition"}]}


def _streams(seed=1):
    rng = random.Random(seed)
    text = b"".join(b"line %d of a text file\n" % n for n in range(20000))
    return {
        0: text[:CHUNK * 3 + 100],                         # compressible
        1: bytes(CHUNK * 2) + rng.randbytes(CHUNK + 7),    # zeros, then random
    }


def _write(path, streams, **kwargs):
    with open(path, "wb") as out:
        writer = ImageWriter(out, META, chunk_size=CHUNK, **kwargs)
        for number, data in streams.items():
            for offset in range(0, len(data), CHUNK):
                writer.add(number, offset, data[offset:offset + CHUNK])
        return writer.close({"note": "test"})


def _read_all(reader, stream, frame_checksum_suffices=False):
    data = bytearray()
    for entry, chunk in reader.chunks(reader.entries(stream),
                                      frame_checksum_suffices=frame_checksum_suffices):
        assert entry.offset >= len(data)
        data += bytes(entry.offset - len(data)) + chunk   # gaps read as zeros here
    return bytes(data)


class _StoringWriter(ImageWriter):
    """Writes incompressible chunks STORED, as images made before 2026-11-26 did."""

    def _compress(self, data):
        kind, payload = super()._compress(data)
        if kind is ChunkKind.ZSTD and len(payload) >= len(data):
            return ChunkKind.STORED, data
        return kind, payload


@pytest.mark.parametrize("writer", [ImageWriter, _StoringWriter])
def test_round_trip_with_zero_compressed_and_stored_chunks(tmp_path, writer):
    streams = _streams()
    path = tmp_path / "a.img"
    with open(path, "wb") as out:
        image = writer(out, META, chunk_size=CHUNK, threads=3)
        for number, data in streams.items():
            for offset in range(0, len(data), CHUNK):
                image.add(number, offset, data[offset:offset + CHUNK])
        stats = image.close({"note": "test"})
    with open(tmp_path / "a.img", "rb") as f:
        reader = ImageReader(f)
        assert reader.metadata == META and reader.header.chunk_size == CHUNK
        kinds = {e.kind for e in reader.entries()}
        if writer is ImageWriter:    # random data stays a zstd frame (raw blocks + checksum)
            assert kinds == {ChunkKind.ZSTD, ChunkKind.ZERO}
            random_chunk = reader.entries(1)[-1]
            assert random_chunk.payload_length <= random_chunk.length + 64 + CHUNK // 4096
        else:
            assert kinds == {ChunkKind.ZSTD, ChunkKind.ZERO, ChunkKind.STORED}
        for number, data in streams.items():
            assert _read_all(reader, number) == data
            assert _read_all(reader, number, frame_checksum_suffices=True) == data
        assert reader.verify() == []
        assert reader.index.summary["note"] == "test"
        assert reader.index.summary["zero_chunks"] == stats.zero_chunks == 2
    assert stats.bytes_out == os.path.getsize(tmp_path / "a.img")
    assert stats.bytes_in == sum(len(d) for d in streams.values())


def test_the_writer_never_seeks_so_it_can_stream_into_a_pipe(tmp_path):
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain():
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read(65536):
                received.extend(chunk)
    thread = threading.Thread(target=drain)
    thread.start()
    with os.fdopen(write_end, "wb") as pipe:
        writer = ImageWriter(pipe, META, chunk_size=CHUNK)
        writer.add(0, 0, b"x" * 1000)
        writer.close()
    thread.join()
    (tmp_path / "piped.img").write_bytes(received)
    with open(tmp_path / "piped.img", "rb") as f:
        assert _read_all(ImageReader(f), 0) == b"x" * 1000


def test_a_damaged_chunk_is_found_and_named(tmp_path):
    _write(tmp_path / "a.img", _streams())
    with open(tmp_path / "a.img", "rb") as f:
        entry = next(e for e in ImageReader(f).entries() if e.kind is ChunkKind.ZSTD)
    with open(tmp_path / "a.img", "r+b") as f:
        f.seek(entry.position + CHUNK_HEADER.size + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with open(tmp_path / "a.img", "rb") as f:
        reader = ImageReader(f)
        problems = reader.verify()
        assert len(problems) == 1 and f"byte {entry.position}" in problems[0]
        assert "checksum mismatch" in problems[0]
        with pytest.raises(ImageFormatError, match="checksum mismatch"):
            reader.read_chunk(entry)
        # a restore, which lets zstd's own content checksum stand in for the BLAKE2b, finds it
        with pytest.raises(ImageFormatError, match="decompress|checksum"):
            reader.read_chunk(entry, frame_checksum_suffices=True)


def test_a_frame_without_content_checksum_is_still_checked_by_blake2b(tmp_path):
    """A zstd payload whose frame does not carry a checksum (the flag is ours to trust only
    when set) falls back to the BLAKE2b, which catches a damaged payload."""
    import zstandard
    from common.imaging.imageformat import encode_chunk_header
    from common.imaging.imagefile import _has_content_checksum
    bare = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(b"q" * 5000)
    assert not _has_content_checksum(bare)
    assert _has_content_checksum(zstandard.ZstdCompressor(write_checksum=True).compress(b"q"))

    class BareWriter(ImageWriter):
        def _encode(self, stream, offset, data):
            payload = bare
            header = encode_chunk_header(ChunkKind.ZSTD, stream, offset, len(data), payload)
            return stream, offset, len(data), ChunkKind.ZSTD, payload, header
    with open(tmp_path / "b.img", "wb") as out:
        writer = BareWriter(out, META, chunk_size=CHUNK)
        writer.add(0, 0, b"q" * 5000)
        writer.close()
    with open(tmp_path / "b.img", "rb") as f:
        entry = ImageReader(f).entries()[0]
    data = bytearray((tmp_path / "b.img").read_bytes())
    data[entry.position + CHUNK_HEADER.size + len(bare) - 2] ^= 0x01   # inside the last block
    (tmp_path / "b.img").write_bytes(data)
    with open(tmp_path / "b.img", "rb") as f:
        with pytest.raises(ImageFormatError, match="checksum mismatch|decompress"):
            ImageReader(f).read_chunk(entry, frame_checksum_suffices=True)


def test_an_interrupted_image_is_refused(tmp_path):
    _write(tmp_path / "a.img", _streams())
    data = (tmp_path / "a.img").read_bytes()
    for cut in (10, 40, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.img").write_bytes(data[:cut])
        with open(tmp_path / "cut.img", "rb") as f, pytest.raises(ImageFormatError):
            ImageReader(f)


def test_an_unknown_major_version_is_refused_and_a_higher_minor_accepted():
    data = bytearray(encode_header(META))
    struct.pack_into("<H", data, 10, 7)
    assert decode_header(bytes(data)).version == (1, 7)
    struct.pack_into("<H", data, 8, 2)
    with pytest.raises(ImageFormatError, match="version 2"):
        decode_header(bytes(data))


def test_a_damaged_index_is_refused(tmp_path):
    _write(tmp_path / "a.img", _streams())
    data = bytearray((tmp_path / "a.img").read_bytes())
    data[-TRAILER.size - 5] ^= 0x01
    (tmp_path / "b.img").write_bytes(data)
    with open(tmp_path / "b.img", "rb") as f, pytest.raises(ImageFormatError, match="index"):
        ImageReader(f)


def test_chunks_must_fit_the_chunk_size(tmp_path):
    with open(tmp_path / "x.img", "wb") as out:
        writer = ImageWriter(out, META, chunk_size=CHUNK)
        with pytest.raises(ValueError):
            writer.add(0, 0, b"x" * (CHUNK + 1))
        with pytest.raises(ValueError):
            writer.add(0, 0, b"")
        writer.abort()


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoders_raise_only_format_errors(data):
    for decode in (lambda d: decode_header(d), lambda d: decode_chunk_header(d, CHUNK),
                   lambda d: decode_trailer(d, 1000), lambda d: decode_index(d, CHUNK, 10 ** 6)):
        try:
            decode(data)
        except ImageFormatError:
            pass


@settings(max_examples=200)
@given(st.integers(0, 1000), st.integers(0, 255))
@example(154, 144)     # the frame's header descriptor: a content size of 7 EB, once a MemoryError
@example(154, 16)      # the same byte: still decodes to the checksummed bytes
def test_any_single_byte_flip_in_a_small_image_is_detected_or_harmless(position, flip):
    buffer = io.BytesIO()
    writer = ImageWriter(buffer, META, chunk_size=4096)
    writer.add(0, 0, b"abc" * 1000)
    writer.add(0, 4096, bytes(4096))
    writer.close()
    data = bytearray(buffer.getvalue())
    position %= len(data)
    data[position] ^= flip or 1
    path = f"/tmp/pbimg-flip-{os.getpid()}.img"
    with open(path, "wb") as f:
        f.write(data)
    try:
        with open(path, "rb") as f:
            try:
                reader = ImageReader(f)
            except ImageFormatError:
                return
            problems = reader.verify()
            if not problems:   # the flip hit a byte nobody reads (reserved or JSON spacing)
                assert _read_all(reader, 0) == b"abc" * 1000 + bytes(1096 + 4096)
                assert _read_all(reader, 0, True) == b"abc" * 1000 + bytes(1096 + 4096)
            else:              # what verify finds, a restore's lighter check finds too,
                # unless the flip left the frame decoding to the very bytes its content
                # checksum covers (a header bit zstd reads either way): those are right
                try:
                    data = _read_all(reader, 0, frame_checksum_suffices=True)
                except ImageFormatError:
                    pass
                else:
                    assert data == b"abc" * 1000 + bytes(1096 + 4096)
    finally:
        os.unlink(path)


# -- StreamChecker: the upload-time check ------------------------------------------------------

def _small_image() -> bytes:
    buffer = io.BytesIO()
    writer = ImageWriter(buffer, META, chunk_size=4096)
    writer.add(0, 0, b"abc" * 1000)
    writer.add(0, 4096, bytes(4096))
    writer.add(1, 0, random.Random(5).randbytes(4096))
    writer.close()
    return buffer.getvalue()


def _stream_check(data: bytes, step: int) -> str | None:
    from common.imaging.imageformat import StreamChecker
    checker = StreamChecker("up.img")
    try:
        for start in range(0, len(data), step):
            checker.feed(data[start:start + step])
        checker.finish()
    except ImageFormatError as exc:
        return str(exc)
    return None


def _full_check(data: bytes, tmp_path) -> str | None:
    path = tmp_path / "full.img"
    path.write_bytes(data)
    try:
        with open(path, "rb") as f:
            reader = ImageReader(f, "up.img")
            for entry in reader.index.entries:
                reader.read_payload(entry)
    except ImageFormatError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("step", [1, 3, 32, 47, 48, 49, 4096, 1 << 20])
def test_stream_checker_accepts_a_sound_image_however_it_is_cut(step):
    assert _stream_check(_small_image(), step) is None


@pytest.mark.parametrize("cut", [0, 10, 31, 32, 100, 4000, -33, -32, -1])
def test_stream_checker_refuses_an_image_cut_short(cut):
    data = _small_image()
    problem = _stream_check(data[:cut] if cut else b"", 1000)
    assert problem and "up.img" in problem


def test_stream_checker_refuses_bytes_between_chunks():
    data = _small_image()
    # bytes slipped in after the header: where a chunk should start
    from common.imaging.imageformat import header_length
    at = header_length(data[:32])
    assert _stream_check(data[:at] + b"junk" + data[at:], 100)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 16), st.integers(1, 255), st.sampled_from([1, 5, 48, 512, 9999]))
def test_stream_checker_refuses_whatever_the_full_check_refuses(tmp_path_factory, position,
                                                                  flip, step):
    """One flipped byte anywhere: if the full check (what the server did before: every index
    entry's header and payload checksum, on the finished file) refuses it, the stream check
    refuses it too; and the stream check never accepts what the full check refuses."""
    data = bytearray(_small_image())
    position %= len(data)
    data[position] ^= flip
    tmp = tmp_path_factory.mktemp("flip")
    full, streamed = _full_check(bytes(data), tmp), _stream_check(bytes(data), step)
    if full is not None:
        assert streamed is not None, (position, full)
