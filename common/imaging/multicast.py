"""The multicast protocol, version 1 (docs/multicast-protocol.md): the pure codec the sender
(imgsrvd) and the receivers (img) both use. Bytes in, typed values out; no sockets, no clock
(timestamps are fields the caller fills in and reads), nothing held between calls.

Every packet is one UDP datagram of at most MAX_DATAGRAM bytes: a 44-byte header (magic,
version, type, body length, session, receiver, sequence, image digest), then a body whose
layout the type fixes. What travels is the image file itself: a DATA packet is the bytes of the
image file at an offset, and every packet names the session and the image (a digest of the
file's header, index and trailer, image_digest()), so nothing can be written to the wrong disk.

decode() accepts exactly what encode() writes and raises MulticastFormatError (a ValueError,
str() a one-line reason) for anything else; building a message with a field out of its bounds
raises the same error, so an instance is always encodable. The group address of a session is
group_address(name): 231.x.y.z from SHA-256 of the name, as the doc states with an example.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

from common.imaging.imageformat import HEADER_FIXED, MAX_METADATA, TRAILER
from common.machine import normalize_mac

MAGIC = b"PBMC"
VERSION = 1
HEADER = struct.Struct(">4sBBHQQI16s")       # 44 bytes; the same in every version
MAX_DATAGRAM = 1400          # UDP payload: fits a 1500-byte MTU with IPv4/IPv6 and a tunnel
MAX_BODY = MAX_DATAGRAM - HEADER.size        # 1356
DIGEST_BYTES = 16
NO_IMAGE = bytes(DIGEST_BYTES)               # "not known yet": only in JOIN and JOIN_REFUSED
CONTROL_PORT = 997           # udp, on the sender's unicast address
DATA_PORT = 997              # udp, on the group address (a session may name another)
MAX_SESSION_NAME_BYTES = 255
MAX_TOKEN_BYTES = 1024       # a capability token (common/policy/capability.py) in a JOIN
MAX_TEXT_BYTES = 255         # a refusal's, an abort's or a leave's reason
MAX_NAK_RANGES = 64
NO_TIMER = 0xFFFFFFFF        # start_in_s on the wire when no start timer runs

_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
_TOKEN = re.compile(r"[A-Za-z0-9._-]*")      # the capability word's alphabet (base64url and .)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MulticastFormatError(ValueError):
    """A packet that is not a well-formed version-1 message, or a message field out of its
    bounds; str() says why in one line. unknown_type is True for a well-formed header of a type
    this codec does not know (a newer peer's message: ignore it rather than count it as
    damaged)."""

    def __init__(self, reason: str, unknown_type: bool = False):
        super().__init__(reason)
        self.unknown_type = unknown_type


class MessageType(IntEnum):
    """The type byte. The high bit says the direction: set for what the sender sends."""

    JOIN = 0x01
    STATUS = 0x02
    NAK = 0x03
    LEAVE = 0x04
    ANNOUNCE = 0x81
    JOIN_ACK = 0x82
    JOIN_REFUSED = 0x83
    START = 0x84
    DATA = 0x85
    PROBE = 0x86
    FINISH = 0x87
    ABORT = 0x88

    @property
    def from_sender(self) -> bool:
        return bool(self & 0x80)


class SessionState(IntEnum):
    WAITING = 1          # taking joins until the start trigger
    SENDING = 2          # the first pass and repairs; joins are refused (STARTED)
    FINISHING = 3        # the pass is over: repairs only, until every receiver is done or lost


class ReceiverState(IntEnum):
    WAITING = 1          # joined, the session has not started
    RECEIVING = 2
    DONE = 3             # every chunk received, verified and written
    FAILED = 4


class Refusal(IntEnum):
    """Why a JOIN was refused. A reader takes a code it does not know for OTHER (the text says
    what happened), so codes can be added without a new version."""

    OTHER = 0
    NO_TOKEN = 1         # the join carries no token and the sender needs one
    BAD_TOKEN = 2        # not readable, forged, expired, signed with an unknown key
    NOT_ALLOWED = 3      # a valid token that does not allow this session, image or machine
    UNKNOWN_SESSION = 4
    STARTED = 5          # imaging began: wait for the next session
    FULL = 6             # the session has all the receivers it takes
    WRONG_IMAGE = 7      # the join names another image than the session sends
    BUSY = 8             # the sender takes no more receivers now; try again later
    VERSION = 9          # the join's version is not one the sender speaks


class AbortReason(IntEnum):
    """Why the sender ended the session, or one receiver's part in it (unknown codes: OTHER)."""

    OTHER = 0
    OPERATOR = 1         # stopped by an operator
    SHUTDOWN = 2         # the sender is stopping
    TOO_SLOW = 3         # this receiver is dropped: it finishes over unicast HTTP
    LOST = 4             # this receiver was silent too long and is no longer in the session
    IMAGE_UNREADABLE = 5  # the sender cannot read the image file any more


class LeaveReason(IntEnum):
    """Why a receiver left (unknown codes: OTHER)."""

    OTHER = 0
    DONE = 1             # every chunk received, verified and written
    CANCELLED = 2        # stopped on the workstation
    FAILED = 3           # the disk, or the image refused (digest, does not fit the disk)
    FALLBACK = 4         # too much loss or too slow: continues over unicast HTTP


