"""tftpd under bad input and bad networks: malformed packets, fuzzing, duplicates, loss.

Raw packets go out of a plain UDP socket and are built by hand (tftpclients.request/ack), so the
daemon's codec is not trusted to test itself. "No reply" is checked without sleeping on a guess:
after the packet under test a second socket sends a request for a missing file (the fence); the
daemon reads its request socket in order, so once the fence's ERROR is back, any reply to the
packet under test has already been sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402
from tftpclients import OP_ACK, OP_DATA, OP_ERROR, OP_OACK, RawClient  # noqa: E402

ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL = 0, 1, 2, 4


def fence(port: int, client: RawClient | None = None) -> None:
    """Return once the daemon has handled everything sent to its request port before."""
    own = client is None
    client = client or RawClient(port)
    try:
        client.rrq("fence-no-such-file")
        reply = client.expect_error(10)
        assert reply.code == ERR_NOT_FOUND, reply
    finally:
        if own:
            client.close()


def assert_healthy(daemon) -> dict:
    assert daemon.proc.poll() is None, f"daemon exited with {daemon.proc.returncode}"
    counters = daemon.counters()
    assert "internal" not in counters["errors"], f"internal errors: {counters['errors']}"
    return counters


def curl_works(daemon, root: Path, tmp_path: Path) -> None:
    """A real client still downloads a file byte-identically."""
    name = "after.bin"
    if not (root / name).exists():
        tc.make_file(root / name, 100_000)
    out = tmp_path / f"after-{time.monotonic_ns()}.bin"
    result = tc.curl_get(daemon.port, name, out, blksize=1468, timeout_s=60)
    assert result.returncode == 0, tc.output_of(result)
    assert tc.sha256(out) == tc.sha256(root / name)
    out.unlink()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the packet table and the hand-driven transfers (Timeout 5: no resends
    inside the short waits below)."""
    folder = tmp_path_factory.mktemp("robust")
    root = folder / "root"
    (root / "upload").mkdir(parents=True)
    files = {
        "five.bin": os.urandom(4 * 512 + 100),          # 5 blocks of 512
        "eleven.bin": os.urandom(10 * 512 + 100),       # 11 blocks of 512
        "three.bin": os.urandom(2 * 512 + 100),         # 3 blocks of 512
        "two.bin": os.urandom(512 + 7),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    daemon = tc.start_daemon(folder, root, Timeout=5, Retries=2)
    try:
        yield daemon, root, files
    finally:
        daemon.stop()


# ---- a table of malformed datagrams to the request port --------------------------------------

MALFORMED = [
    # name, datagram, ERROR code expected back (None: dropped silently)
    ("empty", b"", None),
    ("one-byte", b"\x01", None),
    ("opcode-0", b"\x00\x00five.bin\x00octet\x00", None),
    ("opcode-99", b"\x00\x63five.bin\x00octet\x00", None),
    ("opcode-only-rrq", b"\x00\x01", ERR_ILLEGAL),
    ("rrq-without-nul", b"\x00\x01five.bin\x00octet", ERR_ILLEGAL),
    ("rrq-no-mode", b"\x00\x01five.bin\x00", ERR_ILLEGAL),
    ("rrq-empty-mode", b"\x00\x01five.bin\x00\x00", ERR_ILLEGAL),
    ("rrq-mode-mail", b"\x00\x01five.bin\x00mail\x00", ERR_ILLEGAL),
    ("rrq-empty-filename", b"\x00\x01\x00octet\x00", ERR_ILLEGAL),
    ("rrq-odd-options", b"\x00\x01five.bin\x00octet\x00blksize\x00", ERR_ILLEGAL),
    ("rrq-odd-options-3", b"\x00\x01five.bin\x00octet\x00blksize\x00512\x00tsize\x00",
     ERR_ILLEGAL),
    ("rrq-empty-option-name", b"\x00\x01five.bin\x00octet\x00\x00512\x00", ERR_ILLEGAL),
    ("rrq-non-ascii-filename", b"\x00\x01fi\xffve.bin\x00octet\x00", ERR_ILLEGAL),
    ("rrq-utf8-filename", "\x00\x01f\u00efve.bin\x00octet\x00".encode(), ERR_ILLEGAL),
    ("rrq-non-ascii-option", b"\x00\x01five.bin\x00octet\x00bl\xe9ksize\x00512\x00", ERR_ILLEGAL),
    ("rrq-huge-4000-bytes", b"\x00\x01" + b"a" * 3980 + b"\x00octet\x00", ERR_ILLEGAL),
    ("wrq-mode-mail", b"\x00\x02upload/x\x00mail\x00", ERR_ILLEGAL),
    ("wrq-without-nul", b"\x00\x02upload/x\x00octet", ERR_ILLEGAL),
    ("data-to-request-port", b"\x00\x03\x00\x01hello", None),
    ("ack-to-request-port", b"\x00\x04\x00\x01", None),
    ("error-to-request-port", b"\x00\x05\x00\x01oops\x00", None),
    ("oack-to-request-port", b"\x00\x06blksize\x00512\x00", None),
]


@pytest.mark.parametrize("name,datagram,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_port(shared, tmp_path, name, datagram, code):
    daemon, root, _files = shared
    port = daemon.port
    before = daemon.counters()
    with RawClient(port) as client:
        client.send(datagram)
        fence(port)
        reply = client.recv(0.3)
        if code is None:
            assert reply is None, f"{name}: expected silence, got {reply!r}"
        else:
            assert reply is not None, f"{name}: expected ERROR {code}, got nothing"
            assert reply.opcode == OP_ERROR and reply.code == code, reply
            assert reply.message.startswith("Malformed request"), reply.message
            assert client.recv(0.2) is None, "more than one reply to one bad request"
    after = assert_healthy(daemon)
    assert after["malformed_packets"] == before["malformed_packets"] + 1
    assert after["transfers_started"] == before["transfers_started"]
    curl_works(daemon, root, tmp_path)


def test_option_names_and_mode_are_case_insensitive(shared):
    """RFC 1350 modes and RFC 2347 option names are case-insensitive."""
    daemon, _root, files = shared
    with RawClient(daemon.port) as client:
        client.rrq("five.bin", "OcTeT", {"BLKSIZE": 1024, "TSize": 0})
        oack = client.expect(OP_OACK)
        assert oack.options == {"blksize": "1024", "tsize": str(len(files["five.bin"]))}
        client.send_tid(tc.ack(0))
        got = client.expect(OP_DATA, block=1).payload
        client.send_tid(tc.ack(1))
        got += client.expect(OP_DATA, block=2).payload
        assert got == files["five.bin"][:2048]
        client.send_tid(tc.ack(2))
        last = client.expect(OP_DATA, block=3)
        assert got + last.payload == files["five.bin"]
        client.send_tid(tc.ack(3))


def test_unknown_and_unacceptable_options_are_ignored(shared):
    """RFC 2347: options the server does not know or will not honour are left out of the OACK;
    with none left, plain RFC 1350 (DATA 1, no OACK)."""
    daemon, _root, files = shared
    with RawClient(daemon.port) as client:
        client.rrq("two.bin", "octet", {"foo": "bar", "blksize": "7", "timeout": "0",
                                        "windowsize": "x"})
        first = client.expect(OP_DATA, block=1)
        assert len(first.payload) == 512
        client.send_tid(tc.ack(1))
        second = client.expect(OP_DATA, block=2)
        client.send_tid(tc.ack(2))
        assert first.payload + second.payload == files["two.bin"]


@pytest.mark.parametrize("asked,granted", [
    ({"blksize": 70000}, {"blksize": "65464"}),             # RFC 2348's largest
    ({"windowsize": 100000}, {"windowsize": "64"}),         # MaxWindowSize
    ({"blksize": 8, "windowsize": 1}, {"blksize": "8", "windowsize": "1"}),
    ({"timeout": 256, "blksize": 1428}, {"blksize": "1428"}),   # RFC 2349: 1..255
    ({"blksize": "1428 ", "tsize": "abc"}, {"blksize": "1428"}),
])
def test_option_values_are_clamped_or_ignored(shared, asked, granted):
    daemon, _root, files = shared
    with RawClient(daemon.port) as client:
        client.rrq("five.bin", "octet", asked)
        oack = client.expect(OP_OACK)
        assert oack.options == granted
        client.send_tid(tc.error(0, "enough"))


# ---- fuzzing --------------------------------------------------------------------------------

WORDS = [b"octet", b"netascii", b"mail", b"OCTET", b"blksize", b"tsize", b"windowsize",
         b"timeout", b"0", b"1", b"8", b"512", b"65464", b"65535", b"99999999999", b"-1",
         b"five.bin", b"../etc/passwd", b"/etc/passwd", b"upload/x", b"\xff\xfe", b""]
fields = st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=24)), max_size=8)
structured = st.builds(
    lambda opcode, parts, terminated: opcode.to_bytes(2, "big") + b"\0".join(parts)
    + (b"\0" if terminated else b""),
    st.integers(0, 9), fields, st.booleans())
