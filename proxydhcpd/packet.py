"""DHCP/BOOTP wire format for the proxyDHCP: bytes in, a typed request out (RFC 2131 section 2,
RFC 2132 options, RFC 3396 long options, PXE 2.1 and RFC 4578 client options).

Pure: no sockets, no clock. Parsing is hand-written with fixed offsets because it runs for every
packet on the segment (a lab powering on sends thousands per second); scapy's DHCP layer costs
about 180 us per packet here, so scapy builds the reply templates once (reply.py) and checks
our output in the tests, and stays off this path.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

BOOTREQUEST, BOOTREPLY = 1, 2
MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER_LEN = 236                        # RFC 2131 figure 1, up to and excluding the cookie
MIN_LEN = HEADER_LEN + len(MAGIC_COOKIE)
MAX_LEN = 4096

# RFC 2132 section 9.6 message types
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
                 ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

OPT_PAD, OPT_END = 0, 255
OPT_VENDOR_SPECIFIC = 43
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_LIST = 55
OPT_VENDOR_CLASS = 60
OPT_USER_CLASS = 77
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_CLIENT_GUID = 97
OPT_IPXE_ENCAP = 175

# PXE 2.1 option 43 sub-options (PXE specification, section 2.4.2)
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_SERVERS = 8
PXE_BOOT_MENU = 9
PXE_MENU_PROMPT = 10
PXE_BOOT_ITEM = 71


class MalformedPacket(ValueError):
    """Not a well-formed BOOTP/DHCP packet; str() says why."""


class DhcpPacket(NamedTuple):
    """A parsed request. A NamedTuple rather than a frozen dataclass: it is built for every
    packet on the segment, and a frozen dataclass's __init__ costs several times more."""

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: bytes                         # the full 16-byte field
    sname: bytes
    file: bytes
    options: dict[int, bytes]

    @property
    def mac(self) -> bytes:
        return self.chaddr[:min(self.hlen, 16)]

    @property
    def mac_text(self) -> str:
        return self.mac.hex(":")

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def vendor_class(self) -> str:
        return self.options.get(OPT_VENDOR_CLASS, b"").decode("ascii", "replace")

    @property
    def architectures(self) -> tuple[int, ...]:
        """Option 93 (RFC 4578 section 2.1): a list of 16-bit architecture types."""
        raw = self.options.get(OPT_CLIENT_ARCH, b"")
        return tuple(int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw) - 1, 2))

    @property
    def user_classes(self) -> tuple[bytes, ...]:
        """Option 77: RFC 3004 length-prefixed items, or the bare string iPXE sends."""
        raw = self.options.get(OPT_USER_CLASS, b"")
        items, i = [], 0
        while i < len(raw):
            length = raw[i]
            if length == 0 or i + 1 + length > len(raw):
                return (raw,)  # not RFC 3004 framing: one opaque class
            items.append(raw[i + 1:i + 1 + length])
            i += 1 + length
        return tuple(items)

    @property
    def client_guid(self) -> bytes | None:
        return self.options.get(OPT_CLIENT_GUID)

    def pxe_suboptions(self) -> dict[int, bytes]:
        raw = self.options.get(OPT_VENDOR_SPECIFIC)
        return parse_suboptions(raw) if raw else {}


def format_mac(datagram: bytes) -> str:
    """The client's MAC (chaddr, hlen bytes) of a raw request as text, for log lines."""
    return datagram[28:28 + min(datagram[2], 16)].hex(":")


