"""img/mcwindow.py: the multicast receiver's reassembly window (chunks placed by the index,
a fixed memory budget, staging before the index, eviction for a demanded chunk), the holes it
NAKs and when (hold-off, re-NAK after a probe interval, 64 ranges a packet), as tables."""

from __future__ import annotations

import random

import pytest

from common.imaging.imageformat import CHUNK_HEADER, ChunkKind, IndexEntry
from common.imaging.mcranges import PassOrder
from common.imaging.multicast import MAX_NAK_RANGES
from img.mcwindow import (ABSENT, COMPLETE, CONSUMED, FILLING, MAX_NAKS_PER_ROUND, NakPlanner,
                          Window, WindowError)

H = 100                     # the header
CHUNK = 1000 - CHUNK_HEADER.size        # payloads such that every chunk takes 1000 bytes
COUNT = 8
I = H + COUNT * 1000        # the index
SIZE = I + 200              # index and trailer: 200 bytes


def entries() -> list[IndexEntry]:
    return [IndexEntry(1, n * 4096, 4096, ChunkKind.ZSTD, H + n * 1000, CHUNK, bytes(16))
            for n in range(COUNT)]


def window(budget: int = 10_000, indexed: bool = True) -> Window:
    w = Window(PassOrder(SIZE, H, I), budget)
    if indexed:
        w.set_index(entries())
    return w


def test_chunks_complete_as_their_bytes_arrive_across_packets():
    w = window()
    assert w.put(H, bytes(600)) == []
    assert w.slots[0].state == FILLING and w.used_bytes == 1000
    done = w.put(H + 600, bytes(900))          # the rest of chunk 0 and half of chunk 1
    assert [s.index for s in done] == [0]
    assert w.slots[0].state == COMPLETE and w.slots[1].got == 500
    assert w.put(H + 600, bytes(400)) == [] and w.duplicate_bytes == 400


def test_header_and_tail_are_kept_whole_and_checked_complete():
    w = window(indexed=False)
    w.put(0, b"h" * H)
    assert not w.meta_complete
    w.put(I, b"t" * 200)
    assert w.meta_complete and w.head == b"h" * H and w.tail == b"t" * 200


def test_data_beyond_the_budget_is_dropped_and_not_taken_as_received():
    w = window(budget=4_000)                    # four chunks' room (also the floor: 4 x 1000)
    w.put(H, bytes(6_000))
    assert [s.state for s in w.slots[:6]] == [COMPLETE] * 4 + [ABSENT] * 2
    assert w.dropped_bytes == 2_000
    assert not w.received.covers(H + 4_000, H + 6_000)


def test_read_chunks_make_room_first():
    w = window(budget=4_000)
    w.put(H, bytes(4_000))
    for slot in w.slots[:2]:
        w.verified(slot, bytes(1000))
        w.consumed(slot)
    w.put(H + 4_000, bytes(2_000))              # room comes from the two chunks read
    assert [s.state for s in w.slots[:6]] == [CONSUMED] * 2 + [COMPLETE] * 4
    assert w.slots[0].buffer is None and w.received.covers(H, H + 1_000)


def test_a_demanded_chunk_pushes_out_what_is_read_later():
    w = window(budget=4_000)
    w.set_ranks([e.position for e in reversed(entries())])     # read from the last chunk
    w.put(H, bytes(4_000))                                     # chunks 0-3, read last
    slot = w.slots[7]
    w.demand[slot.index] += 1
    assert w.want(slot)
    assert w.slots[0].state == ABSENT and w.evicted_chunks == 1   # rank 7: read latest
    assert not w.received.covers(H, H + 1_000)                    # so it is NAKed again


def test_data_before_the_index_is_staged_then_placed():
    w = window(indexed=False)
    w.put(H + 500, bytes(1_000))               # the index packet was lost: staged
    assert w.received.covers(H + 500, H + 1_500)
    w.set_index(entries())
    assert w.slots[0].got == 500 and w.slots[1].got == 500
    w.put(H, bytes(500))
    assert w.slots[0].state == COMPLETE


def test_metadata_larger_than_allowed_is_refused():
    with pytest.raises(WindowError):
        Window(PassOrder(200 << 20, 100, 100), 1 << 20)


