"""tftpd against TFTP clients we did not write: tftp-hpa's tftp, atftp and curl.

Every download is compared byte for byte (sha256) with the file in the root, over every option
each client offers: blksize (RFC 2348), windowsize (RFC 7440, atftp only), tsize (RFC 2349),
no options at all (RFC 1350), netascii, the 16-bit block-number rollover, 200 clients at once,
and clients that vanish mid-transfer. The daemon's own counters must agree with what happened.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402

pytestmark = pytest.mark.skipif(not (tc.have("tftp") and tc.have("atftp") and tc.have("curl")),
                                reason="needs tftp-hpa, atftp and curl")

BLKSIZES = [8, 512, 1428, 1468, 8192, 65464]
WINDOWSIZES = [1, 4, 8, 16, 64]
BIG = 3 * 1024 * 1024 + 17            # "a few MiB", not a multiple of any block size


def sizes_for(blksize: int, windowsize: int = 1) -> list[int]:
    """Edge sizes: empty, one byte, around 512 and around this block size and window."""
    sizes = {0, 1, 511, 512, 513, blksize - 1, blksize, blksize + 1, 2 * blksize,
             3 * blksize + 1, windowsize * blksize, windowsize * blksize + 1}
    if blksize >= 512:
        sizes.add(BIG)
    else:
        sizes.add(20000)              # blksize 8 lock-step: 2,500 blocks is enough
    return sorted(s for s in sizes if s >= 0)


EXTRA_SIZES = {1024, 1025, 4096, 65535, 65536}


def all_sizes() -> set[int]:
    sizes: set[int] = set(EXTRA_SIZES)
    for blksize in BLKSIZES:
        for window in WINDOWSIZES:
            sizes.update(sizes_for(blksize, window))
    return sizes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One daemon and a root of random files of every edge size, shared by the matrix."""
    folder = tmp_path_factory.mktemp("clients")
    root = folder / "root"
    (root / "upload").mkdir(parents=True)
    hashes = {size: tc.make_file(root / f"s{size}.bin", size) for size in all_sizes()}
    daemon = tc.start_daemon(folder, root, LogLevel="INFO")
    try:
        yield daemon, root, hashes, folder
    finally:
        daemon.stop()


def check_downloads(daemon, hashes, out: Path, sizes, fetch, late_icmp_ok: bool = False) -> None:
    """Fetch every size with `fetch(port, remote, local)`; all byte-identical, all counted.

    `late_icmp_ok` is kept for callers: with windowsize > 1 the daemon may resend after the
    client's final ACK and get an ICMP error; that must still count as completed
    (test_tftp_robustness.test_final_ack_behind_icmp_error_counts_as_completed).
    """
    port = daemon.port
    before = daemon.counters()
    out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        local = out / f"s{size}.bin"
        result = fetch(port, f"s{size}.bin", local)
        assert result.returncode == 0, f"size {size}: exit {result.returncode}: " \
                                       f"{tc.output_of(result)}"
        assert local.exists(), f"size {size}: no file written; {tc.output_of(result)}"
        assert local.stat().st_size == size, f"size {size}: got {local.stat().st_size} bytes"
        assert tc.sha256(local) == hashes[size], f"size {size}: content differs"
        local.unlink()

    def ended(c):
        return (c["transfers_completed"] + c["transfers_failed"] >= before["transfers_completed"]
                + before["transfers_failed"] + len(sizes) and c["active_transfers"] == 0)

    after = tc.wait_counters(daemon, ended, what="every transfer to end")
    assert after["transfers_started"] == before["transfers_started"] + len(sizes)
    failed = after["transfers_failed"] - before["transfers_failed"]
    assert failed == 0, after["errors"]
    assert after["transfers_completed"] == before["transfers_completed"] + len(sizes) - failed
    assert after["bytes_sent"] - before["bytes_sent"] >= sum(sizes)
    assert after["active_transfers"] == 0


# ---- tftp-hpa: RFC 1350 only (no option support in its client) ------------------------------

