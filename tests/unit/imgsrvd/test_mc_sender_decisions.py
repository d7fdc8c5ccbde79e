"""imgsrvd.multicast's pure parts: the token bucket, the rate's adaptation to loss, the start
triggers, the JOIN refusals made before admission, the verdicts on slow or lossy receivers,
and the repair queue (docs/multicast-protocol.md), as tables."""

from __future__ import annotations

import pytest

from common.imaging.mcranges import PassOrder
from common.imaging.multicast import NO_IMAGE, Refusal
from imgsrvd.multicast.decide import (ReceiverWindow, join_refusal, median, receiver_verdict,
                                      start_in_s, start_reason)
from imgsrvd.multicast.pacing import (IntervalLoss, LossHistory, RateLimits, TokenBucket,
                                      rate_decision)
from imgsrvd.multicast.repair import RepairQueue

DIGEST = bytes(range(1, 17))


# -- pacing ---------------------------------------------------------------------------------------

def test_token_bucket_paces_to_its_rate():
    bucket = TokenBucket(rate_bytes_s=1_000_000, burst_bytes=100_000, now_s=0.0)
    sent, now = 0, 0.0
    while now < 2.0:                       # a sender that sends whenever it may
        wait = bucket.wait_s(64_000, now)
        if wait:
            now += wait
            continue
        bucket.take(64_000, now)
        sent += 64_000
    assert 1_900_000 <= sent <= 2_200_000  # 2 s at 1 MB/s, plus the burst


@pytest.mark.parametrize("tokens_after, size, wait", [
    (100_000, 64_000, 0.0),                # full: goes now
    (0, 64_000, 0.064),                    # empty: the time to earn it
    (-50_000, 64_000, 0.114),              # in debt after a large send
    (0, 500_000, 0.1),                     # larger than the burst: waits for a full bucket
])
def test_token_bucket_waits(tokens_after, size, wait):
    bucket = TokenBucket(1_000_000, 100_000, 0.0)
    bucket.take(100_000 - tokens_after, 0.0)
    assert bucket.wait_s(size, 0.0) == pytest.approx(wait)


@pytest.mark.parametrize("max_kbit, min_receiver, limits", [
    (0, 0, RateLimits(100_000, 1_000, 10_000_000)),         # adapt from 100 Mbit/s
    (50_000, 0, RateLimits(50_000, 1_000, 50_000)),         # MaxBitrate is start and ceiling
    (0, 20_000, RateLimits(100_000, 20_000, 10_000_000)),   # never below the receivers' min
    (500, 0, RateLimits(500, 500, 500)),                    # a tiny MaxBitrate wins
])
def test_rate_limits(max_kbit, min_receiver, limits):
    assert RateLimits.from_settings(max_kbit, min_receiver) == limits


LIMITS = RateLimits(100_000, 1_000, 400_000)


@pytest.mark.parametrize("losses, share, excluded, rate", [
    ({}, 1.0, (), 112_500),                                      # nobody: grows by 1/8
    ({1: IntervalLoss(0.0, 0.0, 5000)}, 1.0, (), 112_500),
    ({1: IntervalLoss(0.10, 0.0, 5000)}, 1.0, (), 75_000),       # congestion: falls by 1/4
    ({1: IntervalLoss(0.05, 0.045, 5000)}, 1.0, (), 112_500),    # a lossy link, always 5 %
    ({1: IntervalLoss(0.09, 0.05, 5000)}, 1.0, (), 75_000),      # ... and more: congestion
    ({1: IntervalLoss(0.09, 0.05, 200)}, 1.0, (), 112_500),      # ... within chance
    ({1: IntervalLoss(0.0, 0.0, 5000), 2: IntervalLoss(0.3, 0.0, 5000)}, 1.0, (2,),
     112_500),                                                   # excluded: to be dropped
    ({1: IntervalLoss(None, 0.0)}, 1.0, (), 112_500),            # too few packets to say
    ({1: IntervalLoss(0.0, 0.0, 5000)}, 0.5, (), 100_000),       # the sender was the limit
    ({1: IntervalLoss(0.9, 0.0, 5000)}, 1.0, (), 10_000),      # ... to what it took
])
def test_rate_decision(losses, share, excluded, rate):
    new, slow_start, why = rate_decision(100_000, losses, share, LIMITS, frozenset(excluded))
    assert new == pytest.approx(rate, rel=0.02), why
    assert why and not slow_start


