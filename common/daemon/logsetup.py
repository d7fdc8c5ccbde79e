"""Logging for every daemon: journald (plain lines on stderr), syslog, or a file.

Under journald (JOURNAL_STREAM is set) lines carry no timestamp or hostname, since the journal
adds them; a file gets full timestamps; syslog gets the daemon name as ident.

Every handler formats with SafeFormatter: control characters in a message (most of them come
from clients: result fields, MACs, paths, user agents, TFTP file names) are escaped, so a
newline a client sent cannot start a forged line. escape_control() is the same escaping for
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


class SafeFormatter(logging.Formatter):
    """A Formatter whose message is one line whatever its arguments hold. The traceback that
    follows an exception stays multi-line: it is ours, not a client's."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args
        record.msg, record.args = escape_control(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved


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
            handler.setFormatter(SafeFormatter("<%(levelno_syslog)s>%(message)s"))
            handler.addFilter(_syslog_priority)
        else:
            handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler = _syslog_or_file(name)
    logger.addHandler(handler)
    # tftpy logs every packet at INFO and DEBUG; keep it quiet unless we debug.
    logging.getLogger("tftpy").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    return logger


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
