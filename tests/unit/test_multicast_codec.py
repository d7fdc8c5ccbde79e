"""common.imaging.multicast: every message round-trips, the bytes match the tables of
docs/multicast-protocol.md, a table of malformed packets each refused with its reason, fuzzing
(decode raises nothing but MulticastFormatError), and the group address's worked example."""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.imaging import multicast as mc
from common.imaging.imagefile import ImageWriter
from common.imaging.imageformat import TRAILER, decode_trailer
from common.imaging.multicast import (Abort, AbortReason, Announce, ByteRange, Data, Finish,
                                      Join, JoinAck, JoinRefused, Leave, LeaveReason,
                                      MessageType, MulticastFormatError, Nak, Probe,
                                      ReceiverState, Refusal, SessionState, Start, Status, decode,
                                      encode)

DIGEST = bytes(range(1, 17))
SESSION = 0x0123456789ABCDEF
RECEIVER = 0xFEDCBA9876543210
TOKEN = "pbcap1.k1.eyJzIjoiMDBDMDRGREMyQUI1In0.c2lnbmF0dXJl"
COMMON = {"session_id": SESSION, "sequence": 7, "image_digest": DIGEST}
TO_SENDER = {**COMMON, "receiver_id": RECEIVER}

SAMPLES = [
    Join(session_id=0, receiver_id=RECEIVER, sent_at_us=1_000_001, session_name="room-101",
         mac="00C04FDC2AB5", token=TOKEN),
    Join(**TO_SENDER, sent_at_us=2**64 - 1, session_name="Ünterricht 3 ☃",
         mac="", token=""),
    Join(session_id=0, receiver_id=1, sent_at_us=0, session_name="n" * 255,
         token="t" * mc.MAX_TOKEN_BYTES),
    Status(**TO_SENDER, echo_sent_at_us=123_456, echo_delay_us=800,
           state=ReceiverState.RECEIVING, first_missing=4096, bytes_received=1 << 33,
           chunks_verified=12, bytes_written=50 << 20, packets_received=2**32 - 1,
           packets_lost=3),
    Nak(**TO_SENDER, ranges=(ByteRange(0, 1347), ByteRange(1347 * 5, 2**32 - 1))),
    Nak(**TO_SENDER, ranges=tuple(ByteRange(n * 4096, 1347) for n in range(64))),
    Nak(**TO_SENDER, ranges=(ByteRange(2**64 - 1, 1),)),
    Leave(**TO_SENDER, reason=LeaveReason.FALLBACK, text="loss 12 % over 10 s: unicast"),
    Leave(**TO_SENDER, reason=LeaveReason.DONE),
    Announce(**COMMON, state=SessionState.WAITING, control_port=997, participants=3,
             start_clients=5, start_in_s=840, image_bytes=21_474_836_480,
             session_name="room-101"),
    Announce(**COMMON, state=SessionState.SENDING, control_port=65535, participants=0,
             start_clients=0, start_in_s=None, image_bytes=0, session_name="x"),
    Start(**COMMON, image_bytes=1 << 31, header_bytes=1200, index_offset=(1 << 31) - 70_000,
          participants=5, rate_kbit_s=500_000),
    Start(**COMMON, image_bytes=64, header_bytes=32, index_offset=32, participants=0,
          rate_kbit_s=0),
    Data(**COMMON, offset=0, payload=b"\x89PBIM\r\n\x1a"),
    Data(**COMMON, offset=2**64 - mc.MAX_DATA_BYTES, payload=bytes(mc.MAX_DATA_BYTES),
         repair=True),
    Probe(**COMMON, sent_at_us=99, grtt_us=1500, probe_interval_ms=250, rate_kbit_s=0,
          pass_position=1 << 40, participants=65535),
    Finish(**COMMON, image_bytes=1 << 31),
    Finish(**COMMON, image_bytes=1 << 31, final=True),
    Abort(**COMMON, reason=AbortReason.OPERATOR, text="stopped by zmgmcast"),
    Abort(**TO_SENDER, reason=AbortReason.TOO_SLOW, text="é" * 127),
    JoinAck(**TO_SENDER, echo_sent_at_us=1_000_001, group_address="231.40.81.200",
            data_port=997, image_bytes=1 << 31, state=SessionState.WAITING, participants=2,
            start_clients=5, start_in_s=900),
    JoinAck(**TO_SENDER, echo_sent_at_us=0, group_address="239.192.0.7", data_port=1,
            image_bytes=0, state=SessionState.WAITING, participants=1, start_clients=0,
            start_in_s=None),
    JoinRefused(session_id=0, image_digest=mc.NO_IMAGE, receiver_id=RECEIVER,
                echo_sent_at_us=5, reason=Refusal.UNKNOWN_SESSION,
                text="no session 'room-101' on this server"),
    JoinRefused(**TO_SENDER, echo_sent_at_us=5, reason=Refusal.STARTED,
                text="imaging began 40 s ago: wait for the next session"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    data = encode(message)
    assert len(data) <= mc.MAX_DATAGRAM
    assert decode(data) == message
    assert encode(decode(data)) == data


def test_the_samples_cover_every_type():
    assert {m.TYPE for m in SAMPLES} == set(MessageType)


def test_the_largest_packet_of_each_type_fits_a_datagram():
    assert len(encode(SAMPLES[2])) == 44 + 17 + 255 + 1024        # the longest JOIN
    assert len(encode(SAMPLES[5])) == 44 + 2 + 64 * 12             # the longest NAK
    assert len(encode(SAMPLES[14])) == mc.MAX_DATAGRAM == 1400      # the longest DATA
    assert mc.MAX_DATA_BYTES == 1347


def test_direction_is_the_type_bytes_high_bit():
    assert {t for t in MessageType if not t.from_sender} == {
        MessageType.JOIN, MessageType.STATUS, MessageType.NAK, MessageType.LEAVE}


u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(min_size=1, max_size=80).filter(lambda n: not mc.session_name_refusal(n))
texts = st.text(max_size=80).filter(lambda t: len(t.encode("utf-8", "replace")) <= 255
                                    and not mc._CONTROL.search(t)
                                    and not any(0xD800 <= ord(c) <= 0xDFFF for c in t))
digests = st.binary(min_size=16, max_size=16).filter(any)
ids = st.integers(1, 2**64 - 1)
group = {"session_id": ids, "sequence": u32, "image_digest": digests}
one = {**group, "receiver_id": ids}
timers = st.none() | st.integers(0, mc.NO_TIMER - 1)


@st.composite
def nak_ranges(draw):
    starts = sorted(draw(st.sets(st.integers(0, 2**40), min_size=1, max_size=64)))
    ranges = []
    for n, start in enumerate(starts):
        room = (starts[n + 1] - start) if n + 1 < len(starts) else 2**32 - 1
        ranges.append(ByteRange(start, draw(st.integers(1, min(room, 2**32 - 1)))))
    return tuple(ranges)


@st.composite
def layouts(draw):
    size = draw(st.integers(64, 2**50))
    header = draw(st.integers(32, min(32 + (1 << 20), size - 32)))
    return size, header, draw(st.integers(header, size - 32))


MESSAGES = st.one_of(
    st.builds(Join, session_id=st.just(0) | ids, receiver_id=ids, sequence=u32,
              image_digest=st.just(mc.NO_IMAGE) | digests, sent_at_us=u64, session_name=names,
              mac=st.just("") | st.binary(min_size=6, max_size=6).filter(any).map(
                  lambda b: b.hex().upper()),
              token=st.from_regex(r"[A-Za-z0-9._-]{0,1024}", fullmatch=True)),
    st.builds(Status, **one, echo_sent_at_us=u64, echo_delay_us=u32,
              state=st.sampled_from(ReceiverState), first_missing=u64, bytes_received=u64,
              chunks_verified=u32, bytes_written=u64, packets_received=u32, packets_lost=u32),
    st.builds(Nak, **one, ranges=nak_ranges()),
    st.builds(Leave, **one, reason=st.sampled_from(LeaveReason), text=texts),
    st.builds(Announce, **group, state=st.sampled_from(SessionState),
              control_port=st.integers(1, 65535), participants=u16, start_clients=u16,
              start_in_s=timers, image_bytes=u64, session_name=names),
    layouts().flatmap(lambda layout: st.builds(
        Start, **group, image_bytes=st.just(layout[0]), header_bytes=st.just(layout[1]),
        index_offset=st.just(layout[2]), participants=u16, rate_kbit_s=u32)),
    st.builds(Data, **group, offset=st.integers(0, 2**64 - 1 - mc.MAX_DATA_BYTES),
              payload=st.binary(min_size=1, max_size=mc.MAX_DATA_BYTES), repair=st.booleans()),
    st.builds(Probe, **group, sent_at_us=u64, grtt_us=u32,
              probe_interval_ms=st.integers(1, 65535), rate_kbit_s=u32, pass_position=u64,
              participants=u16),
    st.builds(Finish, **group, image_bytes=u64, final=st.booleans()),
    st.builds(Abort, **group, receiver_id=st.just(0) | ids,
              reason=st.sampled_from(AbortReason), text=texts),
    st.builds(JoinAck, **one, echo_sent_at_us=u64,
              group_address=st.integers(0xE0000000, 0xEFFFFFFF).map(
                  lambda n: ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))),
              data_port=st.integers(1, 65535), image_bytes=u64,
              state=st.sampled_from(SessionState), participants=u16, start_clients=u16,
              start_in_s=timers),
    st.builds(JoinRefused, session_id=st.just(0) | ids, receiver_id=ids, sequence=u32,
              image_digest=st.just(mc.NO_IMAGE) | digests, echo_sent_at_us=u64,
              reason=st.sampled_from(Refusal), text=texts),
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES)
def test_any_valid_message_round_trips(message):
    data = encode(message)
    assert len(data) <= mc.MAX_DATAGRAM
    assert decode(data) == message


