"""common.imaging.mcranges: the interval set both sides of a multicast session keep, and the
first pass's send order, as tables and against a plain set of bytes."""

from __future__ import annotations

import random

import pytest

from common.imaging.mcranges import PassOrder, RangeSet


@pytest.mark.parametrize("adds, expect, new", [
    ([(0, 10)], [(0, 10)], [10]),
    ([(0, 10), (10, 20)], [(0, 20)], [10, 10]),                 # in order: one interval
    ([(0, 10), (20, 30), (10, 20)], [(0, 30)], [10, 10, 10]),   # fills the hole
    ([(0, 10), (5, 15)], [(0, 15)], [10, 5]),                   # overlap counts once
    ([(20, 30), (0, 5)], [(0, 5), (20, 30)], [10, 5]),          # before everything
    ([(0, 5), (10, 15), (20, 25), (3, 22)], [(0, 25)], [5, 5, 5, 10]),
    ([(0, 10), (2, 8)], [(0, 10)], [10, 0]),                    # nothing new
    ([(5, 5)], [], [0]),                                        # empty
])
def test_add(adds, expect, new):
    s = RangeSet()
    assert [s.add(a, b) for a, b in adds] == new
    assert list(s) == expect
    assert s.bytes == sum(b - a for a, b in expect)


@pytest.mark.parametrize("start, end, expect, removed", [
    (0, 5, [(5, 10), (20, 30)], 5),
    (5, 25, [(0, 5), (25, 30)], 10),
    (2, 4, [(0, 2), (4, 10), (20, 30)], 2),                    # splits one
    (10, 20, [(0, 10), (20, 30)], 0),                          # the hole itself
    (0, 100, [], 20),
])
def test_remove(start, end, expect, removed):
    s = RangeSet([(0, 10), (20, 30)])
    assert s.remove(start, end) == removed
    assert list(s) == expect
    assert s.bytes == sum(b - a for a, b in expect)


def test_queries():
    s = RangeSet([(0, 10), (20, 30), (40, 50)])
    assert s.holes(0, 60) == [(10, 20), (30, 40), (50, 60)]
    assert s.holes(5, 45) == [(10, 20), (30, 40)]
    assert s.holes(0, 60, limit=2) == [(10, 20), (30, 40)]
    assert s.holes(12, 18) == [(12, 18)]
    assert s.holes(20, 30) == []
    assert s.first_missing(0) == 10 and s.first_missing(10) == 10 and s.first_missing(25) == 30
    assert s.covers(20, 30) and not s.covers(20, 31) and s.covers(7, 7)
    assert s.count(5, 45) == 5 + 10 + 5
    assert s.span(5, 45) == [(5, 10), (20, 30), (40, 45)]


def test_random_operations_agree_with_a_set_of_bytes():
    rng = random.Random(14)
    s, plain = RangeSet(), set()
    for _ in range(3000):
        a = rng.randrange(0, 500)
        b = a + rng.randrange(0, 40)
        if rng.random() < 0.7:
            assert s.add(a, b) == len(set(range(a, b)) - plain)
            plain |= set(range(a, b))
        else:
            assert s.remove(a, b) == len(set(range(a, b)) & plain)
            plain -= set(range(a, b))
        assert s.bytes == len(plain)
    intervals = list(s)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(intervals, intervals[1:]))   # merged
    assert {x for a, b in intervals for x in range(a, b)} == plain
    assert s.holes(0, 600) == [h for h in _holes(plain, 0, 600)]


def _holes(plain, start, end):
    out, run = [], None
    for x in range(start, end):
        if x not in plain and run is None:
            run = x
        if x in plain and run is not None:
            out.append((run, x))
            run = None
    if run is not None:
        out.append((run, end))
    return out


def test_pass_order_sends_header_then_tail_then_chunks():
    order = PassOrder(image_bytes=1000, header_bytes=100, index_offset=900)
    # header [0,100) at 0, tail [900,1000) at 100, chunks [100,900) at 200
    assert [order.position_of(x) for x in (0, 99, 900, 999, 100, 899, 1000)] == \
        [0, 99, 100, 199, 200, 999, 1000]
    assert order.sent(0) == []
    assert order.sent(150) == [(0, 100), (900, 950)]
    assert order.sent(1000) == [(0, 100), (900, 1000), (100, 900)]
    assert order.ranges(50, 250) == [(50, 100), (900, 1000), (100, 150)]
    assert order.position_after(900, 10) == 110
