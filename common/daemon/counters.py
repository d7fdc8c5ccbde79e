"""Status counters: the base of each daemon's counters dataclass (`<daemon>/status.py`).

A daemon declares its counters as fields of a dataclass that extends StatusCounters: plain
integers, and collections.Counter fields for counts by kind. snapshot() is what the status reply
carries under "counters" (and `zmgmcast -status` shows): every field in declaration order, a
Counter as a plain dict sorted by key. How zmgmcast orders and names them is in the registry of
services (common.daemon.services). Standard library only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

STATUS_LINE_COUNTERS = 4
STATUS_LINE_MAX_CHARS = 200


@dataclass
class StatusCounters:
    def snapshot(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            data[field.name] = dict(sorted(value.items())) if isinstance(value, Counter) \
                else value
        return data


def status_line(counters: dict[str, Any], order: tuple[str, ...] = (),
                label: Any = None) -> str:
    """A short line of the main counters for systemd's STATUS= (`systemctl status`): the first
    STATUS_LINE_COUNTERS numeric ones, ORDER first, as "Label N, Label N"."""
    first = [key for key in order if key in counters]
    keys = first + [key for key in counters if key not in first]
    shown = []
    for key in keys:
        value = counters[key]
        if isinstance(value, int) and not isinstance(value, bool):
            name = label(key) if label is not None else key
            shown.append(f"{name} {value}")
            if len(shown) == STATUS_LINE_COUNTERS:
                break
    line = ", ".join(shown)
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line[:STATUS_LINE_MAX_CHARS]
