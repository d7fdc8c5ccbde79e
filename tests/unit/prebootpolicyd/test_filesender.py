"""prebootpolicyd.filesender: the sender thread, with real TCP connections on loopback and real
files: whole spans, many at once, a client that stops reading, a reset, stop() and close(), a
file that shrinks; every download ends exactly once and leaves no descriptor behind."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from prebootpolicyd import filesender
from prebootpolicyd.filesender import Download, FileSenders, Stalled

SIZE = 3 << 20 | 12345                   # bigger than a socket buffer: the sender must wait


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "initrd"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    yield path, fd
    os.close(fd)


@pytest.fixture
def senders():
    s = FileSenders("test-sendfile")
    yield s
    s.close()


def connected_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(server side, non-blocking like an asyncio transport's; client side)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    return server, client


def read_all(sock: socket.socket, want: int, out: list[bytes]) -> threading.Thread:
    def run():
        got = bytearray()
        while len(got) < want:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        out.append(bytes(got))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Ends:
    """on_done for downloads: records each end, and lets a test wait for them."""

    def __init__(self):
        self.ended: list[Download] = []
        self.cond = threading.Condition()

    def __call__(self, download: Download) -> None:
        with self.cond:
            self.ended.append(download)
            self.cond.notify_all()

    def wait(self, n: int, timeout_s: float = 20.0) -> list[Download]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.ended) >= n, timeout_s), self.ended
            return list(self.ended)


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_sends_the_span_and_ends_once(senders, data_file):
    path, fd = data_file
    server, client = connected_pair()
    ends, out = Ends(), []
    offset, count = 1000, SIZE - 5000
    reader = read_all(client, count, out)
    download = Download(server.fileno(), fd, offset, count, 10, ends)
    senders.send(download)
    [ended] = ends.wait(1)
    reader.join(20)
    assert ended is download and download.error is None and download.sent == count
    assert hashlib.sha256(out[0]).digest() == hashlib.sha256(
        path.read_bytes()[offset:offset + count]).digest()
    assert closed(download.sock_fd) and closed(download.file_fd)     # its duplicates only
    assert not closed(fd) and server.fileno() >= 0
    time.sleep(0.2)
    assert len(ends.ended) == 1 and senders.active() == 0
    server.close()
    client.close()


def test_many_downloads_at_once(senders, data_file):
    path, fd = data_file
    ends, outs, readers, socks = Ends(), [], [], []
    for _ in range(20):
        server, client = connected_pair()
        socks += [server, client]
        out: list[bytes] = []
        outs.append(out)
        readers.append(read_all(client, SIZE, out))
        senders.send(Download(server.fileno(), fd, 0, SIZE, 10, ends))
    ended = ends.wait(20, 60)
    for r in readers:
        r.join(20)
    want = hashlib.sha256(path.read_bytes()).digest()
    assert all(d.error is None and d.sent == SIZE for d in ended)
    assert all(hashlib.sha256(out[0]).digest() == want for out in outs)
    for s in socks:
        s.close()


def test_a_client_that_takes_nothing_is_cut_after_the_idle_timeout(senders, data_file,
                                                                    monkeypatch):
    monkeypatch.setattr(filesender, "WAKE_CHECK_S", 0.2)
    _, fd = data_file
    server, client = connected_pair(rcvbuf=4096)           # and never reads
    ends = Ends()
    senders.send(Download(server.fileno(), fd, 0, SIZE, 0.5, ends))
    [ended] = ends.wait(1, 10)
    assert isinstance(ended.error, Stalled) and 0 < ended.sent < SIZE
    assert "took nothing for 0.5 s (BootFileIdleTimeout)" in str(ended.error)
    server.close()
    client.close()


def test_a_slow_client_that_keeps_reading_is_not_stalled(senders, data_file, monkeypatch):
    monkeypatch.setattr(filesender, "WAKE_CHECK_S", 0.1)
    _, fd = data_file
    server, client = connected_pair(rcvbuf=4096)
    ends = Ends()
    senders.send(Download(server.fileno(), fd, 0, SIZE, 0.5, ends))
    got = 0
    deadline = time.monotonic() + 2.0                       # 4 idle timeouts, reading slowly
    while time.monotonic() < deadline:
        got += len(client.recv(16384))
        time.sleep(0.05)
    assert not ends.ended                                  # still running: it made progress
    while got < SIZE:
        chunk = client.recv(1 << 20)
        assert chunk
        got += len(chunk)
    [ended] = ends.wait(1)
    assert ended.error is None and got == SIZE
    server.close()
    client.close()


def test_a_reset_ends_the_download_with_a_connection_error(senders, data_file):
    _, fd = data_file
    server, client = connected_pair(rcvbuf=4096)
    ends = Ends()
    senders.send(Download(server.fileno(), fd, 0, SIZE, 30, ends))
    time.sleep(0.2)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()                                         # RST
    [ended] = ends.wait(1, 10)
    assert isinstance(ended.error, ConnectionError) and ended.sent < SIZE
    server.close()


def test_stop_ends_it_at_once(senders, data_file):
    _, fd = data_file
    server, client = connected_pair(rcvbuf=4096)
    ends = Ends()
    download = Download(server.fileno(), fd, 0, SIZE, 30, ends)
    senders.send(download)
    time.sleep(0.2)
    started = time.monotonic()
    download.stop()
    [ended] = ends.wait(1, 5)
    assert time.monotonic() - started < 2
    assert isinstance(ended.error, ConnectionAbortedError)
    assert closed(download.sock_fd) and closed(download.file_fd)
    server.close()
    client.close()


def test_close_ends_running_downloads_and_refuses_new_ones(data_file):
    _, fd = data_file
    senders = FileSenders("test-close")
    server, client = connected_pair(rcvbuf=4096)
    ends = Ends()
    senders.send(Download(server.fileno(), fd, 0, SIZE, 30, ends))
    time.sleep(0.2)
    senders.close()
    [ended] = ends.wait(1, 5)
    assert "stopping" in str(ended.error)
    late = Download(server.fileno(), fd, 0, SIZE, 30, ends)
    senders.send(late)                                     # after close: ends at once
    assert ends.wait(2, 1)[1] is late and "stopping" in str(late.error)
    assert closed(late.sock_fd) and closed(late.file_fd)
    server.close()
    client.close()


def test_a_file_that_shrinks_ends_the_download(senders, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    server, client = connected_pair()
    ends = Ends()
    senders.send(Download(server.fileno(), fd, 0, 5000, 10, ends))   # asks past its end
    [ended] = ends.wait(1)
    assert isinstance(ended.error, ConnectionAbortedError) and ended.sent == 1000
    assert "shrank" in str(ended.error)
    os.close(fd)
    server.close()
    client.close()


def test_no_descriptor_before_the_first_download(data_file):
    """policyd makes its service before it detaches, and python-daemon then closes every
    descriptor it does not know of: the sender's epoll and wake-up pipe must come later (the
    init script test caught a daemon that could no longer stop cleanly)."""
    _, fd = data_file
    before = set(os.listdir("/proc/self/fd"))
    senders = FileSenders("test-lazy")
    assert set(os.listdir("/proc/self/fd")) == before
    senders.close()                                        # nothing started: nothing to close
    assert set(os.listdir("/proc/self/fd")) == before
    senders = FileSenders("test-lazy-2")
    server, client = connected_pair()
    ends, out = Ends(), []
    reader = read_all(client, 1000, out)
    senders.send(Download(server.fileno(), fd, 0, 1000, 10, ends))
    ends.wait(1)
    reader.join(10)
    assert len(out[0]) == 1000
    senders.close()
    server.close()
    client.close()
