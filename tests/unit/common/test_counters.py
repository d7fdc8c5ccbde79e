"""common.daemon.counters: the snapshot every daemon's status counters give the status reply."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from common.daemon.counters import StatusCounters
from imgsrvd.status import ImagingCounters
from prebootpolicyd.status import PolicyCounters
from proxydhcpd.status import ProxyCounters
from tftpd.status import TftpCounters


@dataclass
class Sample(StatusCounters):
    sent: int = 0
    by_kind: Counter = field(default_factory=Counter)
    failed: int = 0


def test_snapshot_keeps_field_order_and_sorts_counts_by_kind():
    sample = Sample()
    sample.sent = 3
    sample.by_kind["zeta"] += 2
    sample.by_kind["alpha"] += 1
    snapshot = sample.snapshot()
    assert list(snapshot) == ["sent", "by_kind", "failed"]
    assert snapshot == {"sent": 3, "by_kind": {"alpha": 1, "zeta": 2}, "failed": 0}
    assert list(snapshot["by_kind"]) == ["alpha", "zeta"]
    assert type(snapshot["by_kind"]) is dict
    sample.by_kind["beta"] += 1
    assert "beta" not in snapshot["by_kind"], "a snapshot is a copy"


def test_every_daemon_starts_at_zero():
    for counters in (ImagingCounters(), PolicyCounters(), ProxyCounters()):
        assert all(value in (0, {}) for value in counters.snapshot().values()), counters
    tftp = TftpCounters().snapshot(active_transfers=2)
    assert list(tftp)[-2:] == ["errors", "active_transfers"] and tftp["active_transfers"] == 2
    assert all(value in (0, {}) for key, value in tftp.items() if key != "active_transfers")
