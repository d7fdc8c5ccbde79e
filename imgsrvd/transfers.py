"""Transfer slots and progress: what keeps one host, or one slow client, from holding the
imaging server's transfers (issue 13).

SlotTable counts the transfers in progress, in all and per client address (MaxClients,
MaxTransfersPerClient); each transfer holds a Slot until it gives it back, once. ProgressWatch
enforces, on one transfer, a minimum of progress per window of TransferTimeout seconds
(MinTransferRate) and a total deadline (MaxTransferTime); the server asks it how long to wait
for the next bytes and tells it what moved. Pure: no sockets; the clock is injected for tests.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from common.daemon.tcpinfo import acked_bytes


class TransferStalled(ConnectionError):
    """A transfer too slow or past its deadline; str() says which. A ConnectionError, since
    the server then cuts the connection."""


class SlotTable:
    def __init__(self) -> None:
        self.total = 0
        self._per_client: Counter[str] = Counter()

    def __len__(self) -> int:
        """How many clients hold slots: never more than the slots taken."""
        return len(self._per_client)

    def refusal(self, client: str, max_total: int, max_per_client: int) -> str | None:
        """Why a new transfer from `client` may not start now, or None."""
        if self.total >= max_total:
            return f"busy: {max_total} transfers in progress (MaxClients)"
        if self._per_client[client] >= max_per_client:
            return (f"busy: {max_per_client} transfers from {client} in progress "
                    "(MaxTransfersPerClient)")
        return None

    def take(self, client: str) -> Slot:
        """One slot for a transfer from `client` (after refusal() said None)."""
        self.total += 1
        self._per_client[client] += 1
        return Slot(self, client)

    def _free(self, client: str) -> None:
        self.total -= 1
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]        # the table holds only clients with transfers


@dataclass(eq=False)
class Slot:
    """One transfer's slot; give_back() frees it once, however often it is called (an error
    path that gives it back as well must not free another transfer's slot)."""

    table: SlotTable
    client: str
    held: bool = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.table._free(self.client)


class AckedBytes:
    """How many bytes the client acknowledged since this was made: the progress of a sendfile
    piece still under way, which only whole pieces would show otherwise (a client that slows
    down mid-piece is then judged on what it took, not cut off for the piece). 0 where the
    kernel does not say (not TCP, not Linux). Acknowledgements of the previous piece's bytes
    still in the socket buffer count too: at most a socket buffer more, once, for a client
    that then stops (the watch's next window sees nothing).
    """

    def __init__(self, sock: socket.socket | None):
        self._sock = sock
        self._start = self._read()

    def _read(self) -> int | None:
        return acked_bytes(self._sock)

    def since_start(self) -> int:
        now = self._read()
        if now is None or self._start is None:
            return 0
        return max(0, now - self._start)


class ProgressWatch:
    """One transfer's progress: at least min_rate_bps × window_s bytes in every window of
    window_s seconds (at least one byte when the rate is 0), and done by deadline_s."""

    def __init__(self, window_s: float, min_rate_bps: int, deadline_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.window_s = window_s
        self.required_bytes = max(1, int(min_rate_bps * window_s))
        now = clock()
        self._deadline = now + deadline_s
        self._deadline_s = deadline_s
        self._window_end = now + window_s
        self._window_bytes = 0

    @property
    def piece_bytes(self) -> int:
        """How much to send at a time when only whole pieces can be counted (sendfile): a
        quarter of a window's minimum, so a client at the minimum rate is not cut off for
        a piece still under way."""
        return min(16 << 20, max(64 << 10, self.required_bytes // 4))

    def next_piece_bytes(self, moved_bytes: int, seconds: float) -> int:
        """The next piece for a client that just took moved_bytes in seconds: what it would
        take in a quarter window at that rate, between piece_bytes and 16 MiB. A fast client
        gets few large pieces (each costs a task and a timer; 480 KiB pieces cost a restore
        ~20 %), a slow one keeps pieces it can finish within the window."""
        rate_bps = moved_bytes / max(seconds, 1e-6)
        return max(self.piece_bytes, min(16 << 20, int(rate_bps * self.window_s / 4)))

    def wait_s(self) -> float:
        """How long to wait for progress before tick() must judge it."""
        return max(0.0, min(self._window_end, self._deadline) - self._clock())

    def add(self, moved_bytes: int) -> None:
        self._window_bytes += moved_bytes
        self.tick()

    def tick(self) -> None:
        """TransferStalled when past the deadline or a window ended with too little moved."""
        now = self._clock()
        if now >= self._deadline:
            raise TransferStalled(f"not done within {self._deadline_s:.0f} s (MaxTransferTime)")
        while now >= self._window_end:
            if self._window_bytes < self.required_bytes:
                raise TransferStalled(
                    f"{self._window_bytes} bytes in {self.window_s:.0f} s, fewer than "
                    f"{self.required_bytes} (TransferTimeout, MinTransferRate)")
            self._window_bytes = 0
            self._window_end += self.window_s
