"""Imaging operations as the results log and the statistics count them, not HTTP requests.

The original counts imaging requests (DOMAIN.md): one Update Request and one results log entry
per store, retrieve, work query, referral and reported result. A store is one PUT, but a
retrieve is many requests: img's HEAD (the size), Range GETs for the header, trailer and index
(the header probe), then the chunks in batches, retried on new connections after a drop; curl
resumes with another Range. Counting requests gave 16 Update Requests for 4 operations.

The rules (docs/imaging-protocol.md, "Operations"):

* **A retrieve** is the GETs of one image by one client, from the first until the image has been
  sent whole (every byte in some answer: then it is an Image Sent, and the next GET starts a new
  retrieve), or until no GET of it came for ``RETRIEVE_IDLE_S`` (then it ended unfinished: a
  failure entry says how much was sent). The client is the ``X-Preboot-Session`` the request
  carries (img sends one per run, so two img runs behind one NAT address are two clients), else
  the requesting address (curl). A HEAD belongs to the retrieve that follows it and starts none
  (it sends no image), unless it is refused: a refusal is an operation that ends at once.
* **One entry per operation, even when the engine reports it too.** A request carrying a
  session and ``X-Preboot-Reports: yes`` comes from an engine that will report its result here
  (``POST /v1/results`` with the same ``session``; img reports to the server it was pointed at,
  not to one a referral sent it to). The server's record of such a store or retrieve waits for that report (at most
  ``REPORT_WAIT_S``), and the two make one entry: the engine's status and message (it also saw
  the disk), the server's bytes and requesting address. A report with no operation waiting (one
  served elsewhere, or by a client without a session) is an entry of its own; a record whose
  report never comes is written alone when the wait ends.

The table is bounded (``MAX_OPERATIONS``; the oldest is settled first), so clients that stop
half way, or never report, cannot grow it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

RETRIEVE_IDLE_S = 600.0     # a retrieve with no GET for this long has ended
REPORT_WAIT_S = 600.0       # how long a finished operation waits for the engine's report
MAX_OPERATIONS = 4096

Key = tuple[str, str, str]   # (client, kind, image path)


@dataclass
class Operation:
    """One store or retrieve of one image by one client."""

    client: str                 # the session, else the requesting address
    kind: str                   # "upload" (store) or "download" (retrieve)
    path: str
    workstation: str
    address: str                # the requesting address
    reports: bool               # the engine will report it (its requests carry a session)
    touched_s: float
    size: int = 0               # the image's size (retrieves)
    sent_bytes: int = 0         # bytes sent over the whole retrieve, resumes included
    intervals: list[tuple[int, int]] = field(default_factory=list)   # merged, sorted
    status: str | None = None   # set when finished
    error: str = ""
    image_type: str | None = None
    stored_bytes: int | None = None

    @property
    def key(self) -> Key:
        return (self.client, self.kind, self.path)

    @property
    def finished(self) -> bool:
        return self.status is not None

    def cover(self, start: int, end: int) -> bool:
        """Add [start, end) to what was sent; True when the image is now sent whole."""
        merged: list[tuple[int, int]] = []
        for low, high in sorted(self.intervals + [(max(0, start), min(self.size, end))]):
            if merged and low <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        self.intervals = merged
        return len(merged) == 1 and merged[0][0] <= 0 and merged[0][1] >= self.size

    def unfinished_reason(self) -> str:
        why = f" ({self.error})" if self.error else ""
        return (f"retrieve not completed: {self.sent_bytes} bytes sent, the image has "
                f"{self.size}{why}")


class OperationTable:
    """Operations in progress, and finished ones waiting for the engine's report. Whatever is
    due to be written (finished without a report to wait for, expired, evicted) is collected
    for ``take_due()``."""

    def __init__(self, max_operations: int = MAX_OPERATIONS,
                 retrieve_idle_s: float = RETRIEVE_IDLE_S, report_wait_s: float = REPORT_WAIT_S,
                 clock: Callable[[], float] = time.monotonic):
        self._table: OrderedDict[Key, Operation] = OrderedDict()
        self._due: list[Operation] = []
        self._max = max_operations
        self._idle_s = retrieve_idle_s
        self._wait_s = report_wait_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._table)

    def live_retrieve(self, client: str, path: str) -> Operation | None:
        """The retrieve in progress for this client and image, if any."""
        op = self._table.get((client, "download", path))
        if op is None or op.finished or self._idle(op, self._clock()):
            return None
        return op

    def begin(self, client: str, kind: str, path: str, workstation: str, address: str,
              reports: bool, size: int = 0) -> Operation:
        """A new operation (a store, or a retrieve's first GET). One with the same key that
        was still there is settled first (written on its own)."""
        now = self._clock()
        self.expire()
        op = Operation(client, kind, path, workstation, address, reports, now, size)
        old = self._table.pop(op.key, None)
        if old is not None:
            self._settle(old)
        self._table[op.key] = op
        while len(self._table) > self._max:
            self._settle(self._table.popitem(last=False)[1])
        return op

    def touch(self, op: Operation) -> None:
        op.touched_s = self._clock()
        if self._table.get(op.key) is op:
            self._table.move_to_end(op.key)

    def finish(self, op: Operation, status: str, error: str = "",
               image_type: str | None = None, stored_bytes: int | None = None) -> None:
        """The server's side of the operation is over: due now, or (the engine reports it)
        waiting for the report."""
        op.status, op.error = status, error
        op.image_type = image_type if image_type is not None else op.image_type
        op.stored_bytes = stored_bytes
        self.touch(op)
        if not op.reports:
            self._remove(op)
            self._due.append(op)

    def report(self, client: str, kind: str, path: str) -> Operation | None:
        """The operation the engine's report is about (taken out of the table), or None."""
        op = self._table.pop((client, kind, path), None)
        if op is not None and not op.finished:
            op.status = "reported"     # ended by its report (e.g. img gave up retrying)
        return op

    def expire(self) -> None:
        """Settle retrieves idle for RETRIEVE_IDLE_S and records whose report did not come
        within REPORT_WAIT_S."""
        now = self._clock()
        for op in list(self._table.values()):
            if (op.finished and now - op.touched_s >= self._wait_s) or \
                    (not op.finished and self._idle(op, now)):
                self._remove(op)
                self._settle(op)

    def settle_all(self) -> None:
        """Everything due now (the server is stopping)."""
        while self._table:
            self._settle(self._table.popitem(last=False)[1])

    def take_due(self) -> list[Operation]:
        due, self._due = self._due, []
        return due

    def _idle(self, op: Operation, now: float) -> bool:
        return now - op.touched_s >= self._idle_s

    def _remove(self, op: Operation) -> None:
        if self._table.get(op.key) is op:
            del self._table[op.key]

    def _settle(self, op: Operation) -> None:
        if not op.finished:
            op.status, op.error = "failure", op.unfinished_reason()
        self._due.append(op)