def test_tftp_hpa_octet_every_size(served, tmp_path):
    daemon, _root, hashes, _ = served
    sizes = sorted({0, 1, 511, 512, 513, 1024, 1025, 4096, 65535, BIG})

    def fetch(port, remote, local):
        result = tc.tftp_hpa_get(port, remote, local)
        assert "Error code" not in tc.output_of(result), tc.output_of(result)
        return result

    check_downloads(daemon, hashes, tmp_path / "out", sizes, fetch)


# ---- curl: blksize with tsize (curl always asks tsize), or no options at all ----------------

@pytest.mark.parametrize("blksize", BLKSIZES, ids=[f"blksize{b}" for b in BLKSIZES])
def test_curl_blksize_tsize(served, tmp_path, blksize):
    daemon, _root, hashes, _ = served
    sizes = [s for s in sizes_for(blksize) if s != 0]   # size 0: see the next test
    check_downloads(daemon, hashes, tmp_path / "out", sizes,
                    lambda port, remote, local: tc.curl_get(port, remote, local, blksize))


def test_curl_empty_file_with_tsize(tftpd, tftp_root, tmp_path):
    # Its own daemon: curl leaves without an ERROR, so the refused transfer lingers until timeout.
    hashes = {0: tc.make_file(tftp_root / "s0.bin", 0)}
    check_downloads(tftpd, hashes, tmp_path / "out", [0],
                    lambda port, remote, local: tc.curl_get(port, remote, local, 512))


def test_curl_no_options(served, tmp_path):
    daemon, _root, hashes, _ = served
    sizes = sorted({0, 1, 511, 512, 513, 1024, 1025, 65536, BIG})
    check_downloads(daemon, hashes, tmp_path / "out", sizes,
                    lambda port, remote, local: tc.curl_get(port, remote, local,
                                                            no_options=True))


# ---- atftp: every blksize x windowsize x tsize ----------------------------------------------

ATFTP_COMBOS = [(b, w, t) for b in BLKSIZES for w in WINDOWSIZES for t in (True, False)]


@pytest.mark.parametrize("blksize,windowsize,tsize", ATFTP_COMBOS,
                         ids=[f"blksize{b}-window{w}-{'tsize' if t else 'notsize'}"
                              for b, w, t in ATFTP_COMBOS])
def test_atftp_blksize_windowsize_tsize(served, tmp_path, blksize, windowsize, tsize):
    daemon, _root, hashes, _ = served
    options = {"blksize": blksize, "windowsize": windowsize}
    if tsize:
        options["tsize"] = 0
    sizes = sizes_for(blksize, windowsize)
    if not tsize or (blksize >= 8192 and windowsize > 1):
        # The big file once per blksize x windowsize; not where big windows of big blocks
        # overflow atftp's socket buffer, so that every window waits for a timeout.
        sizes = [s for s in sizes if s != BIG]
    check_downloads(daemon, hashes, tmp_path / "out", sizes,
                    lambda port, remote, local: tc.atftp_get(port, remote, local, options),
                    late_icmp_ok=windowsize > 1)


def test_atftp_no_options(served, tmp_path):
    daemon, _root, hashes, _ = served
    check_downloads(daemon, hashes, tmp_path / "out", [0, 1, 511, 512, 513, 1025, BIG],
                    lambda port, remote, local: tc.atftp_get(port, remote, local))


# ---- netascii (tftp-hpa converts CR LF back to LF, so the result is identical) ---------------

def netascii_text() -> bytes:
    lines = [b"#!ipxe", b"x" * 510, b"", b"a CR\ralone in a line", b"kernel vmlinuz quiet"]
    # Line lengths that put a CR LF pair across every possible block boundary.
    lines += [b"y" * (n % 97) for n in range(400)]
    lines.append(b"x" * 1022)   # with its CR LF: a 1024-byte run, boundaries fall inside it
    return b"\n".join(lines) + b"\n"


