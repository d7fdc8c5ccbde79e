"""The multicast control plane's decisions, pure: each takes what it decides on and returns the
decision with its reason (catalog.py holds the state and does what they say).

    session_spec        a directory session (or a registration) -> what the engine runs
    plan_sync           the directory's sessions vs the open ones -> open these, close those
    join_refusal        a JOIN the session cannot take (unknown, started, wrong image)
    token_admission     the Gate's verdict on the JOIN's capability -> admitted or a refusal code
    registration_refusal  a workstation's or an operator's session -> refused, with the status
    after_session       how a directory session ended -> delete it, disable it or keep it
    participant_verdict a receiver's report and the sender's view -> its results log entry
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Mapping

from common.imaging.multicast import NO_IMAGE, Refusal, group_address, session_name_refusal
from common.policy.model import MulticastSession
from common.policy.sessions import session_key
from common.policy.trust import Refused

from .images import ImageFacts
from .model import (Admission, JoinRequest, ParticipantStatus, ReceiverState, SessionOrigin,
                    SessionSpec, SessionState)

# What a receiver's report may say it took (img's result: docs/multicast.md, "Results").
PATHS = ("multicast", "multicast+unicast", "failed")
MAX_CLIENTS = 10000
MAX_WAIT_MIN = 10080                 # a week, as the policy file allows


# -- the sessions the engine runs ----------------------------------------------------------------

def session_spec(name: str, image: ImageFacts, clients: int, wait_min: int | None,
                 origin: SessionOrigin, data_port: int, group: str = "") -> SessionSpec:
    """What the engine runs: the group from the name unless overridden, the time trigger in
    seconds after the last join (None: none), the clients trigger (0: none)."""
    return SessionSpec(
        name=name, image_path=image.file_path, image=image.image,
        group=group or group_address(name), data_port=data_port, start_clients=clients,
        start_after_last_join_s=wait_min * 60.0 if wait_min else None, origin=origin)


def directory_spec(session: MulticastSession, image: ImageFacts, default_data_port: int
                   ) -> SessionSpec:
    return session_spec(session.name, image, session.clients, session.timeout_min,
                        SessionOrigin.DIRECTORY, session.data_port or default_data_port,
                        session.group)


@dataclass(frozen=True)
class OpenSession:
    """The catalog's view of a session on the engine."""

    name: str
    origin: SessionOrigin
    image: str
    digest: bytes
    source: MulticastSession | None    # the directory's session it was opened from
    state: SessionState = SessionState.WAITING
    started_at: float | None = None    # when it left WAITING (the catalog's clock)

    @property
    def started(self) -> bool:
        return self.state is not SessionState.WAITING


@dataclass(frozen=True)
class SyncPlan:
    open: tuple[MulticastSession, ...] = ()
    close: tuple[tuple[str, str], ...] = ()      # (name, why)
    waiting: tuple[tuple[str, str], ...] = ()    # enabled, not opened now: (name, why)


def _same_run(session: MulticastSession, other: MulticastSession | None) -> bool:
    """Whether an open session still runs what the directory says (its name aside)."""
    return other is not None and (session.image, session.clients, session.timeout_min,
                                  session.group, session.data_port) == \
        (other.image, other.clients, other.timeout_min, other.group, other.data_port)


def plan_sync(wanted: Iterable[MulticastSession], opened: Mapping[str, OpenSession],
              free: int, finished: Iterable[str] = ()) -> SyncPlan:
    """Make the engine run the directory's enabled sessions: open those not open (at most
    `free` more, in the directory's order), close directory sessions still waiting that were
    removed, disabled or changed (they open again, changed, on a later sync). A session that
    began imaging runs to its end whatever the directory says meanwhile. `opened` is keyed by
    session_key(); `finished`: keys of sessions that ended and whose directory change is still
    being written (not opened again meanwhile)."""
    enabled = {}
    for session in wanted:
        if session.enabled:
            enabled.setdefault(session_key(session.name), session)
    done = set(finished)
    to_close = []
    for key, view in opened.items():
        if view.origin is not SessionOrigin.DIRECTORY or view.started:
            continue
        session = enabled.get(key)
        if session is None:
            to_close.append((view.name, "removed or disabled in the directory"))
        elif not _same_run(session, view.source):
            to_close.append((view.name, "changed in the directory"))
    to_open, waiting = [], []
    for key, session in enabled.items():
        other = opened.get(key)
        if other is not None and other.origin is not SessionOrigin.DIRECTORY:
            waiting.append((session.name, f"a {other.origin.value} session of that name "
                                          "is running"))
            continue
        if key in done or other is not None:
            continue                 # open, or closing: opens again, as it is now, later
        if len(to_open) >= free:
            waiting.append((session.name, "MaxSessions sessions are running"))
            continue
        to_open.append(session)
    return SyncPlan(tuple(to_open), tuple(to_close), tuple(waiting))


