"""img/mcreceive.py's receive path: UDP_GRO buffers cut into datagrams (gro_segment_size,
gro_segments, receive_batch), and the batch of datagrams taken into the window (_take_group:
the DATA fast path and the general path for everything else), every datagram still checked,
bad ones counted and dropped."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from common.imaging import multicast as mc
from common.imaging.mctimers import RttEstimator
from img import mcreceive
from img.mcreceive import (RECV_BYTES, SOL_UDP, UDP_GRO, Joined, MulticastSource,
                           gro_segment_size, gro_segments, receive_batch)

SESSION, DIGEST = 0x1234, bytes(range(1, 17))
GRO_CMSG = (SOL_UDP, UDP_GRO, struct.pack("=i", 1400))


# -- cutting a buffer ------------------------------------------------------------------------

@pytest.mark.parametrize("start, size, segment, expected", [
    (0, 4200, 1400, [(0, 1400), (1400, 2800), (2800, 4200)]),
    (0, 3000, 1400, [(0, 1400), (1400, 2800), (2800, 3000)]),       # a short last segment
    (100, 1401, 1400, [(100, 1500), (1500, 1501)]),                 # a 1-byte last one
    (0, 1400, 0, [(0, 1400)]),                                      # no cmsg: one datagram
    (0, 900, 1400, [(0, 900)]),                                     # segment >= size
    (0, 1400, 1400, [(0, 1400)]),
    (0, 500, -1, [(0, 500)]),                                       # nonsense: one piece
    (7, 0, 1400, []),                                               # an empty datagram
])
def test_gro_segments(start, size, segment, expected):
    assert gro_segments(start, size, segment) == expected


def test_gro_segments_cover_the_buffer_exactly():
    rng = random.Random(14)
    for _ in range(2000):
        start, size, segment = rng.randrange(0, 9000), rng.randrange(0, 65536), \
            rng.randrange(-2, 2000)
        pieces = gro_segments(start, size, segment)
        assert sum(b - a for a, b in pieces) == size
        assert all(a < b for a, b in pieces)
        assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
        if pieces:
            assert pieces[0][0] == start and pieces[-1][1] == start + size
            width = segment if 0 < segment < size else size
            assert all(b - a == width for a, b in pieces[:-1])
            assert 0 < pieces[-1][1] - pieces[-1][0] <= width


def test_gro_segment_size_reads_the_cmsg_or_says_none():
    assert gro_segment_size([GRO_CMSG]) == 1400
    assert gro_segment_size([]) == 0
    assert gro_segment_size([(socket.SOL_SOCKET, 29, b"\0" * 16), GRO_CMSG]) == 1400
    assert gro_segment_size([(SOL_UDP, UDP_GRO, b"\x05")]) == 0        # too short: ignored
    assert gro_segment_size([(SOL_UDP, 103, struct.pack("=i", 1400))]) == 0   # not UDP_GRO


class FakeSocket:
    """recvmsg_into from a list of (bytes, ancdata, flags) or exceptions; then EAGAIN."""

    def __init__(self, items):
        self.items = list(items)
        self.calls = 0

    def recvmsg_into(self, buffers, ancbufsize):
        self.calls += 1
        assert ancbufsize >= socket.CMSG_SPACE(4)
        if not self.items:
            raise BlockingIOError
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        data, ancdata, flags = item
        room = buffers[0]
        assert len(room) == RECV_BYTES
        room[:len(data)] = data
        return len(data), ancdata, flags, ("10.0.0.1", 997)


def test_receive_batch_lays_buffers_side_by_side():
    run = b"a" * 1400 * 3 + b"b" * 600                        # a GRO buffer, short last one
    single = b"c" * 700                                        # a socket's plain datagram
    sock = FakeSocket([(run, [GRO_CMSG], 0), (single, [], 0),
                       ConnectionRefusedError(),              # an ICMP error: go on
                       (b"d" * 10, [], socket.MSG_TRUNC),     # cut by the kernel: dropped
                       (run, [GRO_CMSG], 0)])
    pool = memoryview(bytearray(1 << 20))
    buffers, truncated = receive_batch(sock, pool)
    assert truncated == 1
    n = len(run)
    assert buffers == [(0, n, 1400), (n, 700, 0), (n + 700, n, 1400)]
    assert bytes(pool[n:n + 700]) == single
    assert bytes(pool[4200:n]) == b"b" * 600


def test_receive_batch_stops_at_the_packet_limit_and_the_pool_room():
    sock = FakeSocket([(b"x" * 100, [], 0)] * 50)
    buffers, _ = receive_batch(sock, memoryview(bytearray(1 << 20)), max_packets=10)
    assert len(buffers) == 10 and len(sock.items) == 40
    big = b"y" * 1400 * 46
    sock = FakeSocket([(big, [GRO_CMSG], 0)] * 50)
    pool = memoryview(bytearray(2 * RECV_BYTES + 1000))
    buffers, _ = receive_batch(sock, pool)
    assert len(buffers) == 2                       # the third would not have 64 KiB of room
    sock = FakeSocket([(big, [GRO_CMSG], 0)] * 50)
    buffers, _ = receive_batch(sock, memoryview(bytearray(1 << 20)), max_packets=100)
    assert len(buffers) == 3                       # 46 datagrams a buffer: 138 >= 100


# -- taking a batch into the window ------------------------------------------------------------

H, I, SIZE = 100, 100 + 8 * 1000, 100 + 8 * 1000 + 200


@pytest.fixture
def source():
    """A MulticastSource of a joined session on loopback sockets (its thread runs; nothing
    arrives on them): _take_group is called directly, with a pool the test fills."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.bind(("127.0.0.1", 0))
    data = mcreceive._data_socket("239.77.9.9", 0, "127.0.0.1")
    ack = mc.JoinAck(session_id=SESSION, receiver_id=7, image_digest=DIGEST, echo_sent_at_us=0,
                     group_address="239.77.9.9", data_port=data.getsockname()[1],
                     image_bytes=SIZE,
                     state=mc.SessionState.WAITING, participants=1, start_clients=1,
                     start_in_s=None)
    joined = Joined(sender.getsockname(), ack, 7, "127.0.0.1", control, data, RttEstimator(),
                    "t")
    src = MulticastSource(joined)
    yield src
    src.close()
    sender.close()


