"""The imaging server's results log: a well-formed, crash-safe XML record of every imaging request.

The original's Zimglog.xml used the workstation DN as the element name and so was not well-formed
XML. Ours is a plain XML 1.0 document that is complete after every append and, after the recovery
that ``ResultsLog.open()`` runs, after a ``kill -9`` or power loss at any byte::

    <?xml version="1.0" encoding="UTF-8"?>
    <imaging-results version="1">
    <result timestamp="2026-11-26T18:00:00Z" when="Thu Nov 26 18:00:00 2026" workstation="..." .../>
    ...
    </imaging-results>

Design decisions (and why):

* **One entry = one line, attributes only.** Every field is an attribute of an empty ``<result/>``
  element; ``quoteattr`` turns newlines, carriage returns and tabs into character references, so an
  entry can never span lines. Recovery can then reason line by line: a torn append leaves at most
  one incomplete last line (plus a fragment of the old closing tag), and an entry is *complete*
  exactly when its whole line, newline included, is on disk. Attributes also round-trip ``\\r``
  and leading/trailing whitespace exactly, which element text would not without care.
* **Append = overwrite the closing tag.** Under a thread lock and an exclusive ``flock`` we check
  that the file ends in ``\\n</imaging-results>\\n``, ``pwrite`` ``entry + closing tag`` over the
  old closing tag in one call, and ``fdatasync``. When ``append`` returns, the entry is durable and
  the file is complete. A writer in another process that died mid-append is noticed by that tail
  check and repaired under the same lock before we write. A failed write (disk full) puts the old
  closing tag back and truncates, then re-raises the ``OSError``.
* **Recovery (``open()``) verifies the whole file with expat** (streaming, C speed). If it is not a
  complete document ending in our closing tag, the first parse error bounds the damage: we walk
  back over whole lines before it to the last complete entry (or to a closing-tag line, when junk
  was appended after the document), verify that the kept prefix plus a closing tag parses, write
  the closing tag there, truncate, ``fdatasync``, log a warning and return what was dropped in a
  ``RecoveryReport``. Recovery refuses (``CorruptLogError``) rather than truncate when intact
  entries lie after the damage (that is corruption in the middle, not a torn tail: truncating
  would lose entries that were reported written), and refuses (``NotAResultsLogError``) to touch a
  file that does not start with our header. An empty file, or one holding only a prefix of our
  header (a crash during creation), is initialised. ``open(on_corrupt="quarantine")`` renames a
  corrupt file aside (``PATH.corrupt-YYYYmmddTHHMMSSZ``) and starts a new log instead of raising.
* **Readers.** ``entries()`` takes a shared ``flock`` only long enough to snapshot the size: bytes
  before the closing tag never change afterwards (appends write at or after it; recovery only cuts
  a torn tail beyond it; rotation renames the inode we hold), so it streams that stable prefix
  with ``XMLPullParser`` and supplies the closing tag itself. It never modifies the file: on a torn
  file it reads what recovery would keep. A reader that takes no lock (``xmllint`` by hand) can, in
  the instant of a ``pwrite``, see the closing tag half overwritten: no append-only XML layout can
  avoid that short of rewriting the whole file per entry; take ``flock -s`` to be sure.
* **Rotation (optional, by size).** When an append would take the file past ``max_bytes`` (and it
  holds at least one entry), the current file (already complete) is renamed to ``PATH.1`` after
  shifting ``.1`` -> ``.2`` ... (the one past ``keep`` is deleted), and a new complete file is
  created. Every rotated file is a complete document. Other processes holding the old file notice
  the inode change after taking the lock and reopen ``PATH``.
* **Creation.** ``O_CREAT|O_EXCL`` then ``fchmod(0640)``; the header is written under the
  exclusive lock, and only if the file is still empty, so concurrent creators cannot interleave.
* **Values.** Any Python string is accepted in any text field: characters XML 1.0 forbids (C0
  controls other than tab/LF/CR, lone surrogates, U+FFFE, U+FFFF) become U+FFFD when the entry is
  constructed, so ``entry == ResultEntry.from_element(entry.to_element())`` always holds. Timestamps
  are UTC, whole seconds: ISO 8601 (``timestamp``) plus the original's human form (``when``, fixed
  English names, day zero-padded: ``Thu Nov 06 08:00:00 2026``). A naive datetime is taken as UTC.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree as ET
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

from common.fileio import fsync_parent

__all__ = [
    "CorruptLogError", "ImageType", "NotAResultsLogError", "Operation", "RecoveryReport",
    "ResultEntry", "ResultsLog", "ResultsLogError", "Status", "read_entries", "sanitize",
    "tail_entries",
]

log = logging.getLogger("imgsrvd.resultslog")

FORMAT_VERSION = "1"
ROOT_TAG = "imaging-results"
ENTRY_TAG = "result"
XML_DECL = b'<?xml version="1.0" encoding="UTF-8"?>\n'
ROOT_LINE = b'<imaging-results version="1">\n'
HEADER = XML_DECL + ROOT_LINE
CLOSE = b"</imaging-results>\n"
EMPTY_LOG = HEADER + CLOSE
FILE_MODE = 0o640
_CHUNK = 1 << 20
_MAX_VERIFY_ATTEMPTS = 8


class Operation(StrEnum):
    UPLOAD = "upload"      # store a client's image on the server
    DOWNLOAD = "download"  # put an image down on the client
    LOG = "log"            # an operation serviced elsewhere, only logged here


class ImageType(StrEnum):
    BASE = "base"
    ADDON = "addon"


class Status(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    REFERRED = "referred"
    ASSIGNED = "assigned"   # a work query answered: the work given; its own entries follow


class ResultsLogError(Exception):
    """Base class of the results log's own errors (I/O errors stay OSError)."""