# -- the bytes, as the doc's tables draw them ---------------------------------------------------

def test_data_bytes_match_the_header_and_data_tables():
    data = encode(Data(session_id=SESSION, sequence=7, image_digest=DIGEST, offset=0x1122,
                       payload=b"abc", repair=True))
    assert data == (b"PBMC" + b"\x01" + b"\x85" + b"\x00\x0c"           # magic version type len
                    + bytes.fromhex("0123456789abcdef") + bytes(8)      # session, receiver
                    + b"\x00\x00\x00\x07" + DIGEST                      # sequence, digest
                    + bytes.fromhex("0000000000001122") + b"\x01" + b"abc")


def test_join_bytes_match_the_join_table():
    data = encode(Join(session_id=0, receiver_id=2, sequence=1, sent_at_us=3,
                       session_name="ab", mac="00C04FDC2AB5", token="t.1"))
    assert data[5] == 0x01 and struct.unpack(">H", data[6:8])[0] == 17 + 2 + 3
    assert data[44:] == (bytes.fromhex("0000000000000003") + bytes.fromhex("00c04fdc2ab5")
                         + b"\x02" + b"\x00\x03" + b"ab" + b"t.1")


def test_nak_and_status_bytes_match_their_tables():
    nak = encode(Nak(**TO_SENDER, ranges=(ByteRange(5, 6), ByteRange(100, 1))))
    assert nak[44:] == (b"\x00\x02" + struct.pack(">QI", 5, 6) + struct.pack(">QI", 100, 1))
    status = encode(SAMPLES[3])
    assert len(status) - 44 == 49
    assert status[44:] == struct.pack(">QIBQQIQII", 123_456, 800, 2, 4096, 1 << 33, 12,
                                      50 << 20, 2**32 - 1, 3)