def _ip(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def _walk_options(raw: bytes, into: dict[int, bytes], where: str) -> bool:
    """Parse one options area into `into` (concatenating repeats, RFC 3396); True at END."""
    i, end = 0, len(raw)
    while i < end:
        code = raw[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return True
        if i + 1 >= end:
            raise MalformedPacket(f"option {code} in {where} has no length byte")
        length = raw[i + 1]
        if i + 2 + length > end:
            raise MalformedPacket(f"option {code} in {where} runs past the end")
        value = raw[i + 2:i + 2 + length]
        into[code] = into[code] + value if code in into else value
        i += 2 + length
    return False


def parse(datagram: bytes) -> DhcpPacket:
    """Decode a BOOTP/DHCP packet or raise MalformedPacket."""
    if len(datagram) < MIN_LEN:
        raise MalformedPacket(f"{len(datagram)} bytes is shorter than a DHCP header")
    if len(datagram) > MAX_LEN:
        raise MalformedPacket(f"{len(datagram)} bytes is longer than any DHCP packet")
    if datagram[HEADER_LEN:MIN_LEN] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie (plain BOOTP)")
    op, htype, hlen, hops = datagram[0], datagram[1], datagram[2], datagram[3]
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if hlen > 16:
        raise MalformedPacket(f"hardware address length {hlen} exceeds 16")
    options: dict[int, bytes] = {}
    _walk_options(datagram[MIN_LEN:], options, "options")
    sname, file = datagram[44:108], datagram[108:236]
    overload = options.get(OPT_OVERLOAD)
    if overload:  # RFC 2132 section 9.3: file and/or sname carry more options
        if overload[0] & 1:
            _walk_options(file, options, "file")
            file = b""
        if overload[0] & 2:
            _walk_options(sname, options, "sname")
            sname = b""
    return DhcpPacket(
        op=op, htype=htype, hlen=hlen, hops=hops,
        xid=int.from_bytes(datagram[4:8], "big"),
        secs=int.from_bytes(datagram[8:10], "big"),
        flags=int.from_bytes(datagram[10:12], "big"),
        ciaddr=_ip(datagram[12:16]), yiaddr=_ip(datagram[16:20]),
        siaddr=_ip(datagram[20:24]), giaddr=_ip(datagram[24:28]),
        chaddr=bytes(datagram[28:44]), sname=bytes(sname).rstrip(b"\0"),
        file=bytes(file).rstrip(b"\0"), options=options)


# What decide.decide reads (and 52, which sends the packet to the full parser).
_SCANNED = frozenset((OPT_MESSAGE_TYPE, OPT_VENDOR_CLASS, OPT_USER_CLASS, OPT_CLIENT_ARCH,
                      OPT_IPXE_ENCAP, OPT_VENDOR_SPECIFIC, OPT_CLIENT_GUID, OPT_OVERLOAD))


def scan(datagram: bytes) -> tuple[tuple, bytes | None] | None:
    """See scan_at; the second item is option 97's bytes (code, length, value) or None."""
    scanned = scan_at(datagram)
    if scanned is None:
        return None
    key, at = scanned
    return key, (None if at is None else datagram[at:at + 2 + datagram[at + 1]])


def scan_at(datagram: bytes) -> tuple[tuple, int | None] | None:
    """The lean parse of the per-packet fast path (fastpath.py): one pass over the options that
    keeps only what the decision reads. Returns (key, where) where key is (op, and the raw
    values of options 53, 60, 93, 77, 43, or None when absent, and whether 175 is present) and
    where is the offset of option 97's code byte (a reply echoes the option), or None; returns
    None for a packet only parse() reads right (option overload, a scanned option sent in
    several pieces; parse() then also checks the rest). Otherwise rejects exactly what parse()
    rejects, with the same MalformedPacket text."""
    n = len(datagram)
    if n < MIN_LEN:
        raise MalformedPacket(f"{n} bytes is shorter than a DHCP header")
    if n > MAX_LEN:
        raise MalformedPacket(f"{n} bytes is longer than any DHCP packet")
    if datagram[HEADER_LEN:MIN_LEN] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie (plain BOOTP)")
    op = datagram[0]
    if op != BOOTREQUEST and op != BOOTREPLY:
        raise MalformedPacket(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if datagram[2] > 16:
        raise MalformedPacket(f"hardware address length {datagram[2]} exceeds 16")
    found: dict[int, int] = {}
    wanted = _SCANNED
    i = MIN_LEN
    while i < n:
        code = datagram[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= n:
            raise MalformedPacket(f"option {code} in options has no length byte")
        end = i + 2 + datagram[i + 1]
        if end > n:
            raise MalformedPacket(f"option {code} in options runs past the end")
        if code in wanted:
            if code in found or code == OPT_OVERLOAD:
                return None         # pieces to concatenate, or more options elsewhere
            found[code] = i
        i = end
    get = found.get
    at = get(OPT_MESSAGE_TYPE)
    v53 = None if at is None else datagram[at + 2:at + 2 + datagram[at + 1]]
    at = get(OPT_VENDOR_CLASS)
    v60 = None if at is None else datagram[at + 2:at + 2 + datagram[at + 1]]
    at = get(OPT_CLIENT_ARCH)
    v93 = None if at is None else datagram[at + 2:at + 2 + datagram[at + 1]]
    at = get(OPT_USER_CLASS)
    v77 = None if at is None else datagram[at + 2:at + 2 + datagram[at + 1]]
    at = get(OPT_VENDOR_SPECIFIC)
    v43 = None if at is None else datagram[at + 2:at + 2 + datagram[at + 1]]
    return (op, v53, v60, v93, v77, v43, OPT_IPXE_ENCAP in found), get(OPT_CLIENT_GUID)


def parse_suboptions(raw: bytes) -> dict[int, bytes]:
    """Option 43's PXE sub-options; malformed encapsulation raises MalformedPacket."""
    found: dict[int, bytes] = {}
    _walk_options(raw, found, "option 43")
    return found


def encode_option(code: int, value: bytes) -> bytes:
    """One option, split into 255-byte pieces when longer (RFC 3396)."""
    if not value:
        return bytes((code, 0))
    return b"".join(bytes((code, len(value[i:i + 255]))) + value[i:i + 255]
                    for i in range(0, len(value), 255))


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options in the order given, each split as RFC 3396 says; no END (the caller adds it)."""
    return b"".join(encode_option(code, value) for code, value in options)


def encode_reply_header(siaddr: str, sname: bytes, file: bytes) -> bytes:
    """A BOOTREPLY's fixed part and magic cookie (RFC 2131 section 2, figure 1), with the
    per-client fields (xid, flags, ciaddr, yiaddr, giaddr, chaddr) zero for reply.py to fill.

    htype 1 / hlen 6 (Ethernet, RFC 1700) until the fill copies the client's; `sname` (64
    bytes) and `file` (128 bytes) are NUL-padded and must leave room for the NUL.
    """
    if len(sname) > 63:
        raise ValueError(f"server name of {len(sname)} bytes does not fit the 64-byte field")
    if len(file) > 127:
        raise ValueError(f"boot file name of {len(file)} bytes does not fit the 128-byte field")
    # op, htype, hlen, hops | xid | secs, flags | ciaddr | yiaddr | siaddr | giaddr | chaddr
    fixed = bytes((BOOTREPLY, 1, 6, 0)) + bytes(4) + bytes(4) + bytes(4) + bytes(4) \
        + socket.inet_aton(siaddr) + bytes(4) + bytes(16)
    return fixed + sname.ljust(64, b"\0") + file.ljust(128, b"\0") + MAGIC_COOKIE