class NotAResultsLogError(ResultsLogError):
    """The file exists but is not a results log we wrote; we refuse to modify it."""


class CorruptLogError(ResultsLogError):
    """The file is damaged other than at its tail; truncating would lose intact entries."""


# --- values --------------------------------------------------------------------------------------

_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def sanitize(value: str) -> str:
    """Replace every character XML 1.0 cannot carry with U+FFFD."""
    return _FORBIDDEN.sub("\ufffd", value)


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _iso(ts: datetime) -> str:
    return (f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d}"
            f"T{ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}Z")


def _human(ts: datetime) -> str:
    """The original's form, e.g. ``Thu Nov 26 18:00:00 2026`` (locale-independent)."""
    return (f"{_WEEKDAYS[ts.weekday()]} {_MONTHS[ts.month - 1]} {ts.day:02d} "
            f"{ts.hour:02d}:{ts.minute:02d}:{ts.second:02d} {ts.year:04d}")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


_TEXT_FIELDS = ("workstation", "tree", "operation", "image_type", "image_path", "status",
                "error_message", "requesting_address", "server", "session", "image_digest",
                "transfer", "identity")
# Whole numbers, when present (a multicast receiver's: docs/multicast.md, "Results").
_COUNT_FIELDS = ("bytes", "chunks_verified", "bytes_written")
# Attribute order on disk: the time first, as the original did, then who/what/result.
_ATTR_ORDER = ("workstation", "tree", "operation", "image_type", "image_path", "status",
               "error_message", "requesting_address", "server", "bytes", "duration_s",
               "session", "transfer", "image_digest", "chunks_verified", "bytes_written",
               "identity")
_REQUIRED = ("workstation", "operation", "status", "timestamp")