# -- the common header ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Header:
    """The first 44 bytes, read without their body (decode_header). Its layout is the same in
    every version, so a sender can answer a JOIN of a version it does not speak."""

    version: int
    type: int
    body_length: int
    session_id: int
    receiver_id: int
    sequence: int
    image_digest: bytes


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """The header of a packet of any version; MulticastFormatError if there is none."""
    if len(data) < HEADER.size:
        raise MulticastFormatError(f"packet: {len(data)} bytes, shorter than the "
                                   f"{HEADER.size}-byte header")
    magic, version, kind, length, session, receiver, sequence, digest = \
        HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MulticastFormatError("packet: bad magic (not a multicast imaging packet)")
    return Header(version, kind, length, session, receiver, sequence, digest)


# -- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """What every packet carries (the header). session_id is the sender's random, non-zero id of
    this run of the session (0 only in a JOIN that knows just the name); receiver_id the
    receiver's random, non-zero id (0 in what the sender sends to the whole group); sequence
    the packet's number in its sender's series (RFC 1982 arithmetic, modulo 2**32);
    image_digest the image (image_digest(); NO_IMAGE only before the receiver knows it)."""

    TYPE: ClassVar[MessageType]
    _RECEIVER: ClassVar[str] = "required"     # "required", "zero" or "any"
    _UNKNOWN_OK: ClassVar[bool] = False       # session 0 and NO_IMAGE allowed

    session_id: int
    sequence: int = 0
    image_digest: bytes = NO_IMAGE
    receiver_id: int = 0

    def __post_init__(self) -> None:
        name = self.TYPE.name
        _uint(name, "session_id", self.session_id, _U64)
        _uint(name, "receiver_id", self.receiver_id, _U64)
        _uint(name, "sequence", self.sequence, _U32)
        if not isinstance(self.image_digest, bytes) or len(self.image_digest) != DIGEST_BYTES:
            raise MulticastFormatError(f"{name}: the image digest is not {DIGEST_BYTES} bytes")
        if not self._UNKNOWN_OK:
            if self.session_id == 0:
                raise MulticastFormatError(f"{name}: session id 0 (only a JOIN may not know "
                                           "the session yet)")
            if self.image_digest == NO_IMAGE:
                raise MulticastFormatError(f"{name}: names no image (an all-zero digest)")
        if self._RECEIVER == "required" and self.receiver_id == 0:
            raise MulticastFormatError(f"{name}: receiver id 0 (a {name} names its receiver)")
        if self._RECEIVER == "zero" and self.receiver_id != 0:
            raise MulticastFormatError(f"{name}: goes to the whole group, but names receiver "
                                       f"{self.receiver_id:#x}")
        self._check()

    def _check(self) -> None:
        """The type's own bounds; MulticastFormatError naming the field."""

    def _body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Message":
        raise NotImplementedError


# receiver -> sender (to the sender's control port) ------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Join(Message):
    """Ask to be admitted to a session (retransmitted until a JOIN_ACK or JOIN_REFUSED). mac:
    the workstation's (12 upper-case hex digits, as common.machine.normalize_mac writes it), ""
    for none; token: the capability word (a machine's work token or an operator's), "" for
    none; session_id 0 when the receiver knows only the name (a server-initiated session, named
    in its work answer); image_digest the image it expects, NO_IMAGE when it does not know."""

    TYPE: ClassVar[MessageType] = MessageType.JOIN
    _UNKNOWN_OK: ClassVar[bool] = True
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">Q6sBH")     # 17 bytes

    sent_at_us: int
    session_name: str
    mac: str = ""
    token: str = ""

    def _check(self) -> None:
        _uint("JOIN", "sent_at_us", self.sent_at_us, _U64)
        problem = session_name_refusal(self.session_name)
        if problem:
            raise MulticastFormatError(f"JOIN: {problem}")
        if self.mac and (not isinstance(self.mac, str) or normalize_mac(self.mac) != self.mac):
            raise MulticastFormatError(f"JOIN: MAC {str(self.mac)[:20]!r} is not 12 upper-case "
                                       "hex digits")
        if self.mac == "000000000000":
            raise MulticastFormatError("JOIN: MAC 000000000000 is how the wire says none: "
                                       "give \"\"")
        if not isinstance(self.token, str) or len(self.token) > MAX_TOKEN_BYTES:
            raise MulticastFormatError(f"JOIN: token longer than {MAX_TOKEN_BYTES} bytes")
        if not _TOKEN.fullmatch(self.token):
            raise MulticastFormatError("JOIN: token has characters a capability token has "
                                       "not (letters, digits, '.', '-', '_')")

    def _body(self) -> bytes:
        name = self.session_name.encode("utf-8")
        token = self.token.encode("ascii")
        mac = bytes.fromhex(self.mac) if self.mac else bytes(6)
        return self._FIXED.pack(self.sent_at_us, mac, len(name), len(token)) + name + token

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Join":
        sent_at, mac, name_length, token_length = _fixed(cls, body)
        rest = body[cls._FIXED.size:]
        if name_length + token_length != len(rest):
            raise MulticastFormatError(f"JOIN: name and token lengths ({name_length} + "
                                       f"{token_length}) disagree with the {len(rest)} bytes "
                                       "that follow")
        if token_length > MAX_TOKEN_BYTES:
            raise MulticastFormatError(f"JOIN: token of {token_length} bytes, more than "
                                       f"{MAX_TOKEN_BYTES}")
        name = _text("JOIN", "session name", rest[:name_length])
        try:
            token = rest[name_length:].decode("ascii")
        except UnicodeDecodeError:
            raise MulticastFormatError("JOIN: token is not ASCII") from None
        return cls(**head, sent_at_us=sent_at, session_name=name,
                   mac=mac.hex().upper() if any(mac) else "", token=token)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Message):
    """A receiver's report, sent in answer to every PROBE (and when its state changes).
    echo_sent_at_us/echo_delay_us: the newest PROBE's sent_at_us and how long the receiver held
    it before answering (0, 0 before the first), so the sender measures the round trip as
    now - echo_sent_at_us - echo_delay_us. first_missing: the file offset of the first byte
    not yet received (the image size when complete). packets_received/packets_lost: DATA
    packets since the session started, counted from the sender's sequence numbers, modulo 2**32
    (as RFC 3550 section 6.4.1 counts loss; the sender takes differences)."""

    TYPE: ClassVar[MessageType] = MessageType.STATUS
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QIBQQIQII")   # 49 bytes

    echo_sent_at_us: int
    echo_delay_us: int
    state: ReceiverState
    first_missing: int
    bytes_received: int
    chunks_verified: int
    bytes_written: int
    packets_received: int
    packets_lost: int

    def _check(self) -> None:
        for field, top in (("echo_sent_at_us", _U64), ("echo_delay_us", _U32),
                           ("first_missing", _U64), ("bytes_received", _U64),
                           ("chunks_verified", _U32), ("bytes_written", _U64),
                           ("packets_received", _U32), ("packets_lost", _U32)):
            _uint("STATUS", field, getattr(self, field), top)
        _set_enum(self, "STATUS", "state", ReceiverState)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.echo_sent_at_us, self.echo_delay_us, self.state,
                                self.first_missing, self.bytes_received, self.chunks_verified,
                                self.bytes_written, self.packets_received, self.packets_lost)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Status":
        (echo, delay, state, first_missing, received, verified, written, packets,
         lost) = _fixed(cls, body, exact=True)
        return cls(**head, echo_sent_at_us=echo, echo_delay_us=delay, state=state,
                   first_missing=first_missing, bytes_received=received,
                   chunks_verified=verified, bytes_written=written, packets_received=packets,
                   packets_lost=lost)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A range of the image file: length bytes from offset."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True, kw_only=True)
