"""proxydhcpd's status counters: what `zmgmcast -status` shows. All start at zero."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from common.daemon.counters import StatusCounters


@dataclass
class ProxyCounters(StatusCounters):
    requests: Counter = field(default_factory=Counter)          # by DHCP message type
    architectures: Counter = field(default_factory=Counter)     # by client firmware
    offers_sent: int = 0
    acks_sent: int = 0
    ignored_not_pxe: int = 0
    ignored_other: int = 0
    denied_mac: int = 0
    no_boot_file: int = 0
    malformed: int = 0
    send_errors: int = 0
