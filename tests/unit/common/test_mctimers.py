"""common.imaging.mctimers: the round-trip estimator and the timers of
docs/multicast-protocol.md ("Round trips and timers"), as tables."""

from __future__ import annotations

import pytest

from common.imaging import mctimers as t


def test_first_sample_sets_srtt_and_half_of_it_as_variance():
    rtt = t.RttEstimator()
    assert rtt.srtt_s is None and rtt.rto_s == 1.0          # before any sample: 1 s
    rtt.update(0.008)
    assert rtt.srtt_s == pytest.approx(0.008)
    assert rtt.rttvar_s == pytest.approx(0.004)
    assert rtt.rto_s == pytest.approx(0.008 + 4 * 0.004)


def test_later_samples_smooth_as_rfc6298_section_2_3():
    rtt = t.RttEstimator()
    rtt.update(0.010)
    rtt.update(0.018)
    # RTTVAR first, with the old SRTT: 3/4 * 5 ms + 1/4 * |10 - 18| ms = 5.75 ms
    assert rtt.rttvar_s == pytest.approx(0.00575)
    assert rtt.srtt_s == pytest.approx(0.875 * 0.010 + 0.125 * 0.018)
    assert rtt.samples == 2


@pytest.mark.parametrize("samples, rto", [
    ([0.0001], 0.005),                 # a LAN: the 5 ms floor, not RFC 6298's 1 s
    ([0.0], 0.005),
    ([-0.003], 0.005),                 # negative samples count as 0
    ([2.0], 1.0),                      # a 1 s ceiling
    ([0.010] * 50, 0.011),             # steady: SRTT + the 1 ms floor of the variance term
])
def test_rto_bounds(samples, rto):
    rtt = t.RttEstimator()
    for sample in samples:
        rtt.update(sample)
    assert rtt.rto_s == pytest.approx(rto, rel=0.02)


@pytest.mark.parametrize("srtts, grtt", [
    ([], 0.010),
    ([None, None], 0.010),
    ([0.002, None, 0.030, 0.001], 0.030),
])
def test_group_rtt_is_the_largest_srtt(srtts, grtt):
    assert t.group_rtt_s(srtts) == grtt


@pytest.mark.parametrize("grtt, probe", [
    (0.0001, 0.25), (0.010, 0.25), (0.0625, 0.25), (0.1, 0.4), (0.25, 1.0), (3.0, 1.0),
])
def test_probe_interval(grtt, probe):
    assert t.probe_interval_s(grtt) == pytest.approx(probe)


@pytest.mark.parametrize("probe, rto, lost", [
    (0.25, 0.005, 2.0),                # a LAN: the 2 s floor
    (0.5, 0.1, 2.0),                   # 1.6 s -> 2 s
    (1.0, 1.0, 4.0),                   # the most it can be: 4 s
])
def test_receiver_lost_after(probe, rto, lost):
    assert t.receiver_lost_after_s(probe, rto) == pytest.approx(lost)


@pytest.mark.parametrize("probe, grtt, lost", [
    (None, None, 3.02),                # before the first PROBE: P 1 s, GRTT 10 ms
    (0.25, 0.001, 2.0),
    (1.0, 0.5, 4.0),
])
def test_sender_lost_after(probe, grtt, lost):
    assert t.sender_lost_after_s(probe, grtt) == pytest.approx(lost)


@pytest.mark.parametrize("probe, delay", [(0.25, 0.05), (0.1, 0.025), (1.0, 0.05)])
def test_status_delay_bound(probe, delay):
    assert t.status_delay_max_s(probe) == pytest.approx(delay)


def test_rtt_sample_takes_the_hold_off():
    assert t.rtt_sample_s(10.0, 9.99, 0.004) == pytest.approx(0.006)
    assert t.rtt_sample_s(10.0, 9.99, 0.5) == 0.0


def test_join_backoff_doubles_to_two_seconds_and_gives_up_after_thirty():
    backoff = t.JoinBackoff()
    assert [backoff.interval_s(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    schedule = backoff.schedule_s()
    assert schedule[:5] == (0.0, 0.25, 0.75, 1.75, 3.75)
    assert schedule[-1] < 30.0 <= schedule[-1] + 2.0
    assert len(schedule) == 18           # 4 before the 2 s interval, then every 2 s to 30 s
    assert backoff.interval_s(10_000) == 2.0
