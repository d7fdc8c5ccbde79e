"""The results log's admission: the per-host token bucket and the bounded write queue."""

import concurrent.futures
import threading

from imgsrvd.resultsadmission import HostRateLimit, LogQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_host_may_burst_then_one_every_60_over_n_seconds():
    clock = Clock()
    limit = HostRateLimit(6, clock=clock)
    assert [limit.wait_s("a") for _ in range(6)] == [0.0] * 6
    assert limit.wait_s("a") == 10.0          # one every 10 s
    assert limit.wait_s("b") == 0.0           # per host
    clock.now = 10.0
    assert limit.wait_s("a") == 0.0
    assert limit.wait_s("a") > 0


def test_zero_is_no_limit_and_the_host_table_is_bounded():
    assert all(HostRateLimit(0).wait_s("a") == 0.0 for _ in range(1000))
    limit = HostRateLimit(1, max_hosts=10)
    for n in range(100):
        limit.wait_s(f"10.0.0.{n}")
    assert len(limit) == 10


def test_the_queue_refuses_when_full_and_frees_a_place_per_write():
    queue = LogQueue(2)
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = queue.submit(pool, gate.wait)
        second = queue.submit(pool, lambda: None)
        assert first is not None and second is not None
        assert queue.submit(pool, lambda: None) is None
        gate.set()
        first.result(5)
        second.result(5)
    assert queue.pending == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert queue.submit(pool, lambda: None) is not None
