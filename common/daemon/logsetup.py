"""Logging for every daemon: journald (plain lines on stderr), syslog, or a file.

Under journald (JOURNAL_STREAM is set) lines carry no timestamp or hostname, since the journal
adds them; a file gets full timestamps; syslog gets the daemon name as ident.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

ROOT_LOGGER = "preboot"


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
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {name}[%(process)d]: %(levelname)s %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(logging.Formatter("<%(levelno_syslog)s>%(message)s"))
            handler.addFilter(_syslog_priority)
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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
        handler.setFormatter(logging.Formatter(f"{name}[%(process)d]: %(message)s"))
    except OSError:
        os.makedirs(FALLBACK_LOG_DIR, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(os.path.join(FALLBACK_LOG_DIR, f"{name}.log"))
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {name}[%(process)d]: %(levelname)s %(message)s"))
    return handler