class Nak(Message):
    """The byte ranges of the file a receiver misses: 1 to MAX_NAK_RANGES ranges, each at
    least one byte, in increasing order, not overlapping. A receiver missing more sends the
    first ranges now and the rest in later NAKs."""

    TYPE: ClassVar[MessageType] = MessageType.NAK
    _COUNT: ClassVar[struct.Struct] = struct.Struct(">H")
    _RANGE: ClassVar[struct.Struct] = struct.Struct(">QI")        # 12 bytes

    ranges: tuple[ByteRange, ...]

    def _check(self) -> None:
        if not isinstance(self.ranges, tuple) or not self.ranges:
            raise MulticastFormatError("NAK: no ranges (a tuple of at least one ByteRange)")
        if len(self.ranges) > MAX_NAK_RANGES:
            raise MulticastFormatError(f"NAK: {len(self.ranges)} ranges, more than "
                                       f"{MAX_NAK_RANGES}")
        end = 0
        for number, byte_range in enumerate(self.ranges):
            if not isinstance(byte_range, ByteRange):
                raise MulticastFormatError(f"NAK: range {number} is not a ByteRange")
            _uint("NAK", f"range {number} offset", byte_range.offset, _U64)
            _uint("NAK", f"range {number} length", byte_range.length, _U32)
            if byte_range.length == 0:
                raise MulticastFormatError(f"NAK: range {number} is empty")
            if byte_range.end > _U64 + 1:
                raise MulticastFormatError(f"NAK: range {number} ends past 2**64")
            if byte_range.offset < end:
                raise MulticastFormatError(f"NAK: range {number} overlaps or comes before "
                                           "the one before it")
            end = byte_range.end

    def _body(self) -> bytes:
        return self._COUNT.pack(len(self.ranges)) + b"".join(
            self._RANGE.pack(r.offset, r.length) for r in self.ranges)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Nak":
        if len(body) < cls._COUNT.size:
            raise MulticastFormatError("NAK: body cut short (no range count)")
        (count,) = cls._COUNT.unpack_from(body)
        if count > MAX_NAK_RANGES:
            raise MulticastFormatError(f"NAK: {count} ranges, more than {MAX_NAK_RANGES}")
        need = cls._COUNT.size + count * cls._RANGE.size
        if len(body) != need:
            raise MulticastFormatError(f"NAK: {count} ranges need a {need}-byte body, it has "
                                       f"{len(body)}")
        ranges = tuple(ByteRange(*cls._RANGE.unpack_from(body, cls._COUNT.size + n * 12))
                       for n in range(count))
        return cls(**head, ranges=ranges)


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave(Message):
    """A receiver leaves the session (sent three times; the sender does not answer)."""

    TYPE: ClassVar[MessageType] = MessageType.LEAVE
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">BB")

    reason: LeaveReason
    text: str = ""

    def _check(self) -> None:
        _reason(self, "LEAVE", LeaveReason)

    def _body(self) -> bytes:
        return _reason_body(self.reason, self.text)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Leave":
        code, text = _parse_reason(cls, body)
        return cls(**head, reason=_tolerant(LeaveReason, code), text=text)


