"""A fixed pool of daemon threads for blocking work (directory queries, file I/O, the results
log) that a daemon's event loop hands off.

Unlike concurrent.futures.ThreadPoolExecutor, whose threads the interpreter joins at exit, a
thread stuck in a hung call (a directory server that stopped answering) cannot delay the
process's exit past the daemon contract's 5 seconds. The owner shuts the pool down on stop.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable


class DaemonThreadPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads; see the module docstring."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
                         for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the worker pool is shut down")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue                       # abandoned before it started
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting coroutine
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
