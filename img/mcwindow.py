"""A multicast receiver's reassembly window (docs/multicast-protocol.md, "What travels: the
image file" and "Data and repair"): where the DATA of one session lands, in a fixed amount of
memory, and which holes to NAK when. No sockets, no clock, no threads: img/mcreceive.py holds
its lock around every call and passes the time in.

What it keeps:
- the image's header [0, H) and its index and trailer [I, size), whole (checked against the
  image digest before anything else happens; a few KiB to a few MiB);
- chunk-area data that came before the index (a lost index packet being repaired), in a
  staging area of a quarter of the budget, placed into chunks once the index is in (so the
  whole budget and a quarter at most, for a moment);
- chunk buffers, one per chunk of the index, at most `budget_bytes` of them at a time: a chunk
  being filled, complete (waiting for the restore to read it), or already read (kept for a
  re-read until the room is needed). Data for a chunk that does not fit is dropped: it is
  NAKed later, when there is room (repair comes from the image file, so nothing is lost by
  dropping a packet);
- `received`, the file's bytes held, read, or not part of any chunk (a RangeSet);
- the horizon: the pass position the sender has reached (from first-pass DATA, PROBE, FINISH).

Room, in order: chunks already read go first (oldest first); a chunk the restore waits for
("demanded") may also push out chunks it will read later (the highest rank of the restore's
plan), so the restore always progresses; data nobody waits for never pushes anything out.

NakPlanner decides when holes are NAKed: a hole first seen waits a hold-off uniform in [0,
GRTT]; a range NAKed is not NAKed again for one probe interval; at most MAX_NAK_RANGES ranges a
packet, MAX_NAKS_PER_ROUND packets a round, in send order (the doc's "Data and repair").
"""

from __future__ import annotations

import bisect
import collections
import random
from typing import Callable, Sequence

from common.imaging.imageformat import CHUNK_HEADER, IndexEntry
from common.imaging.mcranges import PassOrder, RangeSet
from common.imaging.multicast import MAX_NAK_RANGES

DEFAULT_BUDGET_BYTES = 64 << 20
MAX_NAK_RANGE_BYTES = 16 << 20       # a NAK range at most (the wire allows 4 GiB)
MAX_NAKS_PER_ROUND = 8               # NAK packets per round (64 ranges each)
MAX_NAKED_KEPT = 4096                # NAKed ranges remembered for the re-NAK interval
MAX_META_BYTES = 64 << 20            # header + index + trailer held whole at most

ABSENT, FILLING, COMPLETE, VERIFIED, CONSUMED = range(5)


class WindowError(Exception):
    """The image cannot be received in this window (its index is larger than allowed)."""


class Slot:
    """One chunk of the index: its file range [start, end) (header and payload), its buffer
    while it has one, and where the restore's plan reads it (rank: lower is sooner)."""

    __slots__ = ("index", "entry", "start", "end", "buffer", "got", "state", "rank", "read_at")

    def __init__(self, index: int, entry: IndexEntry, rank: int):
        self.index = index
        self.entry = entry
        self.start = entry.position
        self.end = entry.position + CHUNK_HEADER.size + entry.payload_length
        self.buffer: bytearray | bytes | None = None
        self.got = 0
        self.state = ABSENT
        self.rank = rank
        self.read_at = 0

    @property
    def size(self) -> int:
        return self.end - self.start