# sender -> group (to the group address and data port) ----------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Announce(Message):
    """The session as it stands, sent to the group about once a second, so receivers that know
    only the name (a client-initiated session) find the sender (the packet's source address)
    and its control port. start_clients: start when that many have joined (0: no such trigger);
    start_in_s: seconds until the time trigger fires (None: no timer runs)."""

    TYPE: ClassVar[MessageType] = MessageType.ANNOUNCE
    _RECEIVER: ClassVar[str] = "zero"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">BHHHIQB")    # 20 bytes

    state: SessionState
    control_port: int
    participants: int
    start_clients: int
    start_in_s: int | None
    image_bytes: int
    session_name: str

    def _check(self) -> None:
        _set_enum(self, "ANNOUNCE", "state", SessionState)
        _port("ANNOUNCE", "control_port", self.control_port)
        _session_fields(self, "ANNOUNCE")
        problem = session_name_refusal(self.session_name)
        if problem:
            raise MulticastFormatError(f"ANNOUNCE: {problem}")

    def _body(self) -> bytes:
        name = self.session_name.encode("utf-8")
        return self._FIXED.pack(self.state, self.control_port, self.participants,
                                self.start_clients, _timer(self.start_in_s), self.image_bytes,
                                len(name)) + name

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Announce":
        state, port, participants, clients, start_in, size, name_length = _fixed(cls, body)
        rest = body[cls._FIXED.size:]
        if name_length != len(rest):
            raise MulticastFormatError(f"ANNOUNCE: name length {name_length} disagrees with "
                                       f"the {len(rest)} bytes that follow")
        return cls(**head, state=state, control_port=port, participants=participants,
                   start_clients=clients, start_in_s=None if start_in == NO_TIMER else start_in,
                   image_bytes=size, session_name=_text("ANNOUNCE", "session name", rest))


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(Message):
    """The first pass begins (sent three times, a probe interval apart). The file's layout says
    the send order (first_pass_ranges): header_bytes, the length of the image header;
    index_offset, where the index starts (the trailer's index offset). rate_kbit_s: the
    sending rate, 0 when not limited."""

    TYPE: ClassVar[MessageType] = MessageType.START
    _RECEIVER: ClassVar[str] = "zero"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QIQHI")      # 26 bytes

    image_bytes: int
    header_bytes: int
    index_offset: int
    participants: int
    rate_kbit_s: int

    def _check(self) -> None:
        _uint("START", "image_bytes", self.image_bytes, _U64)
        _uint("START", "participants", self.participants, _U16)
        _uint("START", "rate_kbit_s", self.rate_kbit_s, _U32)
        _uint("START", "header_bytes", self.header_bytes, _U32)
        _uint("START", "index_offset", self.index_offset, _U64)
        try:
            first_pass_ranges(self.image_bytes, self.header_bytes, self.index_offset)
        except MulticastFormatError as exc:
            raise MulticastFormatError(f"START: {exc}") from None

    def _body(self) -> bytes:
        return self._FIXED.pack(self.image_bytes, self.header_bytes, self.index_offset,
                                self.participants, self.rate_kbit_s)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Start":
        size, header, index, participants, rate = _fixed(cls, body, exact=True)
        return cls(**head, image_bytes=size, header_bytes=header, index_offset=index,
                   participants=participants, rate_kbit_s=rate)


@dataclass(frozen=True, slots=True, kw_only=True)
class Data(Message):
    """payload is the image file's bytes [offset, offset + len(payload)). repair: sent again in
    answer to a NAK (not part of the first pass, so not a sign of where the pass is)."""

    TYPE: ClassVar[MessageType] = MessageType.DATA
    _RECEIVER: ClassVar[str] = "zero"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QB")         # 9 bytes
    REPAIR: ClassVar[int] = 0x01

    offset: int
    payload: bytes
    repair: bool = False

    def _check(self) -> None:
        _uint("DATA", "offset", self.offset, _U64)
        if not isinstance(self.payload, bytes) or not 0 < len(self.payload) <= MAX_DATA_BYTES:
            raise MulticastFormatError(f"DATA: payload is not 1 to {MAX_DATA_BYTES} bytes")
        if self.offset + len(self.payload) > _U64 + 1:
            raise MulticastFormatError("DATA: payload ends past 2**64")

    def _body(self) -> bytes:
        return self._FIXED.pack(self.offset, self.REPAIR if self.repair else 0) + self.payload

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Data":
        offset, flags = _fixed(cls, body)
        return cls(**head, offset=offset, payload=bytes(body[cls._FIXED.size:]),
                   repair=bool(flags & cls.REPAIR))


MAX_DATA_BYTES = MAX_BODY - Data._FIXED.size           # 1347


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe(Message):
    """The sender's heartbeat and round-trip probe, to the group every probe interval from the
    first JOIN_ACK to the end. Receivers answer each with a STATUS echoing sent_at_us (the
    sender's clock, opaque to them) and scale their own timers by grtt_us (the group's round
    trip, the largest smoothed round trip among the receivers) and probe_interval_ms.
    pass_position: bytes of the first pass sent so far, in send order (first_pass_ranges)."""

    TYPE: ClassVar[MessageType] = MessageType.PROBE
    _RECEIVER: ClassVar[str] = "zero"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QIHIQH")     # 28 bytes

    sent_at_us: int
    grtt_us: int
    probe_interval_ms: int
    rate_kbit_s: int
    pass_position: int
    participants: int

    def _check(self) -> None:
        for field, top in (("sent_at_us", _U64), ("grtt_us", _U32),
                           ("probe_interval_ms", _U16), ("rate_kbit_s", _U32),
                           ("pass_position", _U64), ("participants", _U16)):
            _uint("PROBE", field, getattr(self, field), top)
        if self.probe_interval_ms == 0:
            raise MulticastFormatError("PROBE: probe interval 0")

    def _body(self) -> bytes:
        return self._FIXED.pack(self.sent_at_us, self.grtt_us, self.probe_interval_ms,
                                self.rate_kbit_s, self.pass_position, self.participants)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Probe":
        sent_at, grtt, interval, rate, position, participants = _fixed(cls, body, exact=True)
        return cls(**head, sent_at_us=sent_at, grtt_us=grtt, probe_interval_ms=interval,
                   rate_kbit_s=rate, pass_position=position, participants=participants)


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish(Message):
    """The first pass is over: NAK what is missing, or report DONE (repeated every probe
    interval). final: the session is closed, no more repairs; a receiver not done finishes
    over unicast HTTP."""

    TYPE: ClassVar[MessageType] = MessageType.FINISH
    _RECEIVER: ClassVar[str] = "zero"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QB")
    FINAL: ClassVar[int] = 0x01

    image_bytes: int
    final: bool = False

    def _check(self) -> None:
        _uint("FINISH", "image_bytes", self.image_bytes, _U64)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.image_bytes, self.FINAL if self.final else 0)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Finish":
        size, flags = _fixed(cls, body, exact=True)
        return cls(**head, image_bytes=size, final=bool(flags & cls.FINAL))


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Message):
    """The session ends (receiver_id 0, to the group), or one receiver's part in it ends
    (receiver_id set, to that receiver's address)."""

    TYPE: ClassVar[MessageType] = MessageType.ABORT
    _RECEIVER: ClassVar[str] = "any"
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">BB")

    reason: AbortReason
    text: str = ""

    def _check(self) -> None:
        _reason(self, "ABORT", AbortReason)

    def _body(self) -> bytes:
        return _reason_body(self.reason, self.text)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "Abort":
        code, text = _parse_reason(cls, body)
        return cls(**head, reason=_tolerant(AbortReason, code), text=text)


