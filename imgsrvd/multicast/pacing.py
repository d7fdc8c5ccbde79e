"""How fast a multicast session sends (docs/multicast-protocol.md, "Paced sending and
MaxBitrate"): a token bucket that paces the packets, and the rate's adaptation to the loss the
receivers report. Pure: times are arguments, nothing here sleeps or sends.

The adaptation is AIMD (as TCP's, RFC 5681 section 3.1, in spirit): each probe interval the
rate grows by 1/8 when no receiver shows congestion and the sender actually sent at its rate,
and falls by 1/4 when one does (or to the share of it the worst receiver took, when it lost
more); until the first congestion, or until round trips start to grow, it grows by half instead
(slow start), so a short session on a fast LAN is not over before the rate found the link.

Congestion is loss clearly above what the receiver always has. A receiver's baseline is the
median of its last BASELINE_INTERVALS interval losses, and an interval counts as congested
only when its loss exceeds the baseline by CONGESTION_EXCESS plus three standard deviations of
a binomial count at the baseline's rate: a lossy link that drops 5 % whatever the rate
(rate-independent loss) does not drive the rate to the floor, while loss that appears when the
rate rises, as a receiver's socket buffer overflows, does. Delay is a congestion signal too
(as LEDBAT's, RFC 6817): a receiver whose round trip grew QUEUE_LIMIT_S above its least one has
packets queueing somewhere (most often in its own socket buffer, behind a busy CPU), and its
repairs would come too late. Receivers about to be dropped
(lossier than EngineSettings allow while the group is not) are left out: the slow one is sent
to unicast instead of holding the group back.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_START_KBIT_S = 100_000       # MaxBitrate 0: start at 100 Mbit/s, adapt from there
UNLIMITED_CEILING_KBIT_S = 10_000_000  # MaxBitrate 0: "no limit" still needs a number
FLOOR_KBIT_S = 1_000                 # never slower than 1 Mbit/s (or the receivers' minimum)
INCREASE = 1.125                     # per probe interval without congestion
SLOW_START = 1.5                     # ... until the first congestion
DECREASE = 0.75                      # per probe interval with congestion
CONGESTION_EXCESS = 0.02             # loss this much above a receiver's baseline (+ noise)
MIN_INTERVAL_PACKETS = 32            # fewer packets in an interval say nothing about loss
BASELINE_INTERVALS = 16
APP_LIMITED = 0.8                    # sent less than this share of the rate: do not grow
QUEUE_LIMIT_S = 0.100                # a round trip this much above the least: congestion


class TokenBucket:
    """Pacing: `rate_bytes_s` bytes a second with bursts of at most `burst_bytes` (at least one
    send's worth, a GSO run of ~64 KiB). wait_s(n) says how long until n bytes may go; take(n)
    spends them. A bucket that may go negative by one send keeps the average exact when a send
    is larger than what is left."""

    __slots__ = ("rate_bytes_s", "burst_bytes", "_tokens", "_at_s")

    def __init__(self, rate_bytes_s: float, burst_bytes: int, now_s: float):
        self.rate_bytes_s = max(1.0, rate_bytes_s)
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._at_s = now_s

    def _refill(self, now_s: float) -> None:
        if now_s > self._at_s:
            self._tokens = min(self.burst_bytes,
                               self._tokens + (now_s - self._at_s) * self.rate_bytes_s)
            self._at_s = now_s

    def set_rate(self, rate_bytes_s: float, now_s: float) -> None:
        self._refill(now_s)
        self.rate_bytes_s = max(1.0, rate_bytes_s)

    def wait_s(self, size_bytes: int, now_s: float) -> float:
        """0 when `size_bytes` may be sent now, else the seconds until then."""
        self._refill(now_s)
        need = min(size_bytes, self.burst_bytes)      # a send never waits for more than full
        if self._tokens >= need - 1:      # a byte of float rounding is no reason to wait
            return 0.0
        return (need - self._tokens) / self.rate_bytes_s

    def take(self, size_bytes: int, now_s: float) -> None:
        self._refill(now_s)
        self._tokens -= size_bytes


@dataclass(frozen=True)
class RateLimits:
    """The rate's bounds, in kbit/s, from EngineSettings."""

    start_kbit_s: int
    floor_kbit_s: int
    ceiling_kbit_s: int

    @classmethod
    def from_settings(cls, max_bitrate_kbit_s: int, min_receiver_rate_kbit_s: int
                      ) -> "RateLimits":
        ceiling = max_bitrate_kbit_s or UNLIMITED_CEILING_KBIT_S
        floor = min(ceiling, max(FLOOR_KBIT_S, min_receiver_rate_kbit_s))
        start = max_bitrate_kbit_s or DEFAULT_START_KBIT_S
        return cls(max(floor, min(start, ceiling)), floor, ceiling)


@dataclass(frozen=True)
class IntervalLoss:
    """One receiver over one probe interval: its loss fraction (None: too few packets to say),
    the median loss of its last intervals, and the packets the interval counted. prior: how
    many earlier intervals the baseline rests on (LossHistory says; None: not known, taken as
    enough). A receiver's first interval (prior 0) has no baseline to be above: its loss only
    becomes the baseline, so a link that always loses 5 % does not end slow start at the first
    probe interval (it would then creep up from the start rate by 1/8 an interval)."""

    loss: float | None
    baseline: float
    packets: int = 0
    prior: int | None = field(default=None, compare=False)

    @property
    def excess(self) -> float:
        """The loss above the baseline beyond chance: 3 standard deviations of a binomial
        count of `packets` at the baseline's rate taken off."""
        if self.loss is None or not self.packets:
            return 0.0
        p = min(0.999, max(0.001, self.baseline))
        noise = 3 * math.sqrt(p * (1 - p) / self.packets)
        return self.loss - self.baseline - noise


def rate_decision(rate_kbit_s: int, losses: Mapping[int, IntervalLoss], sent_share: float,
                  limits: RateLimits, excluded: frozenset[int] = frozenset(),
                  slow_start: bool = False, queues_s: Mapping[int, float] | None = None
                  ) -> tuple[int, bool, str]:
    """The next interval's rate, whether slow start goes on, and why. losses: receiver id ->
    IntervalLoss for this interval; sent_share: what the sender sent over what the rate
    allowed in it (below APP_LIMITED the sender, not the network, was the limit, so there is no
    reason to grow, RFC 7661 in spirit); excluded: receivers about to be dropped, whose loss
    says nothing about the group's rate; queues_s: receiver id -> its newest round trip less
    its least one."""
    for receiver, queue_s in (queues_s or {}).items():
        if receiver not in excluded and queue_s > QUEUE_LIMIT_S:
            new = max(limits.floor_kbit_s, int(rate_kbit_s * DECREASE))
            return new, False, (f"receiver {receiver:#x}'s round trip is {queue_s * 1000:.0f} "
                                f"ms above its least: {rate_kbit_s} -> {new} kbit/s")
    worst_id, worst = None, 0.0
    for receiver, interval in losses.items():
        if receiver in excluded or interval.loss is None:
            continue
        if interval.prior == 0:
            continue                # the first interval: nothing to compare it with yet
        excess = interval.excess
        if excess > worst:
            worst_id, worst = receiver, excess
    if worst > CONGESTION_EXCESS:
        # by 1/4, or to what that receiver took of the rate when it lost more (an overshoot
        # in slow start is undone in one step, not in several)
        new = max(limits.floor_kbit_s, int(rate_kbit_s * min(DECREASE, 1.0 - worst)))
        return new, False, (f"receiver {worst_id:#x} lost {worst:.1%} above its baseline: "
                            f"{rate_kbit_s} -> {new} kbit/s")
    if slow_start and any(receiver not in excluded and queue_s > QUEUE_LIMIT_S / 4
                          for receiver, queue_s in (queues_s or {}).items()):
        return rate_kbit_s, False, (f"round trips grow: slow start ends at {rate_kbit_s} "
                                    "kbit/s")
    if sent_share < APP_LIMITED:
        return rate_kbit_s, slow_start, (f"sent {sent_share:.0%} of the rate: held at "
                                         f"{rate_kbit_s} kbit/s")
    factor = SLOW_START if slow_start else INCREASE
    new = min(limits.ceiling_kbit_s, max(rate_kbit_s + 1, int(rate_kbit_s * factor)))
    if new == rate_kbit_s:
        return rate_kbit_s, slow_start, f"at the ceiling, {rate_kbit_s} kbit/s"
    return new, slow_start, (f"no congestion{' (slow start)' if slow_start else ''}: "
                             f"{rate_kbit_s} -> {new} kbit/s")


class LossHistory:
    """Each receiver's interval losses, for its baseline (their median): the last
    BASELINE_INTERVALS values (a bounded deque per receiver; forget() when it leaves)."""

    def __init__(self, intervals: int = BASELINE_INTERVALS):
        self._intervals = intervals
        self._seen: dict[int, collections.deque[float]] = {}

    def record(self, receiver: int, lost: int, received: int) -> IntervalLoss:
        """This interval's packets lost and received (differences of STATUS's counters)."""
        total = lost + received
        history = self._seen.setdefault(receiver, collections.deque(maxlen=self._intervals))
        baseline = statistics.median(history) if history else 0.0
        prior = len(history)
        if total < MIN_INTERVAL_PACKETS:
            return IntervalLoss(None, baseline, total, prior)
        loss = max(0.0, min(1.0, lost / total))
        history.append(loss)
        return IntervalLoss(loss, baseline, total, prior)

    def forget(self, receiver: int) -> None:
        self._seen.pop(receiver, None)
