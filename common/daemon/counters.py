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


@dataclass
class StatusCounters:
    def snapshot(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            data[field.name] = dict(sorted(value.items())) if isinstance(value, Counter) \
                else value
        return data
