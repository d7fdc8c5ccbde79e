"""Progress for people: a bar with bytes, rate and ETA on a terminal, plain lines otherwise
(every 10 %), both on stderr so stdout stays for results."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30):
        self.label = label
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._next_percent = 10
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:            # the work starts now (planning it is not part of the rate)
            self.started = now
            return
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        percent = 100 * done / total if total else 100
        eta = (total - done) / rate if rate > 0 else 0
        if self.tty:
            if now - self._last_draw < 0.2 and done < total:
                return
            self._last_draw = now
            filled = int(self.width * percent / 100)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {percent:5.1f}% {_size(done)} / "
                              f"{_size(total)}  {_size(rate)}/s  ETA {eta:4.0f} s ")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif percent >= self._next_percent or done >= total:
            self.stream.write(f"{self.label}: {percent:.0f}% {_size(done)} of {_size(total)}, "
                              f"{_size(rate)}/s, ETA {eta:.0f} s\n")
            self.stream.flush()
            while self._next_percent <= percent:
                self._next_percent += 10
