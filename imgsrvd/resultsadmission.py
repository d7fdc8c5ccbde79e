"""What may enter the results log: a per-host rate limit on reports and a bounded write queue.

Why: one client posted 20,000 results (804 MB of log) in 17 s, and the log's single writer thread
queued every entry without limit (the daemon grew from 48 to 212 MiB). Now:

* ``HostRateLimit``: a token bucket per requesting address (``ResultsPerMinute``): a host may
  send that many reports at once and then one every 60/N seconds. The table of hosts is bounded
  (least recently seen forgotten first), so many addresses cannot grow it either.
* ``LogQueue``: every entry, the server's own and the engines' reports, waits for the writer
  thread in a queue of at most ``ResultsQueue`` entries. A full queue refuses at once (the
  caller answers 503 with Retry-After, or counts a dropped entry) instead of growing. The future
  it hands back completes when ``ResultsLog.append`` has returned, that is when the entry is
  durable (fdatasync), so a report is acknowledged only after its write.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

MAX_HOSTS = 4096          # hosts remembered by the rate limit


class HostRateLimit:
    """A token bucket per host: `per_minute` reports at once, then one every 60/per_minute s.
    per_minute 0: no limit."""

    def __init__(self, per_minute: int, max_hosts: int = MAX_HOSTS,
                 clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._max_hosts = max_hosts
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def wait_s(self, host: str) -> float:
        """0 when `host` may send a report now (one is taken), else seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        rate_per_s = self.per_minute / 60.0
        tokens, then = self._buckets.pop(host, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - then) * rate_per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[host] = (tokens, now)
        while len(self._buckets) > self._max_hosts:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)


class LogQueue:
    """At most `max_pending` entries submitted and not yet written."""

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, pool: Any, write: Callable[..., None], *args: Any
               ) -> concurrent.futures.Future | None:
        """`write(*args)` on the pool's thread; None (nothing queued) when the queue is full."""
        with self._lock:
            if self._pending >= self.max_pending:
                return None
            self._pending += 1
        try:
            future = pool.submit(write, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1