short_packets = st.builds(lambda opcode, block, tail: opcode.to_bytes(2, "big")
                          + block.to_bytes(2, "big") + tail,
                          st.integers(0, 9), st.integers(0, 65535), st.binary(max_size=16))
datagrams = st.one_of(st.binary(max_size=700), structured, short_packets,
                      st.binary(min_size=2040, max_size=2100))


SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
              HealthCheck.filter_too_much]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    root = folder / "root"
    (root / "upload").mkdir(parents=True)
    (root / "five.bin").write_bytes(os.urandom(4 * 512 + 100))
    daemon = tc.start_daemon(folder, root, Timeout=1, Retries=1, LogLevel="WARNING")
    try:
        yield daemon, root
    finally:
        daemon.stop()


@pytest.mark.slow
def test_fuzz_request_port(fuzz_target, tmp_path):
    daemon, root = fuzz_target
    port = daemon.port
    before = daemon.counters()
    # Every socket stays open to the end, so no later one reuses the port (the client TID) of
    # a transfer some valid-looking datagram started; one fence socket for the same reason.
    clients: list[RawClient] = []
    fencer = RawClient(port)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=SUPPRESSED)
    @given(datagram=datagrams)
    def send(datagram):
        client = RawClient(port)
        clients.append(client)
        client.send(datagram)
        fence(port, fencer)

    try:
        send()
    finally:
        for client in clients + [fencer]:
            client.close()
    assert len(clients) >= 100
    counters = assert_healthy(daemon)
    assert counters["malformed_packets"] > before["malformed_packets"]
    tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0, timeout_s=30,
                     what="fuzzed transfers to end")
    curl_works(daemon, root, tmp_path)