def test_join_ack_bytes_match_the_table():
    ack = encode(SAMPLES[20])
    assert ack[44:] == (struct.pack(">Q", 1_000_001) + bytes([231, 40, 81, 200])
                        + struct.pack(">HQBHHI", 997, 1 << 31, 1, 2, 5, 900))
    no_timer = encode(SAMPLES[21])
    assert no_timer[-4:] == b"\xff\xff\xff\xff"


def test_the_header_reads_the_same_in_any_version():
    data = bytearray(encode(SAMPLES[0]))
    data[4] = 2
    header = mc.decode_header(bytes(data))
    assert (header.version, header.type, header.receiver_id) == (2, 0x01, RECEIVER)
    with pytest.raises(MulticastFormatError, match="version 2 is not supported"):
        decode(bytes(data))


# -- malformed packets ------------------------------------------------------------------------

def packet(kind: int, body: bytes = b"", *, magic: bytes = b"PBMC", version: int = 1,
           length: int | None = None, session: int = SESSION, receiver: int = 0,
           digest: bytes = DIGEST) -> bytes:
    return struct.pack(">4sBBHQQI16s", magic, version, kind,
                       len(body) if length is None else length, session, receiver, 9,
                       digest) + body


def join_body(name: bytes = b"room-101", token: bytes = b"", name_length: int | None = None,
              token_length: int | None = None) -> bytes:
    return (struct.pack(">Q6sBH", 1, bytes(6), len(name) if name_length is None else name_length,
                        len(token) if token_length is None else token_length) + name + token)


def status_body(state: int = 2) -> bytes:
    return struct.pack(">QIBQQIQII", 0, 0, state, 0, 0, 0, 0, 0, 0)


def nak_body(*ranges: tuple[int, int], count: int | None = None) -> bytes:
    return (struct.pack(">H", len(ranges) if count is None else count)
            + b"".join(struct.pack(">QI", o, n) for o, n in ranges))


def reason_body(text: bytes, length: int | None = None, code: int = 1) -> bytes:
    return bytes([code, len(text) if length is None else length]) + text


def ack_body(group: bytes = bytes([231, 1, 2, 3]), port: int = 997) -> bytes:
    return struct.pack(">Q4sHQBHHI", 0, group, port, 100, 1, 1, 0, mc.NO_TIMER)


DATA, JOIN, STATUS, NAK, LEAVE = 0x85, 0x01, 0x02, 0x03, 0x04
R = {"receiver": RECEIVER}

