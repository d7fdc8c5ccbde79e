"""imgsrvd's multicast data plane (docs/multicast-protocol.md): the control socket (997/udp)
and every session's sender, on one thread of its own, so imgsrvd's asyncio loop never waits
for a packet, a pacing delay or the image file.

What it owns: the control socket (udpio.control_socket), one group socket per session
(udpio.GroupSender), each session's open image file, and the thread that runs them all. Its
one stop path is stop(): ABORT (shutdown) to every active session, then the thread ends and
every socket and file is closed. The control plane (catalog.py) talks to it through the
thread-safe calls below and hears back through on_event (SessionEvent, model.py).

    engine = MulticastEngine(settings, admit, on_event=...)
    engine.start()                       # binds the control socket; OSError if it cannot
    engine.open_session(spec)            # SessionError with the reason if refused
    engine.start_now(name); engine.close(name, reason); engine.status()
    engine.stop()

admit(JoinRequest) -> Admission and on_event(SessionEvent) run on the engine's thread: they
must be quick and must not wait for the asyncio loop (use loop.call_soon_threadsafe to hand an
event over).

A session, as the doc's "A session, step by step": WAITING (ANNOUNCE about once a second; from
the first admitted JOIN, PROBE every P; JOIN -> decide.join_refusal -> admit() -> JOIN_ACK or
JOIN_REFUSED) until a start trigger (decide.start_reason); SENDING (START three times P apart,
the first pass in send order, paced by a token bucket whose rate adapts to the reported loss,
pacing.rate_decision; NAKed ranges repaired from the image file ahead of new data,
repair.RepairQueue); FINISHING (FINISH every P and repairs, until every receiver is done, left
or lost, or finish_timeout_s); then FINISH final three times and CLOSED. A receiver silent past
its deadline (mctimers.receiver_lost_after_s) gets ABORT lost; one too slow or lossy over a
window (decide.receiver_verdict) gets ABORT too slow and continues over unicast HTTP: one slow
receiver never holds the group back.

Bounded: max_sessions sessions, max_receivers receivers each, RepairQueue's ranges, a fixed
record per receiver, the command queue; one bad packet is counted and dropped, never fatal.

A command-line entry for tests and the bench sends one image file to a group and prints its
events and final numbers as JSON lines (run it inside a network namespace; TTL 1):

    python3 -m imgsrvd.multicast.engine --image F --interface IP [--group G] [--name NAME]
        [--clients N] [--start-after S] [--rate-kbit K] [--min-receiver-rate-kbit K]
        [--max-receiver-loss X] [--finish-timeout S] [--control-port 997]

It exits 0 when the session closed normally, 1 when it was aborted, 2 on a usage error;
SIGTERM or SIGINT stop it (ABORT shutdown).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import queue
import resource
import secrets
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from common.imaging import multicast as mc
from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import TRAILER, ImageFormatError, decode_trailer
from common.imaging.mcranges import PassOrder
from common.imaging.mctimers import (ANNOUNCE_INTERVAL_S, START_REPEATS, RttEstimator,
                                     group_rtt_s, probe_interval_s, receiver_lost_after_s,
                                     rtt_sample_s)
from common.imaging.multicast import AbortReason, LeaveReason, Refusal

from .decide import (ReceiverWindow, VERDICT_WINDOW_S, join_refusal, median, receiver_verdict,
                     start_in_s, start_reason)
from .model import (Admission, EngineSettings, EventKind, JoinRequest, ParticipantStatus,
                    ReceiverState, SessionEvent, SessionOrigin, SessionSpec, SessionState,
                    SessionStatus)
from .pacing import LossHistory, RateLimits, TokenBucket, rate_decision
from .repair import RepairQueue
from .udpio import MAX_RUN_BYTES, GroupSender, control_socket

log = logging.getLogger("imgsrvd.multicast")

RUN_PACKETS = min(46, MAX_RUN_BYTES // mc.MAX_DATAGRAM)     # DATA packets per GSO send
RUN_PAYLOAD_BYTES = RUN_PACKETS * mc.MAX_DATA_BYTES          # 61,962 bytes of the file
BURST_BYTES = 4 * RUN_PACKETS * mc.MAX_DATAGRAM              # the token bucket's depth
MAX_CONTROL_PER_TURN = 256      # control packets read per loop turn (then data gets a turn)
MAX_RUNS_PER_TURN = 16          # GSO sends per loop turn (then control gets a turn)
MAX_WAIT_S = 0.05               # the loop wakes at least this often
STATUS_EVERY_S = 0.25           # status() snapshots
START_ANSWER_S = 5.0            # start_now waits this long for the engine's thread
ABORT_REPEATS = 3               # ABORT to the group, like FINISH final, is sent three times
REPAIR_SHARE_MAX = 0.5          # while the first pass runs, repairs take at most this share
SAMPLES_KEPT = 64               # STATUS samples kept per receiver (~16 s at P = 250 ms)
PROBES_KEPT = 32                # PROBE times a STATUS may echo (a receiver answers late)
RTT_MIN_KEPT = 32               # round-trip samples the least one is taken over
U32 = 1 << 32
_GONE = (ReceiverState.DONE, ReceiverState.FAILED, ReceiverState.LEFT, ReceiverState.LOST,
         ReceiverState.DROPPED)
_WIRE_STATE = {SessionState.WAITING: mc.SessionState.WAITING,
               SessionState.SENDING: mc.SessionState.SENDING,
               SessionState.FINISHING: mc.SessionState.FINISHING}


class SessionError(Exception):
    """open_session, start_now or close refused; str() is the reason, one line."""


def _us(now_s: float) -> int:
    return int(now_s * 1_000_000)


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """The image a session sends, open for os.pread: its size, header length, index offset
    and digest (image_digest: header + index + trailer, read once here)."""

    path: str
    fd: int
    size: int
    header_bytes: int
    index_offset: int
    digest: bytes

    @classmethod
    def open(cls, path: str) -> "ImageFile":
        """The image checked as a restore would (header, trailer, index); SessionError says why
        it cannot be sent."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise SessionError(f"image {path}: {exc.strerror or exc}") from None
        try:
            reader = ImageReader(fd, path)
            size = reader.size
            header_bytes = reader.header.length
            index_offset = decode_trailer(os.pread(fd, TRAILER.size, size - TRAILER.size),
                                          size).index_offset
            head = os.pread(fd, header_bytes, 0)
            tail = os.pread(fd, size - index_offset, index_offset)
            if len(head) != header_bytes or len(tail) != size - index_offset:
                raise ImageFormatError("short read")
            digest = mc.image_digest(head, tail)
            mc.first_pass_ranges(size, header_bytes, index_offset)
        except (OSError, ImageFormatError, mc.MulticastFormatError) as exc:
            os.close(fd)
            raise SessionError(f"image {path} cannot be sent: {exc}") from None
        return cls(path, fd, size, header_bytes, index_offset, digest)

    @property
    def order(self) -> PassOrder:
        return PassOrder(self.size, self.header_bytes, self.index_offset)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read at byte {offset} (the file shrank?)")
        return data

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _Counter:
    """A STATUS counter modulo 2**32 (packets_received, packets_lost), kept whole."""

    __slots__ = ("raw", "total")

    def __init__(self) -> None:
        self.raw: int | None = None
        self.total = 0

    def update(self, raw: int) -> int:
        if self.raw is not None:
            self.total += (raw - self.raw) % U32
        self.raw = raw
        return self.total


