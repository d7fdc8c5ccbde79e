"""Lock-step downloads served by worker processes (tftpd/lockchild.py) or threads
(tftpd/lockstep.py), against real clients: bytes, counters, strangers, and a stop with
transfers in flight.

Files here are larger than LOCKSTEP_MIN_BLOCKS blocks, so every download without windowsize
goes through a worker; the matrix in test_tftp_clients.py covers the small sizes (event loop).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402
from tftpclients import OP_DATA, OP_ERROR, OP_OACK, RawClient  # noqa: E402

from tftpd import packet  # noqa: E402

pytestmark = pytest.mark.skipif(not (tc.have("tftp") and tc.have("atftp") and tc.have("curl")),
                                reason="needs tftp-hpa, atftp and curl")

MODES = {"process": {"PREBOOT_TFTP_LOCKSTEP": "process"},
         "thread": {"PREBOOT_TFTP_LOCKSTEP": "thread"}}


def children_of(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return kids


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mixed_real_clients_at_once_byte_exact_and_counted(tftpd_factory, tftp_root, tmp_path,
                                                           mode):
    daemon = tftpd_factory(_env=MODES[mode], LogLevel="INFO")
    sizes = {f"l{i}.bin": 1024 * 1024 + 1000 * i for i in range(3)}
    digests = {name: tc.make_file(tftp_root / name, size) for name, size in sizes.items()}
    out = tmp_path / "out"
    out.mkdir()
    commands = []
    for i in range(4):
        for name in sizes:
            local = out / f"{i}-{name}"
            commands.append((name, local, {
                0: tc.curl_get_cmd(daemon.port, name, local, blksize=1468),
                1: tc.atftp_cmd(daemon.port, "-g", name, local, {"blksize": 512}),
                2: tc.atftp_cmd(daemon.port, "-g", name, local, None),
                3: ["tftp", "-m", "binary", "127.0.0.1", str(daemon.port), "-c", "get", name,
                    str(local)],
            }[i]))
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _name, _local, cmd in commands]
    try:
        for proc in procs:
            proc.wait(120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(p.args, p.returncode, p.stderr.read()) for p in procs if p.returncode != 0]
    for p in procs:
        p.stderr.close()
    assert not failed, failed[:3]
    for name, local, _cmd in commands:
        assert tc.sha256(local) == digests[name], f"{local.name} differs"
    n = len(commands)
    counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0
                                and c["transfers_completed"] + c["transfers_unconfirmed"] == n,
                                timeout_s=30)
    assert counters["transfers_failed"] == 0, counters
    assert counters["transfers_started"] == n
    assert counters["bytes_sent"] == 4 * sum(sizes.values())
    assert counters["blocks_resent"] == 0, counters
    tc.wait_until(lambda: not children_of(daemon.pid), 10, what="every worker child reaped")


def test_a_stranger_on_a_worker_transfer_gets_error_5(tftpd, tftp_root):
    content = os.urandom(100 * 512)
    (tftp_root / "big.bin").write_bytes(content)
    with RawClient(tftpd.port) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind((tc.HOST, 0))
        stranger.settimeout(5)
        client.rrq("big.bin")
        got = client.expect(OP_DATA, block=1).payload
        stranger.sendto(tc.ack(1), client.tid)
        data, source = stranger.recvfrom(1024)
        assert source == client.tid
        assert packet.decode(data) == packet.Error(5, "Unknown transfer ID")
        for block in range(1, 101):
            client.send_tid(tc.ack(block))
            got += client.expect(OP_DATA, block=block + 1).payload
        client.send_tid(tc.ack(101))
    assert got == content
    counters = tc.wait_counters(tftpd, lambda c: c["active_transfers"] == 0
                                and c["errors"].get("unknown_tid") == 1)
    assert counters["transfers_completed"] == 1 and counters["bytes_sent"] == len(content)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sigterm_with_lockstep_transfers_in_flight_ends_within_5_s(tftpd_factory, tftp_root,
                                                                   tmp_path, mode):
    """Workers blocked on clients that asked for a 30 s timeout, and a curl download running:
    SIGTERM ends the daemon within 5 s, each client is told, and no worker is left behind."""
    daemon = tftpd_factory(_env=MODES[mode], LogLevel="INFO")
    tc.make_file(tftp_root / "big.bin", 64 * 1024 * 1024)
    clients = [RawClient(daemon.port) for _ in range(3)]
    curl = subprocess.Popen(tc.curl_get_cmd(daemon.port, "big.bin", tmp_path / "c.out",
                                            blksize=512),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for client in clients:
            client.rrq("big.bin", "octet", {"timeout": 30})
            client.expect(OP_OACK)
            client.send_tid(tc.ack(0))
            client.expect(OP_DATA, block=1)
            client.send_tid(tc.ack(1))
            client.expect(OP_DATA, block=2)          # then silence: the worker waits 30 s
        tc.wait_counters(daemon, lambda c: c["active_transfers"] == 4 and c["bytes_sent"] > 0)
        workers = children_of(daemon.pid)
        if mode == "process":
            assert len(workers) == 4, workers
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        daemon.proc.wait(10)
        took = time.monotonic() - t0
        assert took < 5, f"stop took {took:.1f} s"
        assert daemon.proc.returncode == 0
        for client in clients:
            error = client.expect(OP_ERROR, 2)
            assert (error.code, error.message) == (0, "Server shutting down")
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or \
                open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"worker {pid} left running"
        assert curl.wait(10) != 0                    # told to stop, not a complete download
    finally:
        for client in clients:
            client.close()
        if curl.poll() is None:
            curl.kill()
            curl.wait()