# sender -> one receiver (to the address its JOIN came from) ----------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class JoinAck(Message):
    """The receiver is admitted: its JOIN's sent_at_us echoed (its first round-trip sample),
    where the data comes (group address, data port), and the session as in ANNOUNCE. The
    header carries the session id and the image digest the receiver holds the data to."""

    TYPE: ClassVar[MessageType] = MessageType.JOIN_ACK
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">Q4sHQBHHI")  # 31 bytes

    echo_sent_at_us: int
    group_address: str
    data_port: int
    image_bytes: int
    state: SessionState
    participants: int
    start_clients: int
    start_in_s: int | None

    def _check(self) -> None:
        _uint("JOIN_ACK", "echo_sent_at_us", self.echo_sent_at_us, _U64)
        try:
            group = ipaddress.IPv4Address(self.group_address)
        except (ipaddress.AddressValueError, TypeError, ValueError):
            raise MulticastFormatError("JOIN_ACK: the group address is not an IPv4 "
                                       "address") from None
        if not group.is_multicast:
            raise MulticastFormatError(f"JOIN_ACK: group address {group} is not multicast")
        _port("JOIN_ACK", "data_port", self.data_port)
        _set_enum(self, "JOIN_ACK", "state", SessionState)
        _session_fields(self, "JOIN_ACK")

    def _body(self) -> bytes:
        return self._FIXED.pack(self.echo_sent_at_us,
                                ipaddress.IPv4Address(self.group_address).packed,
                                self.data_port, self.image_bytes, self.state,
                                self.participants, self.start_clients,
                                _timer(self.start_in_s))

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "JoinAck":
        echo, group, port, size, state, participants, clients, start_in = \
            _fixed(cls, body, exact=True)
        return cls(**head, echo_sent_at_us=echo, group_address=str(ipaddress.IPv4Address(group)),
                   data_port=port, image_bytes=size, state=state, participants=participants,
                   start_clients=clients, start_in_s=None if start_in == NO_TIMER else start_in)


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinRefused(Message):
    """The receiver is not admitted, and why: a code and one line of text. Echoes the JOIN's
    sent_at_us and its session id and digest as the JOIN had them when the sender has nothing
    better (an unknown session)."""

    TYPE: ClassVar[MessageType] = MessageType.JOIN_REFUSED
    _UNKNOWN_OK: ClassVar[bool] = True
    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QBB")        # 10 bytes

    echo_sent_at_us: int
    reason: Refusal
    text: str = ""

    def _check(self) -> None:
        _uint("JOIN_REFUSED", "echo_sent_at_us", self.echo_sent_at_us, _U64)
        _reason(self, "JOIN_REFUSED", Refusal)

    def _body(self) -> bytes:
        return struct.pack(">Q", self.echo_sent_at_us) + _reason_body(self.reason, self.text)

    @classmethod
    def _parse(cls, head: dict, body: bytes) -> "JoinRefused":
        echo, code, length = _fixed(cls, body)
        rest = body[cls._FIXED.size:]
        if length != len(rest):
            raise MulticastFormatError(f"JOIN_REFUSED: text length {length} disagrees with "
                                       f"the {len(rest)} bytes that follow")
        return cls(**head, echo_sent_at_us=echo, reason=_tolerant(Refusal, code),
                   text=_text("JOIN_REFUSED", "text", rest))


AnyMessage = Union[Join, Status, Nak, Leave, Announce, Start, Data, Probe, Finish, Abort, JoinAck,
                   JoinRefused]
_CLASSES: dict[int, type[Message]] = {cls.TYPE: cls for cls in (
    Join, Status, Nak, Leave, Announce, Start, Data, Probe, Finish, Abort, JoinAck, JoinRefused)}


# -- encode and decode --------------------------------------------------------------------------

def encode(message: Message) -> bytes:
    """The datagram for message (which was checked when it was built)."""
    body = message._body()
    if len(body) > MAX_BODY:            # every type's bounds keep it below; a guard all the same
        raise MulticastFormatError(f"{message.TYPE.name}: {HEADER.size + len(body)} bytes, "
                                   f"more than {MAX_DATAGRAM}")
    return HEADER.pack(MAGIC, VERSION, message.TYPE, len(body), message.session_id,
                       message.receiver_id, message.sequence, message.image_digest) + body


