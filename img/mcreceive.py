"""img's multicast receiver (docs/multicast-protocol.md): join a session, receive the image
file from its group into a bounded window (img/mcwindow.py), and hand it to the normal restore
(img/restore.py) as a positional reader, so a multicast restore writes the disk exactly as a
unicast one does.

    receive_session(server, name, token, mac, expected_digest, disk, unicast=...)
                        the whole thing: join, receive, restore, leave; a ReceiveOutcome with
                        the path taken (multicast, multicast+unicast, unicast) or why it failed
    MulticastSource     what ImageReader reads through: size, pread(length, offset), plan()
    join_session        JOIN (retransmitted with back-off) to a known sender, or
                        discover_session first: the ANNOUNCE of a name on its group

What it owns: two UDP sockets (the control socket its JOIN left from, and the data socket bound
to the group, with UDP_GRO where the kernel has it: runs of datagrams in one buffer, cut back
into datagrams by the control message's segment size, each checked on its own; the doc's
"Packets" says how), and one thread ("mc-net") that receives DATA into the window, answers
each PROBE with a STATUS (it never waits for the disk, so a slow disk shows as lag, not as
silence), NAKs holes (mcwindow.NakPlanner), and watches for a lost sender. pread() blocks
until its bytes are there. The thread stops, after its LEAVE, when the restore is done, failed
or fell back; close() is its one stop path.

The image is checked before a byte is written: the digest of the header and tail received
(image_digest) must be the one every packet names and the one expected (the work answer's),
the index's CRC the trailer's; every chunk's header must match its index entry and its payload
its BLAKE2b (anyone on the segment can send packets with the session's id), else it is dropped
and NAKed again.

Fallback: when the sender drops this receiver (ABORT too slow or lost), is lost, closes the
session before this receiver is done, or the loss stays too high, the source reads what it
lacks over the unicast RemoteImage (img/remote.py) the caller's factory opens, once that image's
digest is the same: the restore simply continues.

A command-line entry for tests and the bench (one JSON line with the outcome; exit 0 when the
disk was restored):

    python3 -m img.mcreceive --server IP --session NAME (--disk F | --output F)
        [--unicast-server HOST:PORT --image PATH] [--digest HEX] [--token T] [--mac M]
        [--interface IP] [--control-port 997] [--window-mib 64] [--threads 2]

Without --server it joins by name: it waits for the session's ANNOUNCE on its group. --output
writes the image file itself (every chunk checked) instead of restoring a disk: the transfer
the bench compares with udpcast's and UFTP's (the copy's sha256 is the source's). The JSON line
also carries the process's CPU seconds (cpu_s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import secrets
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from common.imaging import multicast as mc
from common.imaging.imagefile import ImageReader
from common.imaging.imageformat import (CHUNK_HEADER, HEADER_FIXED, TRAILER, ChunkKind,
                                        ImageFormatError, IndexEntry, check_index_bytes,
                                        decode_chunk_header, decode_header, decode_index,
                                        decode_trailer, digest, header_length)
from common.imaging.mcranges import PassOrder
from common.imaging.mctimers import (LEAVE_REPEATS, LEAVE_SPACING_S, START_REPEATS, JoinBackoff,
                                     RttEstimator,
                                     probe_interval_s, rtt_sample_s, sender_lost_after_s,
                                     status_delay_max_s)
from common.imaging.multicast import AbortReason, LeaveReason, ReceiverState

from .mcwindow import (CONSUMED, COMPLETE, DEFAULT_BUDGET_BYTES, MAX_NAKS_PER_ROUND, VERIFIED,
                       NakPlanner, Window, WindowError)

RECEIVE_BUFFER_BYTES = 8 << 20       # the data socket's: ~65 ms at 1 Gbit/s (a deeper one
                                     # turns a busy CPU's backlog into late repairs)
MAX_PACKETS_PER_TURN = 512          # datagrams read before acting on them (one lock taking)
RECV_BYTES = 1 << 16                 # one recvmsg's room: a UDP_GRO buffer holds up to 64 KiB
POOL_BYTES = 1 << 20                 # a turn's datagrams, side by side (the window copies them
                                     # out before the next turn reuses the room)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_GRO = getattr(socket, "UDP_GRO", 104)        # Linux 5.0; not in Python 3.11's socket
_GRO_ANC = socket.CMSG_SPACE(4)                  # the cmsg: the segment size, a native int
_INT = struct.Struct("=i")
NAK_EVERY_S = 0.002                  # how often the holes are looked at (at most)
LOSS_WINDOW_S = 5.0                  # the receiver's own judgement of its loss ...
MAX_LOSS = 0.5                       # ... falls back to unicast above this
LOSS_MIN_PACKETS = 500
WAIT_TICK_S = 0.25                   # pread's waits wake this often to look at the state
STALL_S = 30.0                       # a chunk waited for that long without a byte: fallback
U32 = 1 << 32
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)


class MulticastFailure(Exception):
    """The multicast restore cannot go on (and no unicast path continues it); str() says why
    in one line."""


class Refused(MulticastFailure):
    """The sender refused the JOIN: code (common.imaging.multicast.Refusal) and its text."""

    def __init__(self, code: int, text: str):
        try:
            name = mc.Refusal(code).name.lower()
        except ValueError:
            name = str(code)
        super().__init__(f"refused: {name}: {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class MulticastStats:
    """What the multicast part of a receive did."""

    packets_received: int            # DATA packets since START
    packets_lost: int                # the sender's sequence numbers missed
    loss_fraction: float
    repair_packets: int              # DATA with the repair flag received
    duplicate_bytes: int
    dropped_bytes: int               # arrived without room in the window (NAKed later)
    naks_sent: int
    nak_ranges: int
    chunks_rejected: int             # failed their header or BLAKE2b check
    bytes_multicast: int             # chunk bytes the restore read from the window
    bytes_unicast: int               # ... and over unicast HTTP
    srtt_ms: float | None
    seconds: float
    gro: bool = False                # the data socket had UDP_GRO (runs of datagrams a read)
    malformed_packets: int = 0       # dropped: not a well-formed packet
    foreign_packets: int = 0         # dropped: another session's or image's, or not the sender


@dataclass(frozen=True)
class ReceiveOutcome:
    """What receive_session did. path: "multicast", "multicast+unicast" or "unicast" when the
    disk was restored; "refused" (the sender refused the JOIN: refusal is its code) or
    "failed". reason: why it fell back, failed or was refused ("" for a clean multicast run).
    chunks_verified: chunks whose bytes were checked against the digest-checked index (the
    BLAKE2b of those read, multicast or unicast; zero chunks, which the index alone says);
    all of the image's when the disk was restored. disk_changed: whether anything was written
    (never on a refusal or a bad image)."""

    ok: bool
    path: str
    reason: str
    image_digest: str
    chunks: int
    chunks_verified: int
    bytes_written: int
    disk_changed: bool
    refusal: int | None
    stats: MulticastStats | None

    @property
    def digest(self) -> str:
        """The image digest restored (hex; "" when none was seen)."""
        return self.image_digest

    @property
    def error(self) -> str:
        """Why it failed or was refused; "" when the disk was restored."""
        return "" if self.ok else self.reason


# -- sockets ------------------------------------------------------------------------------------

def local_address_towards(server: str, port: int) -> str:
    """The address this host sends to server from (the routing table's choice; no packet is
    sent: a connected UDP socket only picks its source)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((server, port))
        return probe.getsockname()[0]


