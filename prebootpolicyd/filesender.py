"""The bytes of running boot file downloads, sent by one thread of their own: an epoll loop
over the downloads' sockets that calls sendfile(2) on each socket with room in its buffer,
until its span is out, its client takes nothing for the idle timeout, or its owner stops it.

Why not the event loop: asyncio's loop.sendfile costs, each time a socket buffer fills (about
ten times per file in a boot storm), a future, an epoll_ctl to add a writer and one to remove
it, and a pass of the loop; with the idle watch's task per piece on top, policyd spent about
1.5 ms of CPU per boot file in Python where nginx spends next to none (bench/RESULTS.md, "Boot
storm"). Why not a thread per download: starting one costs about as much again, and a boot
storm would start a thousand. Here the loop hands a download over once (a queue and a wake-up)
and hears back once; in between, each buffer-full costs the sender a few bytecodes, outside
the event loop, with epoll_wait and sendfile run without the GIL.

A download works on its own duplicates of the connection's and the file's descriptors, so
neither can be closed under the sender, nor their numbers be reused by another connection
while it sends; the sender closes them when the download ends. `Download.stop()` and
`FileSenders.close()` can be called from the event loop at any time; `on_done` is called in
the sender thread, once per download, and must hand over with call_soon_threadsafe.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from typing import Callable

from common.daemon.tcpinfo import acked_bytes

WAKE_CHECK_S = 1.0          # the sender looks for stalled downloads at least this often


class Stalled(ConnectionError):
    """The client took nothing for the idle timeout."""


class Download:
    """COUNT bytes of a file from OFFSET down a connected, non-blocking socket."""

    def __init__(self, sock_fd: int, file_fd: int, offset: int, count: int,
                 idle_timeout_s: float, on_done: Callable[["Download"], None]):
        self.offset = offset
        self.count = count
        self.idle_timeout_s = idle_timeout_s
        self.on_done = on_done
        self.sent = 0                            # bytes handed to the kernel so far
        self.error: BaseException | None = None  # why it ended early; None: all sent
        self.stopping = False
        self.last_progress = time.monotonic()
        self.acked: int | None = None            # tcpi_bytes_acked when last looked at
        self.acked_at = self.last_progress       # when that value was first seen
        self.file_fd = os.dup(file_fd)
        try:
            self.sock = socket.socket(fileno=os.dup(sock_fd))
        except OSError:
            os.close(self.file_fd)
            raise
        self.sock_fd = self.sock.fileno()
        self._senders: FileSenders | None = None

    def stop(self) -> None:
        """End the download early (its handler was cancelled); the sender closes it."""
        self.stopping = True
        if self._senders is not None:
            self._senders.stops_pending = True
            self._senders.wake()


class FileSenders:
    """The sender thread (started with the first download) and the downloads it runs."""

    def __init__(self, name: str = "policyd-sendfile"):
        self._name = name
        self._lock = threading.Lock()
        self._handed: collections.deque[Download] = collections.deque()
        self._running: dict[int, Download] = {}          # by socket descriptor (the duplicate)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stops_pending = False                       # a Download.stop() to act on
        # made with the thread, at the first download: a daemon made before it detaches
        # (python-daemon closes every descriptor it does not know of) would lose them
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1

    def send(self, download: Download) -> None:
        """Hand DOWNLOAD to the sender; its on_done says when it ended and how."""
        with self._lock:
            if self._closed:
                download.error = ConnectionAbortedError("the service is stopping")
                _close(download)
                download.on_done(download)
                return
            download._senders = self
            self._handed.append(download)
            if self._thread is None:
                self._epoll = select.epoll()
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._epoll.register(self._wake_r, select.EPOLLIN)
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self.wake()

    def wake(self) -> None:
        if self._wake_w < 0:
            return              # no thread yet: nothing to wake
        try:
            os.write(self._wake_w, b"!")
        except OSError:         # the pipe is full (a wake-up is pending anyway), or closed
            pass

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop: every running download ends (its on_done says so), the thread exits."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self.wake()
        thread.join(timeout_s)
        if not thread.is_alive():
            assert self._epoll is not None
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def active(self) -> int:
        return len(self._running) + len(self._handed)

    # ---- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        assert self._epoll is not None
        next_check = time.monotonic() + WAKE_CHECK_S
        while True:
            events = self._epoll.poll(WAKE_CHECK_S)
            for fd, _ in events:
                if fd == self._wake_r:
                    _drain(fd)
                elif fd in self._running:
                    self._pump(self._running[fd])
            if self._closed:
                break
            self._take_handed()
            now = time.monotonic()
            if now >= next_check or self.stops_pending:
                self.stops_pending = False
                next_check = now + WAKE_CHECK_S
                self._end_stopped_and_stalled(now)
        for download in list(self._running.values()) + list(self._handed):
            self._end(download, ConnectionAbortedError("the service is stopping"))
        self._handed.clear()

    def _take_handed(self) -> None:
        while self._handed:
            download = self._handed.popleft()
            assert self._epoll is not None
            try:
                self._epoll.register(download.sock_fd, select.EPOLLOUT)
            except OSError as exc:           # ENOMEM, ENOSPC: this download fails, not all
                self._end(download, exc)
                continue
            self._running[download.sock_fd] = download
            self._pump(download)

    def _pump(self, download: Download) -> None:
        """Send what the socket takes now; end the download when it is all out or failed."""
        moved = False
        while download.sent < download.count:
            wanted = download.count - download.sent
            try:
                n = os.sendfile(download.sock_fd, download.file_fd,
                                download.offset + download.sent, wanted)
            except BlockingIOError:
                break
            except OSError as exc:
                self._end(download, exc)
                return
            if n == 0:
                self._end(download, ConnectionAbortedError("the file ended early (it shrank "
                                                           "while sent)"))
                return
            download.sent += n
            moved = True
            if n < wanted:       # the buffer is full: epoll says when it has room (no EAGAIN)
                break
        if moved:
            download.last_progress = time.monotonic()
        if download.sent >= download.count:
            self._end(download, None)

    def _end_stopped_and_stalled(self, now: float) -> None:
        """Once a WAKE_CHECK_S: end the stopped downloads and those whose client neither freed
        room in the socket buffer nor acknowledged a byte for the idle timeout."""
        for download in list(self._running.values()):
            if download.stopping:
                self._end(download, ConnectionAbortedError("the download was stopped"))
                continue
            # the socket says "writable" only once a good part of its buffer is free: a slow
            # client that keeps reading shows in what it acknowledged
            acked = acked_bytes(download.sock)
            if acked != download.acked:
                download.acked, download.acked_at = acked, now
            alive_at = max(download.last_progress, download.acked_at)
            if now - alive_at >= download.idle_timeout_s:
                self._end(download, Stalled(f"the client took nothing for "
                                            f"{download.idle_timeout_s:g} s "
                                            "(BootFileIdleTimeout)"))

    def _end(self, download: Download, error: BaseException | None) -> None:
        if self._running.pop(download.sock_fd, None) is not None and self._epoll is not None:
            try:
                self._epoll.unregister(download.sock_fd)
            except OSError:
                pass
        download.error = error
        _close(download)
        try:
            download.on_done(download)
        except Exception:  # pragma: no cover - a closed loop at exit; nothing waits any more
            pass


def _close(download: Download) -> None:
    download.sock.close()
    try:
        os.close(download.file_fd)
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
