"""The DHCPDISCOVER the load generator sends, and the check that a reply is a valid offer.

The request is what a BIOS PXE ROM broadcasts when it powers on (PXE 2.1 section 2.2.1): a
DHCPDISCOVER with the broadcast flag, option 60 "PXEClient:Arch:00000:UNDI:002001", option 93
(architecture 0, BIOS), 94 (UNDI 2.1), 97 (client GUID), 57 and the parameter request list.
One template is built once; each client's copy differs only in the fields written at fixed byte
offsets: xid (4), the MAC in chaddr (28: 02:77 + the xid, so every xid is a distinct locally
administered MAC) and the last four bytes of the GUID (also the xid).

A reply counts only when it is a valid offer for one of our clients: op 2 (BOOTREPLY), the DHCP
cookie, option 53 = 2 (DHCPOFFER), and chaddr = the MAC that belongs to its xid.
"""

from __future__ import annotations

import struct

COOKIE = b"\x63\x82\x53\x63"
MAC_PREFIX = b"\x02\x77"
XID_OFFSET = 4
MAC_XID_OFFSET = 30                      # chaddr (28) + the 2-byte MAC_PREFIX
VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PARAMS = bytes((1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50,
                51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135))


def _opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def discover_template() -> tuple[bytes, int]:
    """(packet with xid 0, offset of the GUID's last 4 bytes)."""
    header = bytearray(236)
    header[0:4] = bytes((1, 1, 6, 0))                # BOOTREQUEST, Ethernet, hlen 6, hops 0
    struct.pack_into("!HH", header, 8, 4, 0x8000)    # secs 4, broadcast flag
    header[28:34] = MAC_PREFIX + b"\0\0\0\0"
    options = (_opt(53, b"\x01") + _opt(57, struct.pack("!H", 1260))
               + _opt(93, b"\x00\x00") + _opt(94, b"\x01\x02\x01"))
    guid_at = 236 + len(COOKIE) + len(options) + 2 + 1 + 12   # type byte + 16-byte UUID, last 4
    options += _opt(97, b"\x00" + bytes(range(0x40, 0x4c)) + b"\0\0\0\0")
    options += _opt(60, VENDOR_CLASS) + _opt(55, PARAMS) + b"\xff"
    return bytes(header) + COOKIE + options, guid_at


def offer_xid(data: bytes) -> int | None:
    """The xid of a valid DHCPOFFER to one of our clients, else None."""
    if len(data) < 243 or data[0] != 2 or data[236:240] != COOKIE:
        return None
    if data[28:30] != MAC_PREFIX or data[30:34] != data[4:8]:
        return None
    i, n = 240, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= n:
            return None
        length = data[i + 1]
        if code == 53:
            if length == 1 and i + 2 < n and data[i + 2] == 2:
                return int.from_bytes(data[4:8], "big")
            return None
        i += 2 + length
    return None


def options(data: bytes) -> list[tuple[int, bytes]]:
    """All options of a reply in order (for the report's description of each server's offer)."""
    out, i, n = [], 240, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= n:
            break
        length = data[i + 1]
        out.append((code, bytes(data[i + 2:i + 2 + length])))
        i += 2 + length
    return out


def describe_offer(data: bytes) -> dict:
    opts = options(data)
    by_code = dict(opts)
    file = data[108:236].split(b"\0", 1)[0].decode("ascii", "replace")
    siaddr = ".".join(str(b) for b in data[20:24])
    return {"bytes": len(data), "options": [c for c, _ in opts],
            "vendor_class": by_code.get(60, b"").decode("ascii", "replace"),
            "server_id": ".".join(str(b) for b in by_code.get(54, b"")),
            "siaddr": siaddr, "file": file,
            "broadcast_flag": bool(data[10] & 0x80)}