@dataclass(frozen=True)
class ResultEntry:
    """One imaging request: who asked, what, with which image, and how it ended.

    Text fields accept any value (``str()`` is applied) and are sanitised for XML on construction.
    ``operation``/``image_type``/``status`` take the ``Operation``/``ImageType``/``Status`` values
    but, since a log must never refuse a record, any string is kept as given.
    """

    workstation: str
    operation: str
    status: str
    tree: str | None = None
    image_type: str | None = None
    image_path: str | None = None
    error_message: str | None = None
    requesting_address: str | None = None
    server: str | None = None
    bytes: int | None = None
    duration_s: float | None = None
    timestamp: datetime = field(default_factory=_now)
    # a multicast receiver's: its session, the path it took (multicast, multicast+unicast,
    # failed), the image digest it restored (hex), chunks verified and bytes written
    session: str | None = None
    transfer: str | None = None
    image_digest: str | None = None
    chunks_verified: int | None = None
    bytes_written: int | None = None
    # the identity the engine applied to the restored system (MachineIdentity.describe())
    identity: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if type(value) is not str:
                if value is None:
                    if name in _REQUIRED:
                        raise ValueError(f"results log entry: {name} is required")
                    continue
                value = value.value if isinstance(value, StrEnum) else str(value)
                set_(self, name, value)
            if _FORBIDDEN.search(value) is not None:
                set_(self, name, sanitize(value))
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"results log entry: {name} must be an int or None")
            if value < 0:
                raise ValueError(f"results log entry: {name} must not be negative")
        if self.duration_s is not None:
            if isinstance(self.duration_s, bool) or not isinstance(self.duration_s, (int, float)):
                raise TypeError("results log entry: duration_s must be a number or None")
            object.__setattr__(self, "duration_s", float(self.duration_s))
        ts = self.timestamp
        if not isinstance(ts, datetime):
            raise TypeError("results log entry: timestamp must be a datetime")
        if ts.tzinfo is not timezone.utc or ts.microsecond:
            ts = (ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None
                  else ts.astimezone(timezone.utc))
            set_(self, "timestamp", ts.replace(microsecond=0))

    # -- XML ------------------------------------------------------------------------------------

    def attributes(self) -> dict[str, str]:
        """The attributes written for this entry, in file order (``None`` fields are omitted)."""
        attrs = {"timestamp": _iso(self.timestamp), "when": _human(self.timestamp)}
        for name in _ATTR_ORDER:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "duration_s":
                attrs[name] = repr(value)
            else:
                attrs[name] = str(value)
        return attrs

    def to_element(self) -> ET.Element:
        return ET.Element(ENTRY_TAG, self.attributes())

    def to_line(self) -> bytes:
        """The entry as one line of the log file, newline included."""
        body = " ".join(f"{name}={quoteattr(value)}" for name, value in self.attributes().items())
        return f"<{ENTRY_TAG} {body}/>\n".encode("utf-8")

    @classmethod
    def from_element(cls, element: ET.Element) -> ResultEntry:
        if element.tag != ENTRY_TAG:
            raise ValueError(f"not a results log entry: <{element.tag}>")
        a = element.attrib
        missing = [name for name in _REQUIRED if name not in a]
        if missing:
            raise ValueError(f"results log entry lacks {', '.join(missing)}")
        try:
            timestamp = datetime.fromisoformat(a["timestamp"])
            counts = {name: int(a[name]) if name in a else None for name in _COUNT_FIELDS}
            duration = float(a["duration_s"]) if "duration_s" in a else None
        except ValueError as exc:
            raise ValueError(f"results log entry: bad value: {exc}") from None
        kwargs: dict[str, Any] = {name: a.get(name) for name in _TEXT_FIELDS}
        return cls(**kwargs, **counts, duration_s=duration, timestamp=timestamp)

    def summary(self) -> str:
        """One human line for the daemon log."""
        parts = [_human(self.timestamp), self.workstation, self.operation]
        if self.image_type is not None:
            parts.append(self.image_type)
        if self.image_path is not None:
            parts.append(self.image_path)
        parts.append(self.status)
        if self.error_message:
            parts.append(f"({self.error_message})")
        return " ".join(parts).replace("\n", "\\n").replace("\r", "\\r")


