"""img.remote.RemoteImage: batches, prefetch, resumption, with a stand-in client (the real
server path is tests/integration/test_img_server_modes.py)."""

from __future__ import annotations

import io
import random
import threading

import pytest

from common.imaging.imagefile import ImageReader, ImageWriter
from img.client import ConnectionLost
from img.remote import RemoteImage

CHUNK = 64 * 1024


def image_bytes(chunks: int = 12) -> bytes:
    rng = random.Random(4)
    buffer = io.BytesIO()
    writer = ImageWriter(buffer, {"format": 1, "type": "base"}, chunk_size=CHUNK)
    for n in range(chunks):
        writer.add(0, n * CHUNK, rng.randbytes(CHUNK // 2) + bytes(CHUNK // 2))
    writer.close()
    return buffer.getvalue()


class FakeClient:
    """Serves ranges of `data` like ImagingClient.read_range; can break once at a given
    range, handing over the first half as ConnectionLost.answer does."""

    server = "fake"

    def __init__(self, data: bytes, break_at: int | None = None):
        self.data = data
        self.break_at = break_at
        self.ranges: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()

    def size(self, path: str) -> int:
        return len(self.data)

    def read_range(self, path: str, offset: int, length: int) -> bytearray:
        with self.lock:
            self.ranges.append((offset, length, threading.current_thread().name))
            if self.break_at is not None and offset <= self.break_at < offset + length:
                self.break_at = None
                half = bytes(self.data[offset:offset + length // 2])
                raise ConnectionLost("fake: connection reset", answer=half)
        return bytearray(self.data[offset:offset + length])


def restore_all(remote: RemoteImage, name: str = "img") -> bytes:
    reader = ImageReader(remote, name)
    remote.plan(reader.entries(), batch=3 * CHUNK)
    out = bytearray()
    with remote:
        for entry, data in reader.chunks(reader.entries(), threads=2,
                                         frame_checksum_suffices=True):
            out += data
    return bytes(out)


class InMemory:
    """A positional reader over bytes (what ImageReader takes besides a real file)."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]


def expected(data: bytes) -> bytes:
    reader = ImageReader(InMemory(data))
    return b"".join(chunk for _, chunk in reader.chunks(reader.entries()))


def test_batches_are_fetched_once_each_and_the_next_one_ahead():
    data = image_bytes()
    client = FakeClient(data)
    remote = RemoteImage(client, "a.img")
    assert restore_all(remote) == expected(data)
    batch_reads = [r for r in client.ranges if r[1] > 1024]     # not the header/index reads
    starts = [offset for offset, _, _ in batch_reads]
    assert len(starts) == len(set(starts)), "a batch was fetched twice"
    assert any(name.startswith("img-prefetch") for _, _, name in batch_reads), \
        "no batch came from the prefetch thread"


def test_a_broken_fetch_resumes_where_it_stopped():
    data = image_bytes()
    break_at = len(data) // 2
    client = FakeClient(data, break_at=break_at)
    remote = RemoteImage(client, "a.img", retry_delay=0)
    assert restore_all(remote) == expected(data)
    assert remote.retried == 1
    # the retry asked only for the bytes that had not arrived
    broken = next(r for r in client.ranges if r[0] <= break_at < r[0] + r[1])
    retry = client.ranges[client.ranges.index(broken) + 1:]
    assert any(offset == broken[0] + broken[1] // 2 for offset, _, _ in retry)


def test_a_prefetch_that_fails_is_fetched_again_by_the_reader():
    data = image_bytes()

    class FailingPrefetch(FakeClient):
        def read_range(self, path, offset, length):
            if threading.current_thread().name.startswith("img-prefetch"):
                with self.lock:
                    self.ranges.append((offset, length, "failed"))
                raise RuntimeError("prefetch trouble")
            return super().read_range(path, offset, length)
    client = FailingPrefetch(data)
    assert restore_all(RemoteImage(client, "a.img")) == expected(data)
    assert any(name == "failed" for _, _, name in client.ranges)


def test_closed_remote_prefetches_nothing_more():
    data = image_bytes()
    client = FakeClient(data)
    remote = RemoteImage(client, "a.img")
    reader = ImageReader(remote, "a")
    remote.plan(reader.entries(), batch=3 * CHUNK)
    remote.close()
    first = reader.entries()[0]
    assert len(reader.read_chunk(first)) == CHUNK
    assert not any(name.startswith("img-prefetch") for _, _, name in client.ranges)
