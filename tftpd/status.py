"""tftpd's status counters: what `zmgmcast -status` shows. All start at zero."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.daemon.counters import StatusCounters


@dataclass
class TftpCounters(StatusCounters):
    requests_read: int = 0
    requests_write: int = 0
    transfers_started: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfers_unconfirmed: int = 0  # every block sent, the final ACK never came: may have arrived
    size_probes: int = 0       # OACK read, then cancelled by the client (UEFI asks tsize first)
    bytes_sent: int = 0
    bytes_received: int = 0
    blocks_resent: int = 0
    malformed_packets: int = 0
    duplicate_requests: int = 0
    refused_paths: int = 0
    refused_busy: int = 0
    gateway_answers: int = 0   # grub/grub.cfg, preboot/policy.grub/...: policyd answered
    gateway_failures: int = 0  # ... policyd did not (the client got a TFTP error saying so)
    errors: Counter = field(default_factory=Counter)   # by kind: file_not_found, timeout, ...

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def snapshot(self, active_transfers: int) -> dict[str, Any]:  # type: ignore[override]
        data = super().snapshot()
        data["active_transfers"] = active_transfers
        return data