@pytest.mark.slow
def test_fuzz_live_transfer_port(fuzz_target, tmp_path):
    """Garbage as the client's answer to DATA 1 or to the OACK, from the client's own TID."""
    daemon, root = fuzz_target
    port = daemon.port
    clients: list[RawClient] = []      # kept open to the end: no TID is reused meanwhile

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=SUPPRESSED)
    @given(datagram=datagrams, windowed=st.booleans())
    def poke(datagram, windowed):
        client = RawClient(port)
        clients.append(client)
        client.rrq("five.bin", "octet", {"windowsize": 4} if windowed else None)
        client.expect(OP_OACK if windowed else OP_DATA, 10)
        client.send_tid(datagram)
        # Whatever it does next, it must not flood: at most one window (or an ERROR).
        extra = client.drain(0.02)
        assert len(extra) <= 5, extra

    try:
        poke()
        assert len(clients) >= 100
        assert_healthy(daemon)
        tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0, timeout_s=30,
                         what="poked transfers to end")
    finally:
        for client in clients:
            client.close()
    assert_healthy(daemon)
    fence(port)
    curl_works(daemon, root, tmp_path)


# ---- duplicates: one transfer per request, one DATA per ACK ----------------------------------

def test_duplicate_rrq_yields_one_transfer(shared):
    daemon, _root, files = shared
    before = daemon.counters()
    with RawClient(daemon.port) as client:
        client.rrq("five.bin")
        client.rrq("five.bin")                     # a retransmitted request, same client port
        first = client.expect(OP_DATA, block=1)
        others = client.drain(0.5)
        assert others == [], f"a second transfer answered: {others}"
        content = first.payload
        for block in range(1, 5):
            client.send_tid(tc.ack(block))
            packet = client.expect(OP_DATA, block=block + 1)
            assert packet.source == first.source
            content += packet.payload
        client.send_tid(tc.ack(5))
    assert content == files["five.bin"]
    after = tc.wait_counters(daemon, lambda c: c["transfers_completed"]
                             == before["transfers_completed"] + 1)
    assert after["duplicate_requests"] == before["duplicate_requests"] + 1
    assert after["transfers_started"] == before["transfers_started"] + 1
    assert after["requests_read"] == before["requests_read"] + 1