def test_a_rejected_chunk_is_asked_for_again():
    w = window()
    w.put(H, bytes(1_000))
    w.reject(w.slots[0])
    assert w.slots[0].state == ABSENT and not w.received.covers(H, H + 1_000)


@pytest.mark.parametrize("puts, horizon, holes", [
    # nothing behind the horizon: nothing to NAK
    ([], 0, []),
    # send order: the header, then the tail, then the chunks
    ([(0, 50), (I, 100)], H + 200 + 2_000, [(50, 100), (I + 100, SIZE), (H, H + 2_000)]),
    # only what the pass has reached
    ([(0, H), (I, 200), (H, 500)], H + 200 + 1_200, [(H + 500, H + 1_200)]),
])
def test_holes_in_send_order_behind_the_horizon(puts, horizon, holes):
    w = window(indexed=False)
    for offset, length in puts:
        w.put(offset, bytes(length))
    w.set_index(entries())
    w.advance(horizon)
    assert w.holes(100) == holes


def test_holes_only_as_far_as_the_room_goes():
    w = window(budget=4_000)
    w.put(0, bytes(H))
    w.put(I, bytes(200))
    w.put(H, bytes(500))                      # chunk 0 filling
    w.advance(SIZE)                           # the pass is over
    # chunk 0's rest, then three more chunks fit the room; the demanded chunk 7 always
    w.demand[7] += 1
    assert w.holes(100) == [(H + 500, H + 4_000), (H + 7_000, H + 8_000)]


def test_the_planner_holds_off_then_naks_then_waits_a_probe_interval():
    planner = NakPlanner(random.Random(1))
    holes = [(0, 10), (20, 30)]
    assert planner.plan(holes, 10.0, 0.004, 0.25) == []                # hold-off
    due = planner.next_due_s()
    assert 10.0 <= due <= 10.004
    assert planner.plan(holes, due, 0.004, 0.25) == holes               # NAKed
    assert planner.plan(holes, due + 0.1, 0.004, 0.25) == []           # not again so soon
    assert planner.plan(holes + [(40, 50)], due + 0.1, 0.0, 0.25) == [(40, 50)]  # a new one
    assert planner.plan(holes, due + 0.3, 0.0, 0.25) == holes           # a P later: again
    assert planner.naks_sent == 3 and planner.ranges_sent == 5


def test_the_planner_sends_at_most_a_rounds_worth():
    planner = NakPlanner(random.Random(1))
    holes = [(n * 10, n * 10 + 5) for n in range(2_000)]
    ranges = planner.plan(holes, 1.0, 0.0, 0.25)
    assert len(ranges) == MAX_NAK_RANGES * MAX_NAKS_PER_ROUND
    assert ranges == holes[:len(ranges)]                                 # in the order given
    assert planner.plan(holes, 1.0, 0.0, 0.25) == holes[len(ranges):2 * len(ranges)]


def _state(w: Window) -> tuple:
    return (list(w.received), w.duplicate_bytes, w.dropped_bytes, w.used_bytes, w.head, w.tail,
            [(s.state, s.got, bytes(s.buffer) if s.buffer is not None else None)
             for s in w.slots])


@pytest.mark.parametrize("seed", range(30))
def test_put_run_is_put_for_each_piece(seed):
    """Runs of back-to-back pieces, anywhere (inside a chunk, across chunks, over the header,
    the tail, the chunk area's end), repeated (duplicates), before and after the index, with a
    budget that runs out: the window ends the same as with put() piece by piece."""
    rng = random.Random(seed)
    budget = rng.choice([3000, 10_000])
    a, b = window(budget, indexed=False), window(budget, indexed=False)
    for step in range(60):
        if step == 20:
            a.set_index(entries())
            b.set_index(entries())
        size = rng.choice([1, 7, 100, 347])
        count = rng.randrange(1, 12)
        offset = rng.randrange(0, SIZE - size * count + 1)
        pieces = [bytes([rng.randrange(256)]) * size for _ in range(count)]
        completed_a = a.put_run(offset, [memoryview(p) for p in pieces])
        completed_b = []
        for n, piece in enumerate(pieces):
            completed_b += b.put(offset + n * size, piece)
        assert [s.index for s in completed_a] == [s.index for s in completed_b]
        assert _state(a) == _state(b)
