"""The multicast control plane: which sessions exist, who may join which, start and stop, and
what becomes of them and of their receivers (docs/multicast.md).

The catalog runs on imgsrvd's event loop; the engine (the data plane, engine.py) on a thread
of its own. Between them, the contract of model.py:

- the catalog opens sessions on the engine (`open_session(SessionSpec)`): the directory's
  enabled sessions (re-read every SYNC_S seconds and with every work query), sessions a
  workstation registers (`img session NAME master`, POST /v1/sessions) and an operator's
  (`zmgmcast -start`); at most MaxSessions at once;
- the engine asks the catalog about every JOIN (`admit(JoinRequest) -> Admission`), on the
  engine's thread: the catalog answers from a snapshot it replaces whole (never edits), so
  no lock is shared and a JOIN never waits for the loop. A JOIN is admitted with a capability
  that allows retrieving the session's image for the JOIN's machine (a machine's, from its
  multicast work answer; or an operator's, `preboot-dir token --allow retrieve`), or without
  one when AllowAnonymous is on; a session that began imaging refuses (started);
- the engine reports each session's end (`on_outcome(SessionStatus)`, any thread): the catalog
  deletes or disables the directory's session as it says (decisions.after_session) and writes
  one results log entry per receiver: the receiver's own report (POST /v1/results with the
  multicast fields), judged by decisions.participant_verdict, or, when none came within
  REPORT_WAIT_S, the sender's view of it, never a success;
- zmgmcast's control commands (root, on the status socket) start, stop and delete sessions.

With MaxSessions = 0 (multicast off), or where the engine cannot be imported, NoEngine stands
in: it keeps the sessions it is given, sends nothing, and reports them waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from common.machine import normalize_mac
from common.policy.model import MulticastSession
from common.policy.sessions import session_key
from common.policy.trust import Gate, Refused

from . import decisions
from .decisions import Ending, OpenSession, ReceiverReport, Registration, Verdict
from .images import ImageFacts, ImageFactsCache, ImageFactsError
from .model import (Admission, JoinRequest, ParticipantStatus, ReceiverState, SessionOrigin,
                    SessionSpec, SessionState, SessionStatus)

log = logging.getLogger("preboot.imgsrvd.multicast")

TICK_S = 1.0                    # the engine's status is read this often
SYNC_S = 10.0                   # ... and the directory's sessions this often
RETRY_UNAVAILABLE_S = 60.0      # a directory session that could not open is tried again then
REPORT_WAIT_S = 600.0           # a receiver's report is awaited this long after the session
MAX_RESULTS = 65536             # receivers' reports and entries waiting for one, at most
ENDED_KEPT = 256                # ended sessions whose image facts are kept for late reports
STOP_DIRECTORY_S = 1.0          # stopping: what the directory gets to take ended sessions


class Engine(Protocol):
    """What the catalog calls on the data plane (engine.py's MulticastEngine)."""

    on_outcome: Callable[[SessionStatus], None] | None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def open_session(self, spec: SessionSpec) -> None: ...
    def start_now(self, name: str) -> None: ...
    def close(self, name: str, reason: str) -> None: ...
    def status(self) -> list[SessionStatus]: ...


class NoEngine:
    """The engine's stand-in: sessions are kept and listed (waiting), nothing is sent."""

    def __init__(self) -> None:
        self.on_outcome: Callable[[SessionStatus], None] | None = None
        self._specs: dict[str, SessionSpec] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._specs.clear()

    def open_session(self, spec: SessionSpec) -> None:
        self._specs[spec.name] = spec

    def start_now(self, name: str) -> None:
        pass

    def close(self, name: str, reason: str) -> None:
        spec = self._specs.pop(name, None)
        if spec is not None and self.on_outcome is not None:
            self.on_outcome(_status_of(spec, SessionState.ABORTED))

    def status(self) -> list[SessionStatus]:
        return [_status_of(spec, SessionState.WAITING) for spec in self._specs.values()]


def _status_of(spec: SessionSpec, state: SessionState, image_bytes: int = 0) -> SessionStatus:
    return SessionStatus(spec.name, spec.image, spec.group, state, spec.origin,
                         spec.start_clients, None, 0, 0, 0, image_bytes)


class DirectoryPort(Protocol):
    """The directory's sessions, as the server reaches them (on its worker pool)."""

    async def sessions(self) -> list[MulticastSession]: ...
    async def change_sessions(self, change: Callable[[list[MulticastSession]],
                                                     list[MulticastSession] | None]) -> None: ...


@dataclass(frozen=True)
class CatalogSettings:
    image_root: str
    data_port: int                    # the data port of sessions that name none
    control_port: int                 # as configured (0: the engine picks one)
    report_wait_s: float = REPORT_WAIT_S


@dataclass(frozen=True)
class JoinInfo:
    """Where a receiver joins a session: the multicast fields of a work answer."""

    session: str
    group: str
    data_port: int
    control_port: int
    image: str
    digest: str                       # hex
    state: str

    def answer(self) -> dict[str, Any]:
        return {"session": self.session, "group": self.group, "data_port": self.data_port,
                "control_port": self.control_port, "image": self.image, "digest": self.digest,
                "state": self.state}


@dataclass(frozen=True)
class ParticipantEntry:
    """One receiver's results log entry."""

    session: str
    image: str
    mac: str
    address: str
    verdict: Verdict
    report: ReceiverReport | None
    participant: ParticipantStatus | None


@dataclass
class _Waiting:
    """A receiver of an ended session whose report has not come yet."""

    session: str
    image: str
    participant: ParticipantStatus
    facts: ImageFacts | None
    due_at: float


@dataclass
class _Open:
    view: OpenSession
    spec: SessionSpec
    facts: ImageFacts
    status: SessionStatus | None = None


class Catalog:
    """The control plane of one imaging server: start(engine), then sync / register /
    start_now / stop_session / report from the loop, admit from the engine's thread."""

    def __init__(self, settings: CatalogSettings, gate: Gate, directory: DirectoryPort,
                 record: Callable[[ParticipantEntry], None],
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._gate = gate
        self._directory = directory
        self._record = record
        self._clock = clock
        self._engine: Engine | None = None
        self._on = False                       # an engine runs (MaxSessions > 0)
        self._max_sessions = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[str, _Open] = {}      # by session_key, on the loop only
        self._views: dict[str, OpenSession] = {}   # the snapshot admit() reads: replaced whole
        self._asked: dict[str, Ending] = {}    # how the catalog asked a session to end
        self._pending_changes: dict[str, tuple[MulticastSession, Ending]] = {}
        self._unavailable: dict[str, tuple[str, float]] = {}   # key -> (why, retry at)
        self._ended: OrderedDict[str, ImageFacts] = OrderedDict()
        self._reported: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._waiting: OrderedDict[tuple[str, str], _Waiting] = OrderedDict()
        self._facts = ImageFactsCache()
        self._ticker: asyncio.Task | None = None
        self._last_sync = -SYNC_S
        self._syncing: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._on

    async def start(self, engine: Engine | None, max_sessions: int) -> None:
        """Run with `engine` (None: multicast is off). The engine is started on a thread."""
        self._loop = asyncio.get_running_loop()
        self._syncing = asyncio.Lock()
        self._max_sessions = max_sessions
        if engine is None:
            return
        engine.on_outcome = self._outcome_threadsafe
        await asyncio.to_thread(engine.start)
        self._engine, self._on = engine, True
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        engine, self._engine, self._on = self._engine, None, False
        for key in self._open:
            self._asked.setdefault(key, Ending.SHUTDOWN)
        if engine is not None:
            try:
                await asyncio.to_thread(engine.stop)
            except Exception as exc:  # stopping anyway
                log.error("multicast engine: stopping: %s", exc)
        await asyncio.sleep(0)               # outcomes the engine reported while stopping
        if self._pending_changes and self._syncing is not None:
            # a session that completed must not run again after a restart
            try:
                await asyncio.wait_for(self._apply_locked(), STOP_DIRECTORY_S)
            except asyncio.TimeoutError:
                log.error("multicast: stopping before the directory took the end of session(s) "
                          "%s; delete or disable them (preboot-dir sessions)",
                          ", ".join(s.name for s, _ in self._pending_changes.values()))
        self._flush_waiting(everything=True)

    def control_port(self) -> int:
        """The control port receivers join on: the engine's, when it picked a free one."""
        bound = getattr(self._engine, "control_port", None)
        return bound if isinstance(bound, int) and bound > 0 else self.settings.control_port

    # ---- what the rest of imgsrvd asks ----------------------------------------------------------

    def started_keys(self) -> frozenset[str]:
        """session_key()s of the directory sessions a machine must not be sent into now: those
        that began imaging, and those that ended and are being deleted or disabled."""
        return frozenset([key for key, entry in self._open.items() if entry.view.started] +
                         list(self._pending_changes))

    def join_info(self, name: str) -> JoinInfo | None:
        entry = self._open.get(session_key(name))
        if entry is None:
            return None
        return JoinInfo(entry.view.name, entry.spec.group, entry.spec.data_port,
                        self.control_port(), entry.view.image, entry.facts.digest_hex,
                        entry.view.state.value)

    def unavailable(self, name: str) -> str | None:
        """Why the directory session `name` is not open, if it could not be opened."""
        found = self._unavailable.get(session_key(name))
        return found[0] if found else None

    async def sync(self, sessions: list[MulticastSession] | None = None) -> None:
        """Make the engine run the directory's enabled sessions (read now unless given)."""
        if not self._on or self._syncing is None:
            return
        async with self._syncing:
            if sessions is None:
                try:
                    sessions = await self._directory.sessions()
                except Exception as exc:  # the directory is down: the open ones run on
                    log.warning("multicast: cannot read the directory's sessions: %s", exc)
                    return
            self._last_sync = self._clock()
            applied = await self._apply_directory_changes()
            if applied:          # the sessions read before the change: as they are now
                sessions = [s for s in sessions if session_key(s.name) not in applied]
            now = self._clock()
            self._unavailable = {k: v for k, v in self._unavailable.items() if v[1] > now}
            views = {key: entry.view for key, entry in self._open.items()}
            plan = decisions.plan_sync(sessions, views, self._free(),
                                       set(self._pending_changes) | set(self._unavailable))
            for name, why in plan.close:
                self._close(name, why, Ending.WITHDRAWN)
            for session in plan.open:
                await self._open_directory_session(session)

    async def register(self, request: Registration) -> tuple[int, dict[str, Any]]:
        """A session not in the directory (POST /v1/sessions; zmgmcast -start): (HTTP status,
        answer). Opening one that is open as asked answers it again (200)."""
        if not self._on:
            return 503, {"error": "multicast is off on this server (MaxSessions = 0, or its "
                                  "port could not be opened)"}
        try:
            facts: ImageFacts | None = await asyncio.to_thread(
                self._facts.get, self.settings.image_root, request.image)
        except ImageFactsError as exc:
            facts, problem = None, str(exc)
        else:
            problem = ""
        try:
            directory_names = [s.name for s in await self._directory.sessions()]
        except Exception as exc:  # cannot tell: refuse rather than shadow a directory session
            return 503, {"error": f"the directory cannot be read ({exc}); try again later"}
        views = {key: entry.view for key, entry in self._open.items()}
        refusal = decisions.registration_refusal(request, views, directory_names, self._free(),
                                                 facts.digest if facts else None)
        if refusal is not None:
            status, reason = refusal
            if status == 404 and problem:
                reason = f"{problem} (a workstation master stores its image first)"
            return status, {"error": reason}
        key = session_key(request.name)
        assert self._syncing is not None
        async with self._syncing:      # the engine reads the image in a thread: one at a time
            created = key not in self._open
            if created:
                assert facts is not None
                spec = decisions.session_spec(request.name, facts, request.clients,
                                              request.wait_min, request.origin,
                                              self.settings.data_port)
                if not await self._engine_open(spec, facts, None):
                    return 500, {"error": "the multicast engine did not take the session (see "
                                          "the imaging server's log)"}
                log.info("multicast: %s session '%s' opened: %s to %s:%d, %s",
                         request.origin.value, request.name, request.image, spec.group,
                         spec.data_port, _triggers(spec))
        info = self.join_info(request.name)
        assert info is not None
        return (201 if created else 200), {**info.answer(), "created": created}

    def start_now(self, name: str, origins: tuple[SessionOrigin, ...] | None = None
                  ) -> tuple[bool, str]:
        """Start a waiting session now (the master's g, zmgmcast -start NAME)."""
        entry = self._open.get(session_key(name))
        if entry is None:
            return False, f"no multicast session '{name}'"
        if origins is not None and entry.view.origin not in origins:
            return False, f"'{entry.view.name}' is a {entry.view.origin.value} session"
        if entry.view.started:
            return False, f"session '{entry.view.name}' began already"
        assert self._engine is not None
        try:
            self._engine.start_now(entry.view.name)
        except Exception as exc:  # noqa: BLE001 - the engine's SessionError: nobody joined, ...
            return False, str(exc)
        log.info("multicast: session '%s' started now (no trigger waited for)", entry.view.name)
        return True, f"session '{entry.view.name}' starts now"

    async def stop_session(self, name: str, delete: bool,
                           origins: tuple[SessionOrigin, ...] | None = None) -> tuple[bool, str]:
        """Stop a session (an operator): a directory session is then kept, disabled, or with
        delete, removed from the directory (also when it is not running)."""
        key = session_key(name)
        entry = self._open.get(key)
        if entry is not None:
            if origins is not None and entry.view.origin not in origins:
                return False, f"'{entry.view.name}' is a {entry.view.origin.value} session"
            ending = Ending.DELETED if delete else Ending.STOPPED
            self._close(entry.view.name, "deleted by an operator" if delete
                        else "stopped by an operator", ending)
            return True, f"session '{entry.view.name}' {'deleted' if delete else 'stopped'}"
        if not delete or origins is not None:
            return False, f"no multicast session '{name}' is running"
        found: list[str] = []

        def remove(sessions: list[MulticastSession]) -> list[MulticastSession] | None:
            kept = [s for s in sessions if session_key(s.name) != key]
            found.extend(s.name for s in sessions if session_key(s.name) == key)
            return kept if found else None
        try:
            await self._directory.change_sessions(remove)
        except Exception as exc:  # DirectoryError, timeout
            return False, f"the directory cannot be changed: {exc}"
        if not found:
            return False, f"no multicast session '{name}' runs or is in the directory"
        log.info("multicast: session '%s' deleted from the directory by an operator", found[0])
        return True, f"session '{found[0]}' deleted from the directory"

    def view(self, name: str) -> OpenSession | None:
        entry = self._open.get(session_key(name))
        return entry.view if entry else None

    def statuses(self) -> list[SessionStatus]:
        """The engine's view of each open session (as of the last poll)."""
        return [entry.status or _status_of(entry.spec, entry.view.state, entry.facts.size)
                for entry in self._open.values()]

    # ---- joins (the engine's thread) ----------------------------------------------------------

    def admit(self, request: JoinRequest) -> Admission:
        """The engine's question about one JOIN. Runs on the engine's thread: reads only the
        snapshot and the Gate, never waits for the loop."""
        view = self._views.get(session_key(request.session))
        if view is not None and view.name != request.session:
            view = None          # on the wire names are exact (another case: another group)
        refusal = decisions.join_refusal(view, request, self._clock())
        if refusal is not None:
            return refusal
        assert view is not None
        try:
            self._gate.check_client(request.address[0])
        except Refused as exc:
            return decisions.token_admission(exc)
        mac = normalize_mac(request.mac) if request.mac else None
        try:
            capability = self._gate.authorize(f"Bearer {request.token}" if request.token
                                               else None, "retrieve", time.time(), view.image,
                                               mac)
        except Refused as exc:
            return decisions.token_admission(exc)
        if capability is not None and not capability.is_operator and mac is None:
            return decisions.token_admission(Refused(
                403, "a machine's capability needs the machine's MAC in the join"))
        return decisions.token_admission(None)

    # ---- results ------------------------------------------------------------------------------

    def knows(self, session: str) -> bool:
        """Whether the catalog has the image of this session (open, or ended not long ago)."""
        key = session_key(session)
        return key in self._open or key in self._ended

    def report(self, report: ReceiverReport, image: ImageFacts | None = None) -> Verdict:
        """A receiver's report: its verdict (the caller writes the entry, counts an Image Sent
        when verified). The receiver's entry from the sender's view is then not written.
        image: the facts of the image the report names, for a session the catalog no longer
        knows (imgsrvd restarted since): the report is then judged against that image."""
        key = session_key(report.session)
        entry = self._open.get(key)
        facts = entry.facts if entry is not None else self._ended.get(key, image)
        participant = None
        if entry is not None and entry.status is not None:
            participant = next((p for p in entry.status.participants if p.mac == report.mac),
                               None)
        waiting = self._waiting.pop((key, report.mac), None)
        if waiting is not None:
            participant, facts = waiting.participant, waiting.facts or facts
        self._reported[(key, report.mac)] = self._clock()
        self._reported.move_to_end((key, report.mac))
        while len(self._reported) > MAX_RESULTS:
            self._reported.popitem(last=False)
        verdict = decisions.participant_verdict(report, participant, facts)
        if not verdict.verified and report.status == "success":
            log.warning("multicast: %s reported success in session '%s', logged as a failure: "
                        "%s", report.mac, report.session, verdict.error)
        return verdict

    # ---- the engine's reports -------------------------------------------------------------------

    def _outcome_threadsafe(self, status: SessionStatus) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._ended_session, status)
        except RuntimeError:        # the loop is closing: imgsrvd is stopping
            pass

    def _ended_session(self, status: SessionStatus) -> None:
        """A session ended: its receivers' entries await their reports, a directory session
        is deleted or disabled."""
        key = session_key(status.name)
        entry = self._open.pop(key, None)
        self._publish()
        ending = decisions.ending_of(status.state, self._asked.pop(key, None))
        facts = entry.facts if entry else None
        if facts is not None:
            self._ended[key] = facts
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        done = sum(1 for p in status.participants if p.state is ReceiverState.DONE)
        log.info("multicast: session '%s' ended (%s): %d receivers, %d done, %d bytes sent "
                 "(%.0f %% repairs)", status.name, ending.value, len(status.participants), done,
                 status.bytes_sent, 100 * status.repair_share)
        now = self._clock()
        for participant in status.participants:
            who = participant.mac or f"{participant.address}#{participant.receiver_id:x}"
            if (key, participant.mac) in self._reported and participant.mac:
                continue
            wait = self.settings.report_wait_s
            self._waiting[(key, who)] = _Waiting(status.name, status.image, participant, facts,
                                                 now + wait)
            while len(self._waiting) > MAX_RESULTS:
                self._write_waiting(self._waiting.popitem(last=False)[1])
        source = entry.view.source if entry else None
        if source is not None and entry is not None and \
                entry.view.origin is SessionOrigin.DIRECTORY:
            action, _why = decisions.after_session(source, ending)
            if action != "keep":
                self._pending_changes[key] = (source, ending)
                if self._loop is not None:
                    task = self._loop.create_task(self._apply_locked())
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _apply_locked(self) -> None:
        """_apply_directory_changes between syncs (never while one reads the directory)."""
        assert self._syncing is not None
        async with self._syncing:
            await self._apply_directory_changes()

    async def _apply_directory_changes(self) -> set[str]:
        """Delete or disable the directory sessions that ended (until the directory takes it:
        meanwhile they are not opened again). The keys of those changed now."""
        applied = set()
        for key, (session, ending) in list(self._pending_changes.items()):
            action, why = decisions.after_session(session, ending)

            def change(sessions: list[MulticastSession]) -> list[MulticastSession] | None:
                out, changed = [], False
                for s in sessions:
                    if session_key(s.name) != key:
                        out.append(s)
                    elif action == "delete":
                        changed = True
                    else:
                        out.append(replace(s, enabled=False))
                        changed = changed or s.enabled
                return out if changed else None
            try:
                await self._directory.change_sessions(change)
            except Exception as exc:  # tried again on the next sync
                log.warning("multicast: session '%s' %s, but the directory cannot be changed "
                            "(%s); trying again", session.name, why, exc)
                continue
            self._pending_changes.pop(key, None)
            applied.add(key)
            verb = "deleted from" if action == "delete" else "disabled in"
            log.info("multicast: session '%s' %s the directory: %s", session.name, verb, why)
        return applied

    def _flush_waiting(self, everything: bool = False) -> None:
        now = self._clock()
        while self._waiting:
            key, waiting = next(iter(self._waiting.items()))
            if not everything and waiting.due_at > now:
                break
            del self._waiting[key]
            self._write_waiting(waiting)

    def _write_waiting(self, waiting: _Waiting) -> None:
        participant = waiting.participant
        verdict = decisions.participant_verdict(None, participant, waiting.facts)
        self._emit(ParticipantEntry(waiting.session, waiting.image, participant.mac,
                                    participant.address, verdict, None, participant))

    def _emit(self, entry: ParticipantEntry) -> None:
        try:
            self._record(entry)
        except Exception as exc:  # the results log's own problem: the daemon log has it
            log.error("multicast: results log: %s", exc)

    # ---- inside -----------------------------------------------------------------------------

    def _free(self) -> int:
        return max(0, self._max_sessions - len(self._open))

    async def _open_directory_session(self, session: MulticastSession) -> None:
        key = session_key(session.name)
        try:
            facts = await asyncio.to_thread(self._facts.get, self.settings.image_root,
                                            session.image)
        except ImageFactsError as exc:
            why = f"its image cannot be sent: {exc}"
            if key not in self._unavailable:
                log.error("multicast: directory session '%s' not opened: %s (tried again "
                          "every %.0f s)", session.name, why, RETRY_UNAVAILABLE_S)
            self._unavailable[key] = (why, self._clock() + RETRY_UNAVAILABLE_S)
            return
        spec = decisions.directory_spec(session, facts, self.settings.data_port)
        if await self._engine_open(spec, facts, session):
            log.info("multicast: directory session '%s' opened: %s to %s:%d, %s", session.name,
                     session.image, spec.group, spec.data_port, _triggers(spec))

    async def _engine_open(self, spec: SessionSpec, facts: ImageFacts,
                           source: MulticastSession | None) -> bool:
        """Open `spec` on the engine (callers hold self._syncing); False when it refused (logged
        and remembered as unavailable). The engine reads the image's header and index, so in a
        thread: never on the event loop."""
        assert self._engine is not None
        key = session_key(spec.name)
        for other in self._open.values():
            if other.spec.group == spec.group:
                log.warning("multicast: sessions '%s' and '%s' share the group %s: each "
                            "receiver also receives the other's traffic (a group override "
                            "for one of them ends it)", other.view.name, spec.name, spec.group)
        view = OpenSession(spec.name, spec.origin, spec.image, facts.digest, source)
        try:
            await asyncio.to_thread(self._engine.open_session, spec)
        except Exception as exc:  # the engine refused it (its own limits, a bad spec)
            log.error("multicast: the engine did not open session '%s': %s", spec.name, exc)
            self._unavailable[key] = (f"the engine did not open it: {exc}",
                                      self._clock() + RETRY_UNAVAILABLE_S)
            return False
        self._open[key] = _Open(view, spec, facts)
        self._unavailable.pop(key, None)
        self._publish()
        return True

    def _close(self, name: str, why: str, ending: Ending) -> None:
        key = session_key(name)
        if key not in self._open:
            return
        self._asked[key] = ending
        assert self._engine is not None
        try:
            self._engine.close(self._open[key].view.name, why)
        except Exception as exc:  # already gone on the engine: its outcome says so
            log.warning("multicast: closing session '%s': %s", name, exc)
        log.info("multicast: session '%s' closed: %s", name, why)

    def _publish(self) -> None:
        """Replace the snapshot admit() reads."""
        self._views = {key: entry.view for key, entry in self._open.items()}

    async def _tick(self) -> None:
        while True:
            try:
                await asyncio.sleep(TICK_S)
                self._poll()
                self._flush_waiting()
                if self._clock() - self._last_sync >= SYNC_S:
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the control plane
                log.exception("multicast: control plane")

    def _poll(self) -> None:
        """Read the engine's status: states (a session that began is refused to late joiners
        and to work queries) and what zmgmcast shows."""
        if self._engine is None:
            return
        statuses = {session_key(s.name): s for s in self._engine.status()}
        changed = False
        now = self._clock()
        for key, entry in self._open.items():
            status = statuses.get(key)
            if status is None:
                continue
            entry.status = status
            if status.state is not entry.view.state and status.state in (
                    SessionState.WAITING, SessionState.SENDING, SessionState.FINISHING):
                started_at = entry.view.started_at
                if started_at is None and status.state is not SessionState.WAITING:
                    started_at = now
                    log.info("multicast: session '%s' began: %d receivers", entry.view.name,
                             len(status.participants))
                entry.view = replace(entry.view, state=status.state, started_at=started_at)
                changed = True
        if changed:
            self._publish()


def _triggers(spec: SessionSpec) -> str:
    parts = []
    if spec.start_clients:
        parts.append(f"starts when {spec.start_clients} have joined")
    if spec.start_after_last_join_s:
        parts.append(f"{spec.start_after_last_join_s / 60:g} min after the last join")
    return " or ".join(parts) or "starts when told to"