@pytest.mark.parametrize("windowsize", [1, 4])
def test_duplicate_ack_sends_no_duplicate_data(shared, windowsize):
    """Sorcerer's Apprentice (RFC 1123 4.2.3.1): a repeated ACK must not repeat the DATA."""
    daemon, _root, files = shared
    before = daemon.counters()
    content = files["eleven.bin"]
    with RawClient(daemon.port) as client:
        if windowsize == 1:
            client.rrq("eleven.bin")
        else:
            client.rrq("eleven.bin", "octet", {"windowsize": windowsize})
            assert client.expect(OP_OACK).options == {"windowsize": str(windowsize)}
            client.send_tid(tc.ack(0))
        window = [client.expect(OP_DATA, block=b) for b in range(1, windowsize + 1)]
        client.send_tid(tc.ack(windowsize))
        client.send_tid(tc.ack(windowsize))        # the duplicate
        got = client.drain(1.0)
        blocks = [p.block for p in got if p.opcode == OP_DATA]
        assert blocks == list(range(windowsize + 1, 2 * windowsize + 1)), got
        assert all(p.opcode == OP_DATA for p in got), got
        received = b"".join(p.payload for p in window + got)
        assert received == content[:len(received)]
        client.send_tid(tc.error(0, "enough"))
    after = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
    assert after["blocks_resent"] == before["blocks_resent"]


# ---- timeouts and retransmission --------------------------------------------------------------

def test_unacked_data_is_resent_then_the_transfer_fails(tftpd_factory, tftp_root):
    content = os.urandom(3000)
    (tftp_root / "f.bin").write_bytes(content)
    daemon = tftpd_factory(Timeout=1, Retries=2)
    with RawClient(daemon.port) as client:
        client.rrq("f.bin")
        first = client.expect(OP_DATA, block=1)
        t0 = time.monotonic()
        seen = []
        while True:
            packet = client.recv(15)
            assert packet is not None, f"no ERROR after {seen}"
            seen.append((time.monotonic() - t0, packet))
            if packet.opcode == OP_ERROR:
                break
    resends = [p for _, p in seen if p.opcode == OP_DATA]
    assert [p.block for p in resends] == [1, 1], seen          # Retries = 2
    assert all(p.payload == first.payload == content[:512] for p in resends)
    assert seen[0][0] >= 0.5, "resent long before the 1 s timeout"
    error = seen[-1][1]
    assert error.code == ERR_UNDEFINED and "Timeout" in error.message, error
    counters = tc.wait_counters(daemon, lambda c: c["transfers_failed"] == 1)
    assert counters["errors"].get("timeout") == 1
    assert counters["blocks_resent"] == 2
    assert counters["active_transfers"] == 0
    assert counters["transfers_completed"] == 0


def test_unacked_oack_is_resent_then_the_transfer_fails(tftpd_factory, tftp_root):
    (tftp_root / "f.bin").write_bytes(os.urandom(3000))
    daemon = tftpd_factory(Timeout=1, Retries=2)
    with RawClient(daemon.port) as client:
        client.rrq("f.bin", "octet", {"blksize": 1024})
        first = client.expect(OP_OACK)
        rest = []
        while not rest or rest[-1].opcode != OP_ERROR:
            packet = client.recv(15)
            assert packet is not None, rest
            rest.append(packet)
    assert [p.opcode for p in rest] == [OP_OACK, OP_OACK, OP_ERROR]
    assert all(p.raw == first.raw for p in rest[:2])
    counters = tc.wait_counters(daemon, lambda c: c["transfers_failed"] == 1)
    assert counters["errors"].get("timeout") == 1


