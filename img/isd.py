"""The image-safe data record: the codec (bytes in, a typed value out; no I/O, no clock).

A machine's identity (common.identity.MachineIdentity) is kept on its disk in one small
record that base-image restores leave alone (docs/image-format.md, "Image-safe data", says
where and why; img/isdstore.py reads and writes it there). Layout, little-endian:

    offset size  field
    0      8     magic 89 50 42 49 53 44 0D 0A  ("\\x89PBISD\\r\\n")
    8      2     version, 1
    10     2     flags, 0 (reserved)
    12     4     payload length L (1 .. MAX_PAYLOAD)
    16     32    SHA-256 of bytes 0..15 followed by the payload
    48     L     payload: a UTF-8 JSON object
                 {"identity": <common.identity.identity_to_wire>, "written": "...Z", "tool": "..."}

The rest of the slot (SLOT_BYTES) is zeros. The checksum covers the header's fields, so a
damaged version or length is caught as surely as a damaged payload. Unknown payload fields are
ignored (later additions within version 1); the identity itself is strict, as everywhere.
Every malformed record raises BadRecord (one line, naming what is wrong), never anything else.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from common.identity import (BadIdentity, MachineIdentity, identity_from_wire,
                             identity_to_wire)

from .errors import IsdError

MAGIC = b"\x89PBISD\r\n"
VERSION = 1
SLOT_BYTES = 4096                  # one 4 KiB sector, or eight 512-byte ones
HEADER = struct.Struct("<8sHHI32s")
HEADER_BYTES = HEADER.size         # 48
MAX_PAYLOAD = SLOT_BYTES - HEADER_BYTES


class BadRecord(IsdError):
    """Bytes that are not a well-formed image-safe data record; the text says what is wrong."""


@dataclass(frozen=True)
class IsdRecord:
    """A decoded record: the identity, when it was written (UTC, ISO 8601 "...Z") and by what."""

    identity: MachineIdentity
    written: str = ""
    tool: str = ""


def has_magic(data: bytes) -> bool:
    """Whether data starts like a record (a record, possibly damaged, is there)."""
    return data[:len(MAGIC)] == MAGIC


def encode(record: IsdRecord) -> bytes:
    """The record as SLOT_BYTES bytes (zero padded). BadRecord when the payload is too large
    (an identity is a few hundred bytes; the limit is 4048)."""
    payload = json.dumps({"identity": identity_to_wire(record.identity),
                          "written": record.written, "tool": record.tool},
                         separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(payload) > MAX_PAYLOAD:
        raise BadRecord(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD} fit")
    fields = struct.pack("<8sHHI", MAGIC, VERSION, 0, len(payload))
    digest = hashlib.sha256(fields + payload).digest()
    return (fields + digest + payload).ljust(SLOT_BYTES, b"\0")


def decode(data: bytes) -> IsdRecord:
    """A record from the start of data (a slot's bytes, trailing zeros allowed)."""
    if len(data) < HEADER_BYTES:
        raise BadRecord(f"{len(data)} bytes; a record has a {HEADER_BYTES}-byte header")
    magic, version, flags, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadRecord(f"magic {magic.hex()}, expected {MAGIC.hex()}")
    if version != VERSION:
        raise BadRecord(f"version {version}; this img reads version {VERSION}")
    if flags != 0:
        raise BadRecord(f"flags {flags:#06x}; version {VERSION} has none")
    if not 1 <= length <= MAX_PAYLOAD or HEADER_BYTES + length > len(data):
        raise BadRecord(f"payload length {length} out of range (1 to "
                        f"{min(MAX_PAYLOAD, len(data) - HEADER_BYTES)})")
    payload = bytes(data[HEADER_BYTES:HEADER_BYTES + length])
    if hashlib.sha256(bytes(data[:16]) + payload).digest() != digest:
        raise BadRecord("SHA-256 checksum mismatch (the record is damaged)")
    return _from_payload(payload)


def _from_payload(payload: bytes) -> IsdRecord:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRecord("payload is not a JSON object")
    if "identity" not in value:
        raise BadRecord("payload has no identity")
    try:
        identity = identity_from_wire(value["identity"])
    except BadIdentity as exc:
        raise BadRecord(f"identity: {exc}") from None
    written, tool = value.get("written", ""), value.get("tool", "")
    if not isinstance(written, str) or not isinstance(tool, str):
        raise BadRecord("payload: written and tool must be strings")
    return IsdRecord(identity, written, tool)


def new_record(identity: MachineIdentity, now: datetime.datetime, tool: str) -> IsdRecord:
    """A record written at `now` (the caller reads the clock)."""
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return IsdRecord(identity, stamp, tool)


def describe(record: IsdRecord) -> dict[str, Any]:
    """The record for people and JSON output."""
    return {"identity": identity_to_wire(record.identity), "written": record.written,
            "tool": record.tool}
