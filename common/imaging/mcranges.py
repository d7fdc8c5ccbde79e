"""Byte ranges of an image file as the multicast protocol moves them (docs/multicast-protocol.md):
pure bookkeeping the sender (imgsrvd: what was NAKed, what is queued for repair) and the
receivers (img: what arrived, what to NAK) both need. No sockets, no clock.

    RangeSet    a set of bytes as sorted, disjoint, non-adjacent [start, end) intervals: add
                (returns the bytes that were new), remove, holes within bounds, first missing
    PassOrder   the first pass's send order (header, index and trailer, then the chunk area,
                common.imaging.multicast.first_pass_ranges): a file offset's pass position and
                the file ranges a pass position has covered
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Iterator

from .multicast import ByteRange, first_pass_ranges


class RangeSet:
    """Bytes as sorted, disjoint, non-adjacent [start, end) intervals (two parallel lists, so a
    lookup is a bisect). Adding in order, the common case of a stream arriving, extends the
    last interval without moving anything.

    Callers bound it: the intervals are at most the holes plus one, and a holder of untrusted
    ranges (the sender's repair queue) checks len() before it adds."""

    __slots__ = ("_starts", "_ends", "_bytes")

    def __init__(self, ranges: "list[tuple[int, int]] | tuple[tuple[int, int], ...]" = ()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._bytes = 0
        for start, end in ranges:
            self.add(start, end)

    def __len__(self) -> int:
        """The number of intervals (not bytes: see .bytes)."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(zip(self._starts, self._ends)))

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    @property
    def bytes(self) -> int:
        """How many bytes the set holds."""
        return self._bytes

    def add(self, start: int, end: int) -> int:
        """Add [start, end); returns how many of its bytes were not in the set before."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        if not ends or start > ends[-1]:               # beyond everything: a new interval
            starts.append(start)
            ends.append(end)
            self._bytes += end - start
            return end - start
        i = bisect.bisect_left(ends, start)            # the first interval ending at/after start
        if starts[i] <= start and end <= ends[i]:
            return 0                                   # nothing new
        if ends[i] == start and (i + 1 == len(ends) or end < starts[i + 1]):
            ends[i] = end                              # a stream continuing: extend in place
            self._bytes += end - start
            return end - start
        if end < starts[i]:                            # between two intervals, touching none
            starts.insert(i, start)
            ends.insert(i, end)
            self._bytes += end - start
            return end - start
        j = bisect.bisect_right(starts, end)           # past the last interval it touches
        covered = 0
        for k in range(i, j):
            overlap = min(ends[k], end) - max(starts[k], start)
            if overlap > 0:
                covered += overlap
        new_start, new_end = min(start, starts[i]), max(end, ends[j - 1])
        old = 0
        for k in range(i, j):
            old += ends[k] - starts[k]
        starts[i:j] = [new_start]
        ends[i:j] = [new_end]
        self._bytes += (new_end - new_start) - old
        return (end - start) - covered

    def remove(self, start: int, end: int) -> int:
        """Take [start, end) out; returns how many bytes were removed."""
        if end <= start or not self._starts:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)           # first interval ending after start
        j = bisect.bisect_left(starts, end)            # first interval starting at/after end
        if i >= j:
            return 0
        removed = 0
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        for k in range(i, j):
            s, e = starts[k], ends[k]
            removed += min(e, end) - max(s, start)
            if s < start:
                keep_starts.append(s)
                keep_ends.append(start)
            if e > end:
                keep_starts.append(end)
                keep_ends.append(e)
        starts[i:j] = keep_starts
        ends[i:j] = keep_ends
        self._bytes -= removed
        return removed

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._bytes = 0

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of [start, end) is in the set."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def count(self, start: int, end: int) -> int:
        """How many bytes of [start, end) are in the set."""
        if end <= start or not self._starts:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        total = 0
        while i < len(starts) and starts[i] < end:
            total += min(ends[i], end) - max(starts[i], start)
            i += 1
        return total

    def holes(self, start: int, end: int, limit: int | None = None) -> list[tuple[int, int]]:
        """The ranges of [start, end) not in the set, in order; at most `limit` of them."""
        found: list[tuple[int, int]] = []
        if end <= start:
            return found
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        position = start
        while position < end and (limit is None or len(found) < limit):
            if i >= len(starts) or starts[i] >= end:
                found.append((position, end))
                break
            if starts[i] > position:
                found.append((position, starts[i]))
            position = max(position, ends[i])
            i += 1
        return found

    def first_missing(self, start: int = 0) -> int:
        """The first offset at or after start that is not in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return self._ends[i]
        return start

    def span(self, start: int, end: int) -> list[tuple[int, int]]:
        """The set's intervals clipped to [start, end)."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        out = []
        while i < len(starts) and starts[i] < end:
            out.append((max(starts[i], start), min(ends[i], end)))
            i += 1
        return out


@dataclass(frozen=True)
class PassOrder:
    """The first pass's send order for one image: [0, H) the header, [I, size) the index and
    trailer, [H, I) the chunk area (first_pass_ranges). A pass position counts bytes of the pass
    sent so far; PROBE carries it, and a receiver takes the file ranges behind it as sent."""

    image_bytes: int
    header_bytes: int
    index_offset: int

    @functools.cached_property
    def regions(self) -> tuple[ByteRange, ByteRange, ByteRange]:
        return first_pass_ranges(self.image_bytes, self.header_bytes, self.index_offset)

    @functools.cached_property
    def _bases(self) -> tuple[tuple[int, int, int], ...]:
        """(file start, file end, pass position of the start) per region."""
        out, base = [], 0
        for region in self.regions:
            out.append((region.offset, region.end, base))
            base += region.length
        return tuple(out)

    def position_of(self, offset: int) -> int:
        """The pass position of the byte at `offset` of the file (where the pass sends it)."""
        for start, end, base in self._bases:
            if start <= offset < end:
                return base + offset - start
        return self.image_bytes

    def position_after(self, offset: int, length: int) -> int:
        """The pass position just after a piece of first-pass data [offset, offset+length),
        which never crosses a region boundary (the sender cuts its packets so)."""
        return self.position_of(offset) + length

    def sent(self, position: int) -> list[tuple[int, int]]:
        """The file ranges the pass has sent once it reached `position`, in send order."""
        out = []
        left = max(0, position)
        for region in self.regions:
            if left <= 0:
                break
            take = min(left, region.length)
            if take:
                out.append((region.offset, region.offset + take))
            left -= take
        return out

    def ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The file ranges of pass positions [start, end), in send order."""
        out = []
        base = 0
        for region in self.regions:
            lo, hi = max(start, base), min(end, base + region.length)
            if lo < hi:
                out.append((region.offset + lo - base, region.offset + hi - base))
            base += region.length
        return out