def _control_socket(local: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((local, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP generic receive offload: the kernel hands over a run of same-size datagrams
    (as the sender's UDP_SEGMENT sends them, cut into packets on the wire) in one buffer, so
    one recvmsg and one pass of Python reads up to 64 KiB instead of one 1,400-byte datagram
    (the receiver's CPU, not the network, was the limit). False where the kernel refuses (before
    Linux 5.0, other systems): the socket then gets single datagrams, which gro_segments()
    reads as one-piece buffers, so the same receive path serves both."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment_size(ancdata: Sequence[tuple[int, int, bytes]]) -> int:
    """The segment size the kernel's UDP_GRO cmsg gives (0 when there is none: the buffer is
    one datagram)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
            return _INT.unpack_from(data)[0]
    return 0


def gro_segments(start: int, size: int, segment: int) -> list[tuple[int, int]]:
    """A received buffer at [start, start + size) cut into its datagrams: pieces of `segment`
    bytes, the last one possibly shorter (GRO joins datagrams of one size and may end with a
    smaller one); one piece when segment is 0 (no cmsg), negative or not smaller than size."""
    if segment <= 0 or segment >= size:
        return [(start, start + size)] if size > 0 else []
    end = start + size
    return [(at, min(at + segment, end)) for at in range(start, end, segment)]


def receive_batch(sock: socket.socket, pool: memoryview, max_packets: int = MAX_PACKETS_PER_TURN
                  ) -> tuple[list[tuple[int, int, int]], int]:
    """What is queued on sock, read into `pool` side by side: ([(position, size, segment) of
    each buffer received], buffers cut short). segment: the GRO segment size (0: the buffer is
    one datagram; gro_segments() cuts it). Stops when the socket is empty, about max_packets
    datagrams are in, or the pool has no room for another 64 KiB. A buffer the kernel cut
    (MSG_TRUNC: cannot happen with RECV_BYTES of room, counted all the same) is left out."""
    buffers: list[tuple[int, int, int]] = []
    position, truncated, packets = 0, 0, 0
    room = len(pool) - RECV_BYTES
    for _ in range(max_packets):
        if position > room or packets >= max_packets:
            break
        try:
            size, ancdata, flags, _source = sock.recvmsg_into(
                [pool[position:position + RECV_BYTES]], _GRO_ANC)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            continue                    # an ICMP error reported on the socket: the next one
        if flags & socket.MSG_TRUNC:
            truncated += 1
            continue
        segment = gro_segment_size(ancdata)
        buffers.append((position, size, segment))
        packets += -(-size // segment) if segment > 0 else 1
        position += size
    return buffers, truncated


def _data_socket(group: str, port: int, local: str) -> socket.socket:
    """Bound to the group address itself (not 0.0.0.0, so a host's unicast traffic to the port
    never lands here), joined on the interface of `local`, IP_MULTICAST_ALL off, UDP_GRO on
    where the kernel has it (_enable_gro)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        _enable_gro(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33),
                            RECEIVE_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.bind((group, port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(local)))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _gro_on(sock: socket.socket) -> bool:
    """Whether the socket has UDP_GRO (for the outcome's numbers)."""
    try:
        return bool(sock.getsockopt(SOL_UDP, UDP_GRO))
    except OSError:
        return False


def _now_us(now_s: float) -> int:
    return int(now_s * 1_000_000)


# -- joining ---------------------------------------------------------------------------------------

@dataclass
class Joined:
    """An admitted receiver: the sender's control address (the JOIN_ACK's source), the
    JOIN_ACK, our receiver id, sockets (control, and data when it was opened to discover)."""

    sender: tuple[str, int]
    ack: mc.JoinAck
    receiver_id: int
    local: str
    control: socket.socket
    data: socket.socket | None
    rtt: RttEstimator
    name: str


@dataclass(frozen=True)
class Announced:
    """A session found by its name on its group: who announces it and where to JOIN."""

    sender: tuple[str, int]          # (the announcing address, its control port)
    announce: mc.Announce


def discover_session(name: str, local: str, data_port: int = mc.DATA_PORT,
                     timeout_s: float = 30.0, group: str | None = None
                     ) -> tuple[Announced, socket.socket]:
    """Wait for the ANNOUNCE of `name` on its group (group_address(name) unless given); the
    session found and the data socket already joined to the group. MulticastFailure after
    timeout_s."""
    group = group or mc.group_address(name)
    sock = _data_socket(group, data_port, local)
    deadline = time.monotonic() + timeout_s
    pool = memoryview(bytearray(RECV_BYTES))
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MulticastFailure(f"no session {name!r} announced on {group}:{data_port} "
                                       f"within {timeout_s:g} s")
            if not select.select([sock], [], [], min(left, 0.5))[0]:
                continue
            # one buffer at a time (the socket has UDP_GRO: it may hold several datagrams),
            # with its source: the ANNOUNCE's sender is where to JOIN
            try:
                size, ancdata, flags, source = sock.recvmsg_into([pool], _GRO_ANC)
            except (BlockingIOError, InterruptedError):
                continue
            if flags & socket.MSG_TRUNC:
                continue
            for start, end in gro_segments(0, size, gro_segment_size(ancdata)):
                try:
                    message = mc.decode(pool[start:end])
                except mc.MulticastFormatError:
                    continue
                if isinstance(message, mc.Announce) and message.session_name == name:
                    return Announced((source[0], message.control_port), message), sock
    except BaseException:
        sock.close()
        raise


def join_session(sender: tuple[str, int], name: str, token: str = "", mac: str = "",
                 expected_digest: bytes | None = None, session_id: int = 0,
                 local: str | None = None, backoff: JoinBackoff = JoinBackoff(),
                 data: socket.socket | None = None,
                 log: Callable[[str], None] | None = None) -> Joined:
    """JOIN the session at sender (its control address), retransmitted with back-off
    (mctimers.JoinBackoff) until a JOIN_ACK (Joined) or JOIN_REFUSED (Refused); 30 s without
    an answer is a MulticastFailure naming the sender."""
    local = local or local_address_towards(*sender)
    control = _control_socket(local)
    receiver_id = secrets.randbits(64) or 1
    rtt = RttEstimator()
    buffer = bytearray(mc.MAX_DATAGRAM + 1)
    started = time.monotonic()
    attempts: dict[int, float] = {}
    try:
        for attempt, at in enumerate(backoff.schedule_s()):
            while time.monotonic() < started + at:
                _await_answer(control, started + at, buffer, sender, receiver_id, attempts,
                              rtt, name, data, local)
            now = time.monotonic()
            sent_us = _now_us(now)
            attempts[sent_us] = now
            join = mc.Join(session_id=session_id, receiver_id=receiver_id,
                           image_digest=expected_digest or mc.NO_IMAGE, sequence=attempt,
                           sent_at_us=sent_us, session_name=name, mac=mac, token=token)
            try:
                control.sendto(mc.encode(join), sender)
            except OSError as exc:
                if log:
                    log(f"img: JOIN to {sender[0]}:{sender[1]}: {exc}")
        _await_answer(control, started + backoff.give_up_s, buffer, sender, receiver_id,
                      attempts, rtt, name, data, local)
        raise MulticastFailure(f"the session's sender {sender[0]}:{sender[1]} did not answer "
                               f"{name!r}'s JOIN within {backoff.give_up_s:g} s")
    except _Answered as answered:
        return answered.joined
    except BaseException:
        control.close()
        raise


class _Answered(Exception):
    def __init__(self, joined: Joined):
        self.joined = joined


def _await_answer(control: socket.socket, until_s: float, buffer: bytearray,
                  sender: tuple[str, int], receiver_id: int, attempts: dict[int, float],
                  rtt: RttEstimator, name: str, data: socket.socket | None, local: str) -> None:
    while True:
        left = until_s - time.monotonic()
        if left <= 0:
            return
        if not select.select([control], [], [], left)[0]:
            return
        try:
            size, source = control.recvfrom_into(buffer)
        except (BlockingIOError, ConnectionRefusedError):
            continue
        if source[0] != sender[0]:
            continue                                # only the sender answers a JOIN
        try:
            message = mc.decode(memoryview(buffer)[:size])
        except mc.MulticastFormatError:
            continue
        if getattr(message, "receiver_id", 0) != receiver_id:
            continue
        sent = attempts.get(getattr(message, "echo_sent_at_us", -1))
        if sent is not None:
            rtt.update(rtt_sample_s(time.monotonic(), sent))
        if isinstance(message, mc.JoinAck):
            raise _Answered(Joined(source, message, receiver_id, local, control, data, rtt,
                                   name))
        if isinstance(message, mc.JoinRefused):
            raise Refused(int(message.reason), message.text)


# -- the source ----------------------------------------------------------------------------------

class _Runs:
    """DATA of a batch gathered into runs, each packet continuing the one before it: the
    next sequence number, the next byte of the file, the same repair flag; take(pieces,
    offset, first sequence, repair) gets each run once it ends (flush)."""

    __slots__ = ("take", "pieces", "offset", "end", "first", "next", "repair")

    def __init__(self, take: Callable[[list[memoryview], int, int, int], None]) -> None:
        self.take = take
        self.pieces: list[memoryview] = []
        self.offset = self.end = self.first = self.next = self.repair = 0

    def add(self, first: int, offset: int, repair: int, pieces: list[memoryview],
            payload_bytes: int) -> None:
        """pieces: payloads of packets numbered first, first + 1, ... from offset on."""
        if self.pieces and offset == self.end and first == self.next and \
                repair == self.repair:
            self.pieces += pieces
        else:
            self.flush()
            self.pieces = pieces
            self.offset, self.first, self.repair = offset, first, repair
        self.end = offset + payload_bytes
        self.next = (first + len(pieces)) & (U32 - 1)

    def flush(self) -> None:
        if self.pieces:
            pieces, self.pieces = self.pieces, []
            self.take(pieces, self.offset, self.first, self.repair)


class _Took:
    """What a batch of DATA did, for once-a-batch actions: the farthest pass position of its
    first-pass data (-1: none) and whether readers must be woken."""

    __slots__ = ("horizon", "woken")

    def __init__(self) -> None:
        self.horizon = -1
        self.woken = False


class MulticastSource:
    """The image of a joined session as a positional reader (size, pread, plan) for
    ImageReader; see the module's docstring."""

    def __init__(self, joined: Joined, expected_digest: bytes | None = None,
                 window_bytes: int = DEFAULT_BUDGET_BYTES,
                 unicast: Callable[[], Any] | None = None,
                 log: Callable[[str], None] | None = None):
        ack = joined.ack
        self.name = joined.name
        self.size = ack.image_bytes
        self.session_id = ack.session_id
        self.digest = ack.image_digest
        self._joined = joined
        self._expected = expected_digest
        self._budget = window_bytes
        self._unicast_factory = unicast
        self._log = log or (lambda message: None)
        self._sender = joined.sender
        self._control = joined.control
        data = joined.data
        if data is not None and data.getsockname() != (ack.group_address, ack.data_port):
            data.close()                    # discovered on the name's group; sent elsewhere
            data = None
        self._data = data or _data_socket(ack.group_address, ack.data_port, joined.local)
        self._cond = threading.Condition(threading.Lock())
        self._window: Window | None = None
        self._order: PassOrder | None = None
        self._chunk_size = 0
        self._meta_ready = False
        self._ranks: list[int] | None = None
        self._failure: str | None = None
        self._fallback: str | None = None
        self._leave: tuple[LeaveReason, str] | None = None
        self._leaves_left = 0
        self._next_leave_s = 0.0
        self._stopping = False
        self._done = False
        self._remote: Any = None
        self._unicast_lock = threading.Lock()
        self._rng = random.Random()
        self._planner = NakPlanner(self._rng)
        self._rtt = joined.rtt
        # the sender's timers, from its newest PROBE
        self._grtt_s: float | None = None
        self._probe_s: float | None = None
        self._heard_s = time.monotonic()
        self._probe_echo: tuple[int, float] | None = None    # (sent_at_us, when it came)
        self._status_due_s: float | None = None
        self._status_sent_s = time.monotonic()
        self._next_nak_s = 0.0
        self._started = False
        self._seq_base: int | None = None
        self._seq_max = 0
        self._seq_cycles = 0
        self._group_packets = 0
        self.packets_received = 0
        self.repair_packets = 0
        self.foreign_packets = 0
        self.malformed_packets = 0
        self._verified: set[int] = set()           # positions of the chunks checked
        self._entries: dict[int, IndexEntry] | None = None   # the checked index, by position
        self.chunks_rejected = 0
        self.bytes_multicast = 0
        self.bytes_unicast = 0
        self.bytes_written = 0
        self._loss_marks: list[tuple[float, int, int]] = []
        self._started_s = time.monotonic()
        self._buffer = bytearray(mc.MAX_DATAGRAM + 1)        # the control socket's
        self._pool = memoryview(bytearray(POOL_BYTES))         # the data socket's
        self.gro = _gro_on(self._data)
        self._thread = threading.Thread(target=self._run, name="mc-net", daemon=True)
        self._probes_unstarted = 0
        self._thread.start()
        if expected_digest is not None and expected_digest != self.digest:
            with self._cond:
                self._fail(f"the session sends image {self.digest.hex()}, not the expected "
                           f"{expected_digest.hex()}")

    # -- what ImageReader and the caller see -----------------------------------------------

    @property
    def fallback_reason(self) -> str | None:
        return self._fallback

    @property
    def chunks_verified(self) -> int:
        """Chunks whose bytes were checked against the index (BLAKE2b, multicast or unicast),
        and the zero chunks, which the index (bound by the image digest) alone says."""
        entries = self._entries
        if entries is None:
            return len(self._verified)
        zero = sum(1 for position, entry in entries.items()
                   if entry.kind is ChunkKind.ZERO and position not in self._verified)
        return len(self._verified) + zero

    @property
    def failure(self) -> str | None:
        return self._failure

    def plan(self, entries: Sequence[IndexEntry]) -> int:
        """The order the restore will read the chunks in: the window keeps what is read soon
        and pushes out what is read late first."""
        positions = [e.position for e in entries]
        with self._cond:
            self._ranks = positions
            if self._window is not None and self._window.indexed:
                self._window.set_ranks(positions)
        return len(positions)

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        end = min(self.size, offset + length)
        with self._cond:
            while not self._meta_ready:
                if self._failure:
                    raise MulticastFailure(self._failure)
                if self._fallback is not None:
                    break
                self._cond.wait(WAIT_TICK_S)
            window = self._window if self._meta_ready else None
        if window is None:
            return self._unicast_read(end - offset, offset)
        o = window.order
        if end <= o.header_bytes:
            return window.head[offset:end]
        if offset >= o.index_offset:
            return window.tail[offset - o.index_offset:end - o.index_offset]
        slots = window.slots_over(offset, end)
        if len(slots) == 1 and slots[0].start <= offset and end <= slots[0].end:
            data = self._chunk(slots[0])
            return data[offset - slots[0].start:end - slots[0].start]
        return self._pieces(window, offset, end)

    def _pieces(self, window: Window, offset: int, end: int) -> bytes:
        """A read across chunks or regions (ImageReader never makes one; for completeness)."""
        out = bytearray()
        position = offset
        for slot in window.slots_over(offset, end):
            if slot.start > position:
                out += self._plain(window, position, slot.start)
            data = self._chunk(slot)
            a, b = max(position, slot.start), min(end, slot.end)
            out += data[a - slot.start:b - slot.start]
            position = b
        if position < end:
            out += self._plain(window, position, end)
        return bytes(out)

    def _plain(self, window: Window, start: int, end: int) -> bytes:
        o = window.order
        if end <= o.header_bytes:
            return window.head[start:end]
        if start >= o.index_offset:
            return window.tail[start - o.index_offset:end - o.index_offset]
        return self._unicast_read(end - start, start)    # bytes no chunk holds

    def _chunk(self, slot: Any) -> bytes:
        """The chunk's bytes (header and payload), checked; waits for them, or reads them over
        unicast after a fallback."""
        window = self._window
        assert window is not None
        while True:
            with self._cond:
                window.demand[slot.index] += 1
                progress, progress_s = -1, time.monotonic()
                try:
                    while True:
                        if self._failure:
                            raise MulticastFailure(self._failure)
                        if slot.state >= COMPLETE and slot.buffer is not None:
                            data, state = slot.buffer, slot.state
                            break
                        if self._fallback is not None:
                            data, state = None, None
                            break
                        window.want(slot)
                        now = time.monotonic()
                        behind = window.horizon > window.order.position_of(slot.end - 1)
                        if slot.got != progress or not behind:
                            # (a chunk the pass has not reached yet is not late)
                            progress, progress_s = slot.got, now
                        elif now - progress_s > STALL_S:
                            # a sender that probes but never repairs what we wait for
                            self._fall_back(f"the chunk at byte {slot.start} made no progress "
                                            f"for {STALL_S:g} s")
                            continue
                        self._next_nak_s = 0.0          # look at the holes now
                        self._cond.wait(WAIT_TICK_S)
                finally:
                    window.demand[slot.index] -= 1
                    if window.demand[slot.index] <= 0:
                        del window.demand[slot.index]
            if data is None:
                return self._unicast_read(slot.size, slot.start)
            if state in (VERIFIED, CONSUMED):
                with self._cond:
                    window.consumed(slot)
                self.bytes_multicast += len(data)
                return bytes(data) if not isinstance(data, bytes) else data
            checked = bytes(data)
            problem = self._check(slot.entry, checked)
            with self._cond:
                if problem:
                    self.chunks_rejected += 1
                    window.reject(slot)
                    self._log(f"img: multicast chunk at byte {slot.start} rejected: {problem}; "
                              "asking for it again")
                    continue
                window.verified(slot, checked)
                window.consumed(slot)
                self._verified.add(slot.start)
            self.bytes_multicast += len(checked)
            return checked

    def _check(self, entry: IndexEntry, raw: bytes) -> str:
        """Why the chunk's bytes are not the index entry's (header, BLAKE2b); "" when they
        are."""
        try:
            header = decode_chunk_header(raw, self._chunk_size, entry.position)
        except ImageFormatError as exc:
            return str(exc)
        if (header.stream, header.offset, header.length, header.kind, header.checksum) != (
                entry.stream, entry.offset, entry.length, entry.kind, entry.checksum):
            return "its header does not match its index entry"
        if digest(memoryview(raw)[CHUNK_HEADER.size:]) != entry.checksum:
            return "BLAKE2b mismatch"
        return ""

    # -- unicast -------------------------------------------------------------------------

    def _unicast_read(self, length: int, offset: int) -> bytes:
        """Bytes over unicast; a whole chunk is checked against the index as a multicast one
        is (the image was checked to be the session's when the unicast image was opened)."""
        remote = self._remote_image()
        data = bytes(remote.pread(length, offset))
        if len(data) != length:
            raise MulticastFailure(f"unicast: short read at byte {offset}")
        entry = self._entries.get(offset) if self._entries else None
        if entry is not None and length == CHUNK_HEADER.size + entry.payload_length:
            problem = self._check(entry, data)
            if problem:
                raise MulticastFailure(f"unicast: the chunk at byte {offset}: {problem}")
            with self._cond:
                self._verified.add(offset)
        self.bytes_unicast += len(data)
        return data

    def _remote_image(self) -> Any:
        """The unicast image, opened once and checked to be this session's image."""
        with self._unicast_lock:
            if self._remote is not None:
                return self._remote
            if self._unicast_factory is None:
                raise MulticastFailure(f"{self._fallback or 'multicast failed'}; no unicast "
                                       "path to continue on")
            remote = self._unicast_factory()
            try:
                fixed = bytes(remote.pread(HEADER_FIXED.size, 0))
                head_length = header_length(fixed)
                head = bytes(remote.pread(head_length, 0))
                trailer = decode_trailer(bytes(remote.pread(TRAILER.size,
                                                            remote.size - TRAILER.size)),
                                         remote.size)
                tail = bytes(remote.pread(remote.size - trailer.index_offset,
                                          trailer.index_offset))
            except ImageFormatError as exc:
                raise MulticastFailure(f"unicast: {exc}") from None
            got = mc.image_digest(head, tail)
            if remote.size != self.size or got != self.digest:
                raise MulticastFailure(
                    f"unicast: the server's image {got.hex()} is not the session's "
                    f"{self.digest.hex()} (replaced since?)")
            if self._entries is None:            # fell back before the index came
                try:
                    header = decode_header(head)
                    index_bytes = tail[:-TRAILER.size]
                    check_index_bytes(trailer, index_bytes)
                    index = decode_index(index_bytes, header.chunk_size, trailer.index_offset)
                except ImageFormatError as exc:
                    raise MulticastFailure(f"unicast: {exc}") from None
                self._chunk_size = header.chunk_size
                self._entries = {entry.position: entry for entry in index.entries}
            with self._cond:
                window = self._window
                missing = []
                if window is not None and window.indexed:
                    order = self._ranks or [s.start for s in window.slots]
                    for position in order:
                        slot = window.slot_at(position)
                        if slot is not None and not (slot.state >= COMPLETE and
                                                     slot.buffer is not None):
                            missing.append(slot.entry)
            if missing and hasattr(remote, "plan"):
                remote.plan(missing)
            self._remote = remote
            self._log(f"img: continuing over unicast from {remote} ({len(missing)} chunks "
                      "to fetch)" if missing else f"img: continuing over unicast from {remote}")
            return remote

    # -- the end -------------------------------------------------------------------------

    def finish(self, ok: bool, text: str = "") -> None:
        """The restore is over: STATUS and LEAVE (done, or failed with text), then the thread
        ends and the sockets close."""
        with self._cond:
            if self._leave is None:
                self._done = ok
                reason = LeaveReason.DONE if ok else LeaveReason.FAILED
                self._start_leave(reason, text or ("done" if ok else "failed"))
        self.close()

    def close(self, timeout_s: float = 2.0) -> None:
        """The one stop path: the thread ends (after its LEAVEs, at most ~150 ms), sockets and
        the unicast image close. Idempotent."""
        with self._cond:
            if self._leave is None:
                self._start_leave(LeaveReason.CANCELLED, "stopped")
        self._thread.join(timeout_s)
        with self._cond:
            self._stopping = True
        self._thread.join(timeout_s)
        for sock in (self._control, self._data):
            try:
                sock.close()
            except OSError:
                pass
        remote, self._remote = self._remote, None
        if remote is not None and hasattr(remote, "close"):
            remote.close()

    def stats(self) -> MulticastStats:
        lost = self._packets_lost()
        total = self.packets_received + lost
        window = self._window
        return MulticastStats(
            packets_received=self.packets_received, packets_lost=lost,
            loss_fraction=round(lost / total, 5) if total else 0.0,
            repair_packets=self.repair_packets,
            duplicate_bytes=window.duplicate_bytes if window else 0,
            dropped_bytes=window.dropped_bytes if window else 0,
            naks_sent=self._planner.naks_sent, nak_ranges=self._planner.ranges_sent,
            chunks_rejected=self.chunks_rejected, bytes_multicast=self.bytes_multicast,
            bytes_unicast=self.bytes_unicast,
            srtt_ms=None if self._rtt.srtt_s is None else round(self._rtt.srtt_s * 1000, 3),
            seconds=round(time.monotonic() - self._started_s, 3), gro=self.gro,
            malformed_packets=self.malformed_packets, foreign_packets=self.foreign_packets)

    # -- state changes (callers hold self._cond) ------------------------------------------

    def _start_leave(self, reason: LeaveReason, text: str) -> None:
        self._leave = (reason, _line(text))
        self._leaves_left = LEAVE_REPEATS
        self._next_leave_s = 0.0
        self._cond.notify_all()

    def _fail(self, why: str, reason: LeaveReason = LeaveReason.FAILED) -> None:
        if self._failure is not None:
            return
        self._failure = why
        self._log(f"img: multicast: {why}")
        if self._leave is None:
            self._start_leave(reason, why)
        self._cond.notify_all()

    def _fall_back(self, why: str) -> None:
        if self._fallback is not None or self._failure is not None or self._leave is not None:
            return
        if self._unicast_factory is None:
            self._fail(f"{why}; no unicast path to continue on", LeaveReason.FAILED)
            return
        self._fallback = why
        self._log(f"img: multicast: {why}: continuing over unicast")
        self._start_leave(LeaveReason.FALLBACK, why)
        self._cond.notify_all()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        return
                now = time.monotonic()
                wake = self._timers(now)
                if wake is None:
                    return                          # LEAVEs sent: nothing more to do
                timeout = max(0.0, min(wake, now + 0.1) - time.monotonic())
                try:
                    ready = select.select([self._data, self._control], [], [], timeout)[0]
                except (OSError, ValueError):
                    return                          # closed under us
                if self._data in ready:
                    self._drain_group()
                if self._control in ready:
                    self._drain_control()
        except Exception as exc:   # noqa: BLE001 - a bug here must fail the restore, loudly
            with self._cond:
                self._fail(f"the receiver thread failed: {type(exc).__name__}: {exc}")
            self._send_leaves_now()

    def _send_leaves_now(self) -> None:
        with self._cond:
            leave = self._leave
        if leave is None:
            return
        for _ in range(LEAVE_REPEATS):
            self._send(mc.Leave(session_id=self.session_id, receiver_id=self._joined.receiver_id,
                                image_digest=self.digest, reason=leave[0], text=leave[1]))

    def _timers(self, now_s: float) -> float | None:
        """Everything due now; returns when to look again (None: the thread is done)."""
        wake = now_s + 0.1
        with self._cond:
            leave = self._leave
            if leave is not None:
                if self._leaves_left and now_s >= self._next_leave_s:
                    if self._leaves_left == LEAVE_REPEATS:
                        self._send_status(now_s, final=True)
                    self._leaves_left -= 1
                    self._next_leave_s = now_s + LEAVE_SPACING_S
                    self._send(mc.Leave(session_id=self.session_id,
                                        receiver_id=self._joined.receiver_id,
                                        image_digest=self.digest, reason=leave[0],
                                        text=leave[1]))
                if not self._leaves_left:
                    return None
                return self._next_leave_s
            if self._status_due_s is not None:
                if now_s >= self._status_due_s:
                    self._status_due_s = None
                    self._send_status(now_s)
                else:
                    wake = min(wake, self._status_due_s)
            keepalive = self._probe_s or 1.0
            if now_s >= self._status_sent_s + keepalive:
                # no PROBE answered for a probe interval (lost, or queued behind data this
                # CPU has not got to): report anyway, so lag never looks like silence
                self._send_status(now_s)
            wake = min(wake, self._status_sent_s + keepalive)
            lost_after = sender_lost_after_s(self._probe_s, self._grtt_s)
            if now_s - self._heard_s > lost_after:
                self._fall_back(f"the sender {self._sender[0]} was silent for "
                                f"{now_s - self._heard_s:.1f} s")
                return now_s
            self._check_loss(now_s)
            window = self._window
            if window is not None and now_s >= self._next_nak_s:
                self._next_nak_s = now_s + NAK_EVERY_S
                holes = window.holes(4 * mc.MAX_NAK_RANGES * MAX_NAKS_PER_ROUND)
                ranges = self._planner.plan(holes, now_s, self._grtt_s or 0.01,
                                            self._probe_s or 1.0)
                due = self._planner.next_due_s()
                if due is not None:
                    wake = min(wake, due)
                if holes:
                    wake = min(wake, self._next_nak_s)
            else:
                ranges = []
        for n in range(0, len(ranges), mc.MAX_NAK_RANGES):
            # the first 64 in send order; a NAK lists them in increasing offsets
            part = sorted(ranges[n:n + mc.MAX_NAK_RANGES])
            self._send(mc.Nak(session_id=self.session_id, receiver_id=self._joined.receiver_id,
                              image_digest=self.digest,
                              ranges=tuple(mc.ByteRange(a, b - a) for a, b in part)))
        return wake

    def _check_loss(self, now_s: float) -> None:
        """Too much loss for too long: this receiver goes unicast on its own."""
        if not self._started:
            return
        marks = self._loss_marks
        if not marks or now_s - marks[-1][0] >= 1.0:
            marks.append((now_s, self.packets_received, self._packets_lost()))
            del marks[:-8]
        old = next((m for m in marks if m[0] <= now_s - LOSS_WINDOW_S), None)
        if old is None:
            return
        received = self.packets_received - old[1]
        lost = self._packets_lost() - old[2]
        if received + lost >= LOSS_MIN_PACKETS and lost / (received + lost) > MAX_LOSS:
            self._fall_back(f"lost {lost / (received + lost):.0%} of the packets over "
                            f"{now_s - old[0]:.0f} s")

    def _send(self, message: mc.Message) -> None:
        try:
            self._control.sendto(mc.encode(message), self._sender)
        except OSError:
            pass                    # a full buffer or an ICMP error: timers retry

    def _send_status(self, now_s: float, final: bool = False) -> None:
        """STATUS (callers hold self._cond): echoing the newest PROBE with how long it was
        held."""
        self._status_sent_s = now_s
        echo_us, delay_us = 0, 0
        if self._probe_echo is not None:
            echo_us = self._probe_echo[0]
            delay_us = min(U32 - 1, max(0, int((now_s - self._probe_echo[1]) * 1e6)))
        window = self._window
        if self._done:
            state = ReceiverState.DONE
        elif self._failure is not None or (final and self._leave is not None and
                                           self._leave[0] is LeaveReason.FAILED):
            state = ReceiverState.FAILED
        elif self._started:
            state = ReceiverState.RECEIVING
        else:
            state = ReceiverState.WAITING
        self._send(mc.Status(
            session_id=self.session_id, receiver_id=self._joined.receiver_id,
            image_digest=self.digest, echo_sent_at_us=echo_us, echo_delay_us=delay_us,
            state=state, first_missing=window.first_missing() if window else 0,
            bytes_received=min(window.received.bytes, self.size) if window else 0,
            chunks_verified=min(self.chunks_verified, U32 - 1),
            bytes_written=self.bytes_written, packets_received=self.packets_received % U32,
            packets_lost=self._packets_lost() % U32))

    def _session_message(self, datagram: memoryview) -> mc.Message | None:
        """The general path: the datagram decoded, if it is a well-formed packet of this
        session and image; anything else is counted (malformed, foreign) and dropped."""
        if len(datagram) > mc.MAX_DATAGRAM:
            self.malformed_packets += 1
            return None
        try:
            message = mc.decode(datagram)
        except mc.MulticastFormatError:
            self.malformed_packets += 1
            return None
        if message.session_id != self.session_id or message.image_digest != self.digest:
            self.foreign_packets += 1               # another session's, or forged
            return None
        return message

    def _drain_control(self) -> None:
        """Read what is queued on the control socket (at most MAX_PACKETS_PER_TURN; only the
        sender's), then act on it under one taking of the lock."""
        messages: list[mc.Message] = []
        buffer, view = self._buffer, memoryview(self._buffer)
        for _ in range(MAX_PACKETS_PER_TURN):
            try:
                size, source = self._control.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue                            # an ICMP error on the control socket
            if source[0] != self._sender[0]:
                self.foreign_packets += 1           # only the sender talks to us directly
                continue
            message = self._session_message(view[:size])
            if message is not None:
                messages.append(message)
        if not messages:
            return
        now = time.monotonic()
        with self._cond:
            self._heard_s = now
            for message in messages:
                self._on_message_safely(message, False, now)

    def _on_message_safely(self, message: mc.Message, group: bool, now: float) -> None:
        try:
            self._on_message(message, group, now)
        except Exception as exc:  # noqa: BLE001 - one bad packet never kills the loop
            self.malformed_packets += 1
            self._log(f"img: multicast: dropped a {type(message).__name__}: {exc}")

    def _drain_group(self) -> None:
        """Read what is queued on the data socket (receive_batch: UDP_GRO buffers or single
        datagrams, at most MAX_PACKETS_PER_TURN datagrams), then act on it in arrival order
        under one taking of the lock: the restore's readers wait for the lock once a batch,
        not once a packet."""
        pool = self._pool
        buffers, truncated = receive_batch(self._data, pool)
        self.malformed_packets += truncated
        if not buffers:
            return
        now = time.monotonic()
        with self._cond:
            if self._take_group(pool, buffers, now):
                self._heard_s = now

    def _take_group(self, pool: memoryview, buffers: list[tuple[int, int, int]],
                    now: float) -> bool:
        """The buffers received from the group, pool[position:position + size] each, in
        arrival order (callers hold self._cond); whether anything was the session's. Every
        datagram is checked on its own. A GRO buffer's full segments first go to mc.data_run,
        which checks all their headers at once (C, column by column) and says whether they are
        one run of this session's DATA; what it refuses, a short last segment and single
        datagrams go one by one: DATA of the session by mc.data_fields (one unpack, no Data
        built), everything else decoded and classified as before. DATA that continues the DATA
        before it (next sequence, next byte, same flag) joins its run (_Runs), taken at once
        (_take_run): the window's bookkeeping once a run, each payload copied once, from the
        pool into its chunk."""
        session, image = self.session_id, self.digest
        window = self._window
        heard = False
        took = _Took()
        runs = _Runs(lambda pieces, offset, first, repair:
                     self._take_run(self._window, pieces, offset, first, repair, took))
        for position, size, segment in buffers:
            if window is not None and 0 < segment < size:
                full = self._take_gro_run(pool, position, size // segment, segment, runs)
                if full:
                    heard = True
                    position, size, segment = position + full, size - full, 0
            for start, end in gro_segments(position, size, segment):
                fields = mc.data_fields(pool, start, end, session, image)
                if fields is None:
                    runs.flush()
                    message = self._session_message(pool[start:end])
                    if message is not None:
                        heard = True
                        self._on_message_safely(message, True, now)
                        window = self._window       # a START makes it
                    continue
                heard = True
                if window is not None:      # before START: NAKed once the layout is known
                    sequence, offset, repair = fields
                    runs.add(sequence, offset, repair, [pool[start + mc.DATA_PAYLOAD_AT:end]],
                             end - start - mc.DATA_PAYLOAD_AT)
        runs.flush()
        if window is not None and took.horizon >= 0:
            window.advance(took.horizon)
        if took.woken:
            self._cond.notify_all()
        return heard

    def _take_gro_run(self, pool: memoryview, position: int, count: int, segment: int,
                      runs: "_Runs") -> int:
        """The `count` full segments at pool[position:] as one run of this session's DATA
        (mc.data_run), added to runs; the bytes taken (0: they are not such a run)."""
        fields = mc.data_run(pool, position, count, segment, self.session_id, self.digest)
        if fields is None:
            return 0
        first, offset, repair = fields
        at = mc.DATA_PAYLOAD_AT
        span = count * segment
        runs.add(first, offset, repair,
                 [pool[p + at:p + segment] for p in range(position, position + span, segment)],
                 count * (segment - at))
        return span

    def _take_run(self, window: Window, run: list[memoryview], offset: int, first: int,
                  repair: int, took: "_Took") -> None:
        """DATA packets of the session, back to back in file and sequence (callers hold
        self._cond): counted as each would be, then into the window."""
        try:
            count = len(run)
            self._count_sequence((first + count - 1) & (U32 - 1), count)
            self.packets_received += count
            if repair:
                self.repair_packets += count
            else:
                # the last packet's pass position is the run's farthest: a run never goes
                # back in the pass (file order is send order within each region)
                last_offset = offset + sum(map(len, run)) - len(run[-1])
                took.horizon = max(took.horizon,
                                   window.order.position_after(last_offset, len(run[-1])))
            if window.put_run(offset, run):
                took.woken = True
            if not self._meta_ready and self._failure is None and window.meta_complete:
                self._meta_arrived(window)
                took.woken = True
        except Exception as exc:  # noqa: BLE001 - bad packets never kill the loop
            self.malformed_packets += len(run)
            self._log(f"img: multicast: dropped {len(run)} DATA: {exc}")

    def _on_message(self, message: mc.Message, group: bool, now: float) -> None:
        """One packet of the session (callers hold self._cond)."""
        if group and self._started:
            self._count_sequence(message.sequence)
        if type(message) is mc.Data:
            self._on_data(message)                  # type: ignore[arg-type]
        elif isinstance(message, mc.Probe):
            self._on_probe(message, now)
        elif isinstance(message, mc.Start):
            self._on_start(message)
        elif isinstance(message, mc.Finish):
            if self._window is not None:
                self._window.advance(self.size)
            if message.final and not (self._window is not None and self._window.complete):
                self._fall_back("the session closed before this receiver had every chunk")
        elif isinstance(message, mc.Abort):
            if message.receiver_id not in (0, self._joined.receiver_id):
                return
            text = f"the sender aborted ({message.reason.name.lower()}): {message.text}"
            if message.reason in (AbortReason.TOO_SLOW, AbortReason.LOST):
                self._fall_back(text)
            else:
                self._fail(text, LeaveReason.FAILED)

    def _on_start(self, start: mc.Start) -> None:
        if self._started:
            return
        if start.image_bytes != self.size:
            self._fail(f"START says {start.image_bytes} bytes, the JOIN_ACK {self.size}")
            return
        try:
            self._order = PassOrder(self.size, start.header_bytes, start.index_offset)
            self._window = Window(self._order, self._budget)
        except WindowError as exc:
            self._fall_back(str(exc))
            return
        self._started = True
        self._seq_base = start.sequence
        self._seq_max = start.sequence
        self._seq_cycles = 0
        self._group_packets = 1
        self._cond.notify_all()

    def _on_probe(self, probe: mc.Probe, now_s: float) -> None:
        self._grtt_s = probe.grtt_us / 1e6
        self._probe_s = probe.probe_interval_ms / 1000
        self._probe_echo = (probe.sent_at_us, now_s)
        if self._window is not None:
            self._window.advance(probe.pass_position)
        elif probe.pass_position:
            self._probes_unstarted += 1
            if self._probes_unstarted > START_REPEATS:
                self._fall_back("every START of the session was lost")
        if self._status_due_s is None:
            self._status_due_s = now_s + self._rng.uniform(
                0.0, status_delay_max_s(self._probe_s or probe_interval_s(self._grtt_s)))

    def _on_data(self, data: mc.Data) -> None:
        window = self._window
        if window is None:
            return                      # before START: NAKed once the layout is known
        self.packets_received += 1
        if data.repair:
            self.repair_packets += 1
        else:
            window.advance(window.order.position_after(data.offset, len(data.payload)))
        meta_before = self._meta_ready
        completed = window.put(data.offset, data.payload)
        if not meta_before and window.meta_complete:
            self._meta_arrived(window)
        if completed or self._meta_ready != meta_before:
            self._cond.notify_all()

    def _meta_arrived(self, window: Window) -> None:
        """The header, index and trailer are all here: check them before anything is
        written (the digest against every packet's and the expected one, the header's length,
        the trailer, the index's CRC), then place chunks by the index."""
        head, tail = window.head, window.tail
        got = mc.image_digest(head, tail)
        if got != self.digest:
            self._fail(f"the image received ({got.hex()}) is not the one the session names "
                       f"({self.digest.hex()}): forged or damaged packets")
            return
        if self._expected is not None and got != self._expected:
            self._fail(f"the session's image {got.hex()} is not the expected "
                       f"{self._expected.hex()}")
            return
        try:
            header = decode_header(head)
            if header.length != len(head):
                raise ImageFormatError("the header's length is not START's")
            trailer = decode_trailer(tail[-TRAILER.size:], self.size)
            if trailer.index_offset != window.order.index_offset:
                raise ImageFormatError("the index offset is not START's")
            index_bytes = tail[:-TRAILER.size]
            check_index_bytes(trailer, index_bytes)
            index = decode_index(index_bytes, header.chunk_size, trailer.index_offset)
        except ImageFormatError as exc:
            self._fail(f"the image received is not sound: {exc}")
            return
        self._chunk_size = header.chunk_size
        self._entries = {entry.position: entry for entry in index.entries}
        window.set_index(index.entries)
        if self._ranks is not None:
            window.set_ranks(self._ranks)
        self._meta_ready = True

    def _count_sequence(self, sequence: int, count: int = 1) -> None:
        """RFC 3550 appendix A.1's extended sequence number, and the packets seen since
        START, so lost = expected - received (section 6.4.1). count > 1: a run of packets
        numbered up to `sequence` one by one, which moves the highest number as its last
        packet alone would."""
        self._group_packets += count
        delta = (sequence - self._seq_max) % U32
        if delta and delta < U32 // 2:
            if sequence < self._seq_max:
                self._seq_cycles += U32
            self._seq_max = sequence

    def _packets_lost(self) -> int:
        if self._seq_base is None:
            return 0
        expected = self._seq_cycles + self._seq_max - self._seq_base + 1
        return max(0, expected - self._group_packets)


def _line(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean.encode("utf-8")[:mc.MAX_TEXT_BYTES].decode("utf-8", "ignore")


# -- the whole receive ---------------------------------------------------------------------------

def restore_order(reader: ImageReader) -> list[IndexEntry]:
    """The order img/restore.py reads the chunks in (_write_disk: partitions first, the disk
    head last when there is a partition table), for MulticastSource.plan."""
    head_last = bool(reader.metadata.get("disk", {}).get("layout", {}).get("partitions"))
    return sorted(reader.entries(), key=lambda e: (head_last and e.stream == 0, e.stream,
                                                   e.offset))


@dataclass(frozen=True)
class CopyResult:
    """copy_image's numbers, named as RestoreResult's."""

    bytes_written: int
    chunks: int


def copy_image(reader: ImageReader, source: "MulticastSource", output: str,
               progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """The image file itself, received, into `output`: header, every chunk (each checked as
    the source checks it), index and trailer, at their offsets (the bench's transfer)."""
    import os
    entries = sorted(reader.entries(), key=lambda e: e.position)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    written = 0
    try:
        head = source.pread(reader.header.length, 0)
        os.pwrite(fd, head, 0)
        position = reader.header.length
        for entry in entries:
            if entry.position > position:          # bytes no chunk holds (none in ours)
                os.pwrite(fd, source.pread(entry.position - position, position), position)
            data = source.pread(CHUNK_HEADER.size + entry.payload_length, entry.position)
            os.pwrite(fd, data, entry.position)
            written += len(data)
            position = entry.position + len(data)
            if progress:
                progress(written, reader.size)
        tail = source.pread(reader.size - position, position)
        os.pwrite(fd, tail, position)
    finally:
        os.close(fd)
    return CopyResult(reader.size, len(entries))


def receive_session(*, session: str, disk: str, control: tuple[str, int] | None = None,
                    server: str | None = None, image: str | None = None, access: Any = None,
                    mode: str = "auto", digest: bytes | None = None, token: str = "",
                    mac: str = "", group: str | None = None, data_port: int = mc.DATA_PORT,
                    unicast: Callable[[], Any] | None = None, interface: str | None = None,
                    grow: bool = False, threads: int = 2, sector_size: int | None = None,
                    shrink: bool = False, scratch: str | None = None,
                    window_bytes: int = DEFAULT_BUDGET_BYTES,
                    progress: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None,
                    backoff: JoinBackoff = JoinBackoff(),
                    output: str | None = None) -> ReceiveOutcome:
    """Restore `disk` from the multicast session `session`: JOIN it at `control` (the
    sender's control address, as a multicast work answer names it; None: find the session by
    its ANNOUNCE on `group`, default the name's group, at data_port), check the image (against
    `digest` when given), run the normal restore (img/restore.py) over the multicast stream,
    LEAVE.

    The unicast fallback reads the image `image` from the imaging server `server` (HOST:PORT,
    with `access`, an img.credentials.ServerAccess, and `mode`) through img.remote.RemoteImage;
    `unicast`, a factory of such a positional reader, replaces that; with neither, a fallback
    is a failure. token and mac go into the JOIN. progress(done, total): the restore's bytes
    written (as img.progress.Progress takes them); log(message): one line of what happens.

    output: write the image file itself there (every chunk checked) instead of restoring
    `disk`: a transfer as the bench compares with other multicast file senders.

    Never raises for what the network, the sender or the server did: the outcome says what
    happened and whether the disk was changed."""
    if unicast is None and server and image:
        unicast = _unicast_factory(server, image, token, mac, access, mode)
    session_name, expected_digest = session, digest
    from .errors import RestoreError
    from .restore import restore_image

    say = log or (lambda message: None)
    joined: Joined | None = None
    source: MulticastSource | None = None
    written = {"bytes": 0, "started": False}

    def failed(path: str, why: str, refusal: int | None = None) -> ReceiveOutcome:
        return ReceiveOutcome(False, path, why, source.digest.hex() if source else "", 0,
                              source.chunks_verified if source else 0, written["bytes"],
                              bool(written["started"]), refusal,
                              source.stats() if source else None)
    try:
        data_sock = None
        if control is None:
            local = interface or "0.0.0.0"
            announced, data_sock = discover_session(session_name, local, data_port,
                                                    backoff.give_up_s, group)
            sender = announced.sender
            session_id = announced.announce.session_id
            if local == "0.0.0.0":
                local = local_address_towards(*sender)
        else:
            sender, session_id = (control[0], int(control[1])), 0
            local = interface or local_address_towards(*sender)
        try:
            joined = join_session(sender, session_name, token, mac, expected_digest,
                                  session_id, local, backoff, data_sock, say)
        except BaseException:
            if data_sock is not None:
                data_sock.close()
            raise
    except Refused as exc:
        return failed("refused", str(exc), exc.code)
    except (MulticastFailure, OSError, mc.MulticastFormatError) as exc:
        return failed("failed", f"joining {session_name!r}: {exc}")
    say(f"img: joined multicast session {session_name!r} from {joined.sender[0]} "
        f"(group {joined.ack.group_address}:{joined.ack.data_port}, image "
        f"{joined.ack.image_bytes} bytes)")
    source = MulticastSource(joined, expected_digest, window_bytes, unicast, say)

    def track(done: int, total: int) -> None:
        written["bytes"] = done
        written["started"] = True
        source.bytes_written = done
        if progress:
            progress(done, total)
    try:
        try:
            reader = ImageReader(source, f"multicast:{session_name}")
            if output is not None:
                source.plan(reader.entries())
                result = copy_image(reader, source, output, track)
            else:
                source.plan(restore_order(reader))
                result = restore_image(reader, disk, grow=grow, threads=threads,
                                       progress=track, shrink=shrink, scratch=scratch,
                                       sector_size=sector_size)
        except RestoreError as exc:
            source.finish(False, f"refused by the disk: {exc}")
            return failed("failed", f"{exc}; the disk was not changed")
        except Exception as exc:  # noqa: BLE001 - whatever failed, the outcome says it
            why = source.failure or str(exc) or type(exc).__name__
            if source.failure is None and source.fallback_reason:
                why = f"{source.fallback_reason}; then over unicast: {why}"
            source.finish(False, why)
            changed = written["started"]
            return failed("failed", f"{why}; " + ("the disk was changed: it is incomplete and "
                                                  "has no valid partition table; restore again"
                                                  if changed else "the disk was not changed"))
    except BaseException:
        source.close()
        raise
    source.finish(True)
    for grown in getattr(result, "grew", ()):     # --grow: each filesystem grown, or why not
        say(grown.line())
    stats = source.stats()
    if stats.bytes_unicast and stats.bytes_multicast:
        path = "multicast+unicast"
    elif stats.bytes_unicast:
        path = "unicast"
    else:
        path = "multicast"
    return ReceiveOutcome(True, path, source.fallback_reason or "", source.digest.hex(),
                          result.chunks, source.chunks_verified, result.bytes_written, True,
                          None, stats)


# -- the command-line entry ------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m img.mcreceive",
        description="Restore a disk (or a disk image file) from a multicast session, or "
                    "receive the image file itself; prints the outcome as one JSON line (a "
                    "test and bench entry of img's receiver).")
    parser.add_argument("--server", help="the sender's address (without: join by name, "
                        "waiting for the session's ANNOUNCE on its group)")
    parser.add_argument("--session", required=True, help="the session's name")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--disk", help="the disk or disk image file to restore")
    target.add_argument("--output", help="write the image file itself here instead (the "
                        "bench's transfer; every chunk checked)")
    parser.add_argument("--control-port", type=int, default=mc.CONTROL_PORT)
    parser.add_argument("--data-port", type=int, default=mc.DATA_PORT)
    parser.add_argument("--group", help="without --server: the group the session is "
                        "announced on (default: the name's)")
    parser.add_argument("--interface", help="the local address to receive on (default: "
                        "the route towards the server)")
    parser.add_argument("--unicast-server", help="HOST[:PORT] of imgsrvd for the fallback")
    parser.add_argument("--image", help="the image's path on --unicast-server")
    parser.add_argument("--digest", help="the image digest expected (32 hex digits)")
    parser.add_argument("--token", default="")
    parser.add_argument("--mac", default="")
    parser.add_argument("--window-mib", type=int, default=DEFAULT_BUDGET_BYTES >> 20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sector-size", type=int)
    parser.add_argument("--grow", action="store_true")
    parser.add_argument("--join-timeout", type=float, default=30.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    expected = bytes.fromhex(args.digest) if args.digest else None
    if args.unicast_server and not args.image:
        parser.error("--unicast-server needs --image")

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)
    outcome = receive_session(
        session=args.session, disk=args.disk or "", output=args.output,
        control=(args.server, args.control_port) if args.server else None,
        server=args.unicast_server, image=args.image, digest=expected, token=args.token,
        mac=args.mac, group=args.group, data_port=args.data_port, interface=args.interface,
        grow=args.grow, threads=args.threads, sector_size=args.sector_size,
        window_bytes=args.window_mib << 20, log=say, mode="manual",
        backoff=JoinBackoff(give_up_s=args.join_timeout))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**dataclasses.asdict(outcome),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}), flush=True)
    return 0 if outcome.ok else 1


def _unicast_factory(server: str, path: str, token: str, mac: str, access: Any = None,
                     mode: str = "manual") -> Callable[[], Any]:
    """The fallback's image: //server/path over HTTP Range requests (img/remote.py)."""
    from .client import ImagingClient
    from .credentials import ServerAccess
    from .remote import RemoteImage

    def open_remote() -> Any:
        client = ImagingClient(server, mac, mode,
                               access=access if access is not None
                               else ServerAccess(token or None))
        return RemoteImage(client, path, log=lambda m: print(m, file=sys.stderr))
    return open_remote


if __name__ == "__main__":
    sys.exit(main())