@pytest.mark.parametrize("losses, share, rate, slow_start", [
    ({1: IntervalLoss(0.0, 0.0, 5000)}, 1.0, 150_000, True),     # grows by half
    ({1: IntervalLoss(0.10, 0.0, 5000)}, 1.0, 75_000, False),    # until the first congestion
    ({1: IntervalLoss(0.0, 0.0, 5000)}, 0.5, 100_000, True),     # held, still slow start
])
def test_slow_start(losses, share, rate, slow_start):
    assert rate_decision(100_000, losses, share, LIMITS, slow_start=True)[:2] == \
        (rate, slow_start)


def test_slow_start_ends_when_round_trips_grow():
    assert rate_decision(100_000, {}, 1.0, LIMITS, slow_start=True,
                         queues_s={1: 0.03})[:2] == (100_000, False)
    assert rate_decision(100_000, {}, 1.0, LIMITS, slow_start=True,
                         queues_s={1: 0.01})[:2] == (150_000, True)


@pytest.mark.parametrize("queues, rate", [
    ({1: 0.02}, 112_500),                 # a little queueing: fine
    ({1: 0.3}, 75_000),                   # a receiver 300 ms behind: congestion
    ({2: 0.3}, 112_500),                  # ... unless it is about to be dropped
])
def test_rate_decision_on_delay(queues, rate):
    assert rate_decision(100_000, {}, 1.0, LIMITS, frozenset({2}), queues_s=queues)[0] == rate


def test_rate_decision_stays_within_the_limits():
    assert rate_decision(1_100, {1: IntervalLoss(0.2, 0.0, 5000)}, 1.0, LIMITS)[0] == 1_000
    assert rate_decision(390_000, {}, 1.0, LIMITS)[0] == 400_000
    assert rate_decision(400_000, {}, 1.0, LIMITS) == (400_000, False,
                                                       "at the ceiling, 400000 kbit/s")


def test_loss_history_baseline_is_the_median_of_recent_losses():
    history = LossHistory(intervals=3)
    assert history.record(1, 10, 90) == IntervalLoss(0.1, 0.0, 100)   # no history: 0
    assert history.record(1, 5, 95) == IntervalLoss(0.05, 0.1, 100)
    assert history.record(1, 1, 9) == IntervalLoss(None, pytest.approx(0.075), 10)  # too few
    history.record(1, 20, 80)                     # history 0.1, 0.05, 0.2
    assert history.record(1, 0, 100).baseline == pytest.approx(0.1)
    assert history.record(1, 0, 100).baseline == pytest.approx(0.05)  # 0.05, 0.2, 0.0
    history.forget(1)
    assert history.record(1, 0, 100) == IntervalLoss(0.0, 0.0, 100)


def test_a_random_five_percent_loss_does_not_drive_the_rate_down():
    """A receiver that loses 5 % of the packets whatever the rate, over 200 intervals: the
    rate still climbs to the ceiling (binomial noise stays within the allowance)."""
    import random
    rng = random.Random(5)
    history, rate, slow = LossHistory(), 100_000, True
    for _ in range(200):
        packets = rate * 125 // 4 // 1400                  # a 250 ms interval's packets
        lost = sum(rng.random() < 0.05 for _ in range(packets))
        interval = history.record(1, lost, packets - lost)
        rate, slow, _why = rate_decision(rate, {1: interval}, 1.0, LIMITS, slow_start=slow)
    assert rate == LIMITS.ceiling_kbit_s


# -- decisions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("participants, clients, after, last_join, now, operator, reason", [
    (0, 3, None, None, 0.0, False, ""),
    (2, 3, None, 1.0, 9.0, False, ""),
    (3, 3, None, 1.0, 1.0, False, "3 of 3 receivers joined"),
    (1, 0, 60.0, 10.0, 69.9, False, ""),
    (1, 0, 60.0, 10.0, 70.0, False, "60 s after the last join"),
    (0, 0, 60.0, 10.0, 99.0, False, ""),                    # everyone left: no timer
    (0, 5, 60.0, None, 99.0, True, "started by an operator"),
    (0, 0, None, None, 99.0, False, ""),                    # only an operator starts it
])
def test_start_reason(participants, clients, after, last_join, now, operator, reason):
    assert start_reason(participants, clients, after, last_join, now, operator) == reason


@pytest.mark.parametrize("after, last_join, participants, now, left", [
    (None, 1.0, 1, 2.0, None), (60.0, None, 0, 2.0, None), (60.0, 1.0, 1, 2.0, 59.0),
    (60.0, 1.0, 1, 99.0, 0.0), (60.0, 1.0, 0, 2.0, None),
])
def test_start_in(after, last_join, participants, now, left):
    assert start_in_s(after, last_join, participants, now) == left