def test_client_timeout_option_sets_the_resend_interval(tftpd_factory, tftp_root):
    """RFC 2349: the client's timeout is echoed and used instead of the configured one."""
    (tftp_root / "f.bin").write_bytes(os.urandom(3000))
    daemon = tftpd_factory(Timeout=1, Retries=1)
    with RawClient(daemon.port) as client:
        client.rrq("f.bin", "octet", {"timeout": 3})
        assert client.expect(OP_OACK).options == {"timeout": "3"}
        client.send_tid(tc.ack(0))
        client.expect(OP_DATA, block=1)
        t0 = time.monotonic()
        again = client.expect(OP_DATA, 20, block=1)
        assert time.monotonic() - t0 >= 2.5, "resent before the negotiated 3 s"
        assert again.payload
        client.send_tid(tc.error(0, "done"))


def test_lost_final_ack_of_an_upload_is_repeated_once_stored(tftpd_factory, tftp_root):
    """RFC 1350 section 6: the receiver of the last DATA dallies and re-ACKs a repeated last
    block; the file is stored once and counted once."""
    daemon = tftpd_factory(AllowWrite=True, Timeout=2)
    content = os.urandom(512 + 33)
    with RawClient(daemon.port) as client:
        client.wrq("upload/dally.bin")
        client.expect(OP_ACK, block=0)
        client.send_tid(tc.data(1, content[:512]))
        client.expect(OP_ACK, block=1)
        client.send_tid(tc.data(2, content[512:]))
        client.expect(OP_ACK, block=2)
        client.send_tid(tc.data(2, content[512:]))       # "our final ACK was lost"
        client.expect(OP_ACK, block=2)
    counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
    assert counters["transfers_completed"] == 1 and counters["transfers_failed"] == 0
    assert (tftp_root / "upload" / "dally.bin").read_bytes() == content
    assert sorted(os.listdir(tftp_root / "upload")) == ["dally.bin"]


# ---- windowsize (RFC 7440) by hand -------------------------------------------------------------

def test_windowsize_by_hand_with_partial_ack(shared):
    daemon, _root, files = shared
    content = files["eleven.bin"]
    before = daemon.counters()
    with RawClient(daemon.port) as client:
        client.rrq("eleven.bin", "octet", {"windowsize": 4, "blksize": 512})
        oack = client.expect(OP_OACK)
        assert oack.options == {"windowsize": "4", "blksize": "512"}
        client.send_tid(tc.ack(0))
        blocks = {}
        for b in (1, 2, 3, 4):                        # a whole window before any ACK
            blocks[b] = client.expect(OP_DATA, block=b).payload
        assert client.drain(0.5) == [], "sent beyond the window"
        client.send_tid(tc.ack(2))                   # "3 and 4 were lost"
        for b in (3, 4, 5, 6):                        # the window restarts after block 2
            blocks[b] = client.expect(OP_DATA, block=b).payload
        assert client.drain(0.5) == []
        client.send_tid(tc.ack(6))
        for b in (7, 8, 9, 10):
            blocks[b] = client.expect(OP_DATA, block=b).payload
        client.send_tid(tc.ack(10))
        last = client.expect(OP_DATA, block=11)
        assert len(last.payload) == 100
        blocks[11] = last.payload
        client.send_tid(tc.ack(11))
        assert client.drain(0.3) == []
    assert b"".join(blocks[b] for b in range(1, 12)) == content
    after = tc.wait_counters(daemon, lambda c: c["transfers_completed"]
                             == before["transfers_completed"] + 1)
    assert after["transfers_failed"] == before["transfers_failed"]


def test_ack_for_a_block_never_sent_is_ignored(shared):
    daemon, _root, files = shared
    with RawClient(daemon.port) as client:
        client.rrq("five.bin")
        client.expect(OP_DATA, block=1)
        client.send_tid(tc.ack(3))                   # from the future
        assert client.drain(0.5) == []
        client.send_tid(tc.ack(1))
        client.expect(OP_DATA, block=2)
        client.send_tid(tc.error(0, "enough"))


# ---- strangers, errors from the client, busy --------------------------------------------------

