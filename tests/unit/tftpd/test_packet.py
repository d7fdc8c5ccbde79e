"""tftpd.packet: the pure codec, a table of malformed payloads, and fuzzing."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import packet
from tftpd.packet import Ack, Data, Error, MalformedPacket, OptionAck, Request


def test_rrq_with_options_round_trips():
    raw = packet.encode_request(packet.OP_RRQ, "pxelinux.0", "octet",
                                {"blksize": "1468", "TSIZE": "0", "windowsize": "8"})
    assert packet.decode(raw) == Request(packet.OP_RRQ, "pxelinux.0", "octet",
                                         {"blksize": "1468", "tsize": "0", "windowsize": "8"})


def test_wrq_mode_is_case_insensitive():
    raw = packet.encode_request(packet.OP_WRQ, "up/x.bin", "NetASCII")
    request = packet.decode(raw)
    assert request.is_write and request.mode == "netascii"


def test_hot_path_packets():
    assert packet.decode(packet.encode_ack(65535)) == Ack(65535)
    assert packet.encode_ack(65536) == b"\x00\x04\x00\x00"  # rollover
    assert packet.decode(packet.encode_data(70000, b"abc")) == Data(70000 & 0xFFFF, b"abc")
    assert packet.decode(packet.encode_error(1, "File not found")) == Error(1, "File not found")
    assert packet.encode_error(0, "a\0b") == b"\x00\x05\x00\x00a b\x00"


def test_oack_encodes_with_tftpy_and_decodes():
    raw = packet.encode_oack({"blksize": "1468", "tsize": "42"})
    assert raw.startswith(b"\x00\x06")
    assert packet.decode(raw) == OptionAck({"blksize": "1468", "tsize": "42"})


MALFORMED = [
    (b"", "too short"),
    (b"\x00", "too short"),
    (b"\x00\x00", "unknown opcode 0"),
    (b"\x00\x63abc", "unknown opcode 99"),
    (b"\x00\x01file", "does not end with a NUL"),
    (b"\x00\x01file\x00", "bad request"),                      # no mode
    (b"\x00\x01\x00octet\x00", "empty file name"),
    (b"\x00\x01file\x00mail\x00", "unsupported transfer mode"),
    (b"\x00\x01file\x00octet\x00blksize\x00", "bad request"),  # odd option count
    (b"\x00\x01fi\xffle\x00octet\x00", "bad request"),         # not ASCII
    (b"\x00\x01" + b"a" * 3000 + b"\x00octet\x00", "too long"),
    (b"\x00\x02file\x00octet\x00\x00\x00", "bad request"),     # empty option name
    (b"\x00\x03\x00", "DATA shorter"),
    (b"\x00\x04\x00", "ACK of 3 bytes"),
    (b"\x00\x04\x00\x01\x00", "ACK of 5 bytes"),
    (b"\x00\x05\x00", "ERROR shorter"),
]


@pytest.mark.parametrize("raw,reason", MALFORMED)
def test_malformed_table(raw, reason):
    with pytest.raises(MalformedPacket, match=reason):
        packet.decode(raw)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_decode_never_raises_anything_but_malformed(raw):
    try:
        decoded = packet.decode(raw)
    except MalformedPacket:
        return
    assert isinstance(decoded, (Request, Data, Ack, Error, OptionAck))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2]),
       st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
               max_size=100),
       st.sampled_from(["octet", "netascii", "OCTET"]),
       st.dictionaries(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10),
                       st.integers(0, 10**6).map(str), max_size=5))
def test_requests_round_trip(opcode, filename, mode, options):
    request = packet.decode(packet.encode_request(opcode, filename, mode, options))
    assert (request.opcode, request.filename, request.mode) == (opcode, filename, mode.lower())
    assert request.options == options


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_data_round_trip(block, payload):
    assert packet.decode(packet.encode_data(block, payload)) == Data(block, payload)
    assert struct.unpack("!HH", packet.data_header(block)) == (3, block)


def test_repeated_option_keeps_its_last_value_whatever_its_case():
    """RFC 2347: option names are case-insensitive; a name repeated (in any spelling) keeps
    the value it was given last."""
    request = packet.decode_request(b"\0\x01f\0octet\0BLKSIZE\x00512\0tsize\x000\0blksize\x001468\0")
    assert request.options == {"blksize": "1468", "tsize": "0"}
