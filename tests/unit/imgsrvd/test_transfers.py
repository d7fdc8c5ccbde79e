"""imgsrvd.transfers: transfer slots in all and per client address (MaxClients,
MaxTransfersPerClient), a transfer's progress per window (TransferTimeout, MinTransferRate) and
its total deadline (MaxTransferTime), and the size of each watched sendfile piece. The clock is
a fake one the tests move."""

from __future__ import annotations

import time

import pytest

from imgsrvd.transfers import ProgressWatch, SlotTable, TransferStalled

MiB = 1 << 20
BASE = 16384 * 120 // 4                      # a quarter of the window's minimum
WINDOW_S = 120.0
RATE_BPS = 16384
REQUIRED = int(RATE_BPS * WINDOW_S)          # bytes each window must see
DEADLINE_S = 43200.0


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now_s: float = 5000.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def watch_on(clock: FakeClock, window_s: float = WINDOW_S, rate_bps: int = RATE_BPS,
             deadline_s: float = DEADLINE_S) -> ProgressWatch:
    return ProgressWatch(window_s, rate_bps, deadline_s, clock=clock)


# ---- slots ---------------------------------------------------------------------------------

def test_a_host_gets_slots_up_to_its_limit_then_the_reason():
    slots = SlotTable()
    for _ in range(3):
        assert slots.refusal("10.0.0.1", 64, 3) is None
        slots.take("10.0.0.1")
    reason = slots.refusal("10.0.0.1", 64, 3)
    assert reason == "busy: 3 transfers from 10.0.0.1 in progress (MaxTransfersPerClient)"
    assert slots.total == 3


def test_hosts_are_counted_apart():
    slots = SlotTable()
    for _ in range(2):
        slots.take("10.0.0.1")
    assert slots.refusal("10.0.0.1", 64, 2) is not None
    assert slots.refusal("10.0.0.2", 64, 2) is None       # another host is not held up
    slots.take("10.0.0.2")
    assert slots.total == 3 and len(slots) == 2


def test_the_limit_in_all_refuses_every_host():
    slots = SlotTable()
    for n in range(4):
        slots.take(f"10.0.0.{n}")
    reason = slots.refusal("10.0.0.99", 4, 2)
    assert reason == "busy: 4 transfers in progress (MaxClients)"
    assert slots.refusal("10.0.0.0", 4, 2) == reason     # the limit in all is said first


def test_a_slot_given_back_admits_the_next_transfer():
    slots = SlotTable()
    held = [slots.take("10.0.0.1") for _ in range(2)]
    assert slots.refusal("10.0.0.1", 64, 2) is not None
    held[0].give_back()
    assert slots.refusal("10.0.0.1", 64, 2) is None and slots.total == 1


def test_a_slot_is_given_back_when_the_transfer_fails():
    """The server's pattern: the slot is given back in a finally, whatever ended the transfer."""
    slots = SlotTable()

    def transfer() -> None:
        slot = slots.take("10.0.0.1")
        try:
            raise ConnectionResetError("the client went away")
        finally:
            slot.give_back()

    for _ in range(5):                        # more failures than the limit: none is kept
        with pytest.raises(ConnectionResetError):
            transfer()
    assert slots.total == 0 and len(slots) == 0
    assert slots.refusal("10.0.0.1", 1, 1) is None


def test_giving_a_slot_back_twice_frees_it_once():
    slots = SlotTable()
    first, second = slots.take("10.0.0.1"), slots.take("10.0.0.1")
    first.give_back()
    first.give_back()                         # an error path that gives it back again
    assert slots.total == 1
    assert slots.refusal("10.0.0.1", 64, 2) is None
    slots.take("10.0.0.1")
    assert slots.refusal("10.0.0.1", 64, 2) is not None   # the second one still counts
    second.give_back()
    second.give_back()
    assert slots.total == 1 and len(slots) == 1


def test_the_table_holds_only_hosts_with_transfers():
    slots = SlotTable()
    for n in range(10_000):                   # many hosts come and go
        slots.take(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}").give_back()
    assert len(slots) == 0 and slots.total == 0


def test_the_table_never_holds_more_hosts_than_the_limit_in_all():
    slots, held = SlotTable(), []
    for n in range(10_000):                   # each host asks once; the server asks first
        host = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        if slots.refusal(host, 64, 8) is None:
            held.append(slots.take(host))
        assert len(slots) <= 64
    assert len(slots) == 64 and slots.total == 64
    for slot in held:
        slot.give_back()
    assert len(slots) == 0


# ---- progress per window -------------------------------------------------------------------