def test_packets_from_another_port_do_not_disturb_a_transfer(shared):
    daemon, _root, files = shared
    with RawClient(daemon.port) as client, RawClient(daemon.port) as stranger:
        client.rrq("five.bin")
        first = client.expect(OP_DATA, block=1)
        stranger.send(tc.ack(1), first.source)
        stranger.send(tc.error(0, "go away"), first.source)
        assert all(p.opcode != OP_DATA for p in stranger.drain(0.3))
        content = first.payload
        for block in range(1, 5):
            client.send_tid(tc.ack(block))
            content += client.expect(OP_DATA, block=block + 1).payload
        client.send_tid(tc.ack(5))
    assert content == files["five.bin"]


def test_error_from_client_ends_the_transfer_quietly(shared):
    daemon, _root, _files = shared
    before = daemon.counters()
    with RawClient(daemon.port) as client:
        client.rrq("five.bin")
        client.expect(OP_DATA, block=1)
        client.send_tid(tc.ack(1))
        client.expect(OP_DATA, block=2)
        client.send_tid(tc.error(0, "user cancelled"))
        assert client.drain(0.5) == [], "the daemon answered an ERROR"
    after = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0
                             and c["transfers_failed"] == before["transfers_failed"] + 1)
    assert after["errors"].get("client_error", 0) == before["errors"].get("client_error", 0) + 1


def test_cancel_after_oack_is_a_size_probe(shared):
    """UEFI asks tsize, reads the OACK and cancels with error 8: counted apart from failures."""
    daemon, _root, files = shared
    before = daemon.counters()
    with RawClient(daemon.port) as client:
        client.rrq("five.bin", "octet", {"tsize": 0, "blksize": 1468})
        oack = client.expect(OP_OACK)
        assert oack.options["tsize"] == str(len(files["five.bin"]))
        client.send_tid(tc.error(8, "size probe"))
        assert client.drain(0.3) == []
    after = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0
                             and c["size_probes"] == before["size_probes"] + 1)
    assert after["transfers_failed"] == before["transfers_failed"]


def test_busy_server_drops_requests_beyond_max_transfers(tftpd_factory, tftp_root):
    content = os.urandom(600)
    (tftp_root / "f.bin").write_bytes(content)
    daemon = tftpd_factory(MaxTransfers=1, Timeout=5)
    with RawClient(daemon.port) as first, RawClient(daemon.port) as second:
        first.rrq("f.bin")
        block1 = first.expect(OP_DATA, block=1)
        second.rrq("f.bin")
        tc.wait_counters(daemon, lambda c: c["refused_busy"] == 1)
        assert second.recv(0.3) is None, "the busy server answered"
        first.send_tid(tc.ack(1))
        block2 = first.expect(OP_DATA, block=2)
        first.send_tid(tc.ack(2))
        assert block1.payload + block2.payload == content
        tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
        assert second.download("f.bin") == content      # its retry is served
    counters = daemon.counters()
    assert counters["transfers_completed"] == 2


def test_final_ack_behind_icmp_error_counts_as_completed(shared):
    """What atftp with windowsize does: it ACKs a window late (ACK 2), then the last block
    (ACK 3), and exits. The late ACK makes the daemon resend block 3 to the closed port."""
    daemon, _root, files = shared
    before = daemon.counters()
    with RawClient(daemon.port) as client:
        client.rrq("three.bin", "octet", {"windowsize": 4})
        client.expect(OP_OACK)
        client.send_tid(tc.ack(0))
        got = b"".join(client.expect(OP_DATA, block=b).payload for b in (1, 2, 3))
        assert got == files["three.bin"]
        tid = client.tid
        # From now on the kernel refuses (ICMP port unreachable) anything the daemon sends us,
        # exactly as if the client had exited; sendto() still reaches the daemon.
        client.sock.connect((tc.HOST, daemon.port))
        client.sock.sendto(tc.ack(2), tid)
        client.sock.sendto(tc.ack(3), tid)
    after = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0
                             and c["transfers_completed"] + c["transfers_failed"]
                             == before["transfers_completed"] + before["transfers_failed"] + 1)
    assert after["transfers_failed"] == before["transfers_failed"], after["errors"]
    assert after["transfers_completed"] == before["transfers_completed"] + 1


# ---- real packet loss, in a network namespace of our own (root only) ----------------------------

