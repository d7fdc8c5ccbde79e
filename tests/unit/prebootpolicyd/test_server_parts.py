"""The server's small parts: the daemon-thread pool, the rate-limited warning, the counters."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter

import pytest

from prebootpolicyd.server import DaemonThreadPool, RateLimitedWarning
from prebootpolicyd.status import ARCHES, PLATFORMS, PolicyCounters, bounded


def test_pool_runs_calls_and_reports_errors():
    pool = DaemonThreadPool(2, "t")
    try:
        assert pool.submit(lambda a, b: a + b, 2, 3).result(5) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(5)
        assert all(t.daemon for t in pool._threads)
    finally:
        pool.shutdown()


def test_pool_with_asyncio_timeout_and_a_stuck_worker():
    release = threading.Event()
    pool = DaemonThreadPool(1, "t")

    async def main():
        loop = asyncio.get_running_loop()
        stuck = loop.run_in_executor(pool, release.wait)            # holds the only worker
        queued = pool.submit(lambda: "late")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(queued), 0.1)
        assert queued.cancelled()                                   # never runs
        release.set()
        await stuck
        return await loop.run_in_executor(pool, lambda: "next")

    try:
        assert asyncio.run(main()) == "next"
    finally:
        pool.shutdown()


def test_pool_shutdown_cancels_what_waits_and_refuses_more():
    release, started = threading.Event(), threading.Event()
    pool = DaemonThreadPool(1, "t")
    running = pool.submit(lambda: started.set() or release.wait())
    assert started.wait(5)
    waiting = pool.submit(lambda: None)
    pool.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    release.set()
    assert running.result(5) is True


def test_rate_limited_warning(caplog):
    logger = logging.getLogger("test.policyd.rate")
    warn = RateLimitedWarning(logger, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.policyd.rate"):
        for n in range(5):
            warn.warning("problem %d", n)
    assert [r.getMessage() for r in caplog.records] == ["problem 0"]
    warn._next_at = 0.0
    with caplog.at_level(logging.WARNING, logger="test.policyd.rate"):
        warn.warning("problem %d", 9)
    assert caplog.records[-1].getMessage() == "problem 9 (4 more like it not shown)"


def test_counter_keys_are_bounded():
    assert bounded("pcbios", PLATFORMS) == "pcbios"
    assert bounded("", PLATFORMS) == bounded(None, PLATFORMS) == "unknown"
    assert bounded("x" * 100, PLATFORMS) == "other"
    assert bounded("arm64", ARCHES) == "arm64"


def test_counters_start_at_zero_and_snapshot_plain_values():
    counters = PolicyCounters()
    snapshot = counters.snapshot()
    assert set(snapshot) == {"queries", "script_requests", "work_assigned", "menus_shown",
                             "no_work", "fallback_answers", "directory_errors", "bad_requests",
                             "by_platform", "by_arch", "by_action"}
    assert all(v == 0 or v == {} for v in snapshot.values())
    counters.by_platform["efi"] += 2
    counters.by_platform["pcbios"] += 1
    counters.queries += 3
    snapshot = counters.snapshot()
    assert snapshot["by_platform"] == {"efi": 2, "pcbios": 1}
    assert type(snapshot["by_platform"]) is dict and not isinstance(snapshot["by_platform"],
                                                                      Counter)
    assert snapshot["queries"] == 3