# --- file-level helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryReport:
    """What ``open()`` found and did."""

    path: str
    entries: int            # entries in the file after recovery
    created: bool = False   # the file did not exist and was created
    repaired: bool = False  # the file was modified to make it well-formed again
    dropped_bytes: int = 0  # bytes discarded (torn entry, junk after the document)
    quarantined_to: str | None = None  # on_corrupt="quarantine": where the damaged file went


@dataclass(frozen=True)
class _Plan:
    body_end: int       # keep [0, body_end), then write CLOSE there and truncate after it
    dropped_bytes: int
    reinit: bool = False
    entries: int = 0    # entries kept


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _Checker:
    """Streaming expat check that a byte stream is a complete well-formed document.

    Callers have already checked our header bytes, so the root is ours. No element handlers are
    set (expat then builds no attribute dicts: several times faster); entries are counted as
    ``\n<result`` line starts, which is exact for the files we write (one entry per line, no raw
    newline or ``<`` inside an entry).
    """

    _MARK = b"\n<" + ENTRY_TAG.encode()

    def __init__(self) -> None:
        self.parser = expat.ParserCreate()
        self.entries = 0
        self._carry = b""

    def run(self, chunks: Iterator[bytes | memoryview]) -> int | None:
        """None when the stream is a complete well-formed document, else the error byte index."""
        mark = self._MARK
        try:
            for chunk in chunks:
                data = bytes(chunk)
                joined = self._carry + data
                self.entries += joined.count(mark)
                self._carry = joined[-(len(mark) - 1):]
                self.parser.Parse(data, False)
            self.parser.Parse(b"", True)
        except expat.ExpatError:
            return self.parser.ErrorByteIndex
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator over an mmap must let go of its views before the unmap
        return None


def _fd_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not chunk:
            return
        yield chunk
        pos += len(chunk)


def _buf_chunks(buf: Any, end: int, tail: bytes = b"") -> Iterator[memoryview | bytes]:
    view = memoryview(buf)
    for pos in range(0, end, _CHUNK):
        yield view[pos:min(end, pos + _CHUNK)]
    if tail:
        yield tail


def _is_entry_line(line: bytes) -> bool:
    """A complete, standalone ``<result .../>`` (or ``<result>...</result>``) line."""
    if not line.startswith(b"<" + ENTRY_TAG.encode()) or not line.endswith(b"\n"):
        return False
    stripped = line.rstrip()
    if not (stripped.endswith(b"/>") or stripped.endswith(b"</result>")):
        return False
    try:
        return ET.fromstring(stripped).tag == ENTRY_TAG
    except ET.ParseError:
        return False


def _describe_foreign(head: bytes) -> str:
    match = re.search(rb"<([A-Za-z_][^\s/>]*)([^>]*)>", re.sub(rb"<\?.*?\?>|<!--.*?-->", b"", head,
                                                            flags=re.S))
    if match is None:
        return "it does not start with the results log header"
    root = match.group(1).decode("utf-8", "replace")
    if root == ROOT_TAG:
        return f"it starts with <{root}{match.group(2).decode('utf-8', 'replace')}>, not the " \
               f"header this version writes (format version {FORMAT_VERSION})"
    return f"its root element is <{root}>, not <{ROOT_TAG}>"


def _plan_recovery(fd: int, path: str) -> _Plan | None:
    """Decide how to make the file complete again; None when it already is. Never writes."""
    return _inspect(fd, path)[0]


