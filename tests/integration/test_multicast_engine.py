"""imgsrvd.multicast.engine.MulticastEngine as the control plane drives it, in-process, inside
a network namespace of its own, a scripted receiver in another (the engine's thread and
sockets, and the receiver's sockets, are made while the test's thread is in the namespace;
multicast never touches the host's interfaces): open_session's
refusals, JOIN admission and its refusals (the control plane's admit(), a wrong image, an
unknown session, another version, garbage), the status, start_now, close and stop with their
events and ABORTs. A scripted receiver speaks the codec over plain UDP sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from common.imaging import multicast as mc
from imgsrvd.multicast.engine import MulticastEngine, SessionError
from imgsrvd.multicast.model import (Admission, EngineSettings, EventKind, JoinRequest,
                                     ReceiverState, SessionSpec, SessionState)
from tests.e2e.netlab import Lab, add_veth, unique_prefix
from tests.mcastrun import MiB, make_base_image

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip"),
]

SENDER = "10.79.0.1"
RECEIVER = "10.79.0.2"
GROUP = "239.192.14.1"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str):
    """This thread in the namespace (sockets and threads made meanwhile stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mc-engine") / "small.img"
    make_base_image(path, 8 * MiB, chunk_size=256 * 1024)
    return path


class Harness:
    def __init__(self, engine: MulticastEngine, ns: str, engine_ns: str, events: queue.Queue):
        self.engine = engine
        self.ns = ns                  # the scripted receiver's namespace
        self.engine_ns = engine_ns    # the engine's (open_session makes the group's socket)
        self.events = events
        self.requests: list[JoinRequest] = []

    def event(self, kind: EventKind, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if event.kind is kind:
                return event
        raise AssertionError(f"no {kind.value} event")

    def open(self, spec: SessionSpec) -> None:
        """open_session from a thread in the engine's namespace, as imgsrvd's loop is."""
        with in_netns(self.engine_ns):
            self.engine.open_session(spec)

    def socket(self) -> socket.socket:
        with in_netns(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((RECEIVER, 0))
        sock.settimeout(3.0)
        return sock

    def group_socket(self, group: str = GROUP) -> socket.socket:
        with in_netns(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)      # SO_RCVBUFFORCE: keep it all
        sock.bind((group, mc.DATA_PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(group),
                                    socket.inet_aton(RECEIVER)))
        sock.settimeout(3.0)
        return sock


@pytest.fixture
def harness(tmp_path):
    with Lab(tmp_path / "lab", prefix=unique_prefix("pme")) as lab:
        ns = lab.netns("snd")
        peer = lab.netns("rcv")
        add_veth(ns, "snd0", peer, "rcv0", cidr_a=f"{SENDER}/24", cidr_b=f"{RECEIVER}/24")
        events: queue.Queue = queue.Queue()
        settings = EngineSettings(
            control_address=SENDER, control_port=mc.CONTROL_PORT, interface_address=SENDER,
            ttl=1, max_bitrate_kbit_s=8_000, min_receiver_rate_kbit_s=0,
            max_receiver_loss=0.5, finish_timeout_s=5.0, max_sessions=2, max_receivers=2)
        holder: dict = {}

        def admit(request: JoinRequest) -> Admission:
            holder["harness"].requests.append(request)
            if request.token == "bad":
                return Admission(False, int(mc.Refusal.BAD_TOKEN), "the token expired 5 s ago")
            return Admission(True)

        with in_netns(ns.name):
            engine = MulticastEngine(settings, admit, events.put, loopback=True)
            engine.start()
        harness = Harness(engine, peer.name, ns.name, events)
        holder["harness"] = harness
        try:
            yield harness
        finally:
            engine.stop()


def spec(image: Path, name: str = "room-101", **kw) -> SessionSpec:
    values = dict(name=name, image_path=str(image), image="small.img", group=GROUP,
                  data_port=mc.DATA_PORT, start_clients=0, start_after_last_join_s=None)
    values.update(kw)
    return SessionSpec(**values)


def join(sock, name="room-101", receiver=7, digest=mc.NO_IMAGE, token="", sent_at=1234,
         session_id=0) -> mc.Message:
    sock.sendto(mc.encode(mc.Join(session_id=session_id, receiver_id=receiver,
                                  image_digest=digest, sent_at_us=sent_at, session_name=name,
                                  mac="00C04FDC2AB5", token=token)),
                (SENDER, mc.CONTROL_PORT))
    return mc.decode(sock.recv(2048))


def group_message(sock, kind, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = mc.decode(sock.recv(2048))
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.__name__}")


def test_open_session_refusals(harness, image, tmp_path):
    engine = harness.engine
    harness.open(spec(image))
    with pytest.raises(SessionError, match="exists already"):
        harness.open(spec(image))
    broken = tmp_path / "broken.img"
    broken.write_bytes(b"\x89PBIM\r\n\x1a" + bytes(100))
    with pytest.raises(SessionError, match="cannot be sent"):
        harness.open(spec(broken, name="other"))
    with pytest.raises(SessionError, match="No such file"):
        harness.open(spec(tmp_path / "missing.img", name="other"))
    with pytest.raises(SessionError, match="224.0.0.0/24"):
        harness.open(spec(image, name="other", group="224.0.0.9"))
    harness.open(spec(image, name="second", group="239.192.14.2"))
    with pytest.raises(SessionError, match="2 sessions run already"):
        harness.open(spec(image, name="third", group="239.192.14.3"))
    with pytest.raises(SessionError, match="no session"):
        engine.start_now("nobody")
    engine.close("second", "deleted from the directory")
    event = harness.event(EventKind.SESSION_ABORTED)
    assert event.session == "second" and event.status.state is SessionState.ABORTED
    time.sleep(0.3)
    assert [s.name for s in engine.status() if s.state is SessionState.WAITING] == ["room-101"]


def test_joins_are_admitted_refused_and_idempotent(harness, image):
    engine = harness.engine
    harness.open(spec(image))
    sock = harness.socket()
    ack = join(sock, sent_at=99)
    assert isinstance(ack, mc.JoinAck), ack
    assert (ack.echo_sent_at_us, ack.group_address, ack.image_bytes, ack.receiver_id,
            ack.state) == (99, GROUP, os.path.getsize(image), 7, mc.SessionState.WAITING)
    assert harness.requests[0].mac == "00C04FDC2AB5"
    assert harness.requests[0].address == sock.getsockname()
    again = join(sock, sent_at=100)                           # the same receiver: the same
    assert isinstance(again, mc.JoinAck) and again.session_id == ack.session_id
    assert len(harness.requests) == 1                         # ... without asking again
    refused = join(sock, receiver=8, token="bad")
    assert isinstance(refused, mc.JoinRefused)
    assert (refused.reason, refused.text) == (mc.Refusal.BAD_TOKEN, "the token expired 5 s ago")
    wrong = join(sock, receiver=9, digest=bytes(15) + b"\x01")
    assert isinstance(wrong, mc.JoinRefused) and wrong.reason is mc.Refusal.WRONG_IMAGE
    unknown = join(sock, name="nobody", receiver=10)
    assert isinstance(unknown, mc.JoinRefused) and unknown.reason is mc.Refusal.UNKNOWN_SESSION
    # another version: a version-1 JOIN_REFUSED read from the header alone
    packet = bytearray(mc.encode(mc.Join(session_id=0, receiver_id=11, sent_at_us=1,
                                         session_name="room-101")))
    packet[4] = 2
    sock.sendto(bytes(packet), (SENDER, mc.CONTROL_PORT))
    version = mc.decode(sock.recv(2048))
    assert isinstance(version, mc.JoinRefused) and version.reason is mc.Refusal.VERSION
    sock.sendto(b"garbage", (SENDER, mc.CONTROL_PORT))        # counted, never fatal
    assert isinstance(join(sock, receiver=12), mc.JoinAck)
    full = join(sock, receiver=13)                             # max_receivers 2
    assert isinstance(full, mc.JoinRefused) and full.reason is mc.Refusal.FULL
    assert engine.counters["malformed"] >= 1
    time.sleep(0.4)
    [status] = [s for s in engine.status() if s.name == "room-101"]
    assert {p.receiver_id for p in status.participants} == {7, 12}
    assert all(p.state is ReceiverState.WAITING for p in status.participants)


def test_start_now_starts_and_stop_aborts_with_shutdown(harness, image):
    engine = harness.engine
    harness.open(spec(image, start_clients=5))
    group = harness.group_socket()
    announce = group_message(group, mc.Announce)
    assert (announce.session_name, announce.start_clients, announce.state) == (
        "room-101", 5, mc.SessionState.WAITING)
    sock = harness.socket()
    assert isinstance(join(sock, session_id=announce.session_id), mc.JoinAck)
    probe = group_message(group, mc.Probe)
    assert probe.participants == 1 and probe.probe_interval_ms >= 250
    engine.start_now("room-101")
    start = group_message(group, mc.Start)
    assert start.image_bytes == os.path.getsize(image) and start.participants == 1
    assert harness.event(EventKind.SESSION_STARTED).reason.startswith("started by an operator")
    late = join(sock, receiver=99)
    assert isinstance(late, mc.JoinRefused) and late.reason is mc.Refusal.STARTED
    assert "imaging began" in late.text
    data = group_message(group, mc.Data)
    assert data.offset == 0 and not data.repair                # the header comes first
    sock.sendto(mc.encode(mc.Status(                           # still here
        session_id=start.session_id, receiver_id=7, image_digest=start.image_digest,
        echo_sent_at_us=0, echo_delay_us=0, state=mc.ReceiverState.RECEIVING,
        first_missing=0, bytes_received=data.offset + len(data.payload), chunks_verified=0,
        bytes_written=0, packets_received=1, packets_lost=0)), (SENDER, mc.CONTROL_PORT))
    with pytest.raises(SessionError, match="not waiting"):
        engine.start_now("room-101")
    engine.stop()
    abort = group_message(group, mc.Abort)
    assert abort.reason is mc.AbortReason.SHUTDOWN and abort.receiver_id == 0
    event = harness.event(EventKind.SESSION_ABORTED)
    assert event.reason == "the imaging server is stopping"
    assert event.status.state is SessionState.ABORTED
    with pytest.raises(SessionError, match="not running"):
        harness.open(spec(image, name="after"))


def test_a_silent_receiver_is_lost(harness, image):
    harness.open(spec(image))
    sock = harness.socket()
    assert isinstance(join(sock), mc.JoinAck)
    # it never answers a PROBE: lost after max(2 s, 3 P + RTO), and told so
    event = harness.event(EventKind.RECEIVER_LOST, timeout_s=6.0)
    assert event.receiver.receiver_id == 7 and event.reason.startswith("silent for")
    abort = mc.decode(sock.recv(2048))
    assert isinstance(abort, mc.Abort) and abort.reason is mc.AbortReason.LOST
    assert abort.receiver_id == 7
