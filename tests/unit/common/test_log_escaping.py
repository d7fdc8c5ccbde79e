"""Control characters in log messages (common/daemon/logsetup.py): whatever a client put in a
field, every handler the daemons log through (file, stderr, journal, syslog) writes one line
per record; a traceback or stack after it, whatever an exception's message quotes, only lines
marked as that record's continuation, with their control characters escaped."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import socket
import sys

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


# An exception whose message quotes a client: a line break and a whole forged record, a
# terminal escape sequence, a carriage return that would hide what came before on a terminal.
FORGED = "2026-01-01 00:00:00,000 preboot-imgsrvd[1]: INFO forged"
HOSTILE = f"bad header 'X-Evil: a\n{FORGED}\x1b[2J\r\x9b\x7f'"
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d ")          # what starts a record in a file


def hostile_exc_info():
    def parse_header() -> None:
        raise ValueError(HOSTILE)
    try:
        parse_header()
    except ValueError:
        return sys.exc_info()


def assert_continued(lines: list[str], prefix: str = logsetup.CONTINUATION) -> None:
    """Every line after a record's first is marked as its continuation, with nothing a
    terminal or a log reader would take for a control character."""
    for line in lines[1:]:
        assert line.startswith(prefix.rstrip()), line
        assert escape_control(line) == line, line


def test_safe_formatter_keeps_our_own_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record("failed for %s", "a\nb", exc_info=sys.exc_info())
    lines = SafeFormatter("%(message)s").format(rec).split("\n")
    assert lines[0] == "failed for a\\x0ab"
    assert lines[1] == "  | Traceback (most recent call last):"
    assert lines[-1] == "  | RuntimeError: boom"
    assert_continued(lines)


def test_a_hostile_exception_message_cannot_forge_a_record():
    rec = record("storing %s failed", "lab/x.img", exc_info=hostile_exc_info())
    text = SafeFormatter("%(asctime)s preboot-imgsrvd[1]: %(levelname)s %(message)s").format(rec)
    lines = text.split("\n")
    assert [line for line in lines if RECORD_START.match(line)] == [lines[0]]
    assert_continued(lines)
    # still readable: the traceback's frames and the message, escaped
    assert "  | Traceback (most recent call last):" in lines
    assert any(line.startswith("  |   File ") and "parse_header" in line for line in lines)
    assert "  | ValueError: bad header 'X-Evil: a" in lines
    assert f"  | {FORGED}\\x1b[2J\\x0d\\x9b\\x7f'" in lines


def test_a_hostile_stack_cannot_forge_a_record():
    rec = record("where am I")
    rec.stack_info = f"Stack (most recent call last):\n  File \"x.py\", line 1\n{HOSTILE}"
    lines = SafeFormatter("%(asctime)s %(levelname)s %(message)s").format(rec).split("\n")
    assert lines[1] == "  | Stack (most recent call last):"
    assert [line for line in lines if RECORD_START.match(line)] == [lines[0]]
    assert_continued(lines)
    assert f"  | {FORGED}\\x1b[2J\\x0d\\x9b\\x7f'" in lines


def test_a_traceback_and_a_stack_together_and_a_chain():
    try:
        try:
            raise KeyError("inner\x1b]0;title\x07")
        except KeyError as exc:
            raise ValueError(HOSTILE) from exc
    except ValueError:
        rec = record("both", exc_info=sys.exc_info())
    rec.stack_info = "Stack (most recent call last):\n  File \"x.py\", line 1"
    lines = SafeFormatter("%(message)s").format(rec).split("\n")
    assert_continued(lines)
    assert "  |" in lines                    # the chain's blank lines: kept, marked
    assert any("direct cause" in line for line in lines)
    assert "  | KeyError: 'inner\\x1b]0;title\\x07'" in lines
    assert lines[-2:] == ["  | Stack (most recent call last):", '  |   File "x.py", line 1']


def test_the_record_is_left_for_other_handlers():
    rec = record("failed", exc_info=hostile_exc_info())
    rec.stack_info = "Stack:\nline"
    exc_info = rec.exc_info
    SafeFormatter("%(message)s").format(rec)
    assert rec.exc_info is exc_info and rec.exc_text is None and rec.stack_info == "Stack:\nline"
    plain = logging.Formatter("%(message)s").format(rec)     # sees the exception as it was
    assert f"\n{FORGED}\x1b[2J" in plain
    # and a traceback another formatter made (exc_text) is escaped all the same
    lines = SafeFormatter("%(message)s").format(rec).split("\n")
    assert_continued(lines)


def test_a_traceback_text_without_exc_info_is_escaped():
    rec = record("from elsewhere")             # e.g. a record rebuilt with makeLogRecord
    rec.exc_text = f"Traceback (most recent call last):\nValueError: {HOSTILE}"
    lines = SafeFormatter("%(message)s").format(rec).split("\n")
    assert lines[1:3] == ["  | Traceback (most recent call last):",
                          "  | ValueError: bad header 'X-Evil: a"]
    assert_continued(lines)


def test_the_journal_gets_the_records_priority_on_every_line():
    formatter = SafeFormatter("<%(levelno_syslog)s>%(message)s",
                              continuation="<%(levelno_syslog)s>  | ")
    rec = record("failed", exc_info=hostile_exc_info())
    rec.levelno_syslog = 4
    lines = formatter.format(rec).split("\n")
    assert lines[0] == "<4>failed"
    assert all(line.startswith("<4>  |") for line in lines[1:]), lines


def _log_hostile_exception(logger: logging.Logger) -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logger.exception("storing %s", "lab/x.img")
    logger.error("and a stack", stack_info=True)


def test_a_log_file_gets_one_record_per_record(tmp_path):
    logger = logging.getLogger(logsetup.ROOT_LOGGER)
    with _configured(logger):
        logsetup.setup_logging("preboot-test", "INFO", str(tmp_path / "d.log"), False)
        _log_hostile_exception(logging.getLogger("preboot.test"))
    lines = (tmp_path / "d.log").read_text().splitlines()
    records = [line for line in lines if RECORD_START.match(line)]
    assert len(records) == 2 and "ERROR storing lab/x.img" in records[0]
    assert not [line for line in lines if line not in records
                and not line.startswith(logsetup.CONTINUATION.rstrip())]
    assert all(escape_control(line) == line for line in lines)


def test_a_librarys_record_gets_the_same_handler_and_escaping(tmp_path):
    """asyncio's 'Task exception was never retrieved' and the like reach only the root
    logger: they go to the daemon's log, escaped, once, also after a second setup."""
    logger, root = logging.getLogger(logsetup.ROOT_LOGGER), logging.getLogger()
    saved = list(root.handlers)
    try:
        with _configured(logger):
            logsetup.setup_logging("preboot-test", "INFO", str(tmp_path / "d.log"), False)
            logsetup.setup_logging("preboot-test", "INFO", str(tmp_path / "d.log"), False)
            _log_hostile_exception(logging.getLogger("asyncio"))
            logging.getLogger("preboot.test").warning("ours")
    finally:
        for handler in [h for h in root.handlers if h not in saved]:
            root.removeHandler(handler)
    lines = (tmp_path / "d.log").read_text().splitlines()
    records = [line for line in lines if RECORD_START.match(line)]
    assert len(records) == 3 and "ERROR storing lab/x.img" in records[0], lines
    assert records[2].endswith("WARNING ours")
    assert all(escape_control(line) == line for line in lines)