@pytest.mark.parametrize("waiting, participants, digest, refusal", [
    (True, 0, NO_IMAGE, None),
    (True, 0, DIGEST, None),
    (False, 0, NO_IMAGE, (Refusal.STARTED, "imaging began 40 s ago: wait for the next session")),
    (True, 0, bytes(15) + b"\x01", (Refusal.WRONG_IMAGE,
                                    "the session sends another image than the one asked for")),
    (True, 8, NO_IMAGE, (Refusal.FULL, "the session has its 8 receivers")),
])
def test_join_refusal(waiting, participants, digest, refusal):
    assert join_refusal(waiting, 40.2, participants, 8, digest, DIGEST) == refusal


def window(duration=5.0, received=1000, lost=0, gained=10_000_000, missing=100_000_000,
           sent=10_000_000) -> ReceiverWindow:
    return ReceiverWindow(duration, received, lost, gained, missing, sent)


@pytest.mark.parametrize("w, group_loss, max_loss, min_rate, drops", [
    (window(), 0.0, 0.2, 1_000, ""),
    (window(duration=3.0, lost=900), 0.0, 0.2, 0, ""),               # not judged yet
    (window(lost=500), 0.0, 0.2, 0, "lost 33% of the packets over 5 s, more than the 20% "
                                    "allowed"),
    (window(lost=500), 0.3, 0.2, 0, ""),               # the whole group loses: the rate's job
    (window(received=100, lost=60), 0.0, 0.2, 0, ""),  # too few packets to judge
    (window(lost=500), 0.0, 1.0, 0, ""),               # 1.0: never for loss
    (window(gained=500_000), 0.0, 1.0, 1_000,
     "received 800 kbit/s over 5 s, less than the 1000 kbit/s required"),
    (window(gained=500_000, missing=1_000_000), 0.0, 1.0, 1_000, ""),   # almost done
    (window(gained=500_000, sent=1_000_000), 0.0, 1.0, 1_000, ""),      # little was sent
    (window(gained=0), 0.0, 1.0, 0, ""),                                # 0: no minimum
])
def test_receiver_verdict(w, group_loss, max_loss, min_rate, drops):
    assert receiver_verdict(w, group_loss, max_loss, min_rate) == drops


