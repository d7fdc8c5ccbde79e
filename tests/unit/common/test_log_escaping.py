"""Control characters in log messages (common/daemon/logsetup.py): whatever a client put in a
field, every handler the daemons log through writes one line per record."""

from __future__ import annotations

import logging

import pytest

from common.daemon import logsetup
from common.daemon.logsetup import SafeFormatter, escape_control


def test_escape_control_leaves_printable_text_alone():
    assert escape_control("lab/base.img: ok (é, \\n stays)") == "lab/base.img: ok (é, \\n stays)"


@pytest.mark.parametrize("raw, shown", [
    ("a\nb", "a\\x0ab"), ("a\r\nb", "a\\x0d\\x0ab"), ("\x1b[2J", "\\x1b[2J"),
    ("\x00\x7f\x85", "\\x00\\x7f\\x85"), ("a\u2028b", "a\\u2028b"), ("\tx", "\\x09x"),
])
def test_escape_control(raw, shown):
    assert escape_control(raw) == shown


def record(msg: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("preboot.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_safe_formatter_escapes_the_arguments_and_keeps_the_record():
    rec = record("%s: %s", "lab-1\nFORGED: INFO success", "x")
    line = SafeFormatter("%(levelname)s %(message)s").format(rec)
    assert line == "WARNING lab-1\\x0aFORGED: INFO success: x"
    assert rec.getMessage() == "lab-1\nFORGED: INFO success: x"   # other handlers see it whole


def test_safe_formatter_keeps_our_own_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        rec = record("failed for %s", "a\nb", exc_info=sys.exc_info())
    text = SafeFormatter("%(message)s").format(rec)
    assert text.startswith("failed for a\\x0ab\nTraceback")


@pytest.mark.parametrize("mode", ["file", "foreground", "journald"])
def test_every_handler_of_setup_logging_escapes(tmp_path, monkeypatch, mode):
    if mode == "journald":
        monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log_file = str(tmp_path / "d.log") if mode == "file" else ""
    logger = logging.getLogger(logsetup.ROOT_LOGGER)
    saved = logger.level, logger.propagate, list(logger.handlers)
    try:
        logsetup.setup_logging("preboot-test", "INFO", log_file, foreground=True)
        assert logger.handlers
        assert all(isinstance(h.formatter, SafeFormatter) for h in logger.handlers)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for handler in saved[2]:
            logger.addHandler(handler)
