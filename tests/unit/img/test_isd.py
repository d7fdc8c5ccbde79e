"""The image-safe data record's codec (img/isd.py) and where it goes on a disk (img/isdstore.py
slot_for, pure), and the bytes a restore keeps (img/disk.py _outside)."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from common.identity import IpSettings, MachineIdentity
from img.disk import _outside
from img.disklayout import DiskLayout, Partition
from img.errors import IsdError
from img.isd import (HEADER_BYTES, MAGIC, MAX_PAYLOAD, SLOT_BYTES, BadRecord, IsdRecord, decode,
                     encode, has_magic, new_record)
from img.isdstore import SLOT_OFFSET, slot_for

MiB = 1 << 20
STATIC = MachineIdentity("pc-01", "lab.example.com", "LAB",
                         IpSettings("10.0.0.5", 24, "10.0.0.1", ("10.0.0.2", "10.0.0.3")))
RECORD = IsdRecord(STATIC, "2026-12-07T10:00:00Z", "img 0.1.0")


def raw(payload: bytes, version: int = 1, flags: int = 0, length: int | None = None,
        magic: bytes = MAGIC, digest: bytes | None = None) -> bytes:
    """A record built by hand, each field chosen (the checksum right unless given)."""
    fields = struct.pack("<8sHHI", magic, version, flags,
                         len(payload) if length is None else length)
    if digest is None:
        digest = hashlib.sha256(fields + payload).digest()
    return (fields + digest + payload).ljust(SLOT_BYTES, b"\0")


def payload(value) -> bytes:
    return json.dumps(value).encode()


GOOD_PAYLOAD = {"identity": {"name": "pc-01", "dns_suffix": "", "workgroup": "", "ip": None},
                "written": "2026-12-07T10:00:00Z", "tool": "img"}


def test_round_trip_static_and_dhcp() -> None:
    for record in (RECORD, IsdRecord(MachineIdentity("ws7"))):
        data = encode(record)
        assert len(data) == SLOT_BYTES and data.startswith(MAGIC) and has_magic(data)
        assert decode(data) == record


def test_layout_is_as_documented() -> None:
    data = encode(RECORD)
    magic, version, flags, length = struct.unpack_from("<8sHHI", data)
    assert (magic, version, flags) == (b"\x89PBISD\r\n", 1, 0)
    body = data[HEADER_BYTES:HEADER_BYTES + length]
    assert data[16:48] == hashlib.sha256(data[:16] + body).digest()
    assert json.loads(body)["identity"]["ip"]["dns_servers"] == ["10.0.0.2", "10.0.0.3"]
    assert not any(data[HEADER_BYTES + length:])


def test_new_record_stamps_utc() -> None:
    now = datetime.datetime(2026, 12, 7, 11, 0, tzinfo=datetime.timezone(
        datetime.timedelta(hours=1)))
    assert new_record(STATIC, now, "img x").written == "2026-12-07T10:00:00Z"


def test_unknown_payload_fields_are_ignored_but_identity_is_strict() -> None:
    assert decode(raw(payload(dict(GOOD_PAYLOAD, later="x")))).identity.name == "pc-01"
    bad = dict(GOOD_PAYLOAD, identity=dict(GOOD_PAYLOAD["identity"], hostname="x"))
    with pytest.raises(BadRecord, match="identity: hostname: not an identity field"):
        decode(raw(payload(bad)))


MALFORMED = [
    ("short", b"\x89PBISD", "6 bytes; a record has a 48-byte header"),
    ("bad magic", raw(payload(GOOD_PAYLOAD), magic=b"ZISD\0\0\0\0"), "magic 5a495344"),
    ("version 0", raw(payload(GOOD_PAYLOAD), version=0), "version 0; this img reads version 1"),
    ("version 2", raw(payload(GOOD_PAYLOAD), version=2), "version 2"),
    ("flags", raw(payload(GOOD_PAYLOAD), flags=1), "flags 0x0001"),
    ("length 0", raw(b"", length=0), "payload length 0 out of range"),
    ("length too long", raw(payload(GOOD_PAYLOAD), length=MAX_PAYLOAD + 1),
     f"payload length {MAX_PAYLOAD + 1} out of range"),
    ("length past the data", raw(payload(GOOD_PAYLOAD))[:60], "payload length"),
    ("length changed", raw(payload(GOOD_PAYLOAD), length=len(payload(GOOD_PAYLOAD)) - 1),
     "checksum mismatch"),
    ("checksum", raw(payload(GOOD_PAYLOAD), digest=bytes(32)), "checksum mismatch"),
    ("not UTF-8", raw(b"\xff\xfe{}"), "not UTF-8 JSON"),
    ("not JSON", raw(b"{name: pc}"), "not UTF-8 JSON"),
    ("not an object", raw(b"[1, 2]"), "not a JSON object"),
    ("no identity", raw(payload({"written": ""})), "payload has no identity"),
    ("identity not an object", raw(payload({"identity": "pc-01"})),
     "identity: identity: must be a JSON object"),
    ("bad name", raw(payload({"identity": {"name": "pc_01"}})), "identity: name: 'pc_01'"),
    ("bad address", raw(payload({"identity": {"name": "pc", "ip": {
        "address": "10.0.0.300", "prefix_len": 24}}})), "identity: ip.address"),
    ("gateway outside", raw(payload({"identity": {"name": "pc", "ip": {
        "address": "10.0.0.5", "prefix_len": 24, "gateway": "10.1.0.1"}}})),
     "identity: ip.gateway"),
    ("written not text", raw(payload(dict(GOOD_PAYLOAD, written=5))),
     "written and tool must be strings"),
]


@pytest.mark.parametrize("data, message", [(d, m) for _, d, m in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_records_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(BadRecord) as caught:
        decode(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert issubclass(BadRecord, IsdError)


def test_every_single_bit_flip_in_header_and_payload_is_detected() -> None:
    data = bytearray(encode(RECORD))
    length = struct.unpack_from("<I", data, 12)[0]
    for byte in range(HEADER_BYTES + length):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[byte] ^= 1 << bit
            with pytest.raises(BadRecord):
                decode(bytes(damaged))


def test_a_payload_too_large_is_refused_when_encoding() -> None:
    huge = IsdRecord(MachineIdentity("pc"), "x" * MAX_PAYLOAD, "")
    with pytest.raises(BadRecord, match="at most 4048 fit"):
        encode(huge)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=SLOT_BYTES))
def test_fuzz_arbitrary_bytes_only_raise_bad_record(data: bytes) -> None:
    for candidate in (data, MAGIC + data, encode(RECORD)[:16] + data):
        try:
            decode(candidate)
        except BadRecord:
            pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, SLOT_BYTES - 1), st.integers(1, 255), st.binary(max_size=64))
def test_fuzz_damaged_records_only_raise_bad_record(position: int, xor: int,
                                                    junk: bytes) -> None:
    data = bytearray(encode(RECORD))
    data[position] ^= xor
    data[HEADER_BYTES:HEADER_BYTES + len(junk)] = junk
    try:
        decode(bytes(data))
    except BadRecord:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["name", "ip", "address", "prefix_len",
                                                       "gateway", "dns_servers", "identity",
                                                       "workgroup", "dns_suffix", "x"]),
                                      inner, max_size=5), max_leaves=20))
def test_fuzz_any_json_payload_only_raises_bad_record(value) -> None:
    for candidate in (value, {"identity": value}):
        try:
            decode(raw(payload(candidate)))
        except BadRecord:
            pass


# --- where the record goes (pure) ---------------------------------------------------------

def gpt(sector: int, *starts_mib: int, first_usable: int | None = None) -> DiskLayout:
    parts = tuple(Partition(n, s * MiB // sector, MiB // sector, "0FC63DAF-8483-4772-8E79-"
                            "3D69D8477DE4") for n, s in enumerate(starts_mib, 1))
    return DiskLayout("gpt", sector, 64 * MiB, "11111111-2222-3333-4444-555555555555", parts,
                      first_usable if first_usable is not None else (34 if sector == 512 else 6),
                      64 * MiB // sector - 40)


def mbr(sector: int, *starts: int) -> DiskLayout:
    parts = tuple(Partition(n, s, 1024, "0x83") for n, s in enumerate(starts, 1))
    return DiskLayout("mbr", sector, 64 * MiB, "0x12345678", parts)


SLOTS = [
    ("gpt 512 at 1 MiB", gpt(512, 1, 2), SLOT_OFFSET, "LBAs 2040-2047 of 512-byte sectors"),
    ("gpt 4096 at 1 MiB", gpt(4096, 1), SLOT_OFFSET, "LBA 255 of 4096-byte sectors"),
    ("gpt sfdisk first usable 2048", gpt(512, 1, first_usable=2048), SLOT_OFFSET, "below"),
    ("gpt first partition at 8 MiB", gpt(512, 8, 2), SLOT_OFFSET, "below"),
    ("mbr 512 at 2048", mbr(512, 2048), SLOT_OFFSET, "below"),
    ("mbr 4096 at 256", mbr(4096, 256, 1024), SLOT_OFFSET, "below"),
    ("empty gpt", gpt(512), SLOT_OFFSET, "below"),
    ("mbr at sector 63", mbr(512, 63), None, "partition 1 starts at sector 63 (byte 32256)"),
    ("mbr second partition below 1 MiB", mbr(512, 4096, 100), None, "partition 2 starts"),
    ("gpt 4096 at 64 KiB", DiskLayout("gpt", 4096, 64 * MiB, "", (
        Partition(1, 16, 256, "X"),), 6, 100), None, "starts at sector 16"),
    ("no table", DiskLayout("none", 512, 64 * MiB, "", ()), None, "no partition table"),
    ("tiny disk", DiskLayout("mbr", 512, MiB // 2, "", ()), None, "smaller than 1 MiB"),
]


@pytest.mark.parametrize("layout, offset, reason", [(l, o, r) for _, l, o, r in SLOTS],
                         ids=[name for name, *_ in SLOTS])
def test_slot_for(layout: DiskLayout, offset: int | None, reason: str) -> None:
    slot = slot_for(layout)
    assert slot.offset == offset and reason in slot.reason, slot


def test_slot_refused_where_a_gpt_header_puts_its_entries() -> None:
    layout = gpt(512, 2)
    assert slot_for(layout, (SLOT_OFFSET - 512, 16384)).offset is None
    assert "entry array (bytes 1043968..1060351)" in slot_for(
        layout, (SLOT_OFFSET - 512, 16384)).reason
    assert slot_for(layout, (1024, 16384)).offset == SLOT_OFFSET


# --- the bytes a restore keeps --------------------------------------------------------------

@pytest.mark.parametrize("offset, length, keep, pieces", [
    (0, 100, None, [(0, 100)]),
    (0, 100, (200, 10), [(0, 100)]),
    (0, 100, (100, 10), [(0, 100)]),
    (0, 100, (50, 10), [(0, 50), (60, 100)]),
    (50, 10, (50, 10), []),
    (40, 30, (50, 10), [(40, 50), (60, 70)]),
    (55, 30, (50, 10), [(60, 85)]),
    (0, 55, (50, 10), [(0, 50)]),
    (0, 0, (50, 10), []),
])
def test_outside(offset: int, length: int, keep, pieces) -> None:
    assert _outside(offset, length, keep) == pieces
