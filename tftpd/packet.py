"""TFTP wire format: bytes in, typed packets out, and back (RFC 1350 section 5, RFC 2347).

Pure: no sockets, no clock, no file system, so it is unit-tested and fuzzed on its own.

Request packets (RRQ/WRQ) and OACK go through tftpy's packet factory and types, which are a
correct, well-used codec for these rare packets. DATA, ACK and ERROR are the per-block hot path
(tens of thousands per second per transfer) and tftpy's versions log on every call and cannot
carry an error message, so those are encoded and decoded here with fixed struct layouts.
Every decoding failure, whatever library raised it, becomes one `MalformedPacket` with a reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketOACK

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
_FACTORY = TftpPacketFactory()


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
    if len(datagram) > MAX_REQUEST_BYTES:
        raise MalformedPacket(f"request of {len(datagram)} bytes is too long")
    if not datagram.endswith(b"\0"):
        raise MalformedPacket("request does not end with a NUL")
    try:
        parsed = _FACTORY.parse(bytes(datagram))
    except Exception as exc:  # tftpy raises TftpException, struct.error, UnicodeDecodeError...
        raise MalformedPacket(f"bad request: {exc}") from None
    mode = parsed.mode.lower()
    if mode not in MODES:
        raise MalformedPacket(f"unsupported transfer mode {parsed.mode!r}")
    if not parsed.filename:
        raise MalformedPacket("empty file name")
    options = {str(k).lower(): str(v) for k, v in parsed.options.items()}
    return Request(parsed.opcode, parsed.filename, mode, options)


def decode_error(datagram: bytes) -> Error:
    if len(datagram) < 4:
        raise MalformedPacket("ERROR shorter than its header")
    code = int.from_bytes(datagram[2:4], "big")
    message = bytes(datagram[4:]).split(b"\0", 1)[0].decode("ascii", "replace")
    return Error(code, message)


def _decode_oack(datagram: bytes) -> dict[str, str]:
    try:
        packet = TftpPacketOACK()
        packet.buffer = bytes(datagram)
        packet.decode()
    except Exception as exc:
        raise MalformedPacket(f"bad OACK: {exc}") from None
    return {str(k).lower(): str(v) for k, v in packet.options.items()}


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
    packet = TftpPacketOACK()
    packet.options = options
    return packet.encode().buffer


def encode_request(opcode: int, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    """Build an RRQ/WRQ (tests and tools; tftpy's encoder knows only octet mode)."""
    parts = [filename.encode("ascii"), mode.encode("ascii")]
    for name, value in (options or {}).items():
        parts += [name.encode("ascii"), str(value).encode("ascii")]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)
