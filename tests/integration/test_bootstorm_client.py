"""The boot storm bench's simulated UEFI firmware (bench/bootstormlib/client.py, TftpGet as
EDK2's Mtftp4 reads: a size query, then blksize 1468 windowsize 4) against real servers on
127.0.0.1: our tftpd grants the window (an ACK per four blocks), dnsmasq does not (every block
ACKed); both deliver the file whole. The bench's claim that the peer reads lock-step rests on
this."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from support import REPO, tftpd_on_loopback

sys.path.insert(0, str(REPO / "bench"))
from bootstormlib import client  # noqa: E402

SIZE = 200 * 1468 + 77          # 201 blocks of 1468


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbstorm-", dir="/tmp"))
    (path / "boot.efi").write_bytes(os.urandom(SIZE))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tftpd(root: Path) -> Iterator[int]:
    daemon = tftpd_on_loopback(root, root)
    yield daemon.port
    assert daemon.stop() in (0, None), daemon.log()


@pytest.fixture
def dnsmasq(root: Path) -> Iterator[int]:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(binary):
        pytest.skip("dnsmasq not installed")
    if os.geteuid() != 0:
        pytest.skip("dnsmasq's TFTP listens on port 69: root only")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([binary, "--port=0", "--conf-file=/dev/null", "--keep-in-foreground",
                             "--no-hosts", "--no-resolv", "--listen-address=127.0.0.1",
                             "--bind-interfaces", "--enable-tftp", f"--tftp-root={root}",
                             f"--tftp-port-range={port},{port}", "--pid-file=",
                             "--log-facility=-", "--user=root", "--group=root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while " 0100007F:0045 " not in Path("/proc/net/udp").read_text():    # 127.0.0.1:69
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        yield 69
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Counting(client.TftpGet):
    """TftpGet that counts the ACKs it sends."""

    def _ack(self, block: int) -> None:
        self.acks = getattr(self, "acks", 0) + 1
        super()._ack(block)


async def edk2_read(port: int) -> tuple[client.TftpGet, client.TftpGet]:
    loop = asyncio.get_running_loop()
    buf = bytearray(1 << 16)
    query = Counting(loop, buf, "127.0.0.1", "127.0.0.1", port, "boot.efi", 1468,
                     windowsize=4, size_query=True)
    await asyncio.wait_for(query.run(), 20)
    read = Counting(loop, buf, "127.0.0.1", "127.0.0.1", port, "boot.efi", 1468, windowsize=4)
    await asyncio.wait_for(read.run(), 20)
    return query, read


def check_whole(read: client.TftpGet, root: Path) -> None:
    assert read.size == SIZE
    assert read.hash.hexdigest() == hashlib.sha256((root / "boot.efi").read_bytes()).hexdigest()


def test_our_tftpd_grants_edk2_its_window(root, tftpd):
    query, read = asyncio.run(edk2_read(tftpd))
    assert query.tsize == SIZE and query.size == 0          # the size, and no data
    check_whole(read, root)
    assert read.window == 4
    assert read.acks == 1 + 51                               # ACK 0, then one per window


def test_dnsmasq_reads_lock_step_for_edk2(root, dnsmasq):
    query, read = asyncio.run(edk2_read(dnsmasq))
    assert query.tsize == SIZE
    check_whole(read, root)
    assert read.window == 1                                  # windowsize not in its OACK
    assert read.acks == 1 + 201                              # every block