def decode(data: bytes | bytearray | memoryview) -> AnyMessage:
    """The message a datagram carries; MulticastFormatError (one line) for anything that is not
    a well-formed version-1 message."""
    if len(data) > MAX_DATAGRAM:
        raise MulticastFormatError(f"packet: {len(data)} bytes, more than the {MAX_DATAGRAM} "
                                   "a packet may have")
    if len(data) < HEADER.size:
        raise MulticastFormatError(f"packet: {len(data)} bytes, shorter than the "
                                   f"{HEADER.size}-byte header")
    magic, version, kind, length, session, receiver, sequence, digest = \
        HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MulticastFormatError("packet: bad magic (not a multicast imaging packet)")
    if version != VERSION:
        raise MulticastFormatError(f"packet: version {version} is not supported (this codec "
                                   f"speaks {VERSION})")
    cls = _CLASSES.get(kind)
    if cls is None:
        raise MulticastFormatError(f"packet: unknown type {kind:#04x}", unknown_type=True)
    have = len(data) - HEADER.size
    if length > have:
        raise MulticastFormatError(f"{cls.TYPE.name}: cut short (the header says a "
                                   f"{length}-byte body, {have} bytes came)")
    if length < have:
        raise MulticastFormatError(f"{cls.TYPE.name}: {have - length} trailing bytes after "
                                   "the body")
    if cls is Data:
        return _decode_data(data, session, receiver, sequence, digest)
    head = {"session_id": session, "receiver_id": receiver, "sequence": sequence,
            "image_digest": digest}
    return cls._parse(head, bytes(data[HEADER.size:]))       # type: ignore[return-value]


_DATA_AT = HEADER.size + Data._FIXED.size


def _decode_data(data: bytes | bytearray | memoryview, session: int, receiver: int,
                 sequence: int, digest: bytes) -> Data:
    """DATA, the packet of which a receiver decodes about 90,000 a second at 1 Gbit/s: the
    checks Data's constructor makes, without its cost (7 us a packet through the general path,
    about 2.3 us here). The header's numbers came from struct, so they are in range already."""
    if session == 0:
        raise MulticastFormatError("DATA: session id 0 (only a JOIN may not know the session "
                                   "yet)")
    if digest == NO_IMAGE:
        raise MulticastFormatError("DATA: names no image (an all-zero digest)")
    if receiver:
        raise MulticastFormatError(f"DATA: goes to the whole group, but names receiver "
                                   f"{receiver:#x}")
    if len(data) <= _DATA_AT:
        raise MulticastFormatError(f"DATA: body of {len(data) - HEADER.size} bytes, no "
                                   f"payload after its {Data._FIXED.size} fixed bytes")
    offset, flags = Data._FIXED.unpack_from(data, HEADER.size)
    payload = bytes(data[_DATA_AT:])
    if offset + len(payload) > _U64 + 1:
        raise MulticastFormatError("DATA: payload ends past 2**64")
    message = object.__new__(Data)
    put = object.__setattr__
    put(message, "session_id", session)
    put(message, "sequence", sequence)
    put(message, "image_digest", digest)
    put(message, "receiver_id", 0)
    put(message, "offset", offset)
    put(message, "payload", payload)
    put(message, "repair", bool(flags & Data.REPAIR))
    return message


DATA_HEAD = struct.Struct(HEADER.format + "QB")    # the header and DATA's fixed part, 53 bytes
DATA_PAYLOAD_AT = _DATA_AT


def data_fields(buffer: bytes | bytearray | memoryview, start: int, end: int,
                session_id: int, image_digest: bytes) -> tuple[int, int, int] | None:
    """The receiver's fast path for the one packet it gets ~90,000 times a second:
    buffer[start:end] read with one unpack, no Data built and no payload copied.
    (sequence, offset, repair: Data.REPAIR or 0) when it is a well-formed version-1 DATA of
    `session_id` and `image_digest` (exactly the packets for which decode() returns a Data with that session
    and digest; its payload is buffer[start + DATA_PAYLOAD_AT:end]); None for anything else,
    which the caller hands to decode() to be classified (another type, another session,
    malformed) as before."""
    length = end - start
    if length <= _DATA_AT or length > MAX_DATAGRAM or not session_id:
        return None                     # (session 0 is no session: decode() refuses it)
    magic, version, kind, body, session, receiver, sequence, digest, offset, flags = \
        DATA_HEAD.unpack_from(buffer, start)
    if kind != MessageType.DATA or magic != MAGIC or version != VERSION or \
            body != length - HEADER.size or session != session_id or receiver or \
            digest != image_digest or digest == NO_IMAGE or \
            offset + length - _DATA_AT > _U64 + 1:
        return None
    return sequence, offset, flags & Data.REPAIR           # unknown flag bits: ignored


_RUN_LAYOUTS: dict[int, struct.Struct] = {}


def _run_layout(segment: int) -> struct.Struct:
    """DATA_HEAD followed by the payload skipped: one segment of a run, for iter_unpack."""
    layout = _RUN_LAYOUTS.get(segment)
    if layout is None:
        if len(_RUN_LAYOUTS) >= 64:                 # a few sizes ever occur; stay bounded
            _RUN_LAYOUTS.clear()
        layout = _RUN_LAYOUTS[segment] = struct.Struct(
            f"{DATA_HEAD.format}{segment - _DATA_AT}x")
    return layout