MALFORMED = [
    ("empty", b"", "shorter than the 44-byte header"),
    ("one byte short of a header", packet(0x86)[:43], "shorter than the 44-byte header"),
    ("bad magic", packet(DATA, b"\0" * 10, magic=b"PBMX"), "bad magic"),
    ("image file bytes", b"\x89PBIM\r\n\x1a" + bytes(60), "bad magic"),
    ("unknown version", packet(DATA, b"\0" * 10, version=2), "version 2 is not supported"),
    ("version 0", packet(DATA, b"\0" * 10, version=0), "version 0 is not supported"),
    ("unknown type", packet(0x7F), "unknown type 0x7f"),
    ("longer than a datagram", packet(DATA, bytes(8) + b"\0" + bytes(1348)),
     "1401 bytes, more than the 1400"),
    ("body cut short", packet(DATA, bytes(20), length=21), "cut short"),
    ("trailing bytes", packet(DATA, bytes(20), length=19), "1 trailing bytes"),
    ("data without payload", packet(DATA, bytes(9)), "no payload"),
    ("data without offset", packet(DATA, bytes(4)), "no payload"),
    ("data to one receiver", packet(DATA, bytes(10), receiver=5), "goes to the whole group"),
    ("data of session 0", packet(DATA, bytes(10), session=0), "session id 0"),
    ("data of no image", packet(DATA, bytes(10), digest=bytes(16)), "names no image"),
    ("data past 2**64", packet(DATA, b"\xff" * 8 + b"\0" + b"xy"), "ends past 2**64"),
    ("status one byte long", packet(STATUS, status_body() + b"\0", **R), "not its 49"),
    ("status one byte short", packet(STATUS, status_body()[:-1], **R),
     "shorter than its 49 fixed bytes"),
    ("status unknown state", packet(STATUS, status_body(state=9), **R), "unknown state 9"),
    ("status from nobody", packet(STATUS, status_body()), "receiver id 0"),
    ("join lengths disagree", packet(JOIN, join_body(name_length=9), **R), "disagree"),
    ("join token lengths disagree", packet(JOIN, join_body(token=b"ab", token_length=3), **R),
     "disagree"),
    ("join token too long", packet(JOIN, join_body(token=b"t" * 1025), **R),
     "token of 1025 bytes, more than 1024"),
    ("join token not a capability word", packet(JOIN, join_body(token=b"a b"), **R),
     "characters a capability token has not"),
    ("join token not ASCII", packet(JOIN, join_body(token=b"\xc3\xa9"), **R), "not ASCII"),
    ("join empty name", packet(JOIN, join_body(name=b""), **R), "empty session name"),
    ("join name with a newline", packet(JOIN, join_body(name=b"a\nb"), **R),
     "control characters"),
    ("join name not UTF-8", packet(JOIN, join_body(name=b"\xff\xfe"), **R), "not UTF-8"),
    ("join fixed part short", packet(JOIN, bytes(16), **R), "shorter than its 17"),
    ("join from nobody", packet(JOIN, join_body()), "receiver id 0"),
    ("nak without count", packet(NAK, b"", **R), "no range count"),
    ("nak of no ranges", packet(NAK, nak_body(), **R), "no ranges"),
    ("nak of 65 ranges", packet(NAK, nak_body(*[(n * 10, 1) for n in range(65)]), **R),
     "65 ranges, more than 64"),
    ("nak count says more", packet(NAK, nak_body((0, 1), count=2), **R), "need a 26-byte"),
    ("nak count says fewer", packet(NAK, nak_body((0, 1), (5, 1), count=1), **R),
     "need a 14-byte"),
    ("nak ranges overlap", packet(NAK, nak_body((0, 10), (9, 1)), **R), "overlaps"),
    ("nak ranges out of order", packet(NAK, nak_body((100, 1), (0, 1)), **R), "overlaps"),
    ("nak empty range", packet(NAK, nak_body((0, 0)), **R), "range 0 is empty"),
    ("nak past 2**64", packet(NAK, nak_body((2**64 - 1, 2)), **R), "ends past 2**64"),
    ("leave text not UTF-8", packet(LEAVE, reason_body(b"\xe9t\xe9"), **R), "not UTF-8"),
    ("leave text of two lines", packet(LEAVE, reason_body(b"a\r\nb"), **R),
     "control characters"),
    ("leave text length disagrees", packet(LEAVE, reason_body(b"abc", length=4), **R),
     "disagrees"),
    ("leave without reason", packet(LEAVE, b"\x01", **R), "shorter than its 2 fixed bytes"),
    ("abort text length disagrees", packet(0x88, reason_body(b"abc", length=2)), "disagrees"),
    ("refusal cut short", packet(0x83, bytes(9), **R), "shorter than its 10 fixed bytes"),
    ("refusal text length disagrees", packet(0x83, bytes(8) + reason_body(b"x", length=0),
                                             **R), "disagrees"),
    ("join ack group not multicast", packet(0x82, ack_body(group=bytes([10, 0, 0, 1])), **R),
     "10.0.0.1 is not multicast"),
    ("join ack port 0", packet(0x82, ack_body(port=0), **R), "data_port 0"),
    ("join ack to nobody", packet(0x82, ack_body()), "receiver id 0"),
    ("announce name length disagrees", packet(0x81, struct.pack(">BHHHIQB", 1, 997, 0, 0, 0,
                                                                0, 5) + b"abc"), "disagrees"),
    ("announce unknown state", packet(0x81, struct.pack(">BHHHIQB", 7, 997, 0, 0, 0, 0, 1)
                                      + b"a"), "unknown state 7"),
    ("announce control port 0", packet(0x81, struct.pack(">BHHHIQB", 1, 0, 0, 0, 0, 0, 1)
                                       + b"a"), "control_port 0"),
    ("start header too short", packet(0x84, struct.pack(">QIQHI", 100, 31, 40, 0, 0)),
     "not an image header's"),
    ("start index past the trailer", packet(0x84, struct.pack(">QIQHI", 100, 32, 69, 0, 0)),
     "index offset 69"),
    ("start index before the header", packet(0x84, struct.pack(">QIQHI", 100, 40, 39, 0, 0)),
     "index offset 39"),
    ("start smaller than a trailer", packet(0x84, struct.pack(">QIQHI", 10, 32, 32, 0, 0)),
     "index offset"),
    ("probe interval 0", packet(0x86, struct.pack(">QIHIQH", 0, 0, 0, 0, 0, 0)),
     "probe interval 0"),
    ("finish body short", packet(0x87, bytes(8)), "shorter than its 9 fixed bytes"),
]


