"""tftpd.packet against tftpy, the reference codec it replaced at runtime (docs/packaging.md):
the same requests and OACKs are accepted with the same fields, the same are refused, and our
OACK has tftpy's bytes."""

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tftpd import packet
from tftpd.packet import MalformedPacket

tftpy_factory = pytest.importorskip("tftpy.TftpPacketFactory").TftpPacketFactory()
TftpPacketOACK = pytest.importorskip("tftpy.TftpPacketTypes").TftpPacketOACK


def tftpy_request(raw: bytes):
    """What the old decode_request returned (tftpy's parse, then our checks), or None."""
    if len(raw) > packet.MAX_REQUEST_BYTES or not raw.endswith(b"\0"):
        return None
    try:
        parsed = tftpy_factory.parse(raw)
    except Exception:
        return None
    if parsed.mode.lower() not in packet.MODES or not parsed.filename:
        return None
    return (parsed.opcode, parsed.filename, parsed.mode.lower(),
            {str(k).lower(): str(v) for k, v in parsed.options.items()})


def spelled_two_ways(raw: bytes) -> bool:
    """An option name repeated in two spellings ("OCTET" and "octet"): ours keeps the last
    value by its lower-cased name (RFC 2347: names are case-insensitive), tftpy one per
    spelling, so the reference cannot say which came last: no comparison for those."""
    strings = raw[2:].split(b"\0")[2:]
    spellings: dict[bytes, set[bytes]] = {}
    for name in strings[0::2]:
        spellings.setdefault(name.lower(), set()).add(name)
    return any(len(names) > 1 for names in spellings.values())


def ours(raw: bytes):
    try:
        r = packet.decode_request(raw)
    except MalformedPacket:
        return None
    return (r.opcode, r.filename, r.mode, r.options)


PIECES = st.sampled_from([b"file", b"pxelinux.0", b"", b"octet", b"OCTET", b"netascii",
                          b"mail", b"blksize", b"1468", b"TSIZE", b"0", b"\xff", b"a\x01b"])


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([1, 2]), st.lists(PIECES, max_size=8), st.booleans())
@example(1, [b"file", b"octet", b"blksize", b"512", b"blksize", b"1468"], True)  # last wins
def test_requests_agree_with_tftpy(opcode, pieces, terminated):
    raw = opcode.to_bytes(2, "big") + b"\0".join(pieces) + (b"\0" if terminated else b"")
    assume(not spelled_two_ways(raw))
    assert ours(raw) == tftpy_request(raw)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from([b"\x00\x01", b"\x00\x02"]), st.binary(max_size=80))
def test_random_requests_agree_with_tftpy(opcode, body):
    raw = opcode + body
    assume(not spelled_two_ways(raw))
    assert ours(raw) == tftpy_request(raw)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10),
                       st.integers(0, 10**6).map(str), max_size=5))
def test_oack_bytes_equal_tftpy(options):
    reference = TftpPacketOACK()
    reference.options = options
    assert packet.encode_oack(options) == reference.encode().buffer
    decoded = TftpPacketOACK()
    decoded.buffer = packet.encode_oack(options)
    assert decoded.decode().options == options