def test_median():
    assert median([]) == 0.0 and median([3.0]) == 3.0 and median([4.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5


# -- the repair queue ----------------------------------------------------------------------------

ORDER = PassOrder(image_bytes=10_000, header_bytes=100, index_offset=9_000)


def test_repairs_go_in_send_order_after_merging():
    queue = RepairQueue(ORDER)
    assert queue.nak([(5_000, 6_000), (50, 80)], 10_000, 0.0, 0.01) == 1_030
    assert queue.nak([(5_500, 6_500), (9_500, 9_600)], 10_000, 0.0, 0.01) == 600
    assert queue.pending_bytes == 1_630
    runs = []
    while (run := queue.next_run(700)) is not None:
        runs.append(run)
    # header first, then the index, then the chunks; merged NAKs, cut at 700 bytes
    assert runs == [(50, 30), (9_500, 100), (5_000, 700), (5_700, 700), (6_400, 100)]


def test_what_the_pass_has_not_reached_is_not_queued():
    queue = RepairQueue(ORDER)
    # pass position 1_100: the header [0, 100), the tail [9_000, 10_000), chunks up to 100
    assert queue.nak([(0, 10_000)], 1_100, 0.0, 0.01) == 100 + 1_000
    assert list(queue._pending) == [(0, 100), (9_000, 10_000)]


def test_a_range_repaired_within_a_grtt_is_not_queued_again():
    queue = RepairQueue(ORDER)
    queue.nak([(1_000, 2_000)], 10_000, 0.0, 0.01)
    assert queue.next_run(5_000) == (1_000, 1_000)
    queue.repaired(1_000, 1_000, now_s=1.0)
    assert queue.nak([(1_500, 2_500)], 10_000, 1.005, 0.01) == 500      # the NAK crossed it
    assert queue.suppressed_bytes == 500
    assert queue.nak([(1_000, 1_500)], 10_000, 1.02, 0.01) == 500       # a GRTT later: again


def test_the_queue_is_bounded():
    queue = RepairQueue(ORDER, max_ranges=3)
    queue.nak([(1_000, 1_010), (2_000, 2_010), (3_000, 3_010)], 10_000, 0.0, 0.01)
    assert queue.nak([(4_000, 4_010), (3_005, 3_020)], 10_000, 0.0, 0.01) == 10
    assert queue.dropped_ranges == 1 and len(queue._pending) == 3


def test_a_receivers_first_interval_only_sets_its_baseline():
    """A link that always loses 5 %: its first interval (no baseline yet) neither ends slow
    start nor cuts the rate; loss above the baseline after it still does."""
    history = LossHistory()
    first = history.record(1, 500, 9500)
    assert first == IntervalLoss(0.05, 0.0, 10000) and first.prior == 0
    assert rate_decision(100_000, {1: first}, 1.0, LIMITS, slow_start=True)[:2] == \
        (150_000, True)
    second = history.record(1, 500, 9500)
    assert second.prior == 1 and second.baseline == pytest.approx(0.05)
    assert rate_decision(150_000, {1: second}, 1.0, LIMITS, slow_start=True)[:2] == \
        (225_000, True)
    worse = history.record(1, 2000, 8000)                  # 20 %: the rate's doing
    assert rate_decision(225_000, {1: worse}, 1.0, LIMITS, slow_start=True)[:2] == \
        (int(225_000 * 0.75), False)
    # an IntervalLoss made without a history (prior None) is judged as before
    assert rate_decision(100_000, {1: IntervalLoss(0.10, 0.0, 5000)}, 1.0, LIMITS,
                         slow_start=True)[:2] == (75_000, False)


def test_repairs_of_single_lost_packets_go_out_together():
    """Holes of whole packets are joined into one UDP_SEGMENT send (up to a run's worth of
    packets), in send order; a range whose last packet is short ends the send; the packets
    are exactly the ranges' bytes, numbered on from the session's sequence."""
    import types
    from common.imaging import multicast as mc
    from imgsrvd.multicast.engine import RUN_PACKETS, MulticastEngine
    p = mc.MAX_DATA_BYTES
    order = PassOrder(10_000_000, 100, 9_000_000)
    queue = RepairQueue(order)
    holes = [(100 + k * 3 * p, 100 + k * 3 * p + p) for k in range(60)]     # every 3rd packet
    queue.nak(holes + [(8_000_000, 8_000_010)], order.image_bytes, 0.0, 0.0)
    session = types.SimpleNamespace(repair=queue)
    first = MulticastEngine._repair_ranges(session)
    assert first == [(a, b - a) for a, b in holes[:RUN_PACKETS]]
    second = MulticastEngine._repair_ranges(session)
    assert second == [(a, b - a) for a, b in holes[RUN_PACKETS:]] + [(8_000_000, 10)]
    assert MulticastEngine._repair_ranges(session) == []

    image = types.SimpleNamespace(digest=bytes(range(1, 17)),
                                  read=lambda offset, length: bytes([offset % 251]) * length)
    session = types.SimpleNamespace(id=5, image=image, sequence=2**32 - 2)
    buffer, count, segment = MulticastEngine._encode(session, second, True)
    assert count == len(second) and segment == mc.MAX_DATAGRAM
    packets = [mc.decode(buffer[n * segment:(n + 1) * segment]) for n in range(count)]
    assert [(d.offset, len(d.payload)) for d in packets] == second
    assert [d.sequence for d in packets] == [(2**32 - 2 + n) % 2**32 for n in range(count)]
    assert all(d.repair and d.payload == bytes([d.offset % 251]) * len(d.payload)
               for d in packets)


def test_a_join_while_its_session_is_being_opened_waits_for_the_next_attempt():
    """open_session() reserves the name, then reads the image; a JOIN in between (a receiver
    that started before the sender) is not refused (a refusal is final), only left for its
    retransmission; a name nobody is opening is refused as before."""
    from common.imaging import multicast as mc
    from imgsrvd.multicast.engine import MulticastEngine
    from imgsrvd.multicast.model import EngineSettings
    from common.imaging.multicast import SessionState
    settings = EngineSettings(
        control_address="127.0.0.1", control_port=9, interface_address="127.0.0.1", ttl=1,
        max_bitrate_kbit_s=0, min_receiver_rate_kbit_s=0, max_receiver_loss=0.5,
        finish_timeout_s=5.0, max_sessions=1, max_receivers=2)
    engine = MulticastEngine(settings, lambda request: None, lambda event: None)
    sent = []
    engine._to_receiver = lambda receiver, address, message: sent.append(message)
    join = mc.Join(session_id=0, receiver_id=7, sequence=0, sent_at_us=1, session_name="lab",
                   mac="", token="")
    engine._names["lab"] = SessionState.WAITING              # reserved: being opened
    engine._join(join, ("10.0.0.2", 4000), 0.0)
    assert sent == [] and engine.counters["joins before the session opened"] == 1
    del engine._names["lab"]
    engine._join(join, ("10.0.0.2", 4000), 0.0)
    assert len(sent) == 1 and sent[0].reason == Refusal.UNKNOWN_SESSION