@pytest.mark.parametrize("data, reason", [(d, r) for _, d, r in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_packets_are_refused_with_their_reason(data, reason):
    with pytest.raises(MulticastFormatError) as caught:
        decode(data)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.unknown_type == (reason.startswith("unknown type"))


def test_an_unknown_reason_code_reads_as_other_and_keeps_its_text():
    refused = decode(packet(0x83, struct.pack(">Q", 5) + reason_body(b"new", code=200),
                            receiver=RECEIVER))
    assert refused.reason is Refusal.OTHER and refused.text == "new"
    assert decode(packet(0x88, reason_body(b"", code=77))).reason is AbortReason.OTHER
    assert decode(packet(LEAVE, reason_body(b"", code=9), **R)).reason is LeaveReason.OTHER


@pytest.mark.parametrize("build, reason", [
    (lambda: Data(**COMMON, offset=0, payload=bytes(1348)), "payload is not 1 to 1347"),
    (lambda: Data(**COMMON, offset=-1, payload=b"x"), "offset -1 is outside"),
    (lambda: Data(**COMMON, offset=0, payload=b""), "payload is not 1 to 1347"),
    (lambda: Data(**COMMON, offset=True, payload=b"x"), "offset is not a whole number"),
    (lambda: Data(session_id=1, sequence=2**32, image_digest=DIGEST, offset=0, payload=b"x"),
     "sequence 4294967296 is outside"),
    (lambda: Data(session_id=1, image_digest=b"short", offset=0, payload=b"x"),
     "digest is not 16 bytes"),
    (lambda: Join(session_id=0, receiver_id=1, sent_at_us=0, session_name="a",
                  token="x" * 1025), "token longer than 1024"),
    (lambda: Join(session_id=0, receiver_id=1, sent_at_us=0, session_name="a",
                  mac="00:c0:4f:dc:2a:b5"), "not 12 upper-case hex digits"),
    (lambda: Join(session_id=0, receiver_id=1, sent_at_us=0, session_name="a",
                  mac="000000000000"), "how the wire says none"),
    (lambda: Join(session_id=0, receiver_id=1, sent_at_us=0, session_name="é" * 128),
     "256 bytes, more than 255"),
    (lambda: Nak(**TO_SENDER, ranges=(ByteRange(10, 1), ByteRange(0, 1))), "overlaps"),
    (lambda: Nak(**TO_SENDER, ranges=[ByteRange(0, 1)]), "a tuple of at least one"),
    (lambda: Nak(**TO_SENDER, ranges=(ByteRange(0, 2**32),)), "length 4294967296"),
    (lambda: Leave(**TO_SENDER, reason=LeaveReason.DONE, text="x" * 256), "256 bytes"),
    (lambda: Abort(**COMMON, reason=99), "unknown reason 99"),
    (lambda: Probe(**COMMON, receiver_id=3, sent_at_us=0, grtt_us=0, probe_interval_ms=1,
                   rate_kbit_s=0, pass_position=0, participants=0), "goes to the whole group"),
    (lambda: JoinAck(**TO_SENDER, echo_sent_at_us=0, group_address="231.1.2.300",
                     data_port=997, image_bytes=0, state=SessionState.WAITING,
                     participants=0, start_clients=0, start_in_s=None), "not an IPv4"),
    (lambda: Announce(**COMMON, state=SessionState.WAITING, control_port=997,
                      participants=0, start_clients=0, start_in_s=mc.NO_TIMER,
                      image_bytes=0, session_name="a"), "start_in_s 4294967295 is outside"),
])
def test_a_message_out_of_bounds_cannot_be_built(build, reason):
    with pytest.raises(MulticastFormatError, match=reason):
        build()


def test_enum_fields_take_plain_numbers():
    status = Status(**TO_SENDER, echo_sent_at_us=0, echo_delay_us=0, state=3, first_missing=0,
                    bytes_received=0, chunks_verified=0, bytes_written=0, packets_received=0,
                    packets_lost=0)
    assert status.state is ReceiverState.DONE


# -- fuzzing ------------------------------------------------------------------------------------

def _decodes_or_refuses(data: bytes) -> None:
    try:
        message = decode(data)
    except MulticastFormatError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert decode(encode(message)) == message        # what it accepts, it can write back


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise_anything_else(data):
    _decodes_or_refuses(data)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([int(t) for t in MessageType] + [0, 0x05, 0x80, 0x89, 0xFF]),
       session=st.sampled_from([0, 1, SESSION]), receiver=st.sampled_from([0, RECEIVER]),
       digest=st.sampled_from([bytes(16), DIGEST]), body=st.binary(max_size=1400),
       fix_length=st.booleans())
def test_a_valid_header_on_arbitrary_bodies_never_raises_anything_else(kind, session, receiver,
                                                                        digest, body,
                                                                        fix_length):
    length = len(body) if fix_length else len(body) ^ 1
    _decodes_or_refuses(packet(kind, body, session=session, receiver=receiver, digest=digest,
                               length=length & 0xFFFF))


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(sample=st.sampled_from(SAMPLES), data=st.data())
def test_mutated_valid_packets_never_raise_anything_else(sample, data):
    packet_bytes = bytearray(encode(sample))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "set", "cut", "grow", "splice"]))
        at = data.draw(st.integers(0, max(len(packet_bytes) - 1, 0)))
        if action == "flip" and packet_bytes:
            packet_bytes[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set" and packet_bytes:
            packet_bytes[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif action == "cut":
            del packet_bytes[at:]
        elif action == "grow":
            packet_bytes[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif action == "splice":
            packet_bytes[6:8] = struct.pack(">H", data.draw(st.integers(0, 0xFFFF)))
    _decodes_or_refuses(bytes(packet_bytes))


# -- the group address --------------------------------------------------------------------------

def test_the_docs_worked_example():
    digest = hashlib.sha256(b"room-101").digest()
    assert digest[:3].hex() == "2851c7"                     # 40, 81, 199
    assert mc.group_address("room-101") == "231.40.81.200"  # 1 + 199 mod 254 = 200


@pytest.mark.parametrize("name, address", [
    ("lab-333", "231.213.163.1"),      # h[2] = 0: 1 + 0 mod 254
    ("lab-232", "231.149.115.1"),      # h[2] = 254: 1 + 254 mod 254
    ("lab-869", "231.226.205.2"),      # h[2] = 255: never .255
    ("lab-7651", "231.128.1.253"),     # 231.128.0.x would share 224.0.0.x's Ethernet address
])
def test_the_group_address_avoids_0_255_and_the_flooded_ethernet_addresses(name, address):
    assert mc.group_address(name) == address


@settings(max_examples=500)
@given(st.text(min_size=1, max_size=60).filter(lambda n: not mc.session_name_refusal(n)))
def test_every_hashed_address_is_one_an_administrator_could_have_chosen(name):
    address = mc.group_address(name)
    octets = [int(part) for part in address.split(".")]
    assert octets[0] == 231 and 1 <= octets[3] <= 254
    assert mc.group_address_refusal(address) == ""


@pytest.mark.parametrize("name, reason", [("", "empty"), ("a\tb", "control"),
                                          ("x" * 256, "more than 255"), ("\ud800", "UTF-8")])
def test_a_name_that_cannot_be_a_session_has_no_address(name, reason):
    with pytest.raises(MulticastFormatError, match=reason):
        mc.group_address(name)


@pytest.mark.parametrize("address, reason", [
    ("239.192.0.7", ""), ("231.40.81.200", ""), ("224.0.1.200", ""),
    ("10.0.0.1", "not a multicast address"), ("lab", "not an IPv4 address"),
    ("ff02::1", "not an IPv4 address"), ("224.0.0.251", "local network control block"),
    ("232.1.2.3", "source-specific"), ("239.0.0.9", "224.0.0.9"),
    ("231.128.0.5", "224.0.0.5"),
])
def test_group_address_refusal(address, reason):
    problem = mc.group_address_refusal(address)
    assert (reason in problem) if reason else problem == ""


# -- the image on the wire ----------------------------------------------------------------------

def test_the_first_pass_covers_the_file_once_and_the_digest_is_of_head_and_tail():
    out = io.BytesIO()
    writer = ImageWriter(out, {"format": 1, "type": "base", "streams": [
        {"number": 0, "role": "partition", "size": 3 << 16, "fill": "zero"}]},
        chunk_size=1 << 16)
    for n in range(3):
        writer.add(0, n << 16, bytes([n + 1]) * (1 << 16))
    writer.close()
    image = out.getvalue()
    trailer = decode_trailer(image[-TRAILER.size:], len(image))
    header_bytes = 32 + struct.unpack("<I", image[12:16])[0]
    head, tail, chunks = mc.first_pass_ranges(len(image), header_bytes, trailer.index_offset)
    assert (head.offset, tail.end, chunks.offset, chunks.end) == (
        0, len(image), header_bytes, trailer.index_offset)
    assert head.length + tail.length + chunks.length == len(image)
    assert image[chunks.offset:chunks.offset + 4] == b"PBCK"
    digest = mc.image_digest(image[head.offset:head.end], image[tail.offset:tail.end])
    assert digest == hashlib.blake2b(image[:header_bytes] + image[trailer.index_offset:],
                                     digest_size=16).digest()
    changed = bytearray(image)
    changed[-40] ^= 1                                       # a byte of the index
    assert mc.image_digest(changed[:header_bytes], changed[trailer.index_offset:]) != digest


# -- a run of DATA for one UDP_SEGMENT send -------------------------------------------------------

@pytest.mark.parametrize("length, segment, repair", [
    (1, 0, False), (mc.MAX_DATA_BYTES, 0, False), (mc.MAX_DATA_BYTES + 1, 0, True),
    (46 * mc.MAX_DATA_BYTES, 0, False), (10_000, 1000, True), (999, 1000, False),
])
def test_a_data_run_is_the_packets_encode_writes(length, segment, repair):
    payload = bytes((n * 7) & 0xFF for n in range(length))
    buffer, count, size = mc.encode_data_run(SESSION, DIGEST, 2**32 - 2, 5000, payload,
                                             segment, repair)
    step = segment or mc.MAX_DATA_BYTES
    assert count == -(-length // step) and size == 44 + 9 + step
    expect = b"".join(encode(Data(session_id=SESSION, sequence=(2**32 - 2 + n) % 2**32,
                                  image_digest=DIGEST, offset=5000 + n * step,
                                  payload=payload[n * step:(n + 1) * step], repair=repair))
                      for n in range(count))
    assert bytes(buffer) == expect
    assert all(len(bytes(buffer[n * size:(n + 1) * size])) <= mc.MAX_DATAGRAM
               for n in range(count))


@pytest.mark.parametrize("kwargs", [
    {"session_id": 0}, {"image_digest": mc.NO_IMAGE}, {"image_digest": b"short"},
    {"payload": b""}, {"segment_payload": mc.MAX_DATA_BYTES + 1}, {"sequence": 2**32},
    {"offset": 2**64 - 1, "payload": b"ab"},
])
def test_a_data_run_out_of_bounds_is_refused(kwargs):
    args = {"session_id": SESSION, "image_digest": DIGEST, "sequence": 0, "offset": 0,
            "payload": b"x", **kwargs}
    with pytest.raises(MulticastFormatError):
        mc.encode_data_run(**args)


# -- the receiver's DATA fast path ---------------------------------------------------------------

def _fields_from_decode(datagram: bytes, session: int, digest: bytes):
    """What data_fields must say: decode()'s verdict, restricted to DATA of session/digest."""
    try:
        message = mc.decode(datagram)
    except mc.MulticastFormatError:
        return None
    if type(message) is not Data or message.session_id != session or \
            message.image_digest != digest:
        return None
    return message.sequence, message.offset, Data.REPAIR if message.repair else 0


def _mutations(rng, packet: bytes) -> list[bytes]:
    out = [packet, packet[:-1], packet + b"\0", packet[:mc.HEADER.size + 9],
           packet[:mc.HEADER.size + 10]]
    for _ in range(40):
        b = bytearray(packet)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(0, min(len(b), mc.DATA_PAYLOAD_AT + 2))   # the header mostly
            b[at] = rng.randrange(256)
        out.append(bytes(b))
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, 2**64 - 1), size=st.integers(1, mc.MAX_DATA_BYTES),
       sequence=st.integers(0, 2**32 - 1), repair=st.booleans(), seed=st.integers(0, 2**32))
def test_data_fields_accepts_exactly_what_decode_calls_this_sessions_data(offset, size,
                                                                          sequence, repair,
                                                                          seed):
    import random
    rng = random.Random(seed)
    offset = min(offset, 2**64 - size)
    packet = encode(Data(session_id=SESSION, image_digest=DIGEST, sequence=sequence,
                         offset=offset, payload=bytes(rng.randrange(256) for _ in range(size)),
                         repair=repair))
    others = [encode(sample) for sample in SAMPLES[:6]]
    for datagram in _mutations(rng, packet) + others:
        pad = b"z" * rng.randrange(0, 5)                       # somewhere inside a pool
        pool = memoryview(pad + datagram + b"z" * 3)
        got = mc.data_fields(pool, len(pad), len(pad) + len(datagram), SESSION, DIGEST)
        assert got == _fields_from_decode(datagram, SESSION, DIGEST), datagram[:60].hex()
        if got is not None:
            assert bytes(pool[len(pad) + mc.DATA_PAYLOAD_AT:len(pad) + len(datagram)]) == \
                decode(datagram).payload


def test_data_fields_refuses_a_session_of_zero_and_no_image():
    packet = encode(Data(session_id=SESSION, image_digest=DIGEST, offset=0, payload=b"x"))
    assert mc.data_fields(packet, 0, len(packet), SESSION, DIGEST) == (0, 0, 0)
    assert mc.data_fields(packet, 0, len(packet), 0, DIGEST) is None
    assert mc.data_fields(packet, 0, len(packet), SESSION, mc.NO_IMAGE) is None
    assert mc.data_fields(packet, 0, len(packet) - 1, SESSION, DIGEST) is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, 2**40), payload=st.integers(1, mc.MAX_DATA_BYTES),
       count=st.integers(1, 48), sequence=st.integers(0, 2**32 - 1), repair=st.booleans(),
       seed=st.integers(0, 2**32))
