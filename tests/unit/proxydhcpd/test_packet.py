"""proxydhcpd.packet: real-shaped requests built with scapy, a malformed table, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from proxydhcpd import packet
from proxydhcpd.packet import MalformedPacket

MAC = bytes.fromhex("00c04fdc2ab5")
GUID = b"\x00" + bytes(range(1, 17))          # RFC 4578 2.3: type 0 + 16-byte GUID
VENDOR_BIOS = b"PXEClient:Arch:00000:UNDI:002001"
VENDOR_UEFI = b"PXEClient:Arch:00007:UNDI:003016"


def build(options, *, op=1, xid=0x12345678, flags=0x8000, ciaddr="0.0.0.0", giaddr="0.0.0.0",
          chaddr=MAC, hlen=6, sname=b"", file=b"", end=True) -> bytes:
    """A request as a PXE ROM sends it, built by scapy (numeric option codes, raw values)."""
    options = list(options) + (["end"] if end else [])
    layer = BOOTP(op=op, htype=1, hlen=hlen, xid=xid, secs=4, flags=flags, ciaddr=ciaddr,
                  giaddr=giaddr, chaddr=chaddr + bytes(16 - len(chaddr)), sname=sname,
                  file=file) / DHCP(options=options)
    return bytes(layer)


def discover(*extra, **kw) -> bytes:
    return build([("message-type", "discover"), (60, VENDOR_BIOS), (93, b"\x00\x00"),
                  (94, b"\x01\x02\x01"), (97, GUID), *extra], **kw)


# ---- real-shaped requests -------------------------------------------------------------------


def test_bios_discover_header_and_options():
    request = packet.parse(discover())
    assert request.op == packet.BOOTREQUEST
    assert (request.htype, request.hlen, request.hops) == (1, 6, 0)
    assert request.xid == 0x12345678 and request.secs == 4
    assert request.flags == 0x8000 and request.broadcast
    assert request.ciaddr == request.yiaddr == request.siaddr == request.giaddr == "0.0.0.0"
    assert request.chaddr == MAC + bytes(10) and len(request.chaddr) == 16
    assert request.mac == MAC and request.mac_text == "00:c0:4f:dc:2a:b5"
    assert request.message_type == packet.DISCOVER
    assert request.vendor_class == VENDOR_BIOS.decode()
    assert request.architectures == (0,)
    assert request.client_guid == GUID
    assert request.options[packet.OPT_CLIENT_NDI] == b"\x01\x02\x01"
    assert request.user_classes == ()
    assert request.pxe_suboptions() == {}
    assert request.sname == b"" and request.file == b""


def test_uefi_discover_unicast_flags_and_relay_fields():
    request = packet.parse(build([("message-type", "discover"), (60, VENDOR_UEFI),
                                  (93, b"\x00\x07")], flags=0, giaddr="10.1.2.1"))
    assert not request.broadcast and request.flags == 0
    assert request.giaddr == "10.1.2.1"
    assert request.architectures == (7,)


def test_request_on_4011_with_boot_item():
    raw = build([("message-type", "request"), (60, VENDOR_BIOS), (93, b"\x00\x00"),
                 (43, b"\x47\x04\x80\x00\x00\x00\xff")], ciaddr="10.0.0.50", flags=0)
    request = packet.parse(raw)
    assert request.message_type == packet.REQUEST
    assert request.ciaddr == "10.0.0.50"
    assert request.pxe_suboptions() == {packet.PXE_BOOT_ITEM: b"\x80\x00\x00\x00"}


def test_inform():
    request = packet.parse(build([("message-type", "inform"), (60, VENDOR_UEFI)],
                                 ciaddr="192.168.7.9", flags=0))
    assert request.message_type == packet.INFORM
    assert request.ciaddr == "192.168.7.9"
    assert packet.MESSAGE_NAMES[request.message_type] == "INFORM"


@pytest.mark.parametrize("raw,expected", [
    (b"iPXE", (b"iPXE",)),                          # what iPXE really sends: a bare string
    (b"\x04iPXE", (b"iPXE",)),                      # RFC 3004 framing
    (b"\x04iPXE\x05other", (b"iPXE", b"other")),    # RFC 3004, two classes
    (b"\x05other\x04iPXE", (b"other", b"iPXE")),
    (b"\x00iPXE", (b"\x00iPXE",)),                  # zero-length item: not RFC 3004 framing
    (b"\x09iPXE", (b"\x09iPXE",)),                  # length runs past the end: opaque
    (b"", ()),
])
def test_user_class_bare_and_rfc3004(raw, expected):
    request = packet.parse(discover((77, raw)))
    assert request.user_classes == expected


@pytest.mark.parametrize("raw,expected", [
    (b"\x00\x00", (0,)),
    (b"\x00\x07", (7,)),
    (b"\x00\x0b", (11,)),
    (b"\x00\x10", (16,)),
    (b"\x00\x07\x00\x06\x00\x00", (7, 6, 0)),      # several, in the client's order
    (b"\x00\x07\x00", (7,)),                        # odd trailing byte dropped
    (b"\x01\x00", (256,)),
])
def test_client_architectures(raw, expected):
    request = packet.parse(build([("message-type", "discover"), (60, VENDOR_BIOS), (93, raw)]))
    assert request.architectures == expected


def test_no_option_93():
    request = packet.parse(build([("message-type", "discover"), (60, VENDOR_UEFI)]))
    assert request.architectures == ()


def test_ipxe_encapsulated_option_175():
    raw = discover((77, b"iPXE"), (175, b"\x13\x01\x01\x11\x01\x01"))
    request = packet.parse(raw)
    assert request.options[packet.OPT_IPXE_ENCAP] == b"\x13\x01\x01\x11\x01\x01"


def test_empty_option_value():
    request = packet.parse(discover((175, b"")))
    assert request.options[packet.OPT_IPXE_ENCAP] == b""


def test_option_43_suboptions_with_pad_and_end():
    value = b"\x00\x06\x01\x08\x00\x47\x04\x80\x00\x00\x01\xff\x47\x04junk"
    request = packet.parse(discover((43, value)))
    assert request.pxe_suboptions() == {6: b"\x08", 71: b"\x80\x00\x00\x01"}


def test_malformed_option_43_raises_malformed_from_property():
    request = packet.parse(discover((43, b"\x47\x09\x80")))
    with pytest.raises(MalformedPacket, match="option 43"):
        request.pxe_suboptions()


def test_repeated_options_are_concatenated_rfc3396():
    raw = build([("message-type", "discover"), (60, b"PXEClient:Arch:"),
                 (93, b"\x00\x07"), (60, b"00007:UNDI:003016"), (43, b"\x47\x04"),
                 (43, b"\x80\x00\x00\x00\xff")])
    request = packet.parse(raw)
    assert request.vendor_class == VENDOR_UEFI.decode()
    assert request.pxe_suboptions() == {71: b"\x80\x00\x00\x00"}


def test_repeated_message_type_is_not_a_message_type():
    raw = build([("message-type", "discover"), ("message-type", "request"), (60, VENDOR_BIOS)])
    request = packet.parse(raw)
    assert request.options[packet.OPT_MESSAGE_TYPE] == b"\x01\x03"
    assert request.message_type is None


def test_long_option_encoded_in_pieces_round_trips():
    value = bytes(range(256)) * 2 + b"tail"
    encoded = packet.encode_option(packet.OPT_VENDOR_SPECIFIC, value)
    assert encoded[0] == 43 and encoded[1] == 255 and encoded[257] == 43
    raw = build([("message-type", "discover"), (60, VENDOR_BIOS)], end=False) + encoded + b"\xff"
    assert packet.parse(raw).options[43] == value
    assert packet.encode_option(97, b"") == b"\x61\x00"


def test_plain_bootp_has_no_message_type():
    raw = build([(60, VENDOR_BIOS)])
    request = packet.parse(raw)
    assert request.message_type is None


def test_bootreply_parses():
    request = packet.parse(build([("message-type", "offer")], op=2))
    assert request.op == packet.BOOTREPLY


def test_sname_and_file_fields_when_not_overloaded():
    request = packet.parse(discover(sname=b"bootsrv", file=b"pxelinux.0"))
    assert request.sname == b"bootsrv" and request.file == b"pxelinux.0"


def test_options_area_without_end_is_accepted():
    raw = build([("message-type", "discover"), (60, VENDOR_BIOS)], end=False)
    assert packet.parse(raw).message_type == packet.DISCOVER


def test_data_after_end_is_ignored():
    raw = discover() + b"\x3c\x05zzzzz"
    assert packet.parse(raw).vendor_class == VENDOR_BIOS.decode()


def test_hardware_address_length_up_to_16():
    request = packet.parse(discover(chaddr=bytes(range(16)), hlen=16))
    assert request.mac == bytes(range(16))
    assert packet.parse(discover(hlen=0)).mac == b""


# ---- option overload (RFC 2132 9.3) ---------------------------------------------------------


def test_overload_file_carries_options():
    file_area = packet.encode_option(60, VENDOR_UEFI) + packet.encode_option(93, b"\x00\x07") \
        + b"\xff"
    request = packet.parse(build([("message-type", "discover"), (52, b"\x01")], file=file_area))
    assert request.vendor_class == VENDOR_UEFI.decode()
    assert request.architectures == (7,)
    assert request.file == b""              # the field held options, not a file name


def test_overload_sname_carries_options():
    sname_area = packet.encode_option(77, b"iPXE") + b"\xff"
    request = packet.parse(build([("message-type", "discover"), (60, VENDOR_BIOS), (52, b"\x02")],
                                 sname=sname_area, file=b"keep.me"))
    assert request.user_classes == (b"iPXE",)
    assert request.sname == b"" and request.file == b"keep.me"


def test_overload_both_concatenates_in_rfc3396_order():
    # RFC 3396 section 7: options field first, then file, then sname.
    file_area = packet.encode_option(43, b"\x47\x04") + b"\xff"
    sname_area = packet.encode_option(43, b"\x80\x00\x00\x00\xff") \
        + packet.encode_option(93, b"\x00\x0b") + b"\xff"
    request = packet.parse(build([("message-type", "discover"), (60, VENDOR_BIOS), (52, b"\x03"),
                                  (43, b"\x06\x01\x08")], file=file_area, sname=sname_area))
    assert request.options[43] == b"\x06\x01\x08\x47\x04\x80\x00\x00\x00\xff"
    assert request.pxe_suboptions() == {6: b"\x08", 71: b"\x80\x00\x00\x00"}
    assert request.architectures == (11,)
    assert request.file == b"" and request.sname == b""


def test_overload_value_without_known_bits_leaves_fields_alone():
    request = packet.parse(build([("message-type", "discover"), (52, b"\x04")], file=b"a.0"))
    assert request.file == b"a.0"


# ---- malformed payloads (fbtftp-style table) -------------------------------------------------


def header(op=1, hlen=6) -> bytes:
    return bytes((op, 1, hlen, 0)) + bytes(232)


COOKIE = packet.MAGIC_COOKIE
GOOD = header() + COOKIE + b"\x35\x01\x01\xff"

MALFORMED = [
    (b"", "0 bytes is shorter than a DHCP header"),
    (b"\x01", "shorter than a DHCP header"),
    (header()[:200], "200 bytes is shorter"),
    (header() + COOKIE[:3], "239 bytes is shorter"),
    (header() + b"\0\0\0\0", "no DHCP magic cookie"),
    (header() + b"\x63\x82\x53\x64" + b"\xff", "no DHCP magic cookie"),
    (header() + b"\0" * 64, "no DHCP magic cookie"),                 # plain BOOTP, vend area
    (header(op=3) + COOKIE + b"\xff", "op 3 is neither"),
    (header(op=0) + COOKIE + b"\xff", "op 0 is neither"),
    (header(op=255) + COOKIE + b"\xff", "op 255"),
    (header(hlen=17) + COOKIE + b"\xff", "hardware address length 17 exceeds 16"),
    (header(hlen=255) + COOKIE + b"\xff", "length 255 exceeds"),
    (header() + COOKIE + b"\x35\x05\x01", "option 53 in options runs past the end"),
    (header() + COOKIE + b"\x35\x01\x01\x3c\xff" + b"x" * 10, "option 60 in options runs past"),
    (header() + COOKIE + b"\x35", "option 53 in options has no length byte"),
    (header() + COOKIE + b"\x35\x01\x01\x3c", "option 60 in options has no length byte"),
    (header() + COOKIE + b"\x00\x00\x5d", "option 93 in options has no length byte"),
    (GOOD + bytes(5000 - len(GOOD)), "5000 bytes is longer than any DHCP packet"),
    (GOOD + bytes(packet.MAX_LEN + 1 - len(GOOD)), f"{packet.MAX_LEN + 1} bytes is longer"),
]


def _with_fields(sname: bytes = b"", file: bytes = b"", options: bytes = b"") -> bytes:
    raw = bytearray(header())
    raw[44:44 + len(sname)] = sname
    raw[108:108 + len(file)] = file
    return bytes(raw) + COOKIE + options


MALFORMED += [
    # overload says file holds options, and file holds a broken one
    (_with_fields(file=b"\x3c\x7fPXE", options=b"\x34\x01\x01\xff"),
     "option 60 in file runs past the end"),
    (_with_fields(file=b"\x00" * 127 + b"\x3c", options=b"\x34\x01\x01\xff"),
     "option 60 in file has no length byte"),
    (_with_fields(sname=b"\x4d\x7fiPXE", options=b"\x34\x01\x02\xff"),
     "option 77 in sname runs past the end"),
    (_with_fields(sname=b"\x00" * 63 + b"\x4d", options=b"\x34\x01\x03\xff"),
     "option 77 in sname has no length byte"),
    # both areas: a good file, a bad sname
    (_with_fields(file=b"\x3c\x09PXEClient\xff", sname=b"\x5d\x40",
                  options=b"\x34\x01\x03\xff"), "option 93 in sname runs past the end"),
]


@pytest.mark.parametrize("raw,reason", MALFORMED, ids=[f"{n}-{r}" for n, (_, r) in
                                                      enumerate(MALFORMED)])
def test_malformed_table(raw, reason):
    with pytest.raises(MalformedPacket, match=reason):
        packet.parse(raw)


def test_malformed_is_a_value_error_with_a_reason():
    with pytest.raises(ValueError) as info:
        packet.parse(b"short")
    assert str(info.value) == "5 bytes is shorter than a DHCP header"


def test_max_len_is_accepted():
    assert packet.parse(GOOD + bytes(packet.MAX_LEN - len(GOOD))).message_type == packet.DISCOVER


def test_minimal_packet_is_accepted():
    request = packet.parse(header() + COOKIE)
    assert request.options == {} and request.message_type is None


def test_bad_suboptions():
    for raw, reason in [(b"\x47", "has no length byte"),
                        (b"\x47\x05\x80\x00", "runs past the end")]:
        with pytest.raises(MalformedPacket, match=f"option 71 in option 43 {reason}"):
            packet.parse_suboptions(raw)
    assert packet.parse_suboptions(b"") == {}
    assert packet.parse_suboptions(b"\x06\x01\x08\xff\x47") == {6: b"\x08"}


# ---- fuzzing --------------------------------------------------------------------------------


def _touch_everything(request: packet.DhcpPacket) -> None:
    """Every derived property: each returns or raises MalformedPacket, nothing else."""
    request.mac, request.mac_text, request.message_type, request.broadcast
    request.vendor_class, request.client_guid
    assert all(0 <= a <= 0xFFFF for a in request.architectures)
    assert all(isinstance(c, bytes) for c in request.user_classes)
    try:
        request.pxe_suboptions()
    except MalformedPacket:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=5000))
def test_parse_arbitrary_bytes_raises_only_malformed(raw):
    try:
        request = packet.parse(raw)
    except MalformedPacket:
        return
    _touch_everything(request)


@settings(max_examples=1000, deadline=None)
@given(op=st.sampled_from([1, 2]), hlen=st.integers(0, 16), flags=st.integers(0, 0xFFFF),
       fields=st.binary(min_size=232, max_size=232), options=st.binary(max_size=1200))
def test_valid_header_random_options_raises_only_malformed(op, hlen, flags, fields, options):
    raw = bytearray(bytes((op, 1, hlen, 0)) + fields)
    raw[10:12] = flags.to_bytes(2, "big")
    try:
        request = packet.parse(bytes(raw) + COOKIE + options)
    except MalformedPacket:
        return
    assert request.op == op and request.hlen == hlen and request.flags == flags
    assert len(request.mac) == hlen
    _touch_everything(request)


_option = st.tuples(st.integers(1, 254), st.binary(max_size=300))


@settings(max_examples=1000, deadline=None)
@given(options=st.lists(_option, max_size=12),
       overload=st.sampled_from([None, 1, 2, 3]),
       file=st.binary(max_size=128), sname=st.binary(max_size=64))
def test_well_formed_options_parse_and_properties_never_crash(options, overload, file, sname):
    """Structured options (RFC 3396 pieces), maybe overloaded areas of random bytes."""
    area = b"".join(packet.encode_option(code, value) for code, value in options
                    if code != packet.OPT_OVERLOAD)
    if overload is not None:
        area += packet.encode_option(packet.OPT_OVERLOAD, bytes((overload,)))
    raw = bytearray(header())
    raw[44:44 + len(sname)] = sname
    raw[108:108 + len(file)] = file
    try:
        request = packet.parse(bytes(raw) + COOKIE + area + b"\xff")
    except MalformedPacket as exc:
        assert overload is not None and ("in file" in str(exc) or "in sname" in str(exc))
        return
    expected: dict[int, bytes] = {}
    for code, value in options:
        if code != packet.OPT_OVERLOAD:
            expected[code] = expected.get(code, b"") + value
    for code, value in expected.items():
        assert request.options[code].startswith(value)
    _touch_everything(request)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=255))
def test_suboptions_raise_only_malformed(raw):
    try:
        found = packet.parse_suboptions(raw)
    except MalformedPacket:
        return
    assert all(0 < code < 255 for code in found)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_encode_option_round_trips(value):
    encoded = packet.encode_option(packet.OPT_VENDOR_CLASS, value)
    raw = header() + COOKIE + b"\x35\x01\x01" + encoded + b"\xff"
    if len(raw) > packet.MAX_LEN:
        return
    assert packet.parse(raw).options.get(packet.OPT_VENDOR_CLASS, b"") == value
    assert struct.unpack("B", encoded[:1])[0] == packet.OPT_VENDOR_CLASS