def test_a_transfer_above_the_minimum_is_never_judged_stalled(clock):
    watch = watch_on(clock)
    for _ in range(40):                       # 40 windows, each a little more than required
        for _ in range(4):
            clock.advance(WINDOW_S / 4)
            watch.add(REQUIRED // 4 + 1)
        watch.tick()


def test_a_transfer_below_the_minimum_over_a_window_is_stalled(clock):
    watch = watch_on(clock)
    clock.advance(WINDOW_S / 2)
    watch.add(REQUIRED - 1)                   # a byte short of the window's minimum
    clock.advance(WINDOW_S / 2)
    with pytest.raises(TransferStalled, match=f"{REQUIRED - 1} bytes in 120 s, fewer than "
                       f"{REQUIRED} \\(TransferTimeout, MinTransferRate\\)"):
        watch.tick()


def test_the_first_window_has_no_grace(clock):
    watch = watch_on(clock)
    clock.advance(WINDOW_S - 0.5)
    watch.tick()                              # not over yet: not judged
    clock.advance(0.5)
    with pytest.raises(TransferStalled, match="0 bytes in 120 s"):
        watch.tick()


def test_each_window_is_judged_on_its_own(clock):
    """Plenty in one window does not carry over to a silent next one."""
    watch = watch_on(clock)
    watch.add(100 * REQUIRED)
    clock.advance(WINDOW_S)
    watch.tick()
    clock.advance(WINDOW_S)
    with pytest.raises(TransferStalled):
        watch.tick()


def test_windows_missed_while_nobody_asked_are_judged_too(clock):
    watch = watch_on(clock)
    clock.advance(WINDOW_S / 2)
    watch.add(REQUIRED)                       # the first window: enough
    clock.advance(2 * WINDOW_S)               # the second one passed in silence
    with pytest.raises(TransferStalled, match="0 bytes"):
        watch.tick()


def test_a_rate_of_zero_still_asks_for_a_byte_per_window(clock):
    watch = watch_on(clock, rate_bps=0)
    assert watch.required_bytes == 1
    clock.advance(WINDOW_S)
    with pytest.raises(TransferStalled, match="0 bytes in 120 s, fewer than 1"):
        watch.tick()
    watch = watch_on(clock, rate_bps=0)
    watch.add(1)
    clock.advance(WINDOW_S)
    watch.tick()


def test_wait_s_ends_with_the_window_or_the_deadline(clock):
    watch = watch_on(clock)
    assert watch.wait_s() == WINDOW_S
    clock.advance(30.0)
    assert watch.wait_s() == WINDOW_S - 30.0
    clock.advance(WINDOW_S)                   # past the window: judge it now
    assert watch.wait_s() == 0.0
    short = watch_on(clock, window_s=120.0, deadline_s=100.0)
    assert short.wait_s() == 100.0            # the deadline comes first


# ---- the total deadline --------------------------------------------------------------------

def test_a_transfer_past_its_deadline_is_stalled_however_fast(clock):
    watch = watch_on(clock, deadline_s=600.0)
    for _ in range(4):
        clock.advance(WINDOW_S)
        watch.add(10 * REQUIRED)
    clock.advance(600.0 - 4 * WINDOW_S - 0.5)
    watch.add(10 * REQUIRED)                  # just before the deadline: fine
    clock.advance(0.5)
    with pytest.raises(TransferStalled, match=r"not done within 600 s \(MaxTransferTime\)"):
        watch.add(10 * REQUIRED)


def test_the_deadline_is_said_before_a_slow_window(clock):
    watch = watch_on(clock, deadline_s=WINDOW_S)
    clock.advance(WINDOW_S)
    with pytest.raises(TransferStalled, match="MaxTransferTime"):
        watch.tick()


def test_stalled_is_a_connection_error():
    """The server cuts the connection of a stalled transfer like a broken one."""
    assert issubclass(TransferStalled, ConnectionError)


# ---- the size of a watched sendfile piece --------------------------------------------------

@pytest.mark.parametrize("moved, seconds, expected", [
    (BASE, 0.001, 16 * MiB),                 # a fast client: the largest pieces
    (BASE, 60.0, BASE),                      # a slow one (8 KiB/s) keeps the base piece
    (100 * 1024, 1.0, 3_072_000),            # 100 KiB/s: what a quarter window takes
    (BASE, 0.0, 16 * MiB),                   # no measurable time: as fast as it gets
])
def test_next_piece_follows_the_rate_the_client_showed(moved, seconds, expected):
    watch = ProgressWatch(120.0, 16384, 43200.0, clock=lambda: 0.0)
    assert watch.piece_bytes == BASE
    assert watch.next_piece_bytes(moved, seconds) == expected


@pytest.mark.parametrize("rate_bps, expected", [
    (0, 64 << 10),                           # never below 64 KiB
    (1 << 30, 16 * MiB),                     # never above 16 MiB
])
def test_the_base_piece_is_bounded(rate_bps, expected):
    assert ProgressWatch(120.0, rate_bps, 43200.0, clock=lambda: 0.0).piece_bytes == expected


def test_acked_bytes_counts_what_the_peer_acknowledged():
    import socket as socketlib
    from imgsrvd.transfers import AckedBytes
    server = socketlib.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socketlib.create_connection(server.getsockname(), timeout=5)
    peer, _ = server.accept()
    try:
        client.sendall(b"a" * 1000)
        got = 0
        while got < 1000:
            got += len(peer.recv(4096))
        acked = AckedBytes(client)
        client.sendall(b"b" * 50_000)
        got = 0
        while got < 50_000:
            got += len(peer.recv(65536))
        for _ in range(100):                   # the ACK may trail the data by a moment
            if acked.since_start() >= 50_000:
                break
            time.sleep(0.01)
        assert acked.since_start() == 50_000
    finally:
        for sock in (client, peer, server):
            sock.close()
    assert AckedBytes(None).since_start() == 0
