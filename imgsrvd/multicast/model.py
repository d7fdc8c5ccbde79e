"""The contract between imgsrvd's multicast data plane (engine.py) and its control plane
(catalog.py): what a session is, what a join asks and what it is answered, and what the engine
reports for zmgmcast. Plain frozen dataclasses; no sockets, no clock."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineSettings:
    """imgsrvd's multicast keys, checked (docs/config-imgsrvd.md)."""

    control_address: str          # the unicast address the control socket binds (IPAddress)
    control_port: int             # 997
    interface_address: str        # the address of the interface groups are sent from
    ttl: int                      # 1: this segment only
    max_bitrate_kbit_s: int       # 0: no limit but the adaptation to loss
    min_receiver_rate_kbit_s: int # below this (over a window) a receiver is dropped to unicast
    max_receiver_loss: float      # above this loss fraction (over a window) likewise
    finish_timeout_s: float       # after the first pass, repairs end at the latest then
    max_sessions: int             # sessions at once
    max_receivers: int            # per session


class SessionOrigin(enum.Enum):
    DIRECTORY = "directory"       # a session of the directory (server-initiated)
    CLIENT = "client"             # `img session NAME`: a workstation asked for it
    MANUAL = "manual"             # an operator started it (zmgmcast)


@dataclass(frozen=True)
class SessionSpec:
    name: str                     # 1..255 bytes of UTF-8 (the wire's bound)
    image_path: str               # the image file (absolute, under ImageRoot)
    image: str                    # its path relative to ImageRoot, for logs and results
    group: str                    # IPv4 multicast address (common.imaging.multicast)
    data_port: int
    start_clients: int            # start when this many have joined; 0: no such trigger
    start_after_last_join_s: float | None   # ... or this long after the last join; None: no timer
    origin: SessionOrigin = SessionOrigin.DIRECTORY


@dataclass(frozen=True)
class JoinRequest:
    """A JOIN the engine received, for the control plane to admit or refuse."""

    session: str
    mac: str                      # normalised (common.machine), "" when the JOIN gave none
    token: str                    # the capability, "" when none
    address: tuple[str, int]      # where the JOIN came from
    image_digest: bytes           # the image the receiver expects; 16 zero bytes: any


@dataclass(frozen=True)
class Admission:
    """The control plane's answer: admitted, or refused with a JOIN_REFUSED reason code
    (common.imaging.multicast) and one line of text."""

    admitted: bool
    reason_code: int = 0
    text: str = ""


class ReceiverState(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"
    LEFT = "left"                 # left early (LEAVE with another reason than done)
    LOST = "lost"                 # silent too long
    DROPPED = "dropped"           # too slow or lossy: sent to unicast


@dataclass(frozen=True)
class ParticipantStatus:
    receiver_id: int
    mac: str
    address: str
    state: ReceiverState
    bytes_received: int
    bytes_written: int
    chunks_verified: int
    loss_fraction: float          # over the last reports
    srtt_ms: float | None         # None before the first sample


class SessionState(enum.Enum):
    WAITING = "waiting"           # taking joins
    SENDING = "sending"
    FINISHING = "finishing"       # repairs only
    CLOSED = "closed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SessionStatus:
    name: str
    image: str
    group: str
    state: SessionState
    origin: SessionOrigin
    start_clients: int
    start_in_s: float | None      # the time trigger's countdown; None: no timer runs
    rate_kbit_s: int              # the current sending rate
    bytes_sent: int               # first pass and repairs
    repair_bytes: int             # of which repairs
    image_bytes: int
    participants: tuple[ParticipantStatus, ...] = field(default_factory=tuple)

    @property
    def repair_share(self) -> float:
        return self.repair_bytes / self.bytes_sent if self.bytes_sent else 0.0


class EventKind(enum.Enum):
    """What the engine tells the control plane (MulticastEngine's on_event), so it can log,
    report and delete or disable a session."""

    SESSION_STARTED = "session-started"       # the first pass began (reason: the trigger)
    SESSION_CLOSED = "session-closed"         # finished: every receiver done, left or lost
    SESSION_ABORTED = "session-aborted"       # operator, shutdown, image unreadable, nobody
    RECEIVER_JOINED = "receiver-joined"
    RECEIVER_REFUSED = "receiver-refused"     # reason: the refusal's text
    RECEIVER_DONE = "receiver-done"
    RECEIVER_LEFT = "receiver-left"           # LEAVE with another reason than done
    RECEIVER_FAILED = "receiver-failed"       # STATUS failed (its disk, the image refused)
    RECEIVER_LOST = "receiver-lost"           # silent past its deadline (ABORT lost sent)
    RECEIVER_DROPPED = "receiver-dropped"     # too slow or lossy (ABORT too slow sent)
    RECEIVER_UNFINISHED = "receiver-unfinished"   # not done when the session closed


@dataclass(frozen=True)
class SessionEvent:
    """One outcome. receiver: the participant as it stood (receiver events); status: the
    session's final numbers (SESSION_CLOSED, SESSION_ABORTED)."""

    kind: EventKind
    session: str
    reason: str = ""
    receiver: ParticipantStatus | None = None
    status: SessionStatus | None = None