def test_the_journal_gets_a_priority_on_every_line(monkeypatch, capsys):
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    logger = logging.getLogger(logsetup.ROOT_LOGGER)
    with _configured(logger):
        logsetup.setup_logging("preboot-test", "INFO", "", True)
        _log_hostile_exception(logging.getLogger("preboot.test"))
    lines = capsys.readouterr().err.splitlines()
    records = [line for line in lines if not line.startswith("<3>  |")]
    assert records == ["<3>storing lab/x.img", "<3>and a stack"], lines
    assert f"<3>  | {FORGED}\\x1b[2J\\x0d\\x9b\\x7f'" in lines


def test_syslog_gets_the_same_escaping(tmp_path, monkeypatch):
    """The detached daemons' syslog handler, on a datagram socket standing in for /dev/log."""
    address = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    real = logging.handlers.SysLogHandler

    class ToTheTestSocket(real):
        def __init__(self, *args, facility: int = real.LOG_USER, **kwargs):
            super().__init__(address=address, facility=facility)

    monkeypatch.setattr(logging.handlers, "SysLogHandler", ToTheTestSocket)
    logger = logging.getLogger(logsetup.ROOT_LOGGER)
    try:
        with _configured(logger):
            logsetup.setup_logging("preboot-test", "INFO", "", False)
            assert isinstance(logger.handlers[0], real)
            _log_hostile_exception(logging.getLogger("preboot.test"))
        messages = [server.recv(65536).decode() for _ in range(2)]
    finally:
        server.close()
    lines = messages[0].rstrip("\x00").split("\n")        # <27>: daemon.err
    assert re.match(r"^<27>preboot-test\[\d+\]: storing lab/x\.img$", lines[0]), lines[0]
    assert_continued(lines)
    assert f"  | {FORGED}\\x1b[2J\\x0d\\x9b\\x7f'" in lines


@contextlib.contextmanager
def _configured(logger: logging.Logger):
    """Give the 'preboot' logger back as it was after setup_logging replaced its handlers."""
    saved = logger.level, logger.propagate, list(logger.handlers)
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for handler in saved[2]:
            logger.addHandler(handler)


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