class Window:
    def __init__(self, order: PassOrder, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        if order.header_bytes + order.image_bytes - order.index_offset > MAX_META_BYTES:
            raise WindowError(f"the image's header, index and trailer take more than "
                              f"{MAX_META_BYTES >> 20} MiB")
        self.order = order
        self.size = order.image_bytes
        self.budget_bytes = budget_bytes
        self.received = RangeSet()
        self.horizon = 0
        self._head = bytearray(order.header_bytes)
        self._tail = bytearray(order.image_bytes - order.index_offset)
        self.slots: list[Slot] = []
        self._starts: list[int] = []
        self.demand: collections.Counter[int] = collections.Counter()
        self.used_bytes = 0
        self.indexed = False
        self._buffered: dict[int, Slot] = {}       # the slots holding a buffer (bounded)
        self._last: Slot | None = None             # where the last chunk data went
        # chunk-area data that came before the index (its packet was lost and is being
        # repaired): kept here, up to the budget, and placed into chunks once the index is in
        self._staging: bytearray | None = None
        self._staged = RangeSet()
        self._reads = 0
        self.dropped_bytes = 0              # arrived, but no room (or no index yet)
        self.duplicate_bytes = 0
        self.evicted_chunks = 0

    # -- the metadata ------------------------------------------------------------------------

    @property
    def meta_complete(self) -> bool:
        o = self.order
        return self.received.covers(0, o.header_bytes) and \
            self.received.covers(o.index_offset, o.image_bytes)

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def tail(self) -> bytes:
        return bytes(self._tail)

    def set_index(self, entries: Sequence[IndexEntry], ranks: dict[int, int] | None = None
                  ) -> None:
        """The checked index: a slot per chunk; bytes of the chunk area no chunk covers are
        taken as received (nobody needs them). The budget grows to four of the largest chunk
        if it was smaller, so the restore's readers always find room."""
        ordered = sorted(entries, key=lambda e: e.position)
        self.slots = [Slot(n, e, n if ranks is None else ranks.get(e.position, n))
                      for n, e in enumerate(ordered)]
        self._starts = [s.start for s in self.slots]
        position = self.order.header_bytes
        for slot in self.slots:
            self.received.add(position, slot.start)
            self._staged.remove(position, slot.start)
            position = max(position, slot.end)
        self.received.add(position, self.order.index_offset)
        self._staged.remove(position, self.order.index_offset)
        largest = max((s.size for s in self.slots), default=0)
        self.budget_bytes = max(self.budget_bytes, 4 * largest)
        self.indexed = True
        self._unstage()

    def set_ranks(self, positions_in_order: Sequence[int]) -> None:
        """The restore's reading order (chunk positions): sooner ranks lower."""
        rank = {position: n for n, position in enumerate(positions_in_order)}
        for slot in self.slots:
            slot.rank = rank.get(slot.start, len(rank) + slot.index)

    def slot_at(self, position: int) -> Slot | None:
        """The chunk whose header starts at `position` (an index entry's position)."""
        i = bisect.bisect_left(self._starts, position)
        if i < len(self._starts) and self._starts[i] == position:
            return self.slots[i]
        return None

    def slots_over(self, start: int, end: int) -> list[Slot]:
        """The chunks overlapping [start, end), in file order."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        out = []
        while i < len(self.slots) and self.slots[i].start < end:
            if self.slots[i].end > start:
                out.append(self.slots[i])
            i += 1
        return out

    # -- data arriving -----------------------------------------------------------------------

    def advance(self, position: int) -> None:
        """The sender's pass has reached `position` (never moves back)."""
        if position > self.horizon:
            self.horizon = min(position, self.size)

    def put(self, offset: int, payload: bytes | memoryview) -> list[Slot]:
        """DATA: file[offset, offset + len(payload)). Returns the chunks it completed."""
        end = offset + len(payload)
        slot = self._last
        if slot is not None and slot.start <= offset and end <= slot.end and \
                slot.state == FILLING:
            # the common case, a packet inside the chunk the last one went to
            buffer = slot.buffer
            assert isinstance(buffer, bytearray)
            new = self.received.add(offset, end)
            buffer[offset - slot.start:end - slot.start] = payload
            if new != end - offset:
                self.duplicate_bytes += (end - offset) - new
            slot.got += new
            if slot.got >= slot.size:
                slot.state = COMPLETE
                return [slot]
            return []
        if offset < 0 or end > self.size or end <= offset:
            self.dropped_bytes += len(payload)
            return []
        o = self.order
        completed: list[Slot] = []
        if offset < o.header_bytes:
            self._put_meta(self._head, 0, offset, payload, o.header_bytes)
        if end > o.index_offset:
            self._put_meta(self._tail, o.index_offset, offset, payload, o.image_bytes)
        lo, hi = max(offset, o.header_bytes), min(end, o.index_offset)
        if lo >= hi:
            return completed
        if not self.indexed:
            self._stage(lo, hi, memoryview(payload)[lo - offset:hi - offset])
            return completed
        view = memoryview(payload)
        for slot in self.slots_over(lo, hi):
            a, b = max(lo, slot.start), min(hi, slot.end)
            if slot.state >= COMPLETE:
                self.duplicate_bytes += b - a
                continue
            if slot.buffer is None and not self._allocate(slot, demanded=False):
                self.dropped_bytes += b - a
                continue
            new = self.received.add(a, b)
            if new != b - a:
                self.duplicate_bytes += (b - a) - new
            buffer = slot.buffer
            assert isinstance(buffer, bytearray)
            buffer[a - slot.start:b - slot.start] = view[a - offset:b - offset]
            self._last = slot
            slot.got += new
            if slot.got >= slot.size:
                slot.state = COMPLETE
                completed.append(slot)
        return completed

    def put_run(self, offset: int, pieces: Sequence[bytes | memoryview]) -> list[Slot]:
        """DATA back to back: pieces[0] at offset, each next one where the last ended (a
        sender's UDP_SEGMENT run, as one GRO buffer brings it). The same as put() for each,
        but a run of new bytes inside the chunk the last data went to (nearly every run: a
        4 MiB chunk takes ~70 of them) marks its bytes received once and only copies each
        piece. (A run with bytes already here goes piece by piece: put() stops writing to a
        chunk the moment it is complete, and so does this.)"""
        end = offset
        for piece in pieces:
            end += len(piece)
        slot = self._last
        if slot is None or slot.state != FILLING or not slot.start <= offset or \
                end > slot.end or self.received.count(offset, end):
            completed: list[Slot] = []
            for piece in pieces:
                completed += self.put(offset, piece)
                offset += len(piece)
            return completed
        buffer = slot.buffer
        assert isinstance(buffer, bytearray)
        self.received.add(offset, end)
        at = offset - slot.start
        for piece in pieces:
            size = len(piece)
            buffer[at:at + size] = piece
            at += size
        slot.got += end - offset
        if slot.got >= slot.size:
            slot.state = COMPLETE
            return [slot]
        return []

    def _stage(self, lo: int, hi: int, data: memoryview) -> None:
        base = self.order.header_bytes
        if self._staging is None:
            self._staging = bytearray(min(self.budget_bytes // 4,
                                          self.order.index_offset - base))
        b = min(hi, base + len(self._staging))
        if lo >= b:
            self.dropped_bytes += hi - lo              # beyond the room: NAKed later
            return
        self._staging[lo - base:b - base] = data[:b - lo]
        self._staged.add(lo, b)
        new = self.received.add(lo, b)
        self.duplicate_bytes += (b - lo) - new
        self.dropped_bytes += hi - b

    def _unstage(self) -> None:
        """The index came: staged data into its chunks (as far as they get room)."""
        staging, self._staging = self._staging, None
        if staging is None:
            return
        base = self.order.header_bytes
        for lo, hi in self._staged:
            for slot in self.slots_over(lo, hi):
                a, b = max(lo, slot.start), min(hi, slot.end)
                if slot.buffer is None and not self._allocate(slot, demanded=False):
                    self.received.remove(a, b)
                    self.dropped_bytes += b - a
                    continue
                buffer = slot.buffer
                assert isinstance(buffer, bytearray)
                buffer[a - slot.start:b - slot.start] = staging[a - base:b - base]
                slot.got += b - a
                if slot.got >= slot.size:
                    slot.state = COMPLETE
        self._staged.clear()

    def _put_meta(self, into: bytearray, base: int, offset: int,
                  payload: bytes | memoryview, limit: int) -> None:
        a, b = max(offset, base), min(offset + len(payload), limit)
        if a < b:
            into[a - base:b - base] = memoryview(payload)[a - offset:b - offset]
            new = self.received.add(a, b)
            self.duplicate_bytes += (b - a) - new

    def _allocate(self, slot: Slot, demanded: bool) -> bool:
        """A buffer for slot, making room as the module's docstring says; False: no room."""
        need = slot.size
        if self.used_bytes + need > self.budget_bytes:
            for victim in sorted((s for s in self._buffered.values() if s.state == CONSUMED),
                                 key=lambda s: s.read_at):
                self._drop_buffer(victim, keep_received=True)
                if self.used_bytes + need <= self.budget_bytes:
                    break
        if self.used_bytes + need > self.budget_bytes and demanded:
            for victim in sorted((s for s in self._buffered.values()
                                  if s.state in (FILLING, COMPLETE, VERIFIED) and
                                  s is not slot and not self.demand[s.index] and
                                  s.rank > slot.rank), key=lambda s: -s.rank):
                self._drop_buffer(victim, keep_received=False)
                self.evicted_chunks += 1
                if self.used_bytes + need <= self.budget_bytes:
                    break
        if self.used_bytes + need > self.budget_bytes:
            return False
        slot.buffer = bytearray(need)
        slot.got = 0
        slot.state = FILLING
        self.used_bytes += need
        self._buffered[slot.index] = slot
        return True

    def _drop_buffer(self, slot: Slot, keep_received: bool) -> None:
        if slot.buffer is None:
            return
        self.used_bytes -= slot.size
        slot.buffer = None
        self._buffered.pop(slot.index, None)
        if not keep_received:
            self.received.remove(slot.start, slot.end)
            slot.state = ABSENT
            slot.got = 0
        # a CONSUMED slot keeps its state: its bytes were read, nobody needs them again
        # unless the restore reads it a second time (then want() fetches it anew)

    # -- the restore reading ---------------------------------------------------------------

    def want(self, slot: Slot) -> bool:
        """The restore waits for slot: make sure it has a buffer (pushing out what it must) so
        arriving data is kept. False when there is no room even so."""
        if slot.state == CONSUMED and slot.buffer is None:
            slot.state = ABSENT                     # read before, dropped since: fetch anew
            self.received.remove(slot.start, slot.end)
        if slot.buffer is not None:
            return True
        return self._allocate(slot, demanded=True)

    def reject(self, slot: Slot) -> None:
        """The chunk failed its check (header or BLAKE2b): drop it, its bytes are NAKed again."""
        self._drop_buffer(slot, keep_received=False)

    def verified(self, slot: Slot, data: bytes) -> None:
        if slot.buffer is not None:
            slot.buffer = data
            slot.state = VERIFIED

    def consumed(self, slot: Slot) -> None:
        self._reads += 1
        slot.read_at = self._reads
        if slot.state == VERIFIED:
            slot.state = CONSUMED

    # -- what is missing ------------------------------------------------------------------

    def first_missing(self) -> int:
        return self.received.first_missing(0)

    @property
    def complete(self) -> bool:
        return self.received.bytes >= self.size

    def holes(self, limit: int) -> list[tuple[int, int]]:
        """The holes worth a NAK now, at most `limit`: behind the horizon, in the header and
        tail, in demanded chunks and chunks with a buffer, and in the next chunks (in file
        order) as far as the free room goes. The work is bounded by the chunks held, not by
        the image."""
        found: list[tuple[int, int]] = []
        sent = self.order.sent(self.horizon)
        o = self.order

        def add(start: int, end: int) -> None:
            for lo, hi in sent:
                a, b = max(lo, start), min(hi, end)
                if a < b:
                    found.extend(self.received.holes(a, b, limit))

        add(0, o.header_bytes)
        add(o.index_offset, o.image_bytes)
        if self.indexed:
            for index in [i for i, n in self.demand.items() if n]:
                slot = self.slots[index]
                if slot.state < COMPLETE:
                    add(slot.start, slot.end)
            for slot in list(self._buffered.values()):
                if slot.state == FILLING and not self.demand[slot.index]:
                    add(slot.start, slot.end)
            free = self.budget_bytes - self.used_bytes
            area_end = min(o.index_offset, max((b for a, b in sent if a >= o.header_bytes and
                                                b <= o.index_offset), default=0))
            position = self.received.first_missing(o.header_bytes)
            while position < area_end and len(found) < limit:
                slots = self.slots_over(position, position + 1)
                if not slots:
                    break
                slot = slots[0]
                if slot.buffer is None and slot.state == ABSENT and \
                        not self.demand[slot.index]:
                    if slot.size > free:
                        break                        # no room for more: later
                    free -= slot.size
                    add(slot.start, slot.end)
                position = self.received.first_missing(max(slot.end, position + 1))
        return _split(_merge(found, self.order.position_of), MAX_NAK_RANGE_BYTES)[:limit]


def _merge(ranges: list[tuple[int, int]], position: Callable[[int], int]
           ) -> list[tuple[int, int]]:
    """The ranges in send order (by pass position: the header, the index and trailer, then the
    chunks), overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(set(ranges), key=lambda r: (position(r[0]), r[1])):
        if out and out[-1][0] <= a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def _split(ranges: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        while b - a > most:
            out.append((a, a + most))
            a += most
        out.append((a, b))
    return out


class NakPlanner:
    """When the holes are NAKed (module docstring). plan() is called whenever the receiver
    looks; it returns the ranges to NAK now, in the order given (send order), at most
    MAX_NAKS_PER_ROUND packets' worth."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()
        self._naked: collections.deque[tuple[float, int, int]] = collections.deque(
            maxlen=MAX_NAKED_KEPT)
        self._naked_set = RangeSet()
        self.due_s: float | None = None
        self.naks_sent = 0
        self.ranges_sent = 0

    def plan(self, holes: list[tuple[int, int]], now_s: float, grtt_s: float,
             probe_s: float) -> list[tuple[int, int]]:
        expired = False
        while self._naked and self._naked[0][0] <= now_s - probe_s:
            self._naked.popleft()
            expired = True
        if expired:
            self._naked_set = RangeSet([(a, b) for _at, a, b in self._naked])
        fresh: list[tuple[int, int]] = []
        for a, b in holes:
            fresh.extend(self._naked_set.holes(a, b))
        if not fresh:
            self.due_s = None
            return []
        if self.due_s is None:
            self.due_s = now_s + self._rng.uniform(0.0, max(0.0, grtt_s))
        if now_s < self.due_s:
            return []
        self.due_s = None
        ranges = fresh[:MAX_NAK_RANGES * MAX_NAKS_PER_ROUND]
        for a, b in ranges:
            self._naked.append((now_s, a, b))
            self._naked_set.add(a, b)
        self.ranges_sent += len(ranges)
        self.naks_sent += -(-len(ranges) // MAX_NAK_RANGES)
        return ranges

    def next_due_s(self) -> float | None:
        return self.due_s