def _netns_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(p) for p in ("ip", "nft", "atftp"))


class LossyNamespace:
    """A fresh network namespace whose loopback drops a share of UDP packets (nftables)."""

    def __init__(self, hook: str, rules: dict[str, str]):
        self.name = f"pbtest-{os.getpid()}-{time.monotonic_ns() % 100000}"
        self.hook = hook
        self.rules = rules

    def __enter__(self) -> "LossyNamespace":
        result = tc.run(["ip", "netns", "add", self.name], 20)
        if result.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {tc.output_of(result)}")
        try:
            self.exec(["ip", "link", "set", "lo", "up"], check=True)
            rules = "".join(f'  {rule} counter drop comment "{name}"\n'
                            for name, rule in self.rules.items())
            ruleset = (f"table inet pbloss {{\n chain c {{\n  type filter hook {self.hook} "
                       f"priority 0; policy accept;\n{rules} }}\n}}\n")
            result = tc.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], 20,
                            input=ruleset)
            if result.returncode != 0:
                pytest.skip(f"nftables unusable here: {tc.output_of(result)}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def exec(self, cmd: list[str], timeout_s: float = 120, check: bool = False):
        result = tc.run(["ip", "netns", "exec", self.name, *cmd], timeout_s)
        if check:
            assert result.returncode == 0, tc.output_of(result)
        return result

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)

    def dropped(self, rule: str | None = None) -> int:
        """Datagrams dropped by every rule, or by the one named."""
        text = self.exec(["nft", "list", "ruleset"], 20).stdout
        return sum(int(line.split("counter packets")[1].split()[0])
                   for line in text.splitlines() if "counter packets" in line
                   and (rule is None or f'comment "{rule}"' in line))

    def __exit__(self, *exc) -> None:
        tc.run(["ip", "netns", "del", self.name], 20)