def test_tftp_hpa_netascii_download(tftpd, tftp_root, tmp_path):
    text = netascii_text()
    (tftp_root / "boot.txt").write_bytes(text)
    local = tmp_path / "boot.txt"
    result = tc.tftp_hpa_get(tftpd.port, "boot.txt", local, mode="netascii")
    assert "[netascii]" in tc.output_of(result), tc.output_of(result)
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    assert local.read_bytes() == text
    counters = tc.wait_counters(tftpd, lambda c: c["transfers_completed"] == 1)
    # On the wire every LF became CR LF and the lone CR became CR NUL.
    assert counters["bytes_sent"] == len(text) + text.count(b"\n") + text.count(b"\r")


def test_tftp_hpa_netascii_upload(tftpd_factory, tftp_root, tmp_path):
    daemon = tftpd_factory(AllowWrite=True)
    text = netascii_text()
    local = tmp_path / "notes.txt"
    local.write_bytes(text)
    result = tc.tftp_hpa_put(daemon.port, local, "upload/notes.txt", mode="netascii")
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    tc.wait_counters(daemon, lambda c: c["transfers_completed"] == 1)
    assert (tftp_root / "upload" / "notes.txt").read_bytes() == text
    assert tc.listing(tftp_root / "upload") == ["notes.txt"]


# ---- the 16-bit block-number rollover -------------------------------------------------------

@pytest.mark.slow
def test_block_number_rollover_curl_and_tftp_hpa(tftpd, tftp_root, tmp_path):
    size = 33 * 1024 * 1024 + 1234          # 67,588 blocks of 512: wraps past 65,535
    assert size // 512 + 1 > 65535
    digest = tc.make_file(tftp_root / "big.img", size)
    port = tftpd.port
    out_curl, out_hpa = tmp_path / "curl.img", tmp_path / "hpa.img"
    result = tc.curl_get(port, "big.img", out_curl, blksize=512, timeout_s=240)
    assert result.returncode == 0, tc.output_of(result)
    assert tc.sha256(out_curl) == digest
    out_curl.unlink()
    result = tc.tftp_hpa_get(port, "big.img", out_hpa, timeout_s=240)
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    assert out_hpa.stat().st_size == size
    assert tc.sha256(out_hpa) == digest
    counters = tc.wait_counters(tftpd, lambda c: c["transfers_completed"] == 2)
    assert counters["transfers_failed"] == 0
    assert counters["bytes_sent"] >= 2 * size


@pytest.mark.slow
def test_upload_block_number_rollover(tftpd_factory, tftp_root, tmp_path):
    daemon = tftpd_factory(AllowWrite=True)
    size = 32 * 1024 * 1024 + 4321             # 65,545 blocks of 512
    local = tmp_path / "big.img"
    digest = tc.make_file(local, size)
    result = tc.atftp_put(daemon.port, local, "upload/atftp.img",
                          {"blksize": 512, "windowsize": 16}, timeout_s=240)
    assert result.returncode == 0, tc.output_of(result)
    result = tc.tftp_hpa_put(daemon.port, local, "upload/hpa.img", timeout_s=240)
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    counters = tc.wait_counters(daemon, lambda c: c["transfers_completed"] == 2
                                and c["active_transfers"] == 0)
    assert counters["bytes_received"] == 2 * size
    assert tc.listing(tftp_root / "upload") == ["atftp.img", "hpa.img"]
    for name in ("atftp.img", "hpa.img"):
        assert tc.sha256(tftp_root / "upload" / name) == digest, name


