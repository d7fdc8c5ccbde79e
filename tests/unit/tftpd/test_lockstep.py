"""tftpd.lockstep: the blocking lock-step loop, in a thread, against a raw client on loopback.
Every test runs twice: with the C hot loop (tftpd/_lockstep.c) and with the pure-Python one."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tftpd import packet
from tftpd.lockstep import LocalCounts, LockstepRunner
from tftpd.options import Negotiated
from tftpd.transfer import MemoryBlocks, ReadTransfer

BLKSIZE = 16


class Harness:
    """A ReadTransfer on a server socket, its runner, and a client socket."""

    def __init__(self, content: bytes, timeout_s: float = 1.0, retries: int = 3,
                 oack: bytes | None = None):
        self.content = content
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(3)
        self.tid = self.server.getsockname()
        key = self.client.getsockname()
        self.transfer = ReadTransfer(
            MemoryBlocks(content), Negotiated(BLKSIZE, 1, timeout_s), retries, None,  # type: ignore[arg-type]
            lambda d: self.server.sendto(d, key), oack)
        self.reports: list[dict] = []
        self.strangers: list[tuple] = []
        self.ended = threading.Event()
        self.runner = LockstepRunner(self.transfer, self.server, key,
                                     report=self.reports.append,
                                     stranger=self.strangers.append, on_end=self.ended.set)

    def recv(self) -> packet.Packet:
        data, source = self.client.recvfrom(65536)
        assert source == self.tid
        return packet.decode(data)

    def ack(self, block: int) -> None:
        self.client.sendto(packet.encode_ack(block), self.tid)

    def close(self) -> None:
        self.runner.stop()
        self.ended.wait(5)
        self.server.close()
        self.client.close()


@pytest.fixture(params=["native", "python"])
def loop(request, monkeypatch):
    """Which hot loop serves: the C one (which must be built: install-deps.sh builds it) or
    the pure-Python fallback."""
    from tftpd import lockstep
    if request.param == "native":
        from tftpd import _lockstep
        monkeypatch.setattr(lockstep, "native", _lockstep)
    else:
        monkeypatch.setattr(lockstep, "native", None)
    return request.param


@pytest.fixture
def make(loop):
    made: list[Harness] = []

    def factory(*args, **kwargs) -> Harness:
        made.append(Harness(*args, **kwargs))
        return made[-1]
    yield factory
    for harness in made:
        harness.close()


def test_blocks_go_out_and_the_loop_hands_back_after_the_last(make):
    content = os.urandom(20 * BLKSIZE + 5)           # 21 blocks, the last one short
    h = make(content)
    h.runner.start()
    got = b""
    for block in range(1, 22):
        data = h.recv()
        assert data == packet.Data(block, content[(block - 1) * BLKSIZE:block * BLKSIZE])
        got += data.payload
        if block < 21:
            h.ack(block)
    assert got == content
    assert h.ended.wait(2), "the thread did not hand the transfer back after the last block"
    t = h.transfer
    # the final ACK is the event loop's to wait for: nothing finished yet, all sent
    assert not t.finished and t.sent_last_block and (t.acked, t.next) == (20, 22)
    counts = h.runner.counts.take()
    counts["bytes_sent"] = counts.get("bytes_sent", 0) + sum(r.get("bytes_sent", 0)
                                                             for r in h.reports)
    assert counts["bytes_sent"] == len(content)
    # the state machine takes the final ACK from here
    assert t.on_datagram(packet.encode_ack(21)) and t.done


def test_a_duplicate_ack_is_not_answered(make):
    h = make(os.urandom(40 * BLKSIZE))
    h.runner.start()
    assert h.recv().block == 1
    h.ack(1)
    assert h.recv().block == 2
    h.ack(1)                                           # duplicate: no Sorcerer's Apprentice
    h.client.settimeout(0.3)
    with pytest.raises(socket.timeout):
        h.recv()
    h.client.settimeout(3)
    h.ack(2)
    assert h.recv().block == 3


def test_a_stranger_gets_error_5_and_the_transfer_goes_on(make):
    h = make(os.urandom(40 * BLKSIZE))
    h.runner.start()
    assert h.recv().block == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.settimeout(3)
        stranger.bind(("127.0.0.1", 0))
        stranger.sendto(packet.encode_ack(1), h.tid)
        data, source = stranger.recvfrom(1024)
        assert packet.decode(data) == packet.Error(5, "Unknown transfer ID")
        deadline = time.monotonic() + 2                # counted right after the answer
        while not h.strangers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.strangers == [stranger.getsockname()]
    h.ack(1)
    assert h.recv().block == 2


def test_silence_resends_the_block_then_gives_up(make):
    h = make(os.urandom(40 * BLKSIZE), timeout_s=1.0, retries=2)
    t0 = time.monotonic()
    h.runner.start()
    assert h.recv().block == 1
    h.ack(1)
    first = h.recv()
    assert first.block == 2
    assert h.recv() == first                          # resent after the timeout ...
    assert h.recv() == first                          # ... twice (Retries = 2)
    assert h.recv() == packet.Error(0, "Timeout: no answer from the client")
    assert h.ended.wait(2)
    assert h.transfer.failure.kind == "timeout"
    assert h.runner.counts.blocks_resent == 2
    assert 2.5 < time.monotonic() - t0 < 6


def test_old_acks_do_not_put_the_resend_off(make):
    """A client repeating an old ACK every half timeout must not stop our retransmission."""
    h = make(os.urandom(40 * BLKSIZE), timeout_s=1.0)
    h.runner.start()
    assert h.recv().block == 1
    h.ack(1)
    assert h.recv().block == 2
    h.client.settimeout(0.4)
    start = time.monotonic()
    resent = None
    while time.monotonic() - start < 3 and resent is None:
        h.ack(1)
        try:
            resent = h.recv()
        except socket.timeout:
            pass
    assert resent is not None and resent.block == 2
    assert time.monotonic() - start < 1.8


def test_an_error_from_the_client_ends_it_quietly(make):
    h = make(os.urandom(40 * BLKSIZE))
    h.runner.start()
    assert h.recv().block == 1
    h.client.sendto(packet.encode_error(0, "user cancelled"), h.tid)
    assert h.ended.wait(2)
    assert h.transfer.failure.kind == "client_error"


def test_oack_phase_then_the_fast_path(make):
    oack = packet.encode_oack({"blksize": str(BLKSIZE)})
    h = make(os.urandom(30 * BLKSIZE), oack=oack)
    h.runner.start()
    assert isinstance(h.recv(), packet.OptionAck)
    h.ack(0)
    for block in range(1, 5):
        assert h.recv().block == block
        h.ack(block)
    assert h.recv().block == 5


def test_stop_wakes_the_thread_at_once_and_tells_the_client(make):
    h = make(os.urandom(40 * BLKSIZE), timeout_s=30.0)   # a client-chosen long timeout
    h.runner.start()
    assert h.recv().block == 1
    time.sleep(0.1)
    t0 = time.monotonic()
    h.runner.stop()
    assert h.ended.wait(2)
    assert time.monotonic() - t0 < 0.5
    assert h.recv() == packet.Error(0, "Server shutting down")
    assert h.transfer.failure.kind == "shutdown"


def test_local_counts_take_gives_deltas():
    counts = LocalCounts()
    counts.bytes_sent += 10
    counts.blocks_resent += 1
    assert counts.take() == {"bytes_sent": 10, "blocks_resent": 1}
    assert counts.take() == {}


def _serve_file(tmp_path, content: bytes, blksize: int, family=socket.AF_INET,
                host: str = "127.0.0.1"):
    """A lock-step download of `content` from a file (FileBlocks: the read-ahead path) at
    `blksize`, acknowledged block by block; returns (what arrived, blocks, runner)."""
    from tftpd.transfer import FileBlocks
    path = tmp_path / "file"
    path.write_bytes(content)
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.bind((host, 0))
    client.settimeout(3)
    key, tid = client.getsockname(), server.getsockname()
    fd = os.open(path, os.O_RDONLY)
    transfer = ReadTransfer(FileBlocks(fd, len(content)), Negotiated(blksize, 1, 2.0), 3, None,  # type: ignore[arg-type]
                            lambda d: server.sendto(d, key), None)
    reports: list[dict] = []
    ended = threading.Event()
    runner = LockstepRunner(transfer, server, key, report=reports.append,
                            stranger=lambda s: None, on_end=ended.set)
    runner.start()
    got, blocks = bytearray(), 0
    try:
        while True:
            data, source = client.recvfrom(65536)
            assert source[:2] == tid[:2]
            pkt = packet.decode(data)
            blocks += 1
            assert pkt.block == blocks & 0xFFFF
            got += pkt.payload
            client.sendto(packet.encode_ack(pkt.block), tid)
            if len(pkt.payload) < blksize:
                break
        assert ended.wait(3)
        assert transfer.on_datagram(packet.encode_ack(blocks & 0xFFFF)) and transfer.done
        sent = runner.counts.take().get("bytes_sent", 0) + sum(
            r.get("bytes_sent", 0) for r in reports)
        assert sent == len(content)
        return bytes(got), blocks, reports
    finally:
        runner.stop()
        ended.wait(3)
        server.close()
        client.close()
        if not transfer.finished:
            transfer.release()              # a finished transfer has closed its file


@pytest.mark.parametrize("size, blksize", [
    (600 * 1024 + 7, 512),        # three read-ahead refills, a short last block
    (600 * 1024, 512),            # a multiple of blksize: the last block is empty
    (300 * 1024 + 1, 1468),       # blocks that straddle read-ahead chunks
    (100, 1468),                  # one short block
])
def test_a_file_crosses_read_ahead_chunks(make, tmp_path, size, blksize):
    content = os.urandom(size)
    got, blocks, reports = _serve_file(tmp_path, content, blksize)
    assert got == content and blocks == size // blksize + 1
    # counters are handed over while the transfer runs (every FLUSH_EVERY blocks)
    from tftpd.lockstep import FLUSH_EVERY
    assert len(reports) >= (blocks - 2) // FLUSH_EVERY


def test_block_numbers_roll_over_past_65535(make, tmp_path):
    content = os.urandom(65536 * 8 + 3)               # blksize 8: 65,537 blocks
    got, blocks, _ = _serve_file(tmp_path, content, 8)
    assert got == content and blocks == 65537


def test_an_ipv6_client(make, tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    content = os.urandom(50 * 512 + 1)
    got, _, _ = _serve_file(tmp_path, content, 512, socket.AF_INET6, "::1")
    assert got == content


def test_the_c_loop_is_built():
    """install-deps.sh builds tftpd/_lockstep.c; without it tftpd falls back to Python, slower
    (bench/RESULTS.md), which a packaged build must not do silently."""
    from tftpd import _lockstep
    assert _lockstep.WHY_SENT_ALL == 1
