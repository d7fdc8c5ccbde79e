"""A lock-step transfer's blocks sent by a child process (fork), what tftpd-hpa does per transfer.

Why processes: one Python process runs Python on one core at a time (the GIL), so threads
(lockstep.py on its own) make one transfer fast but not fifty: fifty lock-step transfers
are fifty chains of tiny round trips, each waiting on the same lock. tftpd-hpa forks a process
per transfer and so uses every core, and gets a fair share of a busy machine per transfer from
the scheduler. Here the daemon forks a child per large lock-step download; the child runs the
same blocking loop (lockstep.LockstepRunner) single-threaded, then exits once the last block is
out, and the daemon, which kept everything else (the request port, counters, logs, limits,
the gateway, the final ACK), takes the transfer back.

The child reports through a pipe, one JSON line per message (each well below PIPE_BUF, so
written atomically): "c" counts (every FLUSH_EVERY blocks), "s" a stranger's TID (the child has
already sent it ERROR 5), "x" an internal error's text, and "e" the end: the state machine's
fields and the last counts. The parent applies that to its own copy of the transfer.

In the child: SIGTERM/SIGINT back to their defaults and SIGHUP ignored (the parent's handlers
write to the parent's event loop), the request socket closed (so a restarted daemon can bind
port 69 as soon as the parent is gone), and PR_SET_PDEATHSIG so a child never outlives a killed
daemon. A stop shuts the transfer socket's receive side down in the parent; the socket is the
same in both processes, so that wakes the child, which tells the client and ends. No logging in
the child: the parent logs what it reports.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from .lockstep import LockstepRunner
from .transfer import ReadTransfer, TransferFailed

PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """The parent's handle on one child: its pid and the read end of its report pipe."""

    pid: int
    fd: int
    buffer: bytearray = field(default_factory=bytearray)

    def messages(self, data: bytes) -> list[dict[str, Any]]:
        """Complete JSON lines among what has been read so far."""
        self.buffer += data
        out = []
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"t": "x", "text": f"unreadable report {line[:80]!r}"})
        return out


def fork(runner: LockstepRunner, close_fds: list[int]) -> Child:
    """Start `runner` in a child process; returns at once in the parent. OSError if no fork."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:                                        # the child: never returns
        status = 1
        try:
            os.close(read_fd)
            _child_setup(close_fds, parent)
            _child_run(runner, write_fd)
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return Child(pid, read_fd)


def _child_setup(close_fds: list[int], parent: int) -> None:
    # The loop allocates no cycles; a collection would walk the parent's whole heap and,
    # by touching every object, copy its pages (copy-on-write) into the child.
    gc.disable()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass                                            # best effort: not on every libc
    if os.getppid() != parent:
        os._exit(1)                                     # the parent died before prctl
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _child_run(runner: LockstepRunner, write_fd: int) -> None:
    def say(message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(write_fd, data)
        except OSError:
            pass                                        # the parent is gone: PDEATHSIG follows

    runner._report = lambda counts: counts and say({"t": "c", "counts": counts})
    runner._stranger = lambda source: say({"t": "s", "source": list(source)})
    runner._error = lambda text: say({"t": "x", "text": text})
    runner._on_end = lambda: say({"t": "e", **state_of(runner)})
    runner._run()


def state_of(runner: LockstepRunner) -> dict[str, Any]:
    """What the parent needs of a finished runner: the state machine's fields and counts."""
    t = runner.transfer
    return {"acked": t.acked, "next": t.next, "sent_last_block": t.sent_last_block,
            "retries_left": t.retries_left, "done": t.done,
            "waiting_oack_ack": t.waiting_oack_ack,
            "failure": [t.failure.kind, str(t.failure)] if t.failure else None,
            "last_progress": runner.last_progress, "counts": runner.counts.take()}


def apply_state(transfer: ReadTransfer, state: dict[str, Any]) -> None:
    """The parent's copy of the transfer takes the child's end state (its file still open)."""
    transfer.acked = state["acked"]
    transfer.next = state["next"]
    transfer.sent_last_block = state["sent_last_block"]
    transfer.retries_left = state["retries_left"]
    transfer.waiting_oack_ack = state["waiting_oack_ack"]
    if state["failure"]:
        transfer.failure = TransferFailed(*state["failure"])
    transfer.done = state["done"]
    if transfer.finished:
        transfer.release()                              # the parent's descriptor of the file
