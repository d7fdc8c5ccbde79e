"""Thousands of transfers at once: no thread each, no select() limit of 1,024 descriptors.

The client side is a raw-socket driver in this process (a real client per transfer would need
thousands of processes); it checks every byte it receives.
"""

from __future__ import annotations

import hashlib
import os
import resource
import select
import socket
import time

import pytest

from tftpd import packet

TRANSFERS = 1500


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard < wanted:
            pytest.skip(f"open file limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.slow
def test_1500_concurrent_transfers_all_complete(tftpd_factory, tftp_root):
    _raise_nofile(TRANSFERS * 2 + 200)
    content = os.urandom(3 * 512 + 100)  # four blocks each
    (tftp_root / "small.bin").write_bytes(content)
    daemon = tftpd_factory(Timeout=5, LogLevel="WARNING")
    port = daemon.port

    clients: dict[int, socket.socket] = {}
    received: dict[int, bytearray] = {}
    poller = select.epoll()
    try:
        for _ in range(TRANSFERS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.sendto(packet.encode_request(packet.OP_RRQ, "small.bin"), ("127.0.0.1", port))
            clients[sock.fileno()] = sock
            received[sock.fileno()] = bytearray()
            poller.register(sock.fileno(), select.EPOLLIN)

        # Hold every transfer at its first block until all are open on the server.
        first_blocks = 0
        peak_active = 0
        deadline = time.monotonic() + 60
        pending_first = set(clients)
        peers: dict[int, tuple[str, int]] = {}
        while pending_first and time.monotonic() < deadline:
            for fd, _ in poller.poll(1.0):
                datagram, peer = clients[fd].recvfrom(65536)
                if fd in pending_first and datagram[:4] == b"\x00\x03\x00\x01":
                    pending_first.discard(fd)
                    peers[fd] = peer
                    received[fd] += datagram[4:]
                    first_blocks += 1
        assert first_blocks == TRANSFERS, f"only {first_blocks} transfers started"
        peak_active = daemon.counters()["active_transfers"]

        # Now finish them all, lock-step.
        expected_block = {fd: 1 for fd in clients}
        for fd in clients:
            clients[fd].sendto(packet.encode_ack(1), peers[fd])
        done: set[int] = set()
        while len(done) < TRANSFERS and time.monotonic() < deadline:
            for fd, _ in poller.poll(1.0):
                try:
                    datagram = clients[fd].recv(65536)
                except BlockingIOError:
                    continue
                block = int.from_bytes(datagram[2:4], "big")
                if datagram[:2] != b"\x00\x03" or block != expected_block[fd] + 1:
                    continue
                expected_block[fd] = block
                received[fd] += datagram[4:]
                clients[fd].sendto(packet.encode_ack(block), peers[fd])
                if len(datagram) - 4 < 512:
                    done.add(fd)
        assert len(done) == TRANSFERS
    finally:
        poller.close()
        for sock in clients.values():
            sock.close()

    digest = hashlib.sha256(content).hexdigest()
    assert all(hashlib.sha256(data).hexdigest() == digest for data in received.values())
    assert peak_active == TRANSFERS
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counters = daemon.counters()
        if counters["transfers_completed"] == TRANSFERS:
            break
        time.sleep(0.1)
    assert counters["transfers_completed"] == TRANSFERS
    assert counters["active_transfers"] == 0
    assert counters["transfers_failed"] == 0
