"""The multicast protocol's round trips and timers (docs/multicast-protocol.md, "Round trips
and timers"): pure arithmetic both the sender (imgsrvd) and the receivers (img) use. No clock:
callers pass times and samples in seconds (floats of a monotonic clock) and get seconds back.

Every timer comes from measured round trips, so a silent receiver is declared lost within
seconds and a fast LAN is not slowed by timers made for the Internet:

    RttEstimator        SRTT and RTTVAR of one peer, RFC 6298 section 2 (alpha 1/8, beta 1/4),
                        and its RTO kept within [5 ms, 1 s]
    group_rtt_s         GRTT: the largest SRTT among the receivers (NORM, RFC 5740), 10 ms
                        before any sample
    probe_interval_s    P = clamp(4 GRTT, 250 ms, 1 s)
    receiver_lost_after_s, sender_lost_after_s   the silence after which a peer is lost
    status_delay_max_s  how long a receiver may hold a PROBE before its STATUS
    JoinBackoff         JOIN retransmission: 250 ms, doubled up to 2 s (RFC 8085 section
                        3.1.3), given up after 30 s
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_GRTT_S = 0.010           # before any sample
RTO_MIN_S = 0.005                # RFC 6298's 1 s floor is for the Internet; a LAN would wait
RTO_MAX_S = 1.0
RTO_VARIANCE_FLOOR_S = 0.001     # RFC 6298's G (clock granularity) term: max(G, 4 RTTVAR)
PROBE_MIN_S = 0.25
PROBE_MAX_S = 1.0
PROBE_BEFORE_FIRST_S = 1.0       # a receiver's P before its first PROBE
LOST_FLOOR_S = 2.0
STATUS_DELAY_CAP_S = 0.050
ANNOUNCE_INTERVAL_S = 1.0
START_REPEATS = 3                # START, and FINISH final, three times a probe interval apart
LEAVE_REPEATS = 3
LEAVE_SPACING_S = 0.050
JOIN_FIRST_RETRY_S = 0.25
JOIN_MAX_INTERVAL_S = 2.0
JOIN_GIVE_UP_S = 30.0


class RttEstimator:
    """One peer's smoothed round trip, RFC 6298 section 2.

    The first sample R sets SRTT = R and RTTVAR = R/2; each later one RTTVAR = 3/4 RTTVAR +
    1/4 |SRTT - R|, then SRTT = 7/8 SRTT + 1/8 R (the variance first, with the old SRTT, as
    section 2.3 orders it). Negative samples (a receiver that reports a hold longer than the
    round trip, or a clock step) are taken as 0: a round trip is never negative."""

    __slots__ = ("srtt_s", "rttvar_s", "samples")

    def __init__(self) -> None:
        self.srtt_s: float | None = None
        self.rttvar_s: float | None = None
        self.samples = 0

    def update(self, sample_s: float) -> None:
        r = max(0.0, sample_s)
        if self.srtt_s is None or self.rttvar_s is None:
            self.srtt_s, self.rttvar_s = r, r / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - r)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * r
        self.samples += 1

    @property
    def rto_s(self) -> float:
        """SRTT + max(1 ms, 4 RTTVAR) within [5 ms, 1 s]; 1 s before the first sample (RFC
        6298 section 2.1's initial RTO would be 1 s as well)."""
        if self.srtt_s is None or self.rttvar_s is None:
            return RTO_MAX_S
        rto = self.srtt_s + max(RTO_VARIANCE_FLOOR_S, 4 * self.rttvar_s)
        return min(RTO_MAX_S, max(RTO_MIN_S, rto))


def group_rtt_s(srtts_s: list[float | None] | tuple[float | None, ...]) -> float:
    """GRTT: the largest SRTT among the admitted receivers (NORM's choice, RFC 5740: the sender
    waits long enough for its farthest receiver); DEFAULT_GRTT_S (10 ms) before any sample."""
    known = [s for s in srtts_s if s is not None]
    return max(known) if known else DEFAULT_GRTT_S


def probe_interval_s(grtt_s: float) -> float:
    """P = clamp(4 x GRTT, 250 ms, 1 s): often enough to measure and to notice silence, rare
    enough that a large group's STATUS answers cost little."""
    return min(PROBE_MAX_S, max(PROBE_MIN_S, 4 * grtt_s))


def receiver_lost_after_s(probe_s: float, rto_s: float) -> float:
    """A receiver silent this long is lost: max(2 s, 3 P + RTO_r), at most 4 s."""
    return max(LOST_FLOOR_S, 3 * probe_s + rto_s)


def sender_lost_after_s(probe_s: float | None, grtt_s: float | None) -> float:
    """At a receiver: the sender is lost after max(2 s, 3 P + 2 GRTT) without a packet of the
    session (P and GRTT from the newest PROBE; 1 s and 10 ms before the first)."""
    p = PROBE_BEFORE_FIRST_S if probe_s is None else probe_s
    g = DEFAULT_GRTT_S if grtt_s is None else grtt_s
    return max(LOST_FLOOR_S, 3 * p + 2 * g)


def status_delay_max_s(probe_s: float) -> float:
    """A receiver answers a PROBE after a random delay in [0, min(P/4, 50 ms)], so the answers
    of a large group spread out (it reports the delay, which the sender takes off)."""
    return min(probe_s / 4, STATUS_DELAY_CAP_S)


def nak_holdoff_max_s(grtt_s: float) -> float:
    """A hole is NAKed after a hold-off uniform in [0, GRTT] (docs: "Data and repair")."""
    return max(0.0, grtt_s)


def rtt_sample_s(now_s: float, echo_sent_s: float, echo_delay_s: float = 0.0) -> float:
    """R = now - echo_sent_at - echo_delay (the sender, from a STATUS; a receiver from a
    JOIN_ACK with no delay), never negative."""
    return max(0.0, now_s - echo_sent_s - echo_delay_s)


@dataclass(frozen=True)
class JoinBackoff:
    """JOIN retransmission: the first retry after 250 ms, then the interval doubled up to 2 s
    (exponential back-off, RFC 8085 section 3.1.3), until an answer or 30 s without one."""

    first_s: float = JOIN_FIRST_RETRY_S
    max_interval_s: float = JOIN_MAX_INTERVAL_S
    give_up_s: float = JOIN_GIVE_UP_S

    def interval_s(self, attempt: int) -> float:
        """The wait after attempt number `attempt` (0 is the first JOIN)."""
        return min(self.max_interval_s, self.first_s * (2 ** min(attempt, 16)))

    def schedule_s(self) -> tuple[float, ...]:
        """When each attempt goes out, from the first (0.0) until giving up."""
        times, at, attempt = [], 0.0, 0
        while at < self.give_up_s:
            times.append(at)
            at += self.interval_s(attempt)
            attempt += 1
        return tuple(times)
