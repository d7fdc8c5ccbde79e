"""An image on an imaging server as a positional reader for common.imaging.imagefile.ImageReader:
`pread(length, offset)` becomes an HTTP Range request.

Restores read the image's chunks in a known order: plan() groups neighbouring chunks into
batches of up to BATCH bytes, and the first read inside a batch fetches the whole batch in one
request, so a restore costs one request per ~16 MiB, not one per chunk. A connection that
breaks is retried (RETRIES times, on a new connection) from the byte where it stopped: the
restore resumes at the chunk that failed instead of starting over. While the readers work on
one batch, a prefetch thread fetches the next (close() stops it).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import threading
import time
from typing import Callable, Iterable

from common.imaging.imageformat import CHUNK_HEADER, IndexEntry

from .client import ConnectionLost, ImagingClient, ServerError

BATCH = 16 << 20
RETRIES = 3
KEEP = 4                 # batches kept in memory (two readers, one prefetched, some slack)


class RemoteImage:
    def __init__(self, client: ImagingClient, path: str, retries: int = RETRIES,
                 retry_delay: float = 0.5, log: Callable[[str], None] | None = None):
        self.client = client
        self.path = path
        self.retries = retries
        self.retry_delay = retry_delay
        self.log = log
        self.requests = 0
        self.retried = 0
        self.size = self._with_retries(lambda: client.size(path), f"HEAD {path}")
        self._starts: list[int] = []        # sorted batch starts
        self._ends: dict[int, int] = {}
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._fetching: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def __str__(self) -> str:
        return f"//{self.client.server}/{self.path}"

    def plan(self, entries: Iterable[IndexEntry], batch: int = BATCH) -> int:
        """Group the chunks (in the order they will be read) into batches of neighbouring
        chunks; returns the number of batches."""
        spans = sorted((e.position, e.position + CHUNK_HEADER.size + e.payload_length, e.stream)
                       for e in entries)
        starts, ends = [], {}
        last_stream = None
        for start, end, stream in spans:
            same = stream == last_stream
            last_stream = stream
            if same and starts and start == ends[starts[-1]] and end - starts[-1] <= batch:
                ends[starts[-1]] = end
            else:
                starts.append(start)
                ends[start] = end
        with self._lock:
            self._starts, self._ends = starts, ends
            self._cache.clear()
        return len(starts)

    def _batch_of(self, offset: int, length: int) -> int | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        start = self._starts[i]
        return start if offset + length <= self._ends[start] else None

    def pread(self, length: int, offset: int) -> memoryview | bytes:
        if length <= 0:
            return b""
        length = max(0, min(length, self.size - offset))
        start = self._batch_of(offset, length)
        if start is None:
            return self._fetch(offset, length)
        data = self._batch(start)
        self._prefetch_after(start)
        return memoryview(data)[offset - start: offset - start + length]

    def close(self) -> None:
        """Stop prefetching (a fetch under way ends when the client's connections close)."""
        with self._lock:
            self._closed = True
            prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "RemoteImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _batch(self, start: int) -> bytes | bytearray:
        """The whole batch that begins at `start`: cached, being fetched (wait for it), or
        fetched now by this thread."""
        while True:
            with self._lock:
                data = self._cache.get(start)
                if data is not None:
                    self._cache.move_to_end(start)
                    return data
                event = self._fetching.get(start)
                mine = event is None
                if mine:
                    event = self._fetching[start] = threading.Event()
            if mine:
                return self._fill(start, event)
            event.wait()          # then from the cache, or (the fetch failed) by ourselves

    def _fill(self, start: int, event: threading.Event) -> bytes | bytearray:
        try:
            data = self._fetch(start, self._ends[start] - start)
            with self._lock:
                self._cache[start] = data
                while len(self._cache) > KEEP:
                    self._cache.popitem(last=False)
            return data
        finally:
            with self._lock:
                self._fetching.pop(start, None)
            event.set()

    def _prefetch_after(self, start: int) -> None:
        """Fetch the next batch (in file order) on the prefetch thread while the readers
        decompress this one, so the network and the CPU work at the same time."""
        i = bisect.bisect_left(self._starts, start) + 1
        if i >= len(self._starts):
            return
        following = self._starts[i]
        with self._lock:
            if self._closed or following in self._cache or following in self._fetching:
                return
            event = self._fetching[following] = threading.Event()
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="img-prefetch")
            prefetcher = self._prefetcher
        try:
            prefetcher.submit(self._prefetch, following, event)
        except RuntimeError:             # closed meanwhile
            with self._lock:
                self._fetching.pop(following, None)
            event.set()

    def _prefetch(self, start: int, event: threading.Event) -> None:
        try:
            self._fill(start, event)
        except Exception:  # noqa: BLE001 - a reader that needs the batch fetches it itself
            pass

    def _fetch(self, offset: int, length: int) -> bytes | bytearray:
        """Bytes [offset, offset+length), continuing after a broken connection."""
        got = b""
        failures = 0
        while True:
            try:
                self.requests += 1
                data = self.client.read_range(self.path, offset + len(got), length - len(got))
                return data if not got else got + data     # joined only after a retry
            except ConnectionLost as exc:
                partial = exc.answer if isinstance(exc.answer, bytes) else b""
                got += partial
                failures += 1
                self.retried += 1
                if failures > self.retries:
                    raise ServerError(f"{exc} (gave up after {self.retries} retries)") from None
                if self.log:
                    self.log(f"img: {exc}; retrying from byte {offset + len(got)} "
                             f"({failures}/{self.retries})")
                if len(got) >= length:
                    return got[:length]
                time.sleep(self.retry_delay * failures)

    def _with_retries(self, call, what: str):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except ConnectionLost:
                if attempt == self.retries:
                    raise
                time.sleep(self.retry_delay * (attempt + 1))
        raise AssertionError("unreachable")
