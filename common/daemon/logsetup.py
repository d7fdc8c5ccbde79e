"""Logging for every daemon: journald (plain lines on stderr), syslog, or a file.

Under journald (JOURNAL_STREAM is set) lines carry no timestamp or hostname, since the journal
adds them; a file gets full timestamps; syslog gets the daemon name as ident.

Every handler formats with SafeFormatter: control characters in a message (most of them come
from clients: result fields, MACs, paths, user agents, TFTP file names) are escaped, so a
newline a client sent cannot start a forged line; a traceback keeps its lines, each marked as
a continuation of its record (CONTINUATION) and escaped the same way, since an exception's
message can quote a client too. escape_control() is the same escaping for
anything else that prints text a remote chose (zmgmcast).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys

ROOT_LOGGER = "preboot"

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators: everything a
# terminal, syslog or a log reader may take as a line break or an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """TEXT with every control character written as \\xNN (\\uNNNN): one printable line."""
    return _CONTROL.sub(_escaped, text)


# What starts each line of a traceback or stack after its record's first line: whatever an
# exception's message holds (a header, a path a client sent), no line of it reads as a record.
CONTINUATION = "  | "


class SafeFormatter(logging.Formatter):
    """A Formatter whose message is one line whatever its arguments hold, and whose traceback
    and stack (exc_info, stack_info) cannot forge a record: an exception's message may quote a
    client, so their control characters are escaped too, all but the line breaks that keep a
    traceback readable, and each of their lines starts with `continuation` (a %-format of the
    record's attributes, as fmt: the journal's lines repeat the record's <priority>). The
    record itself is left as it came, for other handlers."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, *,
                 continuation: str = CONTINUATION):
        super().__init__(fmt, datefmt)
        self.continuation = continuation

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args, record.exc_info, record.exc_text, record.stack_info
        record.msg, record.args = escape_control(record.getMessage()), None
        record.exc_info = record.exc_text = record.stack_info = None   # appended below
        try:
            first = super().format(record)
            prefix = self.continuation % vars(record)
        finally:
            record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = saved
        trailer = self._trailer(record)
        if not trailer:
            return first
        return first + "".join(f"\n{prefix}{escape_control(line)}".rstrip(" ")
                               for line in trailer.split("\n"))

    def _trailer(self, record: logging.LogRecord) -> str:
        """The record's traceback and stack, as logging.Formatter would append them (not
        cached on the record: its exc_text stays what other formatters made of it)."""
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts).rstrip("\n")


def setup_logging(name: str, level: str, log_file: str, foreground: bool) -> logging.Logger:
    """Replace the handlers of the 'preboot' logger; safe to call again on reload."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = False
    handler: logging.Handler
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(log_file)
        handler.setFormatter(SafeFormatter(
            f"%(asctime)s {name}[%(process)d]: %(levelname)s %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(SafeFormatter(
                "<%(levelno_syslog)s>%(message)s",
                continuation=f"<%(levelno_syslog)s>{CONTINUATION}"))   # one journal entry a line
            handler.addFilter(_syslog_priority)
        else:
            handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler = _syslog_or_file(name)
    logger.addHandler(handler)
    _route_libraries(handler)
    # tftpy logs every packet at INFO and DEBUG; keep it quiet unless we debug.
    logging.getLogger("tftpy").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    return logger


def _route_libraries(handler: logging.Handler) -> None:
    """Libraries log to their own loggers, which reach only the root logger (asyncio's "Task
    exception was never retrieved", aiohttp's, tftpy's warnings): without a handler there,
    Python's last-resort handler would print them to stderr unescaped. The root logger gets
    the same handler (WARNING and above), replacing the one an earlier call gave it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "preboot_handler", False)]:
        root.removeHandler(old)
    setattr(handler, "preboot_handler", True)
    root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _syslog_priority(record: logging.LogRecord) -> bool:
    """journald reads a leading <N> as the priority (sd-daemon(3))."""
    record.levelno_syslog = _PRIORITY.get(record.levelno, 6)
    return True


FALLBACK_LOG_DIR = "/var/log/preboot"


def _syslog_or_file(name: str) -> logging.Handler:
    """Detached daemons log to syslog; a machine without /dev/log gets a file instead."""
    try:
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(SafeFormatter(f"{name}[%(process)d]: %(message)s"))
    except OSError:
        os.makedirs(FALLBACK_LOG_DIR, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(os.path.join(FALLBACK_LOG_DIR, f"{name}.log"))
        handler.setFormatter(SafeFormatter(
            f"%(asctime)s {name}[%(process)d]: %(levelname)s %(message)s"))
    return handler