def data_run(buffer: bytes | bytearray | memoryview, start: int, count: int, segment: int,
             session_id: int, image_digest: bytes) -> tuple[int, int, int] | None:
    """The receiver's faster path for a whole UDP_SEGMENT run as GRO brings it: `count`
    datagrams of `segment` bytes each, back to back from buffer[start]. (sequence, offset,
    repair) of the first when every one is what data_fields() accepts and they continue each
    other (sequence, sequence + 1, ...; offset, offset + payload, ...; the same flags), so the
    payloads are file[offset, offset + count * (segment - DATA_PAYLOAD_AT)) in order; None
    otherwise (the caller then takes them one by one with data_fields()). Every header is
    read, in C (iter_unpack), and checked column by column: no Python per packet."""
    if count < 1 or not _DATA_AT < segment <= MAX_DATAGRAM or not session_id or \
            image_digest == NO_IMAGE or len(buffer) < start + count * segment:
        return None
    rows = _run_layout(segment).iter_unpack(buffer[start:start + count * segment])
    magic, version, kind, body, session, receiver, sequence, digest, offset, flags = zip(*rows)
    if magic.count(MAGIC) != count or version.count(VERSION) != count or \
            kind.count(MessageType.DATA) != count or \
            body.count(segment - HEADER.size) != count or session.count(session_id) != count or \
            receiver.count(0) != count or digest.count(image_digest) != count or \
            flags.count(flags[0]) != count:
        return None
    payload = segment - _DATA_AT
    first, at = sequence[0], offset[0]
    if first + count - 1 > _U32 or at + count * payload > _U64 + 1 or \
            sequence != tuple(range(first, first + count)) or \
            offset != tuple(range(at, at + count * payload, payload)):
        return None                     # (a run across 2**32 goes the slow way: once in 4 G)
    return first, at, flags[0] & Data.REPAIR