def _pool(datagrams: list[bytes]) -> tuple[memoryview, list[tuple[int, int, int]]]:
    """Single datagrams, as a socket without GRO brings them."""
    pool = bytearray()
    buffers = []
    for d in datagrams:
        buffers.append((len(pool), len(d), 0))
        pool += d
    return memoryview(pool), buffers


def _start(sequence: int = 0) -> bytes:
    return mc.encode(mc.Start(session_id=SESSION, image_digest=DIGEST, sequence=sequence,
                              image_bytes=SIZE, header_bytes=H, index_offset=I,
                              participants=1, rate_kbit_s=0))


def _data(offset: int, payload: bytes, sequence: int, session: int = SESSION,
          repair: bool = False) -> bytes:
    return mc.encode(mc.Data(session_id=session, image_digest=DIGEST, sequence=sequence,
                             offset=offset, payload=payload, repair=repair))


def _take(src: MulticastSource, datagrams: list[bytes]) -> bool:
    pool, buffers = _pool(datagrams)
    with src._cond:
        return src._take_group(pool, buffers, 0.0)


def _take_gro(src: MulticastSource, pool: bytes, segment: int) -> bool:
    """One GRO buffer: datagrams of `segment` bytes back to back, the last maybe shorter."""
    with src._cond:
        return src._take_group(memoryview(pool), [(0, len(pool), segment)], 0.0)


def test_a_batch_in_arrival_order_start_then_data_then_garbage(source):
    run, count, segment = mc.encode_data_run(SESSION, DIGEST, 1, I, bytes(range(200)),
                                             segment_payload=64)
    datagrams = [_start(0)] + [bytes(run[n * segment:(n + 1) * segment])
                               for n in range(count)]
    forged = bytearray(_data(0, b"h" * 50, 9))
    forged[0] = ord("X")                                           # bad magic
    other = _data(0, b"h" * 50, 10, session=SESSION + 1)           # another session's
    cut = _data(0, b"h" * 50, 11)[:-1]                             # shorter than it says
    header = _data(0, b"h" * H, 12)
    assert _take(source, datagrams + [bytes(forged), other, cut, header])
    window = source._window
    assert window is not None and source._started
    assert window.tail == bytes(range(200))                        # the index and trailer
    assert window.head == b"h" * H
    assert source.packets_received == count + 1
    assert source.malformed_packets == 2 and source.foreign_packets == 1
    # the horizon is the farthest first-pass position of the batch (the tail's end: header
    # and tail come first in the pass), whatever order the packets came in
    assert window.horizon == window.order.position_after(I, 200) == H + 200
    assert source._packets_lost() == 12 + 1 - (1 + count + 1)      # 9, 10, 11 were dropped


def test_data_before_start_is_heard_but_not_kept_and_repairs_do_not_move_the_pass(source):
    assert _take(source, [_data(0, b"h" * 10, 5)])
    assert source._window is None and source.packets_received == 0
    assert _take(source, [_start(6), _data(H, b"c" * 100, 7, repair=True)])
    assert source.repair_packets == 1 and source._window.horizon == 0