# -- joins ----------------------------------------------------------------------------------------

def join_refusal(view: OpenSession | None, request: JoinRequest, now: float) -> Admission | None:
    """Why the session cannot take this JOIN whoever sends it; None when it can."""
    if view is None:
        return Admission(False, Refusal.UNKNOWN_SESSION,
                         f"no multicast session '{request.session[:100]}' on this server")
    if view.started:
        ago = f" {max(0, int(now - view.started_at))} s ago" if view.started_at else ""
        return Admission(False, Refusal.STARTED,
                         f"imaging began{ago}: wait for the next session")
    if request.image_digest not in (NO_IMAGE, view.digest):
        return Admission(False, Refusal.WRONG_IMAGE,
                         f"this session sends {view.image}, not the image the join names")
    return None


def token_admission(refused: Refused | None) -> Admission:
    """The JOIN's capability as the Gate judged it (None: allowed) -> the answer. The Gate
    says 401 for no token or a token that cannot be trusted, 403 for one that does not allow
    this, 503 when this server cannot check tokens."""
    if refused is None:
        return Admission(True)
    text = refused.reason[:255]
    if refused.status == 401:
        code = Refusal.NO_TOKEN if "needs a capability" in refused.reason else Refusal.BAD_TOKEN
        if code is Refusal.NO_TOKEN:
            text = ("a capability is needed: a machine's from its multicast work, or an "
                    "operator's (preboot-dir token --allow retrieve)")
        return Admission(False, code, text)
    if refused.status == 503:
        return Admission(False, Refusal.BUSY, text)
    return Admission(False, Refusal.NOT_ALLOWED, text)


# -- sessions a workstation or an operator asks for ---------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """POST /v1/sessions, or zmgmcast -start: a session not in the directory."""

    name: str
    image: str
    clients: int = 0               # start when this many have joined; 0: no such trigger
    wait_min: int = 0              # ... or this long after the last join; 0: no timer
    origin: SessionOrigin = SessionOrigin.CLIENT


