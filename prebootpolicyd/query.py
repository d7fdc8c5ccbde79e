"""What an iPXE query says (pure): HTTP query parameters -> MachineFacts, or a 400 reason.

Lenient with names, strict with values:

* a parameter name that is not a machine attribute is ignored (newer boot scripts may send more);
* a name given twice counts once, the FIRST time: boot.ipxe sends mac first, so a host name or
  SMBIOS string holding "&mac=..." (iPXE passes '&' through unencoded) cannot replace it;
* an empty value means "not reported" (iPXE expands a setting it does not have to nothing);
* mac is required; a value that is not what its attribute holds (a MAC address, a whole number
  of megabytes, an IP address), is longer than MAX_VALUE_CHARS, holds control characters or is not
  valid UTF-8 is a bad request, answered 400 with the one-line reason.

Also here: the HTTP authority (host[:port]) the client reached us by, from its Host header,
checked before it goes into a script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from common.machine import ATTRIBUTE_KINDS, AttributeKind, MachineFacts, facts_from_strings

MAX_VALUE_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAC_CHARS = re.compile(r"[0-9A-Fa-f:\-.]+")
_NUMBER = re.compile(r"[0-9]{1,9}")          # ASCII digits only: int() would take '٣' or '²'
_AUTHORITY = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?"   # name or IPv4
    r"|\[[0-9A-Fa-f:.]{2,45}\])"                                          # [IPv6]
    r"(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class BadQuery:
    reason: str                      # one line, for the 400 body and the log


def _show(value: str, limit: int = 40) -> str:
    """A value as it may appear in a one-line ASCII message."""
    shown = value[:limit].encode("unicode_escape").decode("ascii")   # \n, \x00, \xe9 ...
    return shown + ("..." if len(value) > limit else "")


def _check(name: str, raw: str) -> str | None:
    """Why a value is unacceptable before its attribute's own parsing, or None."""
    if len(raw) > MAX_VALUE_CHARS:
        return f"{name}: longer than {MAX_VALUE_CHARS} characters"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name}: '{_show(raw)}' is not valid UTF-8"
    if _CONTROL.search(raw):
        return f"{name}: '{_show(raw)}' holds control characters"
    text = raw.strip()
    if not text:
        return None
    kind = ATTRIBUTE_KINDS[name]
    if kind is AttributeKind.MAC and not _MAC_CHARS.fullmatch(text):
        return f"{name}: '{_show(text)}' is not a MAC address"
    if kind is AttributeKind.NUMBER and not _NUMBER.fullmatch(text):
        return f"{name}: '{_show(text)}' is not a whole number of megabytes"
    return None


def parse_query(items: Iterable[tuple[str, str]]) -> MachineFacts | BadQuery:
    """The facts a /policy query reports, or why it is a bad request. Never raises."""
    values: dict[str, str] = {}
    for name, raw in items:
        if name in ATTRIBUTE_KINDS and name not in values:
            values[name] = raw
    for name, raw in values.items():
        problem = _check(name, raw)
        if problem:
            return BadQuery(problem)
    if not values.get("mac", "").strip():
        return BadQuery("mac: required (the client's MAC address)")
    try:
        facts, problems = facts_from_strings(values)
    except (ValueError, TypeError) as exc:  # belt and braces: the checks above should catch it
        return BadQuery(f"cannot read the query: {_show(str(exc), 120)}")
    if problems:
        return BadQuery(_show(problems[0], 200))
    return facts


def authority(host_header: str | None, local_address: str, local_port: int) -> str:
    """host[:port] for URLs back to us: the Host header iPXE sent when it is a plain name or
    address, else the address and port the connection came in on."""
    if host_header and _AUTHORITY.fullmatch(host_header):
        return host_header
    if ":" in local_address:
        return f"[{local_address}]:{local_port}"
    return f"{local_address}:{local_port}"


def host_of(authority_text: str) -> str:
    """'10.0.0.1:8090' -> '10.0.0.1'; '[fd00::1]:8090' -> '[fd00::1]'; 'name' -> 'name'."""
    if authority_text.startswith("["):
        return authority_text[:authority_text.index("]") + 1]
    return authority_text.rsplit(":", 1)[0] if ":" in authority_text else authority_text


def port_of(authority_text: str, default: int) -> int:
    """'10.0.0.1:8090' -> 8090; '[fd00::1]:8090' -> 8090; 'name' -> default (the scheme's: a
    client leaves the port out of Host only when it is the scheme's default)."""
    tail = authority_text[authority_text.index("]") + 1:] if authority_text.startswith("[") \
        else authority_text
    _, colon, port = tail.rpartition(":")
    return int(port) if colon and port.isdigit() and int(port) <= 65535 else default