def test_nothing_of_the_session_is_not_heard(source):
    other = _data(0, b"h" * 10, 1, session=SESSION + 1)
    assert not _take(source, [other, b"junk", b"PBMC" + bytes(60)])
    assert source.foreign_packets == 1 and source.malformed_packets == 2


def test_a_datagram_the_window_chokes_on_is_counted_not_fatal(source, monkeypatch):
    assert _take(source, [_start(0)])

    def boom(offset, payload):
        raise RuntimeError("bug")
    monkeypatch.setattr(source._window, "put", boom)
    assert _take(source, [_data(H, b"c" * 10, 1)])
    assert source.malformed_packets == 1 and source.failure is None


def test_the_data_socket_asks_for_gro_or_falls_back(monkeypatch):
    sock = mcreceive._data_socket("239.77.9.8", 0, "127.0.0.1")
    try:
        assert mcreceive._gro_on(sock)
    finally:
        sock.close()

    real = socket.socket.setsockopt

    def refuse(self, level, option, value, *rest):
        if (level, option) == (SOL_UDP, UDP_GRO):
            raise OSError(92, "Protocol not available")
        return real(self, level, option, value, *rest)
    monkeypatch.setattr(socket.socket, "setsockopt", refuse)
    sock = mcreceive._data_socket("239.77.9.8", 0, "127.0.0.1")
    try:
        assert not mcreceive._gro_on(sock)        # no GRO: single datagrams, same path
    finally:
        sock.close()


def _indexed(src: MulticastSource) -> None:
    """START, then the window's index (8 chunks of 1000 bytes after the header), as if the
    header and tail had come and been checked."""
    from common.imaging.imageformat import ChunkKind, IndexEntry
    assert _take(src, [_start(0)])
    with src._cond:
        src._window.set_index([IndexEntry(1, n * 4096, 4096, ChunkKind.ZSTD, H + n * 1000,
                                          1000 - 48, bytes(16)) for n in range(8)])
        src._meta_ready = True


def test_a_gro_buffer_of_a_run_is_taken_whole(source):
    _indexed(source)
    data = bytes(random.Random(3).randrange(256) for _ in range(3000))
    run, count, segment = mc.encode_data_run(SESSION, DIGEST, 1, H, data, segment_payload=347)
    assert count == 9 and len(run) % segment            # 8 full segments and a short one
    assert _take_gro(source, bytes(run), segment)
    window = source._window
    assert window.received.covers(H, H + 3000)
    assert bytes(window.slots[0].buffer) == data[:1000]
    assert bytes(window.slots[2].buffer) == data[2000:3000]
    assert source.packets_received == 9 and source._packets_lost() == 0
    assert window.horizon == window.order.position_after(H, 3000)
    assert source.malformed_packets == source.foreign_packets == 0


@pytest.mark.parametrize("damage", ["magic", "session", "sequence", "offset", "length"])
def test_a_bad_datagram_inside_a_gro_buffer_is_dropped_alone(source, damage):
    """One datagram of a GRO buffer damaged: the buffer goes one datagram at a time; that one
    is counted (malformed, or foreign) or, when its header is sound, taken for what it says;
    the others are taken."""
    _indexed(source)
    data = bytes(random.Random(4).randrange(256) for _ in range(8 * 347))
    run, count, segment = mc.encode_data_run(SESSION, DIGEST, 1, H, data, segment_payload=347)
    run = bytearray(run)
    at = 3 * segment                                     # the 4th datagram
    if damage == "magic":
        run[at] ^= 0xFF
    elif damage == "session":
        run[at + 15] ^= 0x01
    elif damage == "sequence":
        struct.pack_into(">I", run, at + 24, 1000)       # sound, but not the next number
    elif damage == "offset":
        struct.pack_into(">Q", run, at + 44, H + 5000)   # sound: data for another place
    elif damage == "length":
        struct.pack_into(">H", run, at + 6, 10)
    assert _take_gro(source, bytes(run), segment)
    window = source._window
    others = [n for n in range(8) if n != 3]
    assert all(window.received.covers(H + n * 347, H + (n + 1) * 347) for n in others)
    if damage in ("magic", "length"):
        assert source.malformed_packets == 1 and source.packets_received == 7
        assert not window.received.covers(H + 3 * 347, H + 4 * 347)
    elif damage == "session":
        assert source.foreign_packets == 1 and source.packets_received == 7
    else:
        assert source.malformed_packets == source.foreign_packets == 0
        assert source.packets_received == 8
    if damage == "offset":
        assert window.received.covers(H + 5000, H + 5347)