def _inspect(fd: int, path: str) -> tuple[_Plan | None, int]:
    """(the recovery plan or None, the number of entries the file holds after it)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return _Plan(0, 0, reinit=True), 0
    head = _pread_all(fd, min(size, len(HEADER)), 0)
    if size <= len(HEADER) and HEADER.startswith(head):
        return _Plan(0, 0, reinit=True), 0  # crashed while writing the header: nothing lost
    if not head.startswith(HEADER):
        raise NotAResultsLogError(
            f"{path}: not an imaging results log ({_describe_foreign(_pread_all(fd, 4096, 0))}); "
            "refusing to modify it: move it away or configure another ResultsLog path")
    checker = _Checker()
    error = checker.run(_fd_chunks(fd, 0, size))
    if error is None and size >= len(EMPTY_LOG) \
            and _pread_all(fd, len(CLOSE) + 1, size - len(CLOSE) - 1) == b"\n" + CLOSE:
        return None, checker.entries
    limit = size if error is None or error < 0 else min(error, size)
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        plan = _plan_in(mm, size, limit, path)
    return plan, plan.entries


def _plan_in(mm: mmap.mmap, size: int, limit: int, path: str) -> _Plan:
    attempts = 0
    end = mm.rfind(b"\n", 0, limit) + 1  # the last line boundary at or before the first error
    while end >= len(HEADER):
        start = mm.rfind(b"\n", 0, end - 1) + 1
        line = mm[start:end]
        if line == CLOSE:
            body_end, after_document = start, True
        elif end == len(HEADER) or _is_entry_line(line):
            body_end, after_document = end, False
        else:
            end = start
            continue
        checker = _Checker()
        if checker.run(_buf_chunks(mm, body_end, CLOSE)) is None:
            if not after_document:
                _refuse_if_intact_entries_follow(mm, body_end, size, path)
            dropped = size - body_end
            if mm[body_end:body_end + len(CLOSE)] == CLOSE:
                dropped -= len(CLOSE)
            return _Plan(body_end, dropped, entries=checker.entries)
        attempts += 1
        if attempts >= _MAX_VERIFY_ATTEMPTS:
            break
        end = start
    raise CorruptLogError(f"{path}: results log is damaged and no intact prefix could be found; "
                          "refusing to truncate it: move it away to start a new log")


def _refuse_if_intact_entries_follow(mm: mmap.mmap, pos: int, size: int, path: str) -> None:
    """A torn append damages only the last line: intact entries after the damage mean corruption."""
    damaged_at = pos
    while pos < size:
        nl = mm.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        line = mm[pos:end]
        if line == CLOSE:
            return  # what follows is outside the document
        if _is_entry_line(line):
            raise CorruptLogError(
                f"{path}: results log is damaged at byte {damaged_at} but intact entries follow "
                f"(byte {pos}); refusing to truncate them: repair the file by hand or move it away")
        pos = end


def _open_or_create(path: str) -> tuple[int, bool]:
    """Open PATH read-write, creating it (mode 0640, O_EXCL) if missing. Returns (fd, created)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            try:
                return os.open(path, flags), False
            except FileNotFoundError:
                continue  # rotated away between the two calls
        try:
            os.fchmod(fd, FILE_MODE)  # not narrowed (nor widened) by the umask
        except OSError:
            pass
        return fd, True


def _apply(fd: int, plan: _Plan) -> None:
    if plan.reinit:
        _pwrite_all(fd, EMPTY_LOG, 0)
        os.ftruncate(fd, len(EMPTY_LOG))
    else:
        _pwrite_all(fd, CLOSE, plan.body_end)
        os.ftruncate(fd, plan.body_end + len(CLOSE))
    os.fdatasync(fd)


# --- the log -------------------------------------------------------------------------------------