def encode_data_run(session_id: int, image_digest: bytes, sequence: int, offset: int,
                    payload: bytes | bytearray | memoryview,
                    segment_payload: int = 0, repair: bool = False
                    ) -> tuple[bytearray, int, int]:
    """payload, the image file's bytes at offset, as DATA packets back to back in one buffer:
    each carries segment_payload bytes (MAX_DATA_BYTES when 0) but the last, which may carry
    fewer, so every datagram but the last has the same size and one UDP_SEGMENT send (the
    doc's "Packets": Linux cuts the buffer at that size) puts them all on the wire. Returns
    (buffer, packets, segment size in bytes); the packets are numbered sequence, sequence + 1,
    ... modulo 2**32. Each packet is byte for byte what encode(Data(...)) writes; this is the
    sender's path for the ~90,000 packets a second of 1 Gbit/s, without a Data per packet."""
    if not 0 < session_id <= _U64:
        raise MulticastFormatError("DATA: session id 0 or out of range")
    if not isinstance(image_digest, bytes) or len(image_digest) != DIGEST_BYTES or \
            image_digest == NO_IMAGE:
        raise MulticastFormatError("DATA: the image digest is not 16 bytes naming an image")
    size = segment_payload or MAX_DATA_BYTES
    if not 0 < size <= MAX_DATA_BYTES:
        raise MulticastFormatError(f"DATA: segment payload {size} is not 1 to {MAX_DATA_BYTES}")
    total = len(payload)
    if total == 0 or offset < 0 or offset + total > _U64 + 1:
        raise MulticastFormatError("DATA: empty payload or offset out of range")
    _uint("DATA", "sequence", sequence, _U32)
    count = -(-total // size)
    segment = _DATA_AT + size
    out = bytearray(segment * (count - 1) + _DATA_AT + total - size * (count - 1))
    view = memoryview(payload)
    flags = Data.REPAIR if repair else 0
    pack_header, pack_fixed = HEADER.pack_into, Data._FIXED.pack_into
    position = 0
    for n in range(count):
        part = view[n * size:(n + 1) * size]
        pack_header(out, position, MAGIC, VERSION, MessageType.DATA,
                    Data._FIXED.size + len(part), session_id, 0, (sequence + n) & _U32,
                    image_digest)
        pack_fixed(out, position + HEADER.size, offset + n * size, flags)
        out[position + _DATA_AT:position + _DATA_AT + len(part)] = part
        position += segment
    return out, count, segment


# -- the image and the group --------------------------------------------------------------------

def image_digest(head: bytes, tail: bytes) -> bytes:
    """The image's name on the wire: BLAKE2b-128 of the file without its chunk area, i.e. of
    its header (head: bytes [0, header length)) followed by its index and trailer (tail: bytes
    [index offset, end of file)). The index lists every chunk's position, length and BLAKE2b,
    so the digest binds every byte of the file; the sender reads only head and tail to make it."""
    return hashlib.blake2b(bytes(head) + bytes(tail), digest_size=DIGEST_BYTES).digest()


def first_pass_ranges(image_bytes: int, header_bytes: int,
                      index_offset: int) -> tuple[ByteRange, ByteRange, ByteRange]:
    """The first pass's send order: the image header, then the index and trailer (so a receiver
    can check the image before any chunk arrives), then the chunks front to back."""
    if header_bytes < HEADER_FIXED.size or header_bytes > HEADER_FIXED.size + MAX_METADATA:
        raise MulticastFormatError(f"header length {header_bytes} is not an image header's")
    if not header_bytes <= index_offset <= image_bytes - TRAILER.size:
        raise MulticastFormatError(f"index offset {index_offset} is not between the header "
                                   f"({header_bytes}) and the trailer "
                                   f"({image_bytes - TRAILER.size})")
    return (ByteRange(0, header_bytes), ByteRange(index_offset, image_bytes - index_offset),
            ByteRange(header_bytes, index_offset - header_bytes))


def session_name_refusal(name: str) -> str:
    """Why name cannot name a session on the wire; "" when it can: 1 to 255 bytes of UTF-8
    without control characters."""
    if not isinstance(name, str) or not name:
        return "empty session name"
    try:
        length = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "session name is not UTF-8 text"
    if length > MAX_SESSION_NAME_BYTES:
        return f"session name of {length} bytes, more than {MAX_SESSION_NAME_BYTES}"
    if _CONTROL.search(name):
        return "session name has control characters"
    return ""


def group_address(session_name: str) -> str:
    """The session's group address: h = SHA-256(the name's UTF-8 bytes); 231.h[0].h[1].d with
    d = 1 + h[2] mod 254 (never .0 or .255); h[1] becomes 1 when the address would share its
    Ethernet address with 224.0.0.x (RFC 1112 section 6.4), which switches flood (RFC 4541
    section 2.1.2). docs/multicast-protocol.md works an example."""
    problem = session_name_refusal(session_name)
    if problem:
        raise MulticastFormatError(problem)
    h = hashlib.sha256(session_name.encode("utf-8")).digest()
    second, third, fourth = h[0], h[1], 1 + h[2] % 254
    if second & 0x7F == 0 and third == 0:
        third = 1
    return f"231.{second}.{third}.{fourth}"


def group_address_refusal(address: str) -> str:
    """Why address cannot be a session's group address (an administrator's override); "" when
    it can."""
    try:
        group = ipaddress.IPv4Address(address)
    except (ipaddress.AddressValueError, TypeError, ValueError):
        return f"{str(address)[:40]!r} is not an IPv4 address"
    if not group.is_multicast:
        return f"{group} is not a multicast address (224.0.0.0/4)"
    if group in ipaddress.IPv4Network("224.0.0.0/24"):
        return (f"{group} is in 224.0.0.0/24, the local network control block (RFC 5771): "
                "reserved for routing and discovery protocols")
    if group in ipaddress.IPv4Network("232.0.0.0/8"):
        return (f"{group} is in 232.0.0.0/8, source-specific multicast (RFC 4607), which our "
                "receivers do not join")
    low = group.packed
    if low[1] & 0x7F == 0 and low[2] == 0:
        return (f"{group} shares its Ethernet address with 224.0.0.{low[3]} (RFC 1112 "
                "section 6.4), which switches flood to every port (RFC 4541 section 2.1.2)")
    return ""


# -- helpers --------------------------------------------------------------------------------------

def _uint(kind: str, field: str, value: object, top: int) -> None:
    if type(value) is not int and not isinstance(value, IntEnum):
        raise MulticastFormatError(f"{kind}: {field} is not a whole number")
    if not 0 <= value <= top:        # type: ignore[operator]
        raise MulticastFormatError(f"{kind}: {field} {value} is outside 0..{top}")


def _port(kind: str, field: str, value: int) -> None:
    _uint(kind, field, value, _U16)
    if value == 0:
        raise MulticastFormatError(f"{kind}: {field} 0")


def _timer(start_in_s: int | None) -> int:
    return NO_TIMER if start_in_s is None else start_in_s


def _session_fields(message: Announce | JoinAck, kind: str) -> None:
    _uint(kind, "participants", message.participants, _U16)
    _uint(kind, "start_clients", message.start_clients, _U16)
    _uint(kind, "image_bytes", message.image_bytes, _U64)
    if message.start_in_s is not None:
        _uint(kind, "start_in_s", message.start_in_s, NO_TIMER - 1)


def _set_enum(message: Message, kind: str, field: str, enum: type[IntEnum]) -> None:
    value = getattr(message, field)
    try:
        member = enum(value)
    except (ValueError, TypeError):
        raise MulticastFormatError(f"{kind}: unknown {field} {value!r}") from None
    object.__setattr__(message, field, member)


def _tolerant(enum: type[IntEnum], code: int) -> IntEnum:
    try:
        return enum(code)
    except ValueError:
        return enum(0)


def _reason(message: Leave | Abort | JoinRefused, kind: str, enum: type[IntEnum]) -> None:
    _set_enum(message, kind, "reason", enum)
    if not isinstance(message.text, str):
        raise MulticastFormatError(f"{kind}: text is not a string")
    try:
        length = len(message.text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MulticastFormatError(f"{kind}: text is not UTF-8 text") from None
    if length > MAX_TEXT_BYTES:
        raise MulticastFormatError(f"{kind}: text of {length} bytes, more than "
                                   f"{MAX_TEXT_BYTES}")
    if _CONTROL.search(message.text):
        raise MulticastFormatError(f"{kind}: text has control characters (one line only)")


def _reason_body(reason: IntEnum, text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">BB", reason, len(raw)) + raw


def _parse_reason(cls: type[Message], body: bytes) -> tuple[int, str]:
    code, length = _fixed(cls, body)
    rest = body[2:]
    if length != len(rest):
        raise MulticastFormatError(f"{cls.TYPE.name}: text length {length} disagrees with the "
                                   f"{len(rest)} bytes that follow")
    return code, _text(cls.TYPE.name, "text", rest)


def _fixed(cls: type[Message], body: bytes, exact: bool = False) -> tuple:
    layout: struct.Struct = cls._FIXED          # type: ignore[attr-defined]
    if len(body) < layout.size:
        raise MulticastFormatError(f"{cls.TYPE.name}: body of {len(body)} bytes, shorter than "
                                   f"its {layout.size} fixed bytes")
    if exact and len(body) != layout.size:
        raise MulticastFormatError(f"{cls.TYPE.name}: body of {len(body)} bytes, not its "
                                   f"{layout.size}")
    return layout.unpack_from(body)


def _text(kind: str, field: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MulticastFormatError(f"{kind}: {field} is not UTF-8") from None