def test_data_run_takes_a_run_only_when_every_datagram_is_this_sessions_next(
        offset, payload, count, sequence, repair, seed):
    """data_run accepts an unchanged UDP_SEGMENT run (unless it wraps past 2**32); after any
    damage it accepts only what data_fields accepts datagram by datagram, continuing each
    other, with the first one's fields."""
    import random
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(payload * count))
    run, n, segment = mc.encode_data_run(SESSION, DIGEST, sequence, offset, data,
                                         segment_payload=payload, repair=repair)
    assert n == count
    got = mc.data_run(run, 0, count, segment, SESSION, DIGEST)
    wraps = sequence + count - 1 > 2**32 - 1
    assert got == (None if wraps else (sequence, offset, Data.REPAIR if repair else 0))
    for _ in range(10):
        damaged = bytearray(run)
        for _ in range(rng.randrange(1, 3)):
            at = rng.randrange(count) * segment + rng.randrange(mc.DATA_PAYLOAD_AT)
            damaged[at] = rng.randrange(256)
        got = mc.data_run(damaged, 0, count, segment, SESSION, DIGEST)
        if got is None:
            continue
        each = [mc.data_fields(damaged, k * segment, (k + 1) * segment, SESSION, DIGEST)
                for k in range(count)]
        assert all(f is not None for f in each)
        assert each[0] == got
        assert [f[0] for f in each] == list(range(got[0], got[0] + count))
        assert [f[1] for f in each] == list(range(got[1], got[1] + count * payload, payload))
        assert {f[2] for f in each} == {got[2]}


def test_data_run_refuses_what_it_cannot_read():
    run, count, segment = mc.encode_data_run(SESSION, DIGEST, 1, 0, bytes(3500),
                                             segment_payload=1000)
    assert mc.data_run(run, 0, 3, segment, SESSION, DIGEST) == (1, 0, 0)
    assert mc.data_run(run, 0, 4, segment, SESSION, DIGEST) is None    # the last is short
    assert mc.data_run(run, 0, 0, segment, SESSION, DIGEST) is None
    assert mc.data_run(run, 0, 3, segment, 0, DIGEST) is None
    assert mc.data_run(run, 0, 3, segment, SESSION, mc.NO_IMAGE) is None
    assert mc.data_run(run, 0, 3, mc.DATA_PAYLOAD_AT, SESSION, DIGEST) is None
    assert mc.data_run(run, 1, 3, segment, SESSION, DIGEST) is None     # not on a boundary