class _Receiver:
    """One admitted receiver: a fixed record (the samples deque is bounded)."""

    def __init__(self, receiver_id: int, address: tuple[str, int], mac: str, now_s: float):
        self.id = receiver_id
        self.address = address
        self.mac = mac
        self.joined_s = now_s
        self.state = ReceiverState.WAITING
        self.rtt = RttEstimator()
        self.heard_s = now_s
        self.status: mc.Status | None = None
        self.received = _Counter()
        self.lost = _Counter()
        self.interval_mark = (0, 0)            # (received, lost) at the last rate interval
        self.samples: collections.deque[tuple[float, int, int, int, int]] = \
            collections.deque(maxlen=SAMPLES_KEPT)  # (time, received, lost, bytes, pass)
        self.window_loss = 0.0
        self.echoed_us = 0
        self.rtt_samples: collections.deque[float] = collections.deque(maxlen=RTT_MIN_KEPT)
        self.abort_sent_s = -1e9
        self.abort_reason = AbortReason.OTHER
        self.abort_text = ""

    @property
    def active(self) -> bool:
        return self.state not in _GONE

    def snapshot(self) -> ParticipantStatus:
        s = self.status
        return ParticipantStatus(
            receiver_id=self.id, mac=self.mac, address=f"{self.address[0]}:{self.address[1]}",
            state=self.state, bytes_received=s.bytes_received if s else 0,
            bytes_written=s.bytes_written if s else 0,
            chunks_verified=s.chunks_verified if s else 0, loss_fraction=self.window_loss,
            srtt_ms=None if self.rtt.srtt_s is None else round(self.rtt.srtt_s * 1000, 3))


class _Session:
    """One session's sender state; touched only by the engine thread."""

    def __init__(self, spec: SessionSpec, image: ImageFile, out: GroupSender,
                 settings: EngineSettings, now_s: float):
        self.spec = spec
        self.image = image
        self.out = out
        self.id = secrets.randbits(64) or 1
        self.state = SessionState.WAITING
        self.created_s = now_s
        self.receivers: dict[int, _Receiver] = {}
        self.sequence = 0
        self.next_announce_s = now_s
        self.next_probe_s: float | None = None
        self.probe_sent_us = 0
        self.probes_sent: collections.deque[int] = collections.deque(maxlen=PROBES_KEPT)
        self.operator_start = False
        self.last_join_s: float | None = None
        self.started_s: float | None = None
        self.starts_left = 0
        self.next_start_s = now_s
        self.finishing_s: float | None = None
        self.next_finish_s = now_s
        self.finals_left = 0
        self.next_final_s = now_s
        self.end_kind: EventKind | None = None
        self.end_reason = ""
        self.pass_position = 0
        self.order = image.order
        self.repair = RepairQueue(self.order)
        self.limits = RateLimits.from_settings(settings.max_bitrate_kbit_s,
                                               settings.min_receiver_rate_kbit_s)
        self.rate_kbit_s = self.limits.start_kbit_s
        self.slow_start = True
        self.bucket = TokenBucket(self.rate_kbit_s * 125, BURST_BYTES, now_s)
        self.losses = LossHistory()
        self.next_rate_s = now_s
        self.interval_bytes = 0
        self.interval_repair_bytes = 0
        self.interval_pass_bytes = 0
        self.interval_start_s = now_s
        self.bytes_sent = 0
        self.repair_bytes = 0
        self.first_pass_bytes = 0
        self.naks = 0
        self.malformed = 0

    # -- derived --------------------------------------------------------------------------

    @property
    def active(self) -> list[_Receiver]:
        return [r for r in self.receivers.values() if r.active]

    @property
    def participants(self) -> int:
        return len(self.active)

    @property
    def grtt_s(self) -> float:
        return group_rtt_s([r.rtt.srtt_s for r in self.receivers.values() if r.active])

    @property
    def probe_s(self) -> float:
        return probe_interval_s(self.grtt_s)

    def start_in(self, now_s: float) -> float | None:
        if self.state is not SessionState.WAITING:
            return None
        return start_in_s(self.spec.start_after_last_join_s, self.last_join_s,
                          self.participants, now_s)

    def wire_start_in(self, now_s: float) -> int | None:
        left = self.start_in(now_s)
        return None if left is None else min(mc.NO_TIMER - 1, int(left + 0.999))

    def next_sequence(self, count: int = 1) -> int:
        first = self.sequence
        self.sequence = (self.sequence + count) % U32
        return first

    def snapshot(self, now_s: float) -> SessionStatus:
        left = self.start_in(now_s)
        return SessionStatus(
            name=self.spec.name, image=self.spec.image, group=self.spec.group,
            state=self.state, origin=self.spec.origin, start_clients=self.spec.start_clients,
            start_in_s=None if left is None else round(left, 1),
            rate_kbit_s=self.rate_kbit_s if self.started_s is not None else 0,
            bytes_sent=self.bytes_sent, repair_bytes=self.repair_bytes,
            image_bytes=self.image.size,
            participants=tuple(r.snapshot() for r in self.receivers.values()))