class ResultsLog:
    """An append-only, crash-safe XML results log. ``open()`` it, ``append()``, ``close()``.

    Thread-safe; several processes may append to the same file (an exclusive ``flock`` is held
    while appending).
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 0, keep: int = 5) -> None:
        if max_bytes < 0 or keep < 0:
            raise ValueError("max_bytes and keep must not be negative")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._fd: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, on_corrupt: str = "raise") -> RecoveryReport:
        """Open (creating if needed) and recover the file.

        ``on_corrupt``: "raise" (``CorruptLogError``) or "quarantine" (move it aside, start anew).
        """
        if on_corrupt not in ("raise", "quarantine"):
            raise ValueError("on_corrupt must be 'raise' or 'quarantine'")
        with self._lock:
            if self._fd is not None:
                raise ResultsLogError(f"{self.path}: results log is already open")
            fd, created = _open_or_create(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    report = self._recover_locked(fd, created)
                except CorruptLogError as exc:
                    if on_corrupt != "quarantine":
                        raise
                    fd, report = self._quarantine_locked(fd, exc)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            if created or report.quarantined_to:
                fsync_parent(self.path)
            self._fd = fd
            return report

    def _recover_locked(self, fd: int, created: bool) -> RecoveryReport:
        plan, entries = _inspect(fd, self.path)
        if plan is not None:
            _apply(fd, plan)
            if plan.dropped_bytes or not (created or plan.reinit):
                log.warning("%s: results log recovered: dropped %d byte(s) of torn or trailing "
                            "data; the file is well-formed again", self.path, plan.dropped_bytes)
        return RecoveryReport(
            path=self.path, entries=entries, created=created,
            repaired=plan is not None and not created,
            dropped_bytes=plan.dropped_bytes if plan else 0)

    def _quarantine_locked(self, fd: int, exc: CorruptLogError) -> tuple[int, RecoveryReport]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = f"{self.path}.corrupt-{stamp}-{n}"
        os.rename(self.path, aside)
        log.error("%s; moved it to %s and started a new results log", exc, aside)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        fd, created = _open_or_create(self.path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = self._recover_locked(fd, created)
        return fd, RecoveryReport(path=self.path, entries=report.entries, created=True,
                                  quarantined_to=aside)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ResultsLog:
        if self._fd is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    # -- appending ------------------------------------------------------------------------------

    def append(self, entry: ResultEntry) -> None:
        """Write one entry durably; the file is complete when this returns. OSError on I/O errors
        (disk full: the file is left as it was)."""
        line = entry.to_line()
        with self._lock:
            if self._fd is None:
                raise ResultsLogError(f"{self.path}: results log is not open")
            fd = self._lock_current()
            try:
                size = self._ensure_complete(fd)
                if self.max_bytes and size + len(line) > self.max_bytes \
                        and size > len(EMPTY_LOG):
                    fd = self._rotate_locked(fd)
                    size = os.fstat(fd).st_size
                offset = size - len(CLOSE)
                try:
                    _pwrite_all(fd, line + CLOSE, offset)
                except OSError:
                    self._restore(fd, offset, size)
                    raise
                os.fdatasync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_current(self) -> int:
        """flock our fd; if PATH is now another file (rotated or removed elsewhere), use that."""
        assert self._fd is not None
        while True:
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                pst = os.stat(self.path)
                same = (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)
            new_fd, created = _open_or_create(self.path)
            os.close(fd)
            self._fd = new_fd
            if created:
                fsync_parent(self.path)

    def _ensure_complete(self, fd: int) -> int:
        """With the lock held: repair a tail torn by a writer that died; return the size."""
        size = os.fstat(fd).st_size
        if size >= len(EMPTY_LOG) and \
                _pread_all(fd, len(CLOSE) + 1, size - len(CLOSE) - 1) == b"\n" + CLOSE:
            return size
        plan = _plan_recovery(fd, self.path)
        if plan is not None:
            _apply(fd, plan)
            if plan.dropped_bytes and not plan.reinit:
                log.warning("%s: results log recovered before appending: dropped %d byte(s) of "
                            "torn data", self.path, plan.dropped_bytes)
        return os.fstat(fd).st_size

    @staticmethod
    def _restore(fd: int, offset: int, size: int) -> None:
        try:
            _pwrite_all(fd, CLOSE, offset)  # rewrites blocks that were already allocated
            os.ftruncate(fd, size)
            os.fdatasync(fd)
        except OSError as exc:  # the next append or open() repairs the tail
            log.error("results log: could not restore the closing tag after a failed write: %s",
                      exc)

    def _rotate_locked(self, fd: int) -> int:
        """The current file is complete: shift PATH -> PATH.1 ... and start a new file."""
        if self.keep == 0:
            os.unlink(self.path)
        else:
            oldest = f"{self.path}.{self.keep}"
            try:
                os.unlink(oldest)
            except FileNotFoundError:
                pass
            for n in range(self.keep - 1, 0, -1):
                try:
                    os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
                except FileNotFoundError:
                    pass
            os.rename(self.path, f"{self.path}.1")
        new_fd, _created = _open_or_create(self.path)
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX)
            self._ensure_complete(new_fd)  # initialises it unless another process already did
        except BaseException:
            os.close(new_fd)
            raise
        fsync_parent(self.path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = new_fd
        log.info("%s: results log rotated (keeping %d old file(s))", self.path, self.keep)
        return new_fd

    # -- reading --------------------------------------------------------------------------------

    def entries(self) -> Iterator[ResultEntry]:
        """The entries, oldest first, as of the moment of the call. Never modifies the file."""
        return read_entries(self.path)

    def rotated_paths(self) -> list[str]:
        """Existing rotated files, newest first."""
        return [p for p in (f"{self.path}.{n}" for n in range(1, self.keep + 1))
                if os.path.exists(p)]


def read_entries(path: str | os.PathLike[str]) -> Iterator[ResultEntry]:
    """Iterate the entries of a results log file (current or rotated) without modifying it."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(fd).st_size
            if size >= len(EMPTY_LOG) and _pread_all(fd, len(HEADER), 0) == HEADER and \
                    _pread_all(fd, len(CLOSE) + 1, size - len(CLOSE) - 1) == b"\n" + CLOSE:
                body_end = size - len(CLOSE)
            else:  # torn by a writer that died: read what recovery would keep
                plan = _plan_recovery(fd, path)
                if plan is None:
                    body_end = size - len(CLOSE)
                elif plan.reinit:
                    body_end = 0  # empty, or only part of the header: no entries
                else:
                    body_end = plan.body_end
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BaseException:
        os.close(fd)
        raise
    return _iter_entries(fd, body_end)