def _start_in_namespace(ns: LossyNamespace, folder: Path, root: Path, retries: int = 10):
    values = tc.daemon_config(folder, root, Timeout=1, Retries=retries, LogLevel="INFO")
    config = tc.write_config(folder / "tftpd.conf", values)
    daemon = tc.DaemonProcess("tftpd", config, values["StatusSocket"], Path(values["LogFile"]))
    env = dict(os.environ, PYTHONPATH=str(tc.REPO))
    daemon.proc = ns.popen([sys.executable, "-m", "tftpd", "--foreground", "--config",
                            str(config)], cwd=str(tc.REPO), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tc.wait_until(lambda: _answers(daemon), 15, what="the daemon in the namespace")
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _atftp_get_intact(ns: LossyNamespace, port: int, served: Path, digest: str,
                      options: dict, timeout_s: float) -> None:
    """atftp (1 s timeout) in the namespace fetches `served`; it must succeed, byte for byte."""
    out = served.parent.parent / (served.name + ".out")
    result = ns.exec(tc.atftp_cmd(port, "-g", served.name, out, options,
                                  ["--tftp-timeout", "1"]), timeout_s)
    assert result.returncode == 0, tc.output_of(result)[-2000:]
    assert tc.sha256(out) == digest


def _answers(daemon) -> bool:
    try:
        return bool(daemon.status().get("ok"))
    except (OSError, ValueError):
        assert daemon.proc.poll() is None, "the daemon in the namespace exited"
        return False


def _loss_rules(final_block: int) -> dict[str, str]:
    """5% of DATA and of ACK n > 0; the ACK of the final block has a rule of its own, so a test
    knows whether the server could have seen the end of the transfer."""
    final = final_block % 65536
    return {
        "data": "udp length > 100 @th,64,16 3 numgen random mod 100 < 5",
        "ack": f"udp length 12 @th,64,16 4 @th,80,16 != {{ 0, {final} }} "
               "numgen random mod 100 < 5",
        "final-ack": f"udp length 12 @th,64,16 4 @th,80,16 {final} numgen random mod 100 < 5",
    }


LOSSY_DOWNLOADS = {     # options, file size (about 160 and 290 droppable datagrams)
    "blksize65464": ({"blksize": 65464}, 5 * 1024 * 1024),
    "blksize8192-window8": ({"blksize": 8192, "windowsize": 8}, 2 * 1024 * 1024),
}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs root, ip, nft and atftp")
@pytest.mark.parametrize("options", sorted(LOSSY_DOWNLOADS))
def test_download_survives_5_percent_loss(tmp_path, options):
    """5% of the DATA and ACK datagrams dropped on arrival (the sender sees no error, as on a real
    wire). The request, the OACK and ACK 0 are spared: atftp gives up ('unexpected OACK') when
    the daemon's OACK retransmission answers its own retried RRQ, a client weakness.

    When the final ACK is the one dropped, atftp has already exited with the whole file, so the
    daemon cannot tell whether it arrived: that transfer must count as unconfirmed, never as
    completed or failed."""
    root = tmp_path / "root"
    (root / "upload").mkdir(parents=True)
    opts, size = LOSSY_DOWNLOADS[options]
    digest = tc.make_file(root / "five.bin", size)
    final_block = size // opts["blksize"] + 1
    with LossyNamespace("input", _loss_rules(final_block)) as ns:
        daemon = _start_in_namespace(ns, tmp_path, root)
        try:
            _atftp_get_intact(ns, daemon.port, root / "five.bin", digest, opts, 150)
            dropped = ns.dropped()
            assert dropped > 0, "nothing was dropped: the loss rule did not work"
            counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
            assert counters["blocks_resent"] > 0
            assert counters["transfers_failed"] == 0, counters
            if ns.dropped("final-ack"):
                # atftp may still re-ACK the repeated last block if it has not exited yet
                assert counters["transfers_completed"] + counters["transfers_unconfirmed"] == 1
            else:
                assert counters["transfers_completed"] == 1, counters
        finally:
            daemon.stop()


@pytest.mark.root
@pytest.mark.skipif(not _netns_available(), reason="needs root, ip, nft and atftp")
@pytest.mark.parametrize("options", [{}, {"blksize": 1024, "windowsize": 4}])
def test_a_lost_final_ack_counts_as_unconfirmed(tmp_path, options):
    """Every final ACK dropped: the client has the file and has exited; the daemon resends the
    last block, gives up, and says it cannot know rather than calling it completed or failed."""
    root = tmp_path / "root"
    (root / "upload").mkdir(parents=True)
    size = 10 * 1024 + 100
    digest = tc.make_file(root / "last.bin", size)
    final = size // options.get("blksize", 512) + 1
    rule = f"udp length 12 @th,64,16 4 @th,80,16 {final}"
    with LossyNamespace("input", {"final-ack": rule}) as ns:
        daemon = _start_in_namespace(ns, tmp_path, root, retries=2)
        try:
            _atftp_get_intact(ns, daemon.port, root / "last.bin", digest, options, 60)
            counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0, 30)
            assert ns.dropped("final-ack") >= 1
            assert (counters["transfers_unconfirmed"], counters["transfers_completed"],
                    counters["transfers_failed"]) == (1, 0, 0), counters
            assert counters["errors"].get("unconfirmed") is None, counters
            assert "its final ACK never came" in daemon.log_file.read_text()
        finally:
            daemon.stop()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs root, ip, nft and atftp")
def test_download_survives_local_send_errors(tmp_path):
    """5% of the daemon's DATA datagrams refused on the way out (send() fails with EPERM)."""
    root = tmp_path / "root"
    (root / "upload").mkdir(parents=True)
    digest = tc.make_file(root / "five.bin", 1024 * 1024)
    rule = "udp length > 1000 numgen random mod 100 < 5"   # only DATA, never the client's ACKs
    with LossyNamespace("output", {"data-out": rule}) as ns:
        daemon = _start_in_namespace(ns, tmp_path, root)
        try:
            out = tmp_path / "five.out"
            result = ns.exec(tc.atftp_cmd(daemon.port, "-g", "five.bin", out,
                                          {"blksize": 4096}, ["--tftp-timeout", "1"]), 150)
            if ns.dropped() == 0:     # 256 DATA packets at 5%: about one run in 500,000
                pytest.skip("the rule dropped nothing this time")
            assert result.returncode == 0, tc.output_of(result)[-2000:]
            assert tc.sha256(out) == digest
        finally:
            daemon.stop()
