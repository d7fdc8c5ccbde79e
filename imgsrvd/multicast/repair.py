"""A multicast session's repair queue (docs/multicast-protocol.md, "Data and repair"): the
byte ranges the receivers NAKed, merged, waiting to be sent again from the image file to the
whole group, ahead of new data. Pure bookkeeping; the engine sends what next_run() gives.

- What was NAKed but not sent yet in the first pass is not queued: the pass will bring it.
- A range repaired less than one GRTT ago is not queued again: that NAK crossed the repair
  (NORM, RFC 5740, and PGM, RFC 3208, suppress repeats the same way).
- Repairs go in the pass's send order (header, index and trailer, then the chunks), so a
  receiver missing the index gets it before chunk data it could not place.
- Bounded: at most max_ranges queued ranges (NAK ranges beyond are dropped and counted, the
  receivers NAK them again a probe interval later) and max_recent remembered repairs.
"""

from __future__ import annotations

import collections
from typing import Iterable

from common.imaging.mcranges import PassOrder, RangeSet

MAX_RANGES = 8192
MAX_RECENT = 4096


class RepairQueue:
    def __init__(self, order: PassOrder, max_ranges: int = MAX_RANGES,
                 max_recent: int = MAX_RECENT):
        self._order = order
        self._pending = RangeSet()
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque(
            maxlen=max_recent)
        self._max_ranges = max_ranges
        self.dropped_ranges = 0          # NAK ranges not queued: the queue was full
        self.suppressed_bytes = 0        # NAKed bytes repaired less than a GRTT before

    @property
    def pending_bytes(self) -> int:
        return self._pending.bytes

    def __bool__(self) -> bool:
        return bool(self._pending)

    def nak(self, ranges: Iterable[tuple[int, int]], pass_position: int, now_s: float,
            guard_s: float) -> int:
        """Queue the NAKed [offset, end) ranges, less what the pass has not reached and what
        was repaired within guard_s (one GRTT); returns the bytes newly queued."""
        wanted = RangeSet()
        sent = self._order.sent(pass_position)
        for start, end in ranges:
            for lo, hi in sent:
                wanted.add(max(start, lo), min(end, hi))
        if not wanted:
            return 0
        while self._recent and self._recent[0][0] < now_s - guard_s:
            self._recent.popleft()
        for _at, start, end in self._recent:
            self.suppressed_bytes += wanted.remove(start, end)
        added = 0
        for start, end in wanted:
            if len(self._pending) >= self._max_ranges and \
                    not self._pending.count(start - 1, end + 1):
                self.dropped_ranges += 1          # would need a new range: full
                continue
            added += self._pending.add(start, end)
        return added

    def next_run(self, max_bytes: int) -> tuple[int, int] | None:
        """The next range to repair, at most max_bytes: (offset, length), taken off the queue;
        None when nothing waits."""
        if not self._pending:
            return None
        for region in self._order.regions:
            found = self._pending.span(region.offset, region.end)
            if found:
                start, end = found[0]
                end = min(end, start + max_bytes)
                self._pending.remove(start, end)
                return start, end - start
        start, end = next(iter(self._pending))      # outside the image: cannot happen
        self._pending.remove(start, end)
        return None

    def repaired(self, offset: int, length: int, now_s: float) -> None:
        """The range went out at now_s (for the GRTT guard)."""
        self._recent.append((now_s, offset, offset + length))

    def clear(self) -> None:
        self._pending.clear()
        self._recent.clear()
