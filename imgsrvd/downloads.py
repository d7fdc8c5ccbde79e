"""Which ranged downloads add up to a whole image, for the Images Sent statistic.

A restore over Range requests reads the header, the trailer and index, then the chunks in
batches, possibly over several connections after a drop. Counting any range that reaches the
end of the file would count the trailer read as a finished image. Instead the bytes served to
each (client address, image) are kept as merged intervals; the image counts as sent once, when
they cover the whole file. The table is bounded and entries expire, so clients that stop half
way cannot grow it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_TRACKED = 1024
EXPIRE_S = 3600.0


@dataclass
class _Coverage:
    size: int
    intervals: list[tuple[int, int]] = field(default_factory=list)   # merged, sorted
    touched: float = 0.0

    def add(self, start: int, end: int) -> bool:
        """Add [start, end); True when the file is now covered from 0 to size."""
        merged: list[tuple[int, int]] = []
        for low, high in sorted(self.intervals + [(start, end)]):
            if merged and low <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        self.intervals = merged
        return merged == [(0, self.size)] or (len(merged) == 1 and merged[0][0] <= 0
                                                and merged[0][1] >= self.size)


class DownloadTracker:
    def __init__(self, max_tracked: int = MAX_TRACKED, expire_s: float = EXPIRE_S,
                 clock=time.monotonic):
        self._table: OrderedDict[tuple[str, str], _Coverage] = OrderedDict()
        self._max = max_tracked
        self._expire_s = expire_s
        self._clock = clock

    def served(self, client: str, path: str, size: int, start: int, end: int) -> bool:
        """Record that [start, end) of `path` (size bytes) went to `client`. True exactly once
        per completed image: when this range completes the client's coverage of the file."""
        now = self._clock()
        self._expire(now)
        key = (client, path)
        coverage = self._table.get(key)
        if coverage is None or coverage.size != size:
            coverage = _Coverage(size)
        coverage.touched = now
        self._table[key] = coverage
        self._table.move_to_end(key)
        while len(self._table) > self._max:
            self._table.popitem(last=False)
        if coverage.add(max(0, start), min(size, end)):
            del self._table[key]          # a later full read counts again, as a new image
            return True
        return False

    def _expire(self, now: float) -> None:
        while self._table:
            key, coverage = next(iter(self._table.items()))
            if now - coverage.touched < self._expire_s:
                break
            del self._table[key]

    def __len__(self) -> int:
        return len(self._table)
