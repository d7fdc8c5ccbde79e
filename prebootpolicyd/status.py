"""policyd's status counters: what `zmgmcast -status` shows. All start at zero.

queries          /policy requests, bad ones included
script_requests  /boot.ipxe requests
work_assigned    decisions with imaging work (what the answer runs, or the menu's default)
no_work          decisions without (the local disk); work_assigned + no_work = decided queries
menus_shown      answers that show the Preboot menu at once (display always; the hot-key
                 prompt is counted by its decision only, since the key is pressed or not later)
fallback_answers answers given without the directory (FallbackAnswer)
directory_errors directory queries that failed or took longer than DirectoryTimeout
bad_requests     /policy requests answered 400
by_platform, by_arch  what the machines reported (values iPXE does not use count as "other")
by_action        the work decided: restore, make, multicast, maintenance, none
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from common.daemon.counters import StatusCounters

PLATFORMS = frozenset({"pcbios", "efi"})
ARCHES = frozenset({"i386", "x86_64", "arm32", "arm64", "riscv32", "riscv64", "loong64"})


def bounded(value: str | None, known: frozenset[str]) -> str:
    """A counter key from a client's value; never more keys than `known` plus two."""
    if not value:
        return "unknown"
    return value if value in known else "other"


@dataclass
class PolicyCounters(StatusCounters):
    queries: int = 0
    script_requests: int = 0
    work_assigned: int = 0
    menus_shown: int = 0
    no_work: int = 0
    fallback_answers: int = 0
    directory_errors: int = 0
    bad_requests: int = 0
    by_platform: Counter = field(default_factory=Counter)
    by_arch: Counter = field(default_factory=Counter)
    by_action: Counter = field(default_factory=Counter)
