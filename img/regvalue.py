"""Windows registry values as bytes (pure, no I/O): the encodings an offline SYSTEM hive holds
for the types img writes when it applies an identity (img/identity_windows.py), and their
decoding for reading them back.

| type | number | bytes |
|---|---|---|
| REG_SZ | 1 | UTF-16LE text, one NUL character (2 zero bytes) at the end |
| REG_DWORD | 4 | 4 bytes, little-endian |
| REG_MULTI_SZ | 7 | each string in UTF-16LE with its NUL, then one more NUL; an empty list is one NUL |

Decoding is lenient where Windows itself is (a REG_SZ without its NUL, stray data after the
list's end) and strict where the bytes cannot be a value (odd length, a DWORD not 4 bytes long):
BadRegValue names what is wrong.
"""

from __future__ import annotations

import struct

REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7

TYPE_NAMES = {REG_SZ: "REG_SZ", REG_EXPAND_SZ: "REG_EXPAND_SZ", REG_BINARY: "REG_BINARY",
              REG_DWORD: "REG_DWORD", REG_MULTI_SZ: "REG_MULTI_SZ"}

RegData = "str | int | list[str] | bytes"


class BadRegValue(ValueError):
    """Bytes that are not a value of the type they are said to be; the text says why."""


def encode_sz(text: str) -> bytes:
    if "\0" in text:
        raise BadRegValue("REG_SZ: text with a NUL character")
    return (text + "\0").encode("utf-16-le")


def encode_dword(number: int) -> bytes:
    if not 0 <= number <= 0xFFFFFFFF:
        raise BadRegValue(f"REG_DWORD: {number} is outside 0..4294967295")
    return struct.pack("<I", number)


def encode_multi_sz(texts: list[str] | tuple[str, ...]) -> bytes:
    for text in texts:
        if not text or "\0" in text:
            raise BadRegValue("REG_MULTI_SZ: an empty string or one with a NUL cannot be listed")
    return "".join(text + "\0" for text in texts).encode("utf-16-le") + b"\0\0"


def decode(kind: int, data: bytes) -> str | int | list[str] | bytes:
    """The value for people and tests: text, number, list of texts, or the bytes themselves
    for a type img does not write."""
    if kind in (REG_SZ, REG_EXPAND_SZ):
        return _utf16(data, TYPE_NAMES[kind]).split("\0", 1)[0]
    if kind == REG_DWORD:
        if len(data) != 4:
            raise BadRegValue(f"REG_DWORD: {len(data)} bytes, not 4")
        return struct.unpack("<I", data)[0]
    if kind == REG_MULTI_SZ:
        text = _utf16(data, "REG_MULTI_SZ")
        end = text.find("\0\0")
        body = text if end < 0 else text[:end + 1]
        return [part for part in body.split("\0") if part]
    return bytes(data)


def _utf16(data: bytes, what: str) -> str:
    if len(data) % 2:
        raise BadRegValue(f"{what}: {len(data)} bytes, not whole UTF-16 characters")
    try:
        return data.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise BadRegValue(f"{what}: not UTF-16LE text ({exc.reason})") from None