def registration_problem(name: object, image: object, clients: object, wait_min: object
                         ) -> str | None:
    """Why the fields of a registration are unusable (400); None when they are fine."""
    if not isinstance(name, str) or session_name_refusal(name):
        return f"name: {session_name_refusal(name) if isinstance(name, str) else 'not text'}"
    if not isinstance(image, str) or not image:
        return "image: the image path on this server is required"
    for field, value, top in (("clients", clients, MAX_CLIENTS), ("t", wait_min, MAX_WAIT_MIN)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            return f"{field}: a whole number from 0 to {top}"
    if wait_min and not clients:
        return "t: goes only with clients (img session NAME clients=N t=M)"
    return None


def registration_refusal(request: Registration, opened: Mapping[str, OpenSession],
                         directory_names: Iterable[str], free: int,
                         digest: bytes | None) -> tuple[int, str] | None:
    """(HTTP status, reason) when this session cannot be opened; None when it can, or when it
    is open already as asked (registering is idempotent: every workstation of a client session
    may register it). digest: the image's, None when the image cannot be sent."""
    key = session_key(request.name)
    view = opened.get(key)
    if view is not None:
        if view.origin is SessionOrigin.DIRECTORY:
            return 409, f"'{view.name}' is a session of the directory"
        if view.image != request.image:
            return 409, f"session '{view.name}' is running with another image ({view.image})"
        return None
    if key in {session_key(name) for name in directory_names}:
        return 409, f"'{request.name}' is a session of the directory (preboot-dir sessions)"
    if digest is None:
        return 404, f"{request.image}: no such image on this server (a workstation master " \
                    "stores it first)"
    if free <= 0:
        return 503, "MaxSessions sessions are running; try again later"
    return None


# -- endings ------------------------------------------------------------------------------------

class Ending(enum.Enum):
    COMPLETED = "completed"        # sent, and closed: every receiver done, left or lost
    STOPPED = "stopped"            # an operator stopped it (zmgmcast -stop)
    DELETED = "deleted"            # an operator deleted it (zmgmcast -delete, preboot-dir)
    WITHDRAWN = "withdrawn"        # closed before it began: the directory changed
    SHUTDOWN = "shutdown"          # imgsrvd stopped
    FAILED = "failed"              # the engine ended it (the image became unreadable, ...)


def ending_of(status_state: SessionState, asked: Ending | None) -> Ending:
    """How a session ended: what the catalog asked for, else what the engine reports."""
    if asked is not None:
        return asked
    return Ending.COMPLETED if status_state is SessionState.CLOSED else Ending.FAILED


def after_session(session: MulticastSession, ending: Ending) -> tuple[str, str]:
    """("delete" | "disable" | "keep", why) for a directory session that ended: the original's
    "delete the session after completion or keep it, disabled"; stopped or failed runs are kept
    disabled (an enabled one would open again at once); a withdrawn or interrupted one is left
    as the directory has it."""
    if ending is Ending.COMPLETED:
        if session.delete_after:
            return "delete", "completed (delete after completion)"
        return "disable", "completed (kept, disabled)"
    if ending is Ending.DELETED:
        return "delete", "deleted by an operator"
    if ending is Ending.STOPPED:
        return "disable", "stopped by an operator (kept, disabled)"
    if ending is Ending.FAILED:
        return "disable", "failed (kept, disabled; enable it to run it again)"
    return "keep", f"{ending.value}: left as the directory has it"


# -- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReceiverReport:
    """What a receiver reports at the end (POST /v1/results with the multicast fields)."""

    session: str
    mac: str
    status: str                    # success | failure
    digest: str                    # hex of the image digest it restored
    chunks_verified: int
    bytes_written: int
    path: str                      # multicast | multicast+unicast | failed
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    status: str                    # the results log's: success | failure
    error: str
    verified: bool                 # counts as an Image Sent


_LEFT_AS = {
    ReceiverState.DONE: "the workstation reported no result (the sender saw it finish)",
    ReceiverState.FAILED: "failed on the workstation, which reported no result",
    ReceiverState.LEFT: "left the session and reported no result",
    ReceiverState.LOST: "lost: the workstation fell silent and reported no result",
    ReceiverState.DROPPED: "dropped from the session (too slow or too many losses) and "
                           "reported no result of its unicast catch-up",
    ReceiverState.WAITING: "the session ended before it began",
    ReceiverState.RECEIVING: "the session ended while it was receiving; no result reported",
}


def participant_verdict(report: ReceiverReport | None, participant: ParticipantStatus | None,
                        image: ImageFacts | None) -> Verdict:
    """The entry of one receiver. Success only when its report says so and the report shows
    the session's image on its disk: the session's digest, every chunk verified, by multicast
    (with a unicast catch-up or not). Anything else is a failure with the reason, and only a
    verified success counts as an Image Sent."""
    if report is None:
        state = participant.state if participant is not None else ReceiverState.LOST
        return Verdict("failure", _LEFT_AS[state], False)
    if report.status != "success":
        return Verdict("failure", report.error or f"failed ({report.path or 'no path given'})",
                       False)
    if image is None:
        return Verdict("failure", "reported success for a session this server does not know",
                       False)
    if report.digest.lower() != image.digest_hex:
        return Verdict("failure", f"reported success, but with image digest "
                                  f"{report.digest[:32] or '(none)'}, not the session's "
                                  f"{image.digest_hex}", False)
    if report.chunks_verified != image.chunks:
        return Verdict("failure", f"reported success with {report.chunks_verified} of the "
                                  f"image's {image.chunks} chunks verified", False)
    if report.path not in ("multicast", "multicast+unicast"):
        return Verdict("failure", f"reported success by path '{report.path[:40]}'", False)
    return Verdict("success", "", True)
