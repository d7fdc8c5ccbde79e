"""zmgmcast -log [N]: the last N entries of the imaging server's results log, one line each.

The results log (imgsrvd/resultslog.py, docs/config-imgsrvd.md) is an XML document with one
`<result .../>` element per line, attributes only. zmgmcast may not import imgsrvd
(common/__init__.py), so it reads the file's tail itself: at most TAIL_BYTES from the end, each
complete entry line parsed on its own (a line torn by a writer that died is skipped, as the
server's recovery would drop it). Nothing is written. Every field a client reported is printed
with its control characters escaped (common.daemon.logsetup.escape_control): a workstation
name or an error message cannot put a newline or an escape sequence on the terminal.
"""

from __future__ import annotations

import os
from typing import Iterator
from xml.etree import ElementTree as ET

from common.daemon.logsetup import escape_control

# imgsrvd's default ResultsLog (tests/unit/zmgmcast/test_results.py keeps them equal).
DEFAULT_RESULTS_LOG = "/var/log/preboot/imgsrvd-results.xml"
DEFAULT_ENTRIES = 20
MAX_ENTRIES = 10000
TAIL_BYTES = 4 << 20          # entries are a few hundred bytes: thousands of them
MAX_FIELD_CHARS = 200
ENTRY_PREFIX = b"<result "


def tail_entries(path: str, count: int, tail_bytes: int = TAIL_BYTES) -> list[dict[str, str]]:
    """The attributes of the last COUNT complete entries of the results log at PATH, oldest
    first. OSError when the file cannot be read."""
    if count <= 0:
        return []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = max(0, size - tail_bytes)
        handle.seek(start)
        data = handle.read(tail_bytes)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]                  # the first line may be cut by the window
    entries: list[dict[str, str]] = []
    for line in reversed(lines):
        entry = _parse(line)
        if entry is not None:
            entries.append(entry)
            if len(entries) >= count:
                break
    entries.reverse()
    return entries


def _parse(line: bytes) -> dict[str, str] | None:
    line = line.strip()
    if not line.startswith(ENTRY_PREFIX) or not line.endswith(b"/>") or b"<!" in line:
        return None
    try:
        element = ET.fromstring(line)
    except ET.ParseError:
        return None
    return dict(element.attrib)


def _field(value: str) -> str:
    value = value if len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS] + "..."
    return escape_control(value)


def format_entry(entry: dict[str, str]) -> str:
    """One line: when, workstation, operation, [image type], [image], status, [(error)],
    [from ADDRESS], [session S]."""
    parts = [entry.get("timestamp", "?"), entry.get("workstation", "?"),
             entry.get("operation", "?")]
    for name in ("image_type", "image_path"):
        if entry.get(name):
            parts.append(entry[name])
    parts.append(entry.get("status", "?"))
    if entry.get("error_message"):
        parts.append(f"({entry['error_message']})")
    if entry.get("requesting_address"):
        parts.append(f"from {entry['requesting_address']}")
    if entry.get("session"):
        parts.append(f"session {entry['session']}")
    return " ".join(_field(part) for part in parts)


def format_entries(entries: list[dict[str, str]]) -> Iterator[str]:
    for entry in entries:
        yield format_entry(entry)