def tail_entries(path: str | os.PathLike[str], count: int,
                 tail_bytes: int = 1 << 20) -> list[ResultEntry]:
    """The last COUNT complete entries of the results log at PATH, oldest first, reading at most
    its last TAIL_BYTES (a bounded cost whatever the log's size, for the status page). One entry
    is one line (see above): each line is parsed on its own, so a line torn by a writer that
    died, or cut by the window, is skipped. Never modifies the file; OSError when it cannot be
    read."""
    if count <= 0:
        return []
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)      # a stable size: not in the middle of an append
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - tail_bytes)
            data = _pread_all(fd, size - start, start)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]                   # the first line may be cut by the window
    found: list[ResultEntry] = []
    for line in reversed(lines):
        line = line.strip()
        if not line.startswith(b"<" + ENTRY_TAG.encode() + b" ") or not line.endswith(b"/>"):
            continue
        try:
            found.append(ResultEntry.from_element(ET.fromstring(line)))
        except (ET.ParseError, ValueError, TypeError):
            continue
        if len(found) >= count:
            break
    found.reverse()
    return found


def _iter_entries(fd: int, body_end: int) -> Iterator[ResultEntry]:
    try:
        if body_end == 0:
            return
        parser = ET.XMLPullParser(events=("start", "end"))
        depth = 0
        root: ET.Element | None = None
        for chunk in _chain(_fd_chunks(fd, 0, body_end), CLOSE):
            parser.feed(chunk)
            for event, elem in parser.read_events():
                if event == "start":
                    if root is None:
                        root = elem
                    depth += 1
                    continue
                depth -= 1
                if depth == 1 and elem.tag == ENTRY_TAG:
                    yield ResultEntry.from_element(elem)
                    assert root is not None
                    root.clear()
        parser.close()
    finally:
        os.close(fd)


def _chain(chunks: Iterator[bytes], last: bytes) -> Iterator[bytes]:
    yield from chunks
    yield last