def test_netascii_large_file_is_refused_and_tsize_not_offered(tftpd, tftp_root, tmp_path):
    (tftp_root / "huge.txt").write_bytes(b"line\n" * (16 * 1024 * 1024 // 5 + 1))
    result = tc.tftp_hpa_get(tftpd.port, "huge.txt", tmp_path / "huge.txt", mode="netascii")
    assert "Error code 0: File too large for netascii mode" in tc.output_of(result), \
        tc.output_of(result)
    (tftp_root / "small.txt").write_bytes(b"a\nb\n")
    with tc.RawClient(tftpd.port) as client:
        # The size on the wire is not known up front in netascii: tsize is left out (RFC 2347).
        client.rrq("small.txt", "netascii", {"tsize": 0})
        first = client.expect(tc.OP_DATA, block=1)
        assert first.payload == b"a\r\nb\r\n"
        client.send_tid(tc.ack(1))
    counters = tc.wait_counters(tftpd, lambda c: c["transfers_completed"] == 1)
    assert counters["errors"].get("netascii_too_large") == 1


# ---- many clients at once -------------------------------------------------------------------

@pytest.mark.slow
def test_200_concurrent_curl_clients(tftpd, tftp_root, tmp_path):
    files = {f"m{i}.bin": tc.make_file(tftp_root / f"m{i}.bin", 1024 * 1024 + i) for i in range(4)}
    names = sorted(files)
    port = tftpd.port
    tc.curl_get(port, names[0], tmp_path / "warmup.bin", blksize=1468)   # one earlier transfer
    earlier = tftpd.counters()["transfers_completed"]
    assert earlier == 1
    out = tmp_path / "out"
    out.mkdir()
    procs = []
    try:
        for n in range(200):
            name = names[n % len(names)]
            cmd = tc.curl_get_cmd(port, name, out / f"{n}-{name}", blksize=1468)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))
        deadline = time.monotonic() + 180
        for proc in procs:
            proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(p.returncode, p.stderr.read()) for p in procs if p.returncode != 0]
    for p in procs:
        p.stderr.close()
    assert not failed, failed[:5]
    for n in range(200):
        name = names[n % len(names)]
        assert tc.sha256(out / f"{n}-{name}") == files[name], f"client {n} got different bytes"
    counters = tc.wait_counters(tftpd, lambda c: c["transfers_completed"] == 200 + earlier
                                and c["active_transfers"] == 0, timeout_s=30)
    assert counters["transfers_failed"] == 0
    assert counters["refused_busy"] == 0
    assert counters["requests_read"] == 200 + earlier


# ---- a client that vanishes mid-transfer ----------------------------------------------------

ABORTING_CLIENTS = {
    "curl-no-options": lambda port, local: tc.curl_get_cmd(port, "large.bin", local,
                                                           no_options=True),
    "curl-tsize": lambda port, local: tc.curl_get_cmd(port, "large.bin", local, blksize=512),
    "atftp-window16": lambda port, local: tc.atftp_cmd(
        port, "-g", "large.bin", local, {"blksize": 512, "windowsize": 16}),
}


@pytest.mark.slow
@pytest.mark.parametrize("client", sorted(ABORTING_CLIENTS))
def test_client_killed_mid_transfer(tftpd_factory, tftp_root, tmp_path, client):
    daemon = tftpd_factory(Timeout=1, Retries=2)
    digest = tc.make_file(tftp_root / "large.bin", 64 * 1024 * 1024)
    small = tc.make_file(tftp_root / "small.bin", 70000)
    baseline_fds = tc.fd_count(daemon.pid)
    port = daemon.port
    local = tmp_path / "large.out"
    proc = subprocess.Popen(ABORTING_CLIENTS[client](port, local), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        tc.wait_counters(daemon, lambda c: c["active_transfers"] == 1 and c["bytes_sent"] > 0,
                         what="the transfer to start")
        time.sleep(0.2)
        assert proc.poll() is None, "the client finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The daemon notices (timeout, or ICMP port unreachable on its next send) and counts it.
    counters = tc.wait_counters(daemon, lambda c: c["transfers_failed"] == 1
                                and c["active_transfers"] == 0, timeout_s=30,
                                what="the failed transfer to be counted")
    assert counters["transfers_completed"] == 0
    assert sum(counters["errors"].values()) >= 1
    assert set(counters["errors"]) <= {"timeout", "client_gone", "io_error"}, counters["errors"]
    # (polled: the status connection just used closes on the daemon's side a moment later)
    tc.wait_until(lambda: tc.fd_count(daemon.pid) <= baseline_fds, 10,
                  what=f"the daemon's descriptors back to {baseline_fds} (a leak?)")
    # ...and keeps serving.
    out = tmp_path / "small.out"
    result = tc.curl_get(port, "small.bin", out, blksize=1468)
    assert result.returncode == 0, tc.output_of(result)
    assert tc.sha256(out) == small
    assert daemon.proc.poll() is None
    assert digest  # the large file itself was never fully sent
