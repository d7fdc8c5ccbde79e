"""imgsrvd's limits against a hostile client (issue 13), on the real daemon: memory per upload
independent of what the client sends (the daemon's RSS, read with psutil), slots per host,
slots freed from trickling uploads and from retrieves nobody reads, while a legitimate restore
from another address (127.0.0.2) succeeds."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from common.imaging.imageformat import ChunkKind, encode_chunk_header, encode_header
from tests.integration.test_imgsrvd_http import Imgsrvd, imgsrvd_factory, make_image, wait_for, workdir  # noqa: F401

RSS_GROWTH_BOUND = 64 << 20      # what one attack may add to the daemon's RSS
META = {"format": 1, "type": "base", "streams": []}


class _RssPeak(threading.Thread):
    """Samples a process's RSS every 20 ms until stopped; the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def _put_stream(daemon: Imgsrvd, name: str, pieces, source: str = "127.0.0.1") -> int:
    """PUT a body made of `pieces` (chunked), from `source`; the status (0: cut off)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60,
                                      source_address=(source, 0))
    try:
        conn.putrequest("PUT", f"/v1/images/{name}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for piece in pieces:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        return conn.getresponse().status
    except (ConnectionError, BrokenPipeError):
        return 0
    finally:
        conn.close()


def _measure(daemon: Imgsrvd, attack) -> tuple[int, int]:
    """(RSS before, peak RSS during) the attack."""
    sampler = _RssPeak(daemon.pid)
    before = sampler.peak
    sampler.start()
    try:
        attack()
    finally:
        sampler.stopped.set()
        sampler.join()
    return before, sampler.peak


def test_a_flood_of_empty_chunks_does_not_grow_the_daemon(imgsrvd_factory):
    """Old: 52 to 769 MiB for 100 MiB of 48-byte chunks."""
    daemon = imgsrvd_factory()
    chunk = encode_chunk_header(ChunkKind.ZERO, 0, 0, 4096, b"")
    block = chunk * ((1 << 20) // len(chunk))

    def attack():
        status = _put_stream(daemon, "flood.img",
                             [encode_header(META, 4096)] + [block] * 100)
        assert status == 422
    before, peak = _measure(daemon, attack)
    print(f"empty-chunk flood: RSS {before >> 20} -> peak {peak >> 20} MiB")
    assert peak - before < RSS_GROWTH_BOUND, (before, peak)
    assert daemon.leftovers() == []


def test_bytes_that_are_no_chunk_are_refused_not_buffered(imgsrvd_factory):
    """Old: 4 such uploads took 45 to 858 MiB (each buffered up to 256 MiB as "the index")."""
    daemon = imgsrvd_factory()
    junk = b"x" * (1 << 20)
    statuses: list[int] = []

    def one(n: int) -> None:
        statuses.append(_put_stream(daemon, f"junk{n}.img",
                                    [encode_header(META, 4096)] + [junk] * 64))

    def attack():
        threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    before, peak = _measure(daemon, attack)
    print(f"junk after header x4: RSS {before >> 20} -> peak {peak >> 20} MiB")
    assert all(status in (0, 422) for status in statuses), statuses
    assert peak - before < RSS_GROWTH_BOUND, (before, peak)


def _trickle(daemon: Imgsrvd, name: str, stop: threading.Event, statuses: list) -> None:
    """An upload that sends one byte every 2 s (TransferTimeout 5 s: never 'idle')."""
    def pieces():
        yield encode_header(META, 4096)
        while not stop.wait(2):
            yield b"P"
    statuses.append(_put_stream(daemon, name, pieces()))


def test_trickling_uploads_take_at_most_their_share_and_are_cut_off(imgsrvd_factory, workdir):
    """Old: 1 byte every 8 s with TransferTimeout 10 s held a slot forever, and one host could
    hold every slot (restores got 503)."""
    daemon = imgsrvd_factory(MaxClients=4, MaxTransfersPerClient=2, TransferTimeout=5,
                             MinTransferRate=1024)
    image = make_image(workdir / "restore-me.img", chunks=4)
    (daemon.root).mkdir(parents=True, exist_ok=True)
    (daemon.root / "base.img").write_bytes(image.read_bytes())
    stop, statuses = threading.Event(), []
    threads = [threading.Thread(target=_trickle, args=(daemon, f"t{n}.img", stop, statuses))
               for n in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: daemon.counters()["busy_refusals"] >= 2, 10)
        assert daemon.counters()["active_transfers"] == 2     # its share, not every slot
        # a restore from another host meanwhile
        out = workdir / "restored.img"
        assert daemon.download("base.img", out, "--interface", "127.0.0.2") == 200
        assert out.read_bytes() == image.read_bytes()
        # the tricklers lose their slots within 2 windows (stated: 2 x TransferTimeout)
        assert wait_for(lambda: daemon.counters()["active_transfers"] == 0, 30)
        freed_s = time.monotonic() - started
        print(f"trickling uploads cut off after {freed_s:.1f} s")
        assert freed_s < 30
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert sorted(statuses) in ([0, 0, 503, 503], [0, 408, 503, 503], [408, 408, 503, 503]), \
        statuses
    assert daemon.leftovers() == []


def test_a_retrieve_nobody_reads_loses_its_slot(imgsrvd_factory):
    """Old: a download whose client never reads had no send timeout at all."""
    daemon = imgsrvd_factory(MaxClients=2, TransferTimeout=5, MinTransferRate=1024)
    daemon.root.mkdir(parents=True, exist_ok=True)
    with open(daemon.root / "big.img", "wb") as big:
        big.truncate(256 << 20)                 # more than any socket buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    try:
        sock.sendall(b"GET /v1/images/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: daemon.counters()["active_transfers"] == 1, 10)
        started = time.monotonic()
        assert wait_for(lambda: daemon.counters()["active_transfers"] == 0, 40)
        print(f"unread retrieve cut off after {time.monotonic() - started:.1f} s")
    finally:
        sock.close()
    assert daemon.counters()["failures"] >= 1


def test_a_zero_suffix_range_is_416_not_206(imgsrvd_factory, workdir):
    daemon = imgsrvd_factory()
    daemon.root.mkdir(parents=True, exist_ok=True)
    (daemon.root / "r.img").write_bytes(b"0123456789")
    code, _ = daemon.curl("-H", "Range: bytes=-0", path="/v1/images/r.img")
    assert code == 416
    code, body = daemon.curl("-H", "Range: bytes=-3", path="/v1/images/r.img")
    assert (code, body) == (206, "789")


def test_the_referral_location_is_percent_encoded(imgsrvd_factory):
    daemon = imgsrvd_factory()
    code, body = daemon.curl("-i", "-H", "X-Preboot-Mode: auto",
                             path="/v1/images//other.example/a%20b%3Fc%23d.img")
    assert code == 307
    location = next(line for line in body.splitlines() if line.lower().startswith("location:"))
    assert location.split(":", 1)[1].strip() == \
        "http://other.example:998/v1/images/a%20b%3Fc%23d.img"


def test_a_retrieve_that_slows_down_mid_piece_is_not_cut_off(imgsrvd_factory):
    """A client that took the first megabytes fast gets large sendfile pieces (up to 16 MiB);
    when it then slows to 4x MinTransferRate, one piece outlasts a progress window. Old: no
    whole piece in a window counted as no progress, and the client was cut off although it
    took more than the minimum. Now what it acknowledges (TCP_INFO) counts as it goes."""
    daemon = imgsrvd_factory(MaxClients=2, TransferTimeout=5, MinTransferRate=16384)
    daemon.root.mkdir(parents=True, exist_ok=True)
    with open(daemon.root / "big.img", "wb") as big:
        big.truncate(256 << 20)
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(b"GET /v1/images/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        while got < 48 << 20:                   # fast: the pieces grow to 16 MiB
            data = sock.recv(1 << 20)
            assert data, "cut off while reading fast"
            got += len(data)
        slow_rate_bps = 4 * 16384
        ends = time.monotonic() + 3 * 5 + 2     # three progress windows and some
        while time.monotonic() < ends:
            data = sock.recv(8192)
            assert data, f"cut off after {got} bytes while taking {slow_rate_bps} B/s"
            got += len(data)
            time.sleep(len(data) / slow_rate_bps)
        assert daemon.counters()["active_transfers"] == 1
    finally:
        sock.close()
    assert "fewer than" not in daemon.log()
