"""The multicast sender's decisions (docs/multicast-protocol.md, "A session, step by step"), as
pure functions that return their reason: when a session starts, which JOIN is refused before
the control plane is even asked, and which receiver is too slow or too lossy to keep. The
engine (engine.py) acts on them and logs the reason; tests read them as tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.imaging.multicast import NO_IMAGE, Refusal

VERDICT_WINDOW_S = 4.0           # a receiver is judged over at least this long
VERDICT_MIN_PACKETS = 200        # ... and at least this many packets sent its way


def start_reason(participants: int, start_clients: int, start_after_last_join_s: float | None,
                 last_join_s: float | None, now_s: float, operator: bool) -> str:
    """Why a waiting session starts now; "" while it waits. Triggers (any one): an operator
    (start_now), start_clients receivers admitted, start_after_last_join_s since the last
    join (a timer that runs only once someone joined)."""
    if operator:
        return "started by an operator"
    if start_clients and participants >= start_clients:
        return f"{participants} of {start_clients} receivers joined"
    if start_after_last_join_s is not None and last_join_s is not None and participants and \
            now_s >= last_join_s + start_after_last_join_s:
        return f"{start_after_last_join_s:g} s after the last join"
    return ""


def start_in_s(start_after_last_join_s: float | None, last_join_s: float | None,
               participants: int, now_s: float) -> float | None:
    """The time trigger's countdown (None: no timer runs, before the first join or without
    one), for ANNOUNCE, JOIN_ACK and the status."""
    if start_after_last_join_s is None or last_join_s is None or not participants:
        return None
    return max(0.0, last_join_s + start_after_last_join_s - now_s)


def join_refusal(waiting: bool, started_ago_s: float, participants: int, max_receivers: int,
                 join_digest: bytes, session_digest: bytes) -> tuple[Refusal, str] | None:
    """A JOIN refused before admission (no token is read for it; a refused JOIN leaves no
    state), or None when the control plane is to decide."""
    if not waiting:
        return Refusal.STARTED, (f"imaging began {started_ago_s:.0f} s ago: wait for the next "
                                 "session")
    if join_digest != NO_IMAGE and join_digest != session_digest:
        return Refusal.WRONG_IMAGE, "the session sends another image than the one asked for"
    if participants >= max_receivers:
        return Refusal.FULL, f"the session has its {max_receivers} receivers"
    return None


@dataclass(frozen=True)
class ReceiverWindow:
    """What one receiver did over the last window (differences of its STATUS counters)."""

    duration_s: float
    packets_received: int
    packets_lost: int
    bytes_gained: int            # distinct bytes of the file it got in the window
    bytes_missing: int           # what it still lacked at the window's start
    bytes_sent: int              # first-pass bytes the sender sent in the window (repairs are
                                 # mostly others' and a finishing session sends no pass)


def receiver_verdict(window: ReceiverWindow, group_median_loss: float,
                     max_receiver_loss: float, min_receiver_rate_kbit_s: int) -> str:
    """Why this receiver is dropped to unicast (ABORT too slow); "" to keep it.

    Too lossy: it lost more than max_receiver_loss over the window while the group's median
    did not (loss the whole group sees is the sending rate's, which pacing.rate_decision
    lowers). Too slow: it gained less than min_receiver_rate_kbit_s although the sender's first
    pass sent it at least twice that and it lacked at least as much (an almost done receiver
    waiting for a last repair is not slow, nor one whose pass was slowed by another's
    repairs)."""
    if window.duration_s < VERDICT_WINDOW_S:
        return ""
    total = window.packets_received + window.packets_lost
    if max_receiver_loss < 1.0 and total >= VERDICT_MIN_PACKETS:
        loss = window.packets_lost / total
        if loss > max_receiver_loss and group_median_loss <= max_receiver_loss:
            return (f"lost {loss:.0%} of the packets over {window.duration_s:.0f} s, more than "
                    f"the {max_receiver_loss:.0%} allowed")
    if min_receiver_rate_kbit_s > 0:
        got_kbit_s = window.bytes_gained * 8 / 1000 / window.duration_s
        could_kbit_s = min(window.bytes_sent, window.bytes_missing) * 8 / 1000 / \
            window.duration_s
        if got_kbit_s < min_receiver_rate_kbit_s <= could_kbit_s / 2:
            return (f"received {got_kbit_s:.0f} kbit/s over {window.duration_s:.0f} s, less "
                    f"than the {min_receiver_rate_kbit_s} kbit/s required")
    return ""


def median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
