"""TFTP wire format: bytes in, typed packets out, and back (RFC 1350 section 5, RFC 2347).

Pure: no sockets, no clock, no file system, so it is unit-tested and fuzzed on its own.

Every packet is encoded and decoded here: requests (RRQ/WRQ) and OACK are NUL-terminated ASCII
strings (RFC 1350 section 5, RFC 2347 "Packet Formats"), DATA, ACK and ERROR fixed struct
layouts (the per-block hot path). tftpy decoded requests and OACKs before; it is now only the
tests' reference codec (tests/unit/tftpd/test_packet_reference.py; why: docs/packaging.md), and
this codec accepts and refuses what tftpy's did. Every decoding failure becomes one
`MalformedPacket` with a reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

# RFC 1350 section 5 error codes, plus RFC 2347's 8.
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTIONS = 8

MODES = ("octet", "netascii")
MAX_REQUEST_BYTES = 512 * 4  # RFC 2347 lets requests exceed 512 bytes; PXE ROMs stay far below

_HEADER = struct.Struct("!HH")


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed TFTP packet; str() says why."""


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ. `options` keys are lower-cased (RFC 2347: names are case-insensitive)."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def is_write(self) -> bool:
        return self.opcode == OP_WRQ


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class OptionAck:
    options: dict[str, str]


Packet = Request | Data | Ack | Error | OptionAck


def opcode_of(datagram: bytes) -> int | None:
    return int.from_bytes(datagram[:2], "big") if len(datagram) >= 2 else None


def decode(datagram: bytes) -> Packet:
    """Decode any TFTP packet or raise MalformedPacket."""
    opcode = opcode_of(datagram)
    if opcode is None:
        raise MalformedPacket(f"too short ({len(datagram)} bytes)")
    if opcode in (OP_RRQ, OP_WRQ):
        return decode_request(datagram)
    if opcode == OP_DATA:
        if len(datagram) < 4:
            raise MalformedPacket("DATA shorter than its header")
        return Data(int.from_bytes(datagram[2:4], "big"), bytes(datagram[4:]))
    if opcode == OP_ACK:
        if len(datagram) != 4:
            raise MalformedPacket(f"ACK of {len(datagram)} bytes, expected 4")
        return Ack(int.from_bytes(datagram[2:4], "big"))
    if opcode == OP_ERROR:
        return decode_error(datagram)
    if opcode == OP_OACK:
        return OptionAck(_decode_oack(datagram))
    raise MalformedPacket(f"unknown opcode {opcode}")


def decode_request(datagram: bytes) -> Request:
    """RRQ/WRQ: opcode | filename NUL | mode NUL | (option NUL value NUL)* (RFC 2347)."""
    if len(datagram) > MAX_REQUEST_BYTES:
        raise MalformedPacket(f"request of {len(datagram)} bytes is too long")
    if not datagram.endswith(b"\0"):
        raise MalformedPacket("request does not end with a NUL")
    strings = _strings(bytes(datagram[2:]), "bad request")
    if len(strings) < 2:
        raise MalformedPacket("bad request: no transfer mode")
    filename, mode = strings[0], strings[1].lower()   # RFC 1350: mode in any case
    if mode not in MODES:
        raise MalformedPacket(f"unsupported transfer mode {strings[1]!r}")
    if not filename:
        raise MalformedPacket("empty file name")
    return Request(int.from_bytes(datagram[:2], "big"), filename, mode,
                   _options(strings[2:], "bad request"))


def _strings(body: bytes, what: str) -> list[str]:
    """NUL-terminated ASCII strings (the last one must be terminated too)."""
    if not body.endswith(b"\0"):
        raise MalformedPacket(f"{what}: last string not NUL-terminated")
    try:
        return body[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what}: not ASCII") from None


def _options(strings: list[str], what: str) -> dict[str, str]:
    """Option name/value pairs; names lower-cased (RFC 2347: case-insensitive), a repeated
    name keeps its last value. An empty name or value is malformed (RFC 2347 gives none)."""
    if len(strings) % 2:
        raise MalformedPacket(f"{what}: option {strings[-1]!r} has no value")
    if any(not text for text in strings):
        raise MalformedPacket(f"{what}: empty option name or value")
    return {strings[i].lower(): strings[i + 1] for i in range(0, len(strings), 2)}


def decode_error(datagram: bytes) -> Error:
    if len(datagram) < 4:
        raise MalformedPacket("ERROR shorter than its header")
    code = int.from_bytes(datagram[2:4], "big")
    message = bytes(datagram[4:]).split(b"\0", 1)[0].decode("ascii", "replace")
    return Error(code, message)


def _decode_oack(datagram: bytes) -> dict[str, str]:
    """OACK: opcode | (option NUL value NUL)* (RFC 2347); none at all is accepted."""
    body = bytes(datagram[2:])
    if not body:
        return {}
    return _options(_strings(body, "bad OACK"), "bad OACK")


# ---- encoders ---------------------------------------------------------------------------------

def data_header(block: int) -> bytes:
    """The 4-byte DATA header; `block` is taken modulo 2**16 (block-number rollover)."""
    return _HEADER.pack(OP_DATA, block & 0xFFFF)


def encode_data(block: int, payload: bytes) -> bytes:
    return data_header(block) + payload


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(OP_ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    text = message.encode("ascii", "replace").replace(b"\0", b" ")[:500]
    return _HEADER.pack(OP_ERROR, code) + text + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    """OACK with the options in the order given (RFC 2347)."""
    body = b"".join(str(name).encode("ascii") + b"\0" + str(value).encode("ascii") + b"\0"
                    for name, value in options.items())
    return struct.pack("!H", OP_OACK) + body


def encode_request(opcode: int, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    """Build an RRQ/WRQ (tests and tools)."""
    parts = [filename.encode("ascii"), mode.encode("ascii")]
    for name, value in (options or {}).items():
        parts += [name.encode("ascii"), str(value).encode("ascii")]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)