class MulticastEngine:
    """The data plane: see the module's docstring. Every public method is thread-safe."""

    def __init__(self, settings: EngineSettings, admit: Callable[[JoinRequest], Admission],
                 on_event: Callable[[SessionEvent], None] | None = None,
                 loopback: bool = True):
        """on_event: every outcome (SessionEvent); on_outcome (an attribute the control plane
        may set before start()): each session's final SessionStatus when it ends, closed or
        aborted. Both are called on the engine's thread. loopback: whether this host's own
        sockets hear the groups (IP_MULTICAST_LOOP; a lab server imaging itself, tests on one
        host). Off, sending costs a little less."""
        self.settings = settings
        self._admit = admit
        self._on_event = on_event
        self.on_outcome: Callable[[SessionStatus], None] | None = None
        self._loopback = loopback
        self._lock = threading.Lock()
        self._names: dict[str, SessionState] = {}     # what callers may refer to (under lock)
        self._commands: queue.SimpleQueue[Callable[[float], None]] = queue.SimpleQueue()
        self._sessions: dict[str, _Session] = {}       # the engine thread's
        self._by_id: dict[int, _Session] = {}
        self._snapshot: list[SessionStatus] = []
        self._snapshot_s = 0.0
        self._thread: threading.Thread | None = None
        self._control: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._buffer = bytearray(2048)
        self._control_sequence = 0
        self.counters: collections.Counter[str] = collections.Counter()

    # -- lifecycle (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Bind the control socket (OSError if that fails: nothing is left open) and start the
        engine's thread."""
        if self._thread is not None:
            raise RuntimeError("the multicast engine runs already")
        self._control = control_socket(self.settings.control_address,
                                       self.settings.control_port)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="mcast-engine", daemon=True)
        self._thread.start()
        log.info("multicast: control socket on %s:%d/udp, groups from %s, TTL %d",
                 self.settings.control_address, self.settings.control_port,
                 self.settings.interface_address, self.settings.ttl)

    def stop(self, timeout_s: float = 5.0) -> None:
        """The one stop path: ABORT (shutdown) to every active session, end the thread, close
        every socket and file. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("multicast: the engine thread did not stop within %.0f s", timeout_s)
            return
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    @property
    def control_port(self) -> int:
        """The bound control port (the settings' one, or the kernel's pick for port 0); the
        settings' one while no socket is bound."""
        control = self._control
        if control is None:
            return self.settings.control_port
        try:
            return control.getsockname()[1]
        except OSError:                      # closed meanwhile
            return self.settings.control_port

    # -- the control plane's calls (any thread) -------------------------------------------

    def open_session(self, spec: SessionSpec) -> None:
        """Open a session (WAITING: announced, taking joins). Reads the image's header, index
        and trailer and makes the group's socket here, in the caller's thread (a few KiB to
        MiB; use an executor if the image store may be slow). SessionError with the reason:
        the name exists, too many sessions, a bad name, group or port, the image cannot be
        read, the group cannot be sent to."""
        problem = mc.session_name_refusal(spec.name) or mc.group_address_refusal(spec.group)
        if not problem and not 0 < spec.data_port < 65536:
            problem = f"data port {spec.data_port} is not a port"
        if problem:
            raise SessionError(f"session {spec.name!r}: {problem}")
        with self._lock:
            self._check_running()
            if spec.name in self._names:
                raise SessionError(f"session {spec.name!r} exists already")
            if len(self._names) >= self.settings.max_sessions:
                raise SessionError(f"session {spec.name!r}: {self.settings.max_sessions} "
                                   "sessions run already (MaxSessions)")
            self._names[spec.name] = SessionState.WAITING       # reserved while we read
        try:
            image = ImageFile.open(spec.image_path)
        except SessionError:
            with self._lock:
                self._names.pop(spec.name, None)
            raise
        try:
            out = GroupSender(spec.group, spec.data_port, self.settings.interface_address,
                              self.settings.ttl, self._loopback)
        except OSError as exc:
            image.close()
            with self._lock:
                self._names.pop(spec.name, None)
            raise SessionError(f"session {spec.name!r}: cannot send to {spec.group} from "
                               f"{self.settings.interface_address or 'the routed interface'}"
                               f": {exc.strerror or exc}") from None
        self._command(lambda now_s: self._open(spec, image, out, now_s))

    def start_now(self, name: str) -> None:
        """Start a waiting session now (an operator); SessionError if there is no such waiting
        session."""
        with self._lock:
            self._check_running()
            state = self._names.get(name)
            if state is None:
                raise SessionError(f"no session {name!r}")
            if state is not SessionState.WAITING:
                raise SessionError(f"session {name!r} is {state.value}, not waiting")
        answer: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._command(lambda now_s: answer.set_result(self._start_now(name)))
        try:
            refusal = answer.result(timeout=START_ANSWER_S)
        except concurrent.futures.TimeoutError:
            raise SessionError(f"session {name!r}: the engine did not answer") from None
        if refusal:
            raise SessionError(refusal)

    def close(self, name: str, reason: str = "closed by an operator") -> None:
        """End a session now: ABORT (operator) to its group; SESSION_ABORTED follows."""
        with self._lock:
            self._check_running()
            if name not in self._names:
                raise SessionError(f"no session {name!r}")
        self._command(lambda now_s: self._close(name, AbortReason.OPERATOR, reason, now_s))

    def status(self) -> list[SessionStatus]:
        """The open sessions as they stood at most STATUS_EVERY_S ago (never waits for the
        engine's thread); an ended one's last status went to on_outcome and on_event."""
        return list(self._snapshot)

    def _check_running(self) -> None:
        if self._thread is None or self._stopping:
            raise SessionError("the multicast engine is not running")

    def _command(self, fn: Callable[[float], None]) -> None:
        self._commands.put(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                    # a full pipe wakes the loop as well

    # -- the engine's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                self._run_commands(now)
                deadline = now + MAX_WAIT_S
                for session in list(self._sessions.values()):
                    try:
                        deadline = min(deadline, self._tick(session, now))
                    except Exception:   # noqa: BLE001 - one session's bug never stops the rest
                        log.exception("multicast: session %r failed", session.spec.name)
                        self._end(session, EventKind.SESSION_ABORTED, AbortReason.OTHER,
                                  "internal error (see the log)", now)
                self._publish(now)
                timeout = max(0.0, deadline - time.monotonic())
                self._wait(timeout)
        except Exception:   # noqa: BLE001 - logged; the stop path below still runs
            log.exception("multicast: the engine thread failed")
        finally:
            self._shutdown()

    def _wait(self, timeout_s: float) -> None:
        assert self._control is not None
        try:
            ready = select.select([self._control, self._wake_r], [], [], timeout_s)[0]
        except InterruptedError:
            return
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self._control in ready:
            self._read_control()

    def _run_commands(self, now_s: float) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn(now_s)
            except Exception:   # noqa: BLE001
                log.exception("multicast: a command failed")

    def _shutdown(self) -> None:
        now = time.monotonic()
        self._run_commands(now)         # a session opened just before stop(): its file closes
        for session in list(self._sessions.values()):
            self._end(session, EventKind.SESSION_ABORTED, AbortReason.SHUTDOWN,
                      "the imaging server is stopping", now)
        self._publish(now, force=True)
        if self._control is not None:
            self._control.close()
            self._control = None
        with self._lock:
            self._names.clear()

    def _publish(self, now_s: float, force: bool = False) -> None:
        if not force and now_s - self._snapshot_s < STATUS_EVERY_S:
            return
        self._snapshot_s = now_s
        self._snapshot = [s.snapshot(now_s) for s in self._sessions.values()]

    def _event(self, kind: EventKind, session: _Session, reason: str = "",
               receiver: _Receiver | None = None, status: SessionStatus | None = None) -> None:
        if receiver is not None:
            log.info("multicast: session %r: receiver %016x (%s, %s): %s%s", session.spec.name,
                     receiver.id, receiver.mac or "no MAC", receiver.address[0], kind.value,
                     f": {reason}" if reason else "")
        else:
            log.info("multicast: session %r: %s%s", session.spec.name, kind.value,
                     f": {reason}" if reason else "")
        if self._on_event is None:
            return
        try:
            self._on_event(SessionEvent(kind, session.spec.name, reason,
                                        receiver.snapshot() if receiver else None, status))
        except Exception:   # noqa: BLE001 - the control plane's bug is logged, not ours
            log.exception("multicast: on_event failed")

    # -- sessions: open, start, close -----------------------------------------------------

    def _open(self, spec: SessionSpec, image: ImageFile, out: GroupSender,
              now_s: float) -> None:
        if self._stopping:
            out.close()
            image.close()
            return
        session = _Session(spec, image, out, self.settings, now_s)
        for other in self._sessions.values():
            if other.spec.group == spec.group:
                log.warning("multicast: sessions %r and %r share group %s: each one's "
                            "receivers also receive the other's traffic (override one's "
                            "group)", other.spec.name, spec.name, spec.group)
        self._sessions[spec.name] = session
        self._by_id[session.id] = session
        log.info("multicast: session %r open: %s (%d bytes, digest %s) to %s:%d, start at %s",
                 spec.name, spec.image, image.size, image.digest.hex(), spec.group,
                 spec.data_port, _trigger_text(spec))
        self._publish(now_s, force=True)

    def _start_now(self, name: str) -> str:
        """On the engine's thread: mark the session to start; why not, or ""."""
        session = self._sessions.get(name)
        if session is None or session.state is not SessionState.WAITING:
            return f"session {name!r} is not waiting"
        if not session.participants:
            return (f"nobody has joined session {name!r} yet: nothing to send (it keeps "
                    "waiting)")
        session.operator_start = True
        return ""

    def _close(self, name: str, reason: AbortReason, text: str, now_s: float) -> None:
        session = self._sessions.get(name)
        if session is not None:
            self._end(session, EventKind.SESSION_ABORTED, reason, text, now_s)

    def _set_state(self, session: _Session, state: SessionState) -> None:
        session.state = state
        with self._lock:
            if state in (SessionState.CLOSED, SessionState.ABORTED):
                self._names.pop(session.spec.name, None)
            else:
                self._names[session.spec.name] = state

    def _end(self, session: _Session, kind: EventKind, reason: AbortReason, text: str,
             now_s: float) -> None:
        """CLOSED (kind SESSION_CLOSED, after FINISH final) or ABORTED (ABORT to the group
        three times, now): report, forget, close the socket and the file."""
        if kind is EventKind.SESSION_ABORTED and session.receivers:
            # (a session nobody joined has nobody to tell: it never sends a packet)
            for _ in range(ABORT_REPEATS):
                self._group_message(session, mc.Abort, reason=reason, text=_line(text))
        for receiver in session.active:
            if session.started_s is not None:
                self._event(EventKind.RECEIVER_UNFINISHED, session,
                            f"not done when the session ended: {text}", receiver)
        self._set_state(session, SessionState.CLOSED if kind is EventKind.SESSION_CLOSED
                        else SessionState.ABORTED)
        final = session.snapshot(now_s)
        self._event(kind, session, text, status=final)
        if self.on_outcome is not None:
            try:
                self.on_outcome(final)
            except Exception:   # noqa: BLE001 - the control plane's bug is logged, not ours
                log.exception("multicast: on_outcome failed")
        self._sessions.pop(session.spec.name, None)
        self._by_id.pop(session.id, None)
        out = session.out
        self.counters.update({"data sends": out.sends, "packets sent": out.packets,
                              "sends that would block": out.would_block,
                              "send errors": out.errors})
        self.counters["sessions without GSO"] += 0 if out.gso else 1
        out.close()
        session.image.close()
        self._publish(now_s, force=True)

    # -- sending ---------------------------------------------------------------------------

    def _group_message(self, session: _Session, cls: type, **fields: Any) -> None:
        message = cls(session_id=session.id, image_digest=session.image.digest,
                      sequence=session.next_sequence(), **fields)
        session.out.send(mc.encode(message))

    def _to_receiver(self, session: _Session | None, address: tuple[str, int],
                     message: mc.Message) -> None:
        assert self._control is not None
        try:
            self._control.sendto(mc.encode(message), address)
        except OSError as exc:          # full buffer, unreachable: they retransmit or time out
            self.counters["control send errors"] += 1
            log.debug("multicast: send to %s:%d failed: %s", address[0], address[1], exc)

    def _next_control_sequence(self) -> int:
        self._control_sequence = (self._control_sequence + 1) % U32
        return self._control_sequence

    def _abort_receiver(self, session: _Session, receiver: _Receiver, reason: AbortReason,
                        text: str, now_s: float) -> None:
        receiver.abort_reason, receiver.abort_text, receiver.abort_sent_s = reason, text, now_s
        self._to_receiver(session, receiver.address, mc.Abort(
            session_id=session.id, image_digest=session.image.digest,
            receiver_id=receiver.id, sequence=self._next_control_sequence(), reason=reason,
            text=_line(text)))

    def _tick(self, session: _Session, now_s: float) -> float:
        """Timers, transitions and data of one session; returns when it next needs a turn."""
        nxt = now_s + MAX_WAIT_S
        if now_s >= session.next_announce_s:
            session.next_announce_s = now_s + ANNOUNCE_INTERVAL_S
            self._group_message(
                session, mc.Announce, state=_WIRE_STATE[session.state],
                control_port=self.control_port, participants=min(session.participants, 65535),
                start_clients=session.spec.start_clients,
                start_in_s=session.wire_start_in(now_s), image_bytes=session.image.size,
                session_name=session.spec.name)
        nxt = min(nxt, session.next_announce_s)
        if session.next_probe_s is not None and now_s >= session.next_probe_s:
            self._probe(session, now_s)
        if session.next_probe_s is not None:
            nxt = min(nxt, session.next_probe_s)
        self._check_receivers(session, now_s)
        if session.state is SessionState.WAITING:
            why = start_reason(session.participants, session.spec.start_clients,
                               session.spec.start_after_last_join_s, session.last_join_s,
                               now_s, session.operator_start)
            if why:
                self._begin(session, why, now_s)
            return nxt
        if session.state in (SessionState.CLOSED, SessionState.ABORTED):
            return nxt
        if session.starts_left and now_s >= session.next_start_s:
            session.starts_left -= 1
            session.next_start_s = now_s + session.probe_s
            self._group_message(session, mc.Start, image_bytes=session.image.size,
                                header_bytes=session.image.header_bytes,
                                index_offset=session.image.index_offset,
                                participants=min(session.participants, 65535),
                                rate_kbit_s=session.rate_kbit_s)
        if session.starts_left:
            nxt = min(nxt, session.next_start_s)
        if now_s >= session.next_rate_s:
            self._adapt(session, now_s)
        if session.finals_left:
            if now_s >= session.next_final_s:
                session.finals_left -= 1
                session.next_final_s = now_s + session.probe_s
                self._group_message(session, mc.Finish, image_bytes=session.image.size,
                                    final=True)
                if not session.finals_left:
                    self._end(session, EventKind.SESSION_CLOSED, AbortReason.OTHER,
                              session.end_reason, now_s)
                    return nxt
            return min(nxt, session.next_final_s)
        if not session.active:
            self._finish(session, "no receivers left", now_s)
            return now_s
        wait = self._send_data(session, now_s)
        if wait is not None:
            nxt = min(nxt, now_s + wait)
        if session.state is SessionState.SENDING and \
                session.pass_position >= session.image.size and not session.repair:
            self._set_state(session, SessionState.FINISHING)
            session.finishing_s = now_s
            session.next_finish_s = now_s
            log.info("multicast: session %r: first pass sent (%d bytes, %d repaired)",
                     session.spec.name, session.first_pass_bytes, session.repair_bytes)
        if session.state is SessionState.FINISHING:
            assert session.finishing_s is not None
            if not session.active:
                self._finish(session, "every receiver is done, left or lost", now_s)
            elif now_s >= session.finishing_s + self.settings.finish_timeout_s:
                self._finish(session, f"finish deadline ({self.settings.finish_timeout_s:g} s) "
                             "reached", now_s)
            elif now_s >= session.next_finish_s:
                session.next_finish_s = now_s + session.probe_s
                self._group_message(session, mc.Finish, image_bytes=session.image.size,
                                    final=False)
            nxt = min(nxt, session.next_finish_s)
        return nxt

    def _probe(self, session: _Session, now_s: float) -> None:
        grtt = session.grtt_s
        probe = probe_interval_s(grtt)
        session.next_probe_s = now_s + probe
        session.probe_sent_us = _us(now_s)
        session.probes_sent.append(session.probe_sent_us)
        self._group_message(session, mc.Probe, sent_at_us=session.probe_sent_us,
                            grtt_us=min(int(grtt * 1e6), U32 - 1),
                            probe_interval_ms=max(1, int(probe * 1000)),
                            rate_kbit_s=session.rate_kbit_s if session.started_s else 0,
                            pass_position=session.pass_position,
                            participants=min(session.participants, 65535))

    def _begin(self, session: _Session, why: str, now_s: float) -> None:
        if not session.participants:
            self._end(session, EventKind.SESSION_ABORTED, AbortReason.OTHER,
                      "no receivers joined", now_s)
            return
        self._set_state(session, SessionState.SENDING)
        session.started_s = now_s
        session.starts_left = START_REPEATS
        session.next_start_s = now_s
        session.next_rate_s = now_s + session.probe_s
        session.interval_start_s = now_s
        session.interval_bytes = 0
        session.bucket = TokenBucket(session.rate_kbit_s * 125, BURST_BYTES, now_s)
        for receiver in session.active:
            receiver.state = ReceiverState.RECEIVING
            receiver.interval_mark = (receiver.received.total, receiver.lost.total)
        self._event(EventKind.SESSION_STARTED, session,
                    f"{why}; {session.participants} receivers, {session.rate_kbit_s} kbit/s")

    def _finish(self, session: _Session, why: str, now_s: float) -> None:
        """FINISH final three times, P apart, then CLOSED."""
        if session.finals_left:
            return
        session.end_reason = why
        session.finals_left = START_REPEATS
        session.next_final_s = now_s
        if session.state is SessionState.SENDING:
            self._set_state(session, SessionState.FINISHING)
        session.repair.clear()

    def _send_data(self, session: _Session, now_s: float) -> float | None:
        """Repairs first, then the first pass, as the bucket allows; the wait until the next
        send when it does not (None: nothing to send)."""
        if session.starts_left == START_REPEATS:
            return 0.0                   # the first START goes before any data
        for _ in range(MAX_RUNS_PER_TURN):
            passing = session.state is SessionState.SENDING and \
                session.pass_position < session.image.size
            repairing = bool(session.repair)
            if repairing and passing and session.interval_repair_bytes > \
                    REPAIR_SHARE_MAX * (session.interval_repair_bytes +
                                        session.interval_pass_bytes):
                repairing = False   # the pass goes on: one receiver's NAKs never stall it
            if not repairing and not passing:
                return None
            wait = session.bucket.wait_s(RUN_PACKETS * mc.MAX_DATAGRAM, now_s)
            if wait > 0:
                return wait
            if repairing:
                ranges = self._repair_ranges(session)
                if not ranges:
                    continue
            else:
                ranges = [self._pass_run(session)]
            try:
                buffer, count, segment = self._encode(session, ranges, repairing)
            except OSError as exc:
                self._end(session, EventKind.SESSION_ABORTED, AbortReason.IMAGE_UNREADABLE,
                          f"the image cannot be read: {exc.strerror or exc}", now_s)
                return None
            if not session.out.send_run(buffer, count, segment):
                if repairing:
                    session.repair.nak([(o, o + n) for o, n in ranges], session.image.size,
                                       now_s, 0.0)
                return 0.001             # the send buffer is full: a moment
            session.next_sequence(count)
            wire = len(buffer)
            length = sum(n for _o, n in ranges)
            session.bucket.take(wire, now_s)
            session.interval_bytes += wire
            session.bytes_sent += length
            if repairing:
                session.repair_bytes += length
                session.interval_repair_bytes += length
                for offset, size in ranges:
                    session.repair.repaired(offset, size, now_s)
            else:
                session.first_pass_bytes += length
                session.interval_pass_bytes += length
                session.pass_position += length
        return 0.0

    @staticmethod
    def _repair_ranges(session: _Session) -> list[tuple[int, int]]:
        """The repairs for one send: queued ranges, in send order, up to a GSO run's worth of
        packets. Lost packets leave holes of one or a few whole packets, so with 5 % loss most
        ranges are a single packet; sent one range a call, each repair packet cost a loop turn
        and a system call. Ranges are joined while each fills whole packets: UDP_SEGMENT cuts
        the buffer at one size, so only the send's last packet may be short."""
        ranges: list[tuple[int, int]] = []
        room = RUN_PAYLOAD_BYTES                # a multiple of MAX_DATA_BYTES
        while room > 0:
            run = session.repair.next_run(room)
            if run is None:
                break
            ranges.append(run)
            room -= run[1]
            if run[1] % mc.MAX_DATA_BYTES:
                break                           # its last packet is short: the send ends
        return ranges

    @staticmethod
    def _encode(session: _Session, ranges: list[tuple[int, int]], repair: bool
                ) -> tuple[bytearray, int, int]:
        """DATA packets of the ranges (read from the image), numbered from the session's next
        sequence, back to back in one buffer: (buffer, packets, segment size)."""
        out: bytearray | None = None
        count = segment = 0
        for offset, length in ranges:
            buffer, n, segment = mc.encode_data_run(
                session.id, session.image.digest, (session.sequence + count) & 0xFFFFFFFF,
                offset, session.image.read(offset, length), repair=repair)
            if out is None:
                out = buffer
            else:
                out += buffer
            count += n
        assert out is not None
        return out, count, segment

    def _pass_run(self, session: _Session) -> tuple[int, int]:
        """The next piece of the first pass: never across a region boundary (the receivers
        place first-pass data by its pass position)."""
        position = session.pass_position
        base = 0
        for region in session.order.regions:
            if position < base + region.length:
                offset = region.offset + position - base
                return offset, min(RUN_PAYLOAD_BYTES, region.end - offset)
            base += region.length
        raise AssertionError("the pass is complete")

    # -- adapting to the receivers --------------------------------------------------------

    def _adapt(self, session: _Session, now_s: float) -> None:
        """Once a probe interval while sending: each receiver's loss over the interval, the
        rate's decision, and the verdicts on slow receivers."""
        interval = max(1e-3, now_s - session.interval_start_s)
        session.next_rate_s = now_s + session.probe_s
        window_losses, losses, queues = {}, {}, {}
        for receiver in session.active:
            if len(receiver.rtt_samples) >= 2:
                queues[receiver.id] = receiver.rtt_samples[-1] - min(receiver.rtt_samples)
            received, lost = receiver.received.total, receiver.lost.total
            old_received, old_lost = receiver.interval_mark
            receiver.interval_mark = (received, lost)
            losses[receiver.id] = session.losses.record(receiver.id, lost - old_lost,
                                                        received - old_received)
            window_losses[receiver.id] = self._window(session, receiver, now_s)
        group = median([w.packets_lost / (w.packets_lost + w.packets_received)
                        for w in window_losses.values() if w is not None and
                        w.packets_lost + w.packets_received > 0])
        excluded = set()
        for receiver in session.active:
            window = window_losses[receiver.id]
            if window is None:
                continue
            why = receiver_verdict(window, group, self.settings.max_receiver_loss,
                                   self.settings.min_receiver_rate_kbit_s)
            if why:
                excluded.add(receiver.id)
                receiver.state = ReceiverState.DROPPED
                session.losses.forget(receiver.id)
                self._abort_receiver(session, receiver, AbortReason.TOO_SLOW,
                                     f"too slow for the group: {why}; continue over unicast",
                                     now_s)
                self._event(EventKind.RECEIVER_DROPPED, session, why, receiver)
        allowed = session.rate_kbit_s * 125 * interval
        share = session.interval_bytes / allowed if allowed else 1.0
        new, session.slow_start, why = rate_decision(session.rate_kbit_s, losses, share,
                                                     session.limits, frozenset(excluded),
                                                     session.slow_start, queues)
        if new != session.rate_kbit_s:
            log.debug("multicast: session %r: %s", session.spec.name, why)
            session.rate_kbit_s = new
            session.bucket.set_rate(new * 125, now_s)
        session.interval_bytes = 0
        session.interval_repair_bytes = session.interval_pass_bytes = 0
        session.interval_start_s = now_s

    def _window(self, session: _Session, receiver: _Receiver, now_s: float
                ) -> ReceiverWindow | None:
        """The receiver over its last VERDICT_WINDOW_S or more (None: not that long yet)."""
        if not receiver.samples:
            return None
        newest = receiver.samples[-1]
        oldest = None
        for sample in receiver.samples:
            if sample[0] <= now_s - VERDICT_WINDOW_S:
                oldest = sample
            else:
                break
        if oldest is None:
            return None
        t0, received0, lost0, bytes0, sent0 = oldest
        t1, received1, lost1, bytes1, _sent1 = newest
        window = ReceiverWindow(duration_s=t1 - t0, packets_received=received1 - received0,
                                packets_lost=lost1 - lost0, bytes_gained=bytes1 - bytes0,
                                bytes_missing=session.image.size - bytes0,
                                bytes_sent=session.first_pass_bytes - sent0)
        total = window.packets_received + window.packets_lost
        receiver.window_loss = window.packets_lost / total if total else 0.0
        return window

    def _check_receivers(self, session: _Session, now_s: float) -> None:
        """Lost receivers (silent past max(2 s, 3 P + RTO)): ABORT lost."""
        probe = session.probe_s
        for receiver in session.active:
            if now_s - receiver.heard_s > receiver_lost_after_s(probe, receiver.rtt.rto_s):
                receiver.state = ReceiverState.LOST
                session.losses.forget(receiver.id)
                why = f"silent for {now_s - receiver.heard_s:.1f} s"
                self._abort_receiver(session, receiver, AbortReason.LOST,
                                     f"lost: {why}; continue over unicast", now_s)
                self._event(EventKind.RECEIVER_LOST, session, why, receiver)

    # -- control packets ------------------------------------------------------------------

    def _read_control(self) -> None:
        assert self._control is not None
        # a command queued before these packets came (open_session, then a JOIN) goes first
        self._run_commands(time.monotonic())
        for _ in range(MAX_CONTROL_PER_TURN):
            try:
                size, address = self._control.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # e.g. an ICMP error queued on the socket
                self.counters["control receive errors"] += 1
                log.debug("multicast: control socket: %s", exc)
                continue
            data = memoryview(self._buffer)[:size]
            now = time.monotonic()
            try:
                message = mc.decode(data)
            except mc.MulticastFormatError as exc:
                if exc.unknown_type:
                    self.counters["unknown type"] += 1
                    continue
                self.counters["malformed"] += 1
                log.debug("multicast: malformed packet from %s:%d: %s", address[0], address[1],
                          exc)
                self._refuse_version(bytes(data), address)
                continue
            try:
                self._handle(message, address, now)
            except Exception:   # noqa: BLE001 - one bad packet never kills the loop
                self.counters["handler errors"] += 1
                log.exception("multicast: handling %s from %s:%d failed",
                              type(message).__name__, address[0], address[1])

    def _refuse_version(self, data: bytes, address: tuple[str, int]) -> None:
        """A JOIN of another version gets a version-1 JOIN_REFUSED (the header is the same in
        every version); anything else malformed is only counted."""
        try:
            header = mc.decode_header(data)
        except mc.MulticastFormatError:
            return
        if header.version == mc.VERSION or header.type != mc.MessageType.JOIN or \
                not header.receiver_id:
            return
        self._to_receiver(None, address, mc.JoinRefused(
            session_id=header.session_id, receiver_id=header.receiver_id,
            image_digest=header.image_digest, sequence=self._next_control_sequence(),
            echo_sent_at_us=0, reason=Refusal.VERSION,
            text=f"this server speaks version {mc.VERSION} of the multicast protocol"))

    def _handle(self, message: mc.Message, address: tuple[str, int], now_s: float) -> None:
        if isinstance(message, mc.Join):
            self._join(message, address, now_s)
            return
        if not isinstance(message, (mc.Status, mc.Nak, mc.Leave)):
            self.counters["unexpected type"] += 1
            return
        session = self._by_id.get(message.session_id)
        receiver = session.receivers.get(message.receiver_id) if session else None
        if session is None or receiver is None or receiver.address != address or \
                message.image_digest != session.image.digest:
            self.counters["unknown receiver"] += 1     # forged, stale, or another session's
            return
        receiver.heard_s = now_s
        if not receiver.active:
            if receiver.state in (ReceiverState.LOST, ReceiverState.DROPPED) and \
                    not isinstance(message, mc.Leave) and \
                    now_s - receiver.abort_sent_s > session.probe_s:
                # it missed its ABORT: tell it again (at most once a probe interval)
                self._abort_receiver(session, receiver, receiver.abort_reason,
                                     receiver.abort_text, now_s)
            return
        if isinstance(message, mc.Status):
            self._status(session, receiver, message, now_s)
        elif isinstance(message, mc.Nak):
            session.naks += 1
            if session.state in (SessionState.SENDING, SessionState.FINISHING) and \
                    not session.finals_left:
                session.repair.nak(((r.offset, r.end) for r in message.ranges),
                                   session.pass_position, now_s, session.grtt_s)
        else:
            self._leave(session, receiver, message)

    def _status(self, session: _Session, receiver: _Receiver, status: mc.Status,
                now_s: float) -> None:
        if status.echo_sent_at_us and status.echo_sent_at_us in session.probes_sent and \
                status.echo_sent_at_us > receiver.echoed_us:
            # any recent PROBE of ours (a busy receiver answers one after the next went out:
            # keeping only the newest's answers would keep only the quick ones), each once
            receiver.echoed_us = status.echo_sent_at_us
            sample = rtt_sample_s(now_s, status.echo_sent_at_us / 1e6,
                                  status.echo_delay_us / 1e6)
            receiver.rtt.update(sample)
            receiver.rtt_samples.append(sample)
        receiver.status = status
        received = receiver.received.update(status.packets_received)
        lost = receiver.lost.update(status.packets_lost)
        if session.started_s is not None:
            receiver.samples.append((now_s, received, lost, status.bytes_received,
                                     session.first_pass_bytes))
        if status.state is mc.ReceiverState.DONE:
            receiver.state = ReceiverState.DONE
            session.losses.forget(receiver.id)
            self._event(EventKind.RECEIVER_DONE, session,
                        f"{status.bytes_written} bytes written, {status.chunks_verified} "
                        "chunks verified", receiver)
        elif status.state is mc.ReceiverState.FAILED:
            receiver.state = ReceiverState.FAILED
            session.losses.forget(receiver.id)
            self._event(EventKind.RECEIVER_FAILED, session, "its STATUS says failed", receiver)
        elif session.started_s is not None:
            receiver.state = ReceiverState.RECEIVING

    def _leave(self, session: _Session, receiver: _Receiver, leave: mc.Leave) -> None:
        session.losses.forget(receiver.id)
        if leave.reason is LeaveReason.DONE:
            receiver.state = ReceiverState.DONE
            self._event(EventKind.RECEIVER_DONE, session, leave.text or "done", receiver)
            return
        receiver.state = ReceiverState.FAILED if leave.reason is LeaveReason.FAILED \
            else ReceiverState.LEFT
        kind = EventKind.RECEIVER_FAILED if leave.reason is LeaveReason.FAILED \
            else EventKind.RECEIVER_LEFT
        self._event(kind, session, f"{leave.reason.name.lower()}: {leave.text}", receiver)

    def _join(self, join: mc.Join, address: tuple[str, int], now_s: float) -> None:
        session = self._sessions.get(join.session_name)
        if session is None and not join.session_id:
            with self._lock:
                opening = join.session_name in self._names
            if opening:
                # open_session() has reserved the name and is reading the image: the session
                # exists in a moment. Not answered: the receiver sends its JOIN again (a
                # refusal would be final, for a receiver that started before the sender)
                self.counters["joins before the session opened"] += 1
                return
        if session is None or (join.session_id and join.session_id != session.id):
            self.counters["joins refused"] += 1
            text = (f"no session {join.session_name!r} here" if session is None else
                    f"session {join.session_name!r} restarted: join it again by name")
            self._to_receiver(None, address, mc.JoinRefused(
                session_id=join.session_id, receiver_id=join.receiver_id,
                image_digest=join.image_digest, sequence=self._next_control_sequence(),
                echo_sent_at_us=join.sent_at_us, reason=Refusal.UNKNOWN_SESSION, text=text))
            return
        known = session.receivers.get(join.receiver_id)
        if known is not None and known.address == address and known.active:
            self._join_ack(session, join, address, now_s)         # joins are idempotent
            return
        waiting = session.state is SessionState.WAITING
        refused = join_refusal(waiting, now_s - (session.started_s or now_s),
                               session.participants, self.settings.max_receivers,
                               join.image_digest, session.image.digest)
        admission: Admission | None = None
        if refused is None:
            try:
                admission = self._admit(JoinRequest(
                    session=session.spec.name, mac=join.mac, token=join.token,
                    address=address, image_digest=join.image_digest))
            except Exception:   # noqa: BLE001
                log.exception("multicast: admit() failed")
                admission = Admission(False, int(Refusal.OTHER), "admission failed")
            if not admission.admitted:
                try:
                    code = Refusal(admission.reason_code)
                except ValueError:
                    code = Refusal.OTHER
                refused = (code, admission.text)
        if refused is not None:
            code, text = refused
            self.counters["joins refused"] += 1
            self._to_receiver(session, address, mc.JoinRefused(
                session_id=session.id, receiver_id=join.receiver_id,
                image_digest=session.image.digest, sequence=self._next_control_sequence(),
                echo_sent_at_us=join.sent_at_us, reason=code, text=_line(text)))
            self._event(EventKind.RECEIVER_REFUSED, session,
                        f"{join.mac or 'no MAC'} from {address[0]}: {code.name.lower()}: "
                        f"{text}")
            return
        if known is not None:
            session.receivers.pop(known.id)          # the same id, from elsewhere: anew
        receiver = _Receiver(join.receiver_id, address, join.mac, now_s)
        session.receivers[receiver.id] = receiver
        if len(session.receivers) > 2 * self.settings.max_receivers:
            for gone in [r for r in session.receivers.values() if not r.active][
                    :len(session.receivers) - 2 * self.settings.max_receivers]:
                session.receivers.pop(gone.id)     # forget the oldest who left: bounded
        session.last_join_s = now_s
        if session.next_probe_s is None:
            session.next_probe_s = now_s
        self._join_ack(session, join, address, now_s)
        self._event(EventKind.RECEIVER_JOINED, session,
                    f"{session.participants} of {session.spec.start_clients or '-'}", receiver)

    def _join_ack(self, session: _Session, join: mc.Join, address: tuple[str, int],
                  now_s: float) -> None:
        self._to_receiver(session, address, mc.JoinAck(
            session_id=session.id, receiver_id=join.receiver_id,
            image_digest=session.image.digest, sequence=self._next_control_sequence(),
            echo_sent_at_us=join.sent_at_us, group_address=session.spec.group,
            data_port=session.spec.data_port, image_bytes=session.image.size,
            state=_WIRE_STATE.get(session.state, mc.SessionState.FINISHING),
            participants=min(session.participants, 65535),
            start_clients=session.spec.start_clients,
            start_in_s=session.wire_start_in(now_s)))


def _line(text: str) -> str:
    """A reason for the wire: one line, at most 255 bytes of UTF-8."""
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    raw = clean.encode("utf-8")[:mc.MAX_TEXT_BYTES]
    return raw.decode("utf-8", "ignore")


def _trigger_text(spec: SessionSpec) -> str:
    parts = []
    if spec.start_clients:
        parts.append(f"{spec.start_clients} receivers")
    if spec.start_after_last_join_s is not None:
        parts.append(f"{spec.start_after_last_join_s:g} s after the last join")
    return " or ".join(parts) or "an operator's word"


# -- the command-line entry (tests, the bench) --------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m imgsrvd.multicast.engine",
        description="Send one image file to a multicast group (a test and bench entry of "
                    "imgsrvd's multicast engine). Events and the final numbers are printed "
                    "as JSON lines.")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--interface", required=True,
                        help="the address of the interface to send from")
    parser.add_argument("--control-address", help="the control socket's address "
                        "(default: --interface)")
    parser.add_argument("--control-port", type=int, default=mc.CONTROL_PORT)
    parser.add_argument("--name", default="bench", help="the session's name")
    parser.add_argument("--group", help="default: the name's group (group_address)")
    parser.add_argument("--data-port", type=int, default=mc.DATA_PORT)
    parser.add_argument("--clients", type=int, default=1, help="start when this many joined")
    parser.add_argument("--start-after", type=float, default=None,
                        help="or this many seconds after the last join")
    parser.add_argument("--rate-kbit", type=int, default=0, help="MaxBitrate (0: adapt)")
    parser.add_argument("--min-receiver-rate-kbit", type=int, default=0)
    parser.add_argument("--max-receiver-loss", type=float, default=0.5)
    parser.add_argument("--finish-timeout", type=float, default=30.0)
    parser.add_argument("--max-receivers", type=int, default=64)
    parser.add_argument("--ttl", type=int, default=1)
    parser.add_argument("--no-loop", action="store_true",
                        help="IP_MULTICAST_LOOP off (no receiver on this host)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    settings = EngineSettings(
        control_address=args.control_address or args.interface,
        control_port=args.control_port, interface_address=args.interface, ttl=args.ttl,
        max_bitrate_kbit_s=args.rate_kbit, min_receiver_rate_kbit_s=args.min_receiver_rate_kbit,
        max_receiver_loss=args.max_receiver_loss, finish_timeout_s=args.finish_timeout,
        max_sessions=1, max_receivers=args.max_receivers)
    spec = SessionSpec(name=args.name, image_path=os.path.abspath(args.image),
                       image=os.path.basename(args.image),
                       group=args.group or mc.group_address(args.name),
                       data_port=args.data_port, start_clients=args.clients,
                       start_after_last_join_s=args.start_after, origin=SessionOrigin.MANUAL)
    done = threading.Event()
    outcome: dict[str, Any] = {}
    marks: dict[str, float] = {}

    def on_event(event: SessionEvent) -> None:
        now = time.monotonic()
        line: dict[str, Any] = {"event": event.kind.value, "session": event.session,
                                "reason": event.reason, "t": round(now, 3)}
        if event.receiver is not None:
            line["receiver"] = _jsonable(event.receiver)
        if event.kind is EventKind.SESSION_STARTED:
            marks["started"] = now
            marks["cpu"] = _cpu_s()
        if event.status is not None:
            outcome["status"] = event.status
            outcome["kind"] = event.kind
            outcome["elapsed"] = now - marks.get("started", now)
            outcome["cpu"] = _cpu_s() - marks.get("cpu", _cpu_s())
            done.set()
        print(json.dumps(line), flush=True)

    engine = MulticastEngine(settings, lambda request: Admission(True), on_event,
                             loopback=not args.no_loop)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        engine.start()
        engine.open_session(spec)
    except (OSError, SessionError) as exc:
        print(f"engine: {exc}", file=sys.stderr)
        engine.stop()
        return 2
    print(json.dumps({"event": "ready", "group": spec.group, "port": engine.control_port,
                      "session": spec.name}), flush=True)
    while not done.is_set() and not stop.is_set():
        done.wait(0.2)
    engine.stop()
    status: SessionStatus | None = outcome.get("status")
    if status is not None:
        elapsed = outcome["elapsed"]
        print(json.dumps({
            "final": outcome["kind"].value, "bytes_sent": status.bytes_sent,
            "repair_bytes": status.repair_bytes, "repair_share": round(status.repair_share, 4),
            "image_bytes": status.image_bytes, "seconds": round(elapsed, 3),
            "mb_s": round(status.image_bytes / elapsed / 1e6, 2) if elapsed else None,
            "cpu_s": round(outcome["cpu"], 3),
            "cpu_share": round(outcome["cpu"] / elapsed, 3) if elapsed else None,
            "rate_kbit_s": status.rate_kbit_s,
            "participants": [_jsonable(p) for p in status.participants],
            "counters": dict(engine.counters)}), flush=True)
    return 0 if outcome.get("kind") is EventKind.SESSION_CLOSED else 1


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    return value


if __name__ == "__main__":
    sys.exit(main())
