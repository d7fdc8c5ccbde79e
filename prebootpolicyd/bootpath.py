"""Boot file requests, pure (text in, typed values out; no sockets, no file system):

    parse_path(raw)            the percent-encoded path after /boot/ -> the root-relative name
                               ("preboot/initrd") or a Refusal (HTTP status and a reason)
    parse_range(header, size, if_range, validators)
                               a Range header -> the ByteRange to send, None (send it all) or
                               UNSATISFIABLE (416)

The path rules are stricter than tftpd's (tftpd/paths.py), which must take what PXE ROMs send:
HTTP clients are iPXE, curl and browsers, which send clean '/'-separated paths, so anything else
is refused before the disk is touched: '..' and an absolute path (403: an attempt to leave the
root), a backslash, '.' or an empty component, a control character (NUL included), a broken
percent-encoding or a name that is not UTF-8 (400), a path over MAX_PATH characters (414).
Symlinks are checked where the file is opened (bootfiles.open_inside), not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PATH = 1024                 # characters of the decoded path
MAX_COMPONENT = 255             # characters of one component (NAME_MAX)
MAX_RANGE_DIGITS = 19           # a byte position: enough for any file, never a huge int


@dataclass(frozen=True)
class Refusal:
    status: int                  # the HTTP status to answer with
    reason: str                  # one line, for the answer and the log


def _percent_decode(raw: str) -> bytes | None:
    """RFC 3986 percent-decoding; None when a '%' is not followed by two hex digits."""
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
            continue
        out += char.encode("utf-8", "surrogatepass")
        i += 1
    return bytes(out)


def parse_path(raw: str) -> str | Refusal:
    """The root-relative name the client asked for (RAW: the path after the /boot/ prefix, as
    sent, percent-encoded), or why it is refused."""
    if len(raw) > 3 * MAX_PATH:          # every character percent-encoded
        return Refusal(414, "path too long")
    decoded = _percent_decode(raw)
    if decoded is None:
        return Refusal(400, "bad percent-encoding in path")
    try:
        name = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return Refusal(400, "path is not UTF-8")
    if len(name) > MAX_PATH:
        return Refusal(414, "path too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return Refusal(400, "control character in path")
    if not name:
        return Refusal(404, "no file named")
    if name.startswith("/"):
        return Refusal(403, "absolute path")
    if "\\" in name:
        return Refusal(400, "backslash in path (use /)")
    parts = name.split("/")
    if any(p == ".." for p in parts):
        return Refusal(403, "'..' in path")
    if any(p in ("", ".") for p in parts):
        return Refusal(400, "empty or '.' component in path")
    if any(len(p) > MAX_COMPONENT for p in parts):
        return Refusal(414, "path component too long")
    return name


@dataclass(frozen=True)
class ByteRange:
    start: int                   # first byte sent
    end: int                     # last byte sent (inclusive, as in Content-Range)

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class _Unsatisfiable:
    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE = _Unsatisfiable()
_RANGE = re.compile(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")


def parse_range(header: str | None, size: int, if_range: str | None = None,
                validators: tuple[str, ...] = ()) -> ByteRange | None | _Unsatisfiable:
    """What to send for a Range header (RFC 9110, 14.2) on a file of SIZE bytes: a ByteRange
    (206), None (the whole file, 200) or UNSATISFIABLE (416).

    One range only: a multi-range request, a unit other than bytes or a malformed header is
    ignored (the whole file goes, as the RFC allows). If-Range that matches none of VALIDATORS
    (the file's ETag and Last-Modified as sent) means the file changed: the whole file."""
    if header is None:
        return None
    if if_range is not None and if_range.strip() not in validators:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if len(first) > MAX_RANGE_DIGITS or len(last) > MAX_RANGE_DIGITS or not (first or last):
        return None
    if not first:                                   # bytes=-N: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None                                 # invalid: ignored
    if start >= size:
        return UNSATISFIABLE
    return ByteRange(start, min(end, size - 1))
