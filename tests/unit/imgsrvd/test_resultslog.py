"""The results log: round trip, escaping, crash recovery at every byte, rotation, threads."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsrvd import resultslog
from imgsrvd.resultslog import (
    CLOSE, EMPTY_LOG, HEADER, CorruptLogError, ImageType, NotAResultsLogError, Operation,
    ResultEntry, ResultsLog, ResultsLogError, Status, read_entries, sanitize,
)

T0 = datetime(2026, 11, 26, 18, 0, 0, tzinfo=timezone.utc)


def entry(n: int = 0, **kw) -> ResultEntry:
    values = dict(workstation=f"ws{n}.wks.acme", operation=Operation.DOWNLOAD,
                  status=Status.SUCCESS, tree="ACME_TREE", image_type=ImageType.BASE,
                  image_path=f"/images/ws{n}.zmg", requesting_address="192.0.2.10",
                  server="imgsrv1", bytes=1000 * n, duration_s=n / 4,
                  timestamp=T0 + timedelta(seconds=n))
    values.update(kw)
    return ResultEntry(**values)


def parse(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "imaging-results" and root.get("version") == "1"
    return list(root)


def xmllint_ok(path: Path) -> None:
    if shutil.which("xmllint"):
        subprocess.run(["xmllint", "--noout", str(path)], check=True)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "imglog.xml"


@pytest.fixture
def rlog(log_path: Path):
    log = ResultsLog(log_path)
    log.open()
    yield log
    log.close()


# --- round trip -----------------------------------------------------------------------------------

def test_new_log_is_well_formed_and_mode_0640(log_path: Path):
    old = os.umask(0o077)
    try:
        report = ResultsLog(log_path).open()
    finally:
        os.umask(old)
    assert report.created and report.entries == 0 and report.dropped_bytes == 0
    assert log_path.read_bytes() == EMPTY_LOG
    assert parse(log_path) == []
    assert os.stat(log_path).st_mode & 0o777 == 0o640


def test_append_and_read_back(rlog: ResultsLog, log_path: Path):
    written = [entry(n) for n in range(5)]
    written.append(entry(5, status=Status.FAILURE, operation=Operation.UPLOAD,
                         image_type=ImageType.ADDON, bytes=None, duration_s=None, tree=None,
                         error_message="Unable to find an image to download"))
    written.append(ResultEntry(workstation="00C04FDC2AB5", operation=Operation.LOG,
                               status=Status.REFERRED))
    for e in written:
        rlog.append(e)
        assert log_path.read_bytes().endswith(b"\n" + CLOSE)
        parse(log_path)
    assert list(rlog.entries()) == written
    assert [ResultEntry.from_element(el) for el in parse(log_path)] == written
    xmllint_ok(log_path)
    lines = log_path.read_bytes().splitlines()
    assert len(lines) == 2 + len(written) + 1  # one line per entry


def test_entry_attributes_and_when(log_path: Path, rlog: ResultsLog):
    rlog.append(entry(1))
    el = parse(log_path)[0]
    assert el.tag == "result"
    assert el.get("timestamp") == "2026-11-26T18:00:01Z"
    assert el.get("when") == "Thu Nov 26 18:00:01 2026"
    assert el.get("operation") == "download" and el.get("image_type") == "base"
    assert el.get("status") == "success" and el.get("bytes") == "1000"
    assert el.get("tree") == "ACME_TREE" and el.get("server") == "imgsrv1"
    assert el.get("error_message") is None  # omitted, not empty
    assert "Thu Nov 26 18:00:01 2026 ws1.wks.acme download base" in entry(1).summary()


def test_timestamp_normalised_to_utc_seconds():
    cet = timezone(timedelta(hours=1))
    e = entry(timestamp=datetime(2026, 11, 6, 9, 5, 7, 999999, tzinfo=cet))
    assert e.timestamp == datetime(2026, 11, 6, 8, 5, 7, tzinfo=timezone.utc)
    assert e.attributes()["when"] == "Fri Nov 06 08:05:07 2026"
    naive = entry(timestamp=datetime(2026, 1, 1, 0, 0, 0))
    assert naive.timestamp.tzinfo is timezone.utc
    default = ResultEntry(workstation="w", operation="log", status="success")
    assert abs(default.timestamp - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_entry_validation():
    with pytest.raises(ValueError):
        ResultEntry(workstation=None, operation="upload",  # type: ignore[arg-type]
                    status="success")
    with pytest.raises(ValueError):
        entry(bytes=-1)
    with pytest.raises(TypeError):
        entry(bytes="12")
    with pytest.raises(ValueError):
        ResultEntry.from_element(ET.Element("foo"))
    with pytest.raises(ValueError):
        ResultEntry.from_element(ET.Element("result", {"workstation": "w"}))
    assert entry(image_path=Path("/images/a.zmg")).image_path == "/images/a.zmg"


def test_append_requires_open(log_path: Path):
    with pytest.raises(ResultsLogError):
        ResultsLog(log_path).append(entry())


# --- escaping -----------------------------------------------------------------------------------

ESCAPES = [
    'quote " double', "quote ' single", "both \" and '", "<tag>", "a & b", "&amp; literal",
    "line1\nline2", "cr\r\nlf", "\ttab\t", "  lead and trail  ", "", "]]>", "<!-- c -->",
    "nul\x00byte", "bell\x07 esc\x1b", "\x7f del \x85 nel \u2028 ls", "emoji \U0001F600 \U0010FFFF",
    "lone \ud800 surrogate \udfff", "\ufffe\uffff non-chars", "é ß 中文",
]


@pytest.mark.parametrize("text", ESCAPES)
def test_escaping_table(text: str, log_path: Path, rlog: ResultsLog):
    e = entry(workstation=text, tree=text, image_path=text, error_message=text, server=text,
              requesting_address=text, operation=text, status=text, image_type=text)
    rlog.append(e)
    back = ResultEntry.from_element(parse(log_path)[0])
    assert back == e
    assert back.workstation == sanitize(text)
    assert list(rlog.entries()) == [e]
    xmllint_ok(log_path)


def test_sanitize():
    assert sanitize("a\x00b\x01\x0b\x0c\x1f") == "a\ufffdb\ufffd\ufffd\ufffd\ufffd"
    assert sanitize("\t\n\r") == "\t\n\r"
    assert sanitize("\ud83d\ude00") == "\ufffd\ufffd"  # a surrogate pair is two lone surrogates
    assert sanitize("\U0001F600\ufffd\ue000") == "\U0001F600\ufffd\ue000"


any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
opt_text = st.none() | any_text


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workstation=any_text, tree=opt_text, operation=any_text, image_type=opt_text,
       image_path=opt_text, status=any_text, error_message=opt_text,
       requesting_address=opt_text, server=opt_text,
       size=st.none() | st.integers(min_value=0, max_value=2**70),
       duration=st.none() | st.floats(allow_nan=False),
       ts=st.datetimes(timezones=st.just(timezone.utc)))
def test_any_string_in_any_field_round_trips(tmp_path_factory, workstation, tree, operation,
                                             image_type, image_path, status, error_message,
                                             requesting_address, server, size, duration, ts):
    path = tmp_path_factory.mktemp("h") / "log.xml"
    e = ResultEntry(workstation=workstation, tree=tree, operation=operation,
                    image_type=image_type, image_path=image_path, status=status,
                    error_message=error_message, requesting_address=requesting_address,
                    server=server, bytes=size, duration_s=duration, timestamp=ts)
    assert e.workstation == sanitize(workstation) and e.error_message == (
        None if error_message is None else sanitize(error_message))
    with ResultsLog(path) as log:
        log.append(e)
        log.append(e)
        assert list(log.entries()) == [e, e]
    back = [ResultEntry.from_element(el) for el in parse(path)]
    assert back == [e, e]
    assert ResultEntry.from_element(ET.fromstring(ET.tostring(e.to_element()))) == e


# --- recovery -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_entry_file(tmp_path_factory) -> tuple[bytes, list[int], list[ResultEntry]]:
    path = tmp_path_factory.mktemp("three") / "log.xml"
    written = [entry(1), entry(2, error_message="x" * 50, status=Status.FAILURE), entry(3)]
    with ResultsLog(path) as log:
        for e in written:
            log.append(e)
    data = path.read_bytes()
    line_ends = []
    pos = len(HEADER)
    for e in written:
        pos += len(e.to_line())
        line_ends.append(pos)
    assert data == HEADER + b"".join(e.to_line() for e in written) + CLOSE
    return data, line_ends, written


def test_recovery_at_every_truncation_offset(tmp_path: Path, three_entry_file):
    data, line_ends, written = three_entry_file
    path = tmp_path / "log.xml"
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        expected = [e for e, end in zip(written, line_ends) if end <= cut]
        # a reader sees exactly what recovery will keep, without modifying the file
        assert list(read_entries(path)) == expected, cut
        assert path.read_bytes() == data[:cut]
        log = ResultsLog(path)
        report = log.open()
        try:
            assert report.entries == len(expected), cut
            assert [ResultEntry.from_element(el) for el in parse(path)] == expected, cut
            assert path.read_bytes().endswith(b"\n" + CLOSE)
            assert report.repaired == (cut != len(data)), cut
            kept = HEADER + b"".join(e.to_line() for e in expected)
            assert report.dropped_bytes == (max(0, cut - len(kept)) if cut != len(data) else 0)
            log.append(entry(9))  # and the log keeps working
            assert [ResultEntry.from_element(el) for el in parse(path)] == expected + [entry(9)]
        finally:
            log.close()


def test_torn_overwrite_of_closing_tag(tmp_path: Path, three_entry_file):
    """A partial pwrite leaves the new entry's prefix over the old closing tag's bytes."""
    data, line_ends, written = three_entry_file
    path = tmp_path / "log.xml"
    before = data[:line_ends[1]] + CLOSE  # two entries complete
    new = written[2].to_line() + CLOSE
    off = line_ends[1]
    for k in range(1, len(new)):
        torn = bytearray(before)
        torn[off:off + k] = new[:k]
        path.write_bytes(bytes(torn))
        expected = written[:2] + ([written[2]] if k >= len(written[2].to_line()) else [])
        with ResultsLog(path) as log:
            assert [ResultEntry.from_element(el) for el in parse(path)] == expected, k
            assert list(log.entries()) == expected


def test_garbage_after_closing_tag(tmp_path: Path, three_entry_file):
    data, _, written = three_entry_file
    path = tmp_path / "log.xml"
    for junk in [b"garbage", b"garbage\n", b"\n\n", b"<result workstation='x' operation='u' "
                 b"status='s' timestamp='2026-01-01T00:00:00Z'/>\n</imaging-results>\n",
                 b"\x00\x00\x00\xff", b"<!-- comment -->\n"]:
        path.write_bytes(data + junk)
        report = ResultsLog(path).open()
        assert report.repaired and report.dropped_bytes == len(junk)
        assert path.read_bytes() == data
    # closing tag without its newline
    path.write_bytes(data[:-1])
    report = ResultsLog(path).open()
    assert [ResultEntry.from_element(el) for el in parse(path)] == written
    assert path.read_bytes() == data


def test_missing_closing_tag(tmp_path: Path, three_entry_file):
    data, _, written = three_entry_file
    path = tmp_path / "log.xml"
    path.write_bytes(data[:-len(CLOSE)])
    report = ResultsLog(path).open()
    assert report.repaired and report.dropped_bytes == 0 and report.entries == 3
    assert path.read_bytes() == data


def test_empty_file_and_header_prefix(tmp_path: Path):
    path = tmp_path / "log.xml"
    path.write_bytes(b"")
    report = ResultsLog(path).open()
    assert report.entries == 0 and not report.created
    assert path.read_bytes() == EMPTY_LOG
    path.write_bytes(HEADER[:10])
    ResultsLog(path).open()
    assert path.read_bytes() == EMPTY_LOG


@pytest.mark.parametrize("content", [
    b'<?xml version="1.0"?>\n<config><a/></config>\n',
    b"<imaging-results version=\"2\">\n</imaging-results>\n",
    b"hello, this is someone's notes\n",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Zimglog><CN=ws1.O=acme/></Zimglog>',
    b"\x89PNG\r\n\x1a\n",
])
def test_refuses_a_file_that_is_not_ours(tmp_path: Path, content: bytes):
    path = tmp_path / "log.xml"
    path.write_bytes(content)
    with pytest.raises(NotAResultsLogError, match="not an imaging results log"):
        ResultsLog(path).open()
    with pytest.raises(NotAResultsLogError):
        list(read_entries(path))
    assert path.read_bytes() == content  # untouched


def test_refuses_to_truncate_intact_entries_after_damage(tmp_path: Path, three_entry_file):
    data, line_ends, written = three_entry_file
    path = tmp_path / "log.xml"
    damaged = data[:line_ends[0]] + b"<result broken=\n" + data[line_ends[0]:]
    path.write_bytes(damaged)
    with pytest.raises(CorruptLogError, match="intact entries follow"):
        ResultsLog(path).open()
    assert path.read_bytes() == damaged
    report = ResultsLog(path).open(on_corrupt="quarantine")
    assert report.quarantined_to and Path(report.quarantined_to).read_bytes() == damaged
    assert path.read_bytes() == EMPTY_LOG


def test_refuses_when_no_verified_prefix_keeps_later_entries(tmp_path: Path):
    """An entry line that only looks intact (inside a foreign element) fails verification."""
    path = tmp_path / "log.xml"
    damaged = HEADER + b"<wrap>\n" + entry(1).to_line() + b"<result b="
    path.write_bytes(damaged)
    with pytest.raises(CorruptLogError):
        ResultsLog(path).open()
    with pytest.raises(CorruptLogError):
        list(read_entries(path))
    assert path.read_bytes() == damaged


def test_append_repairs_tail_torn_by_another_writer(rlog: ResultsLog, log_path: Path):
    rlog.append(entry(1))
    with open(log_path, "r+b") as f:  # another process died mid-append
        f.seek(-len(CLOSE), os.SEEK_END)
        f.write(entry(2).to_line()[:20])
        f.truncate()
    assert list(rlog.entries()) == [entry(1)]
    rlog.append(entry(3))
    assert [ResultEntry.from_element(el) for el in parse(log_path)] == [entry(1), entry(3)]


def test_disk_full_leaves_the_file_complete(rlog: ResultsLog, log_path: Path, monkeypatch):
    rlog.append(entry(1))
    before = log_path.read_bytes()
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            real(fd, bytes(data)[:7], offset)  # a short write, then ENOSPC
            return 7
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(resultslog.os, "pwrite", failing)
    with pytest.raises(OSError) as info:
        rlog.append(entry(2))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(resultslog.os, "pwrite", real)
    assert log_path.read_bytes() == before
    rlog.append(entry(3))
    assert list(rlog.entries()) == [entry(1), entry(3)]


def test_entries_of_a_log_unchanged_while_appending(rlog: ResultsLog):
    for n in range(3):
        rlog.append(entry(n))
    it = rlog.entries()
    first = next(it)
    rlog.append(entry(7))
    assert [first, *it] == [entry(0), entry(1), entry(2)]  # a snapshot as of the call


# --- rotation -----------------------------------------------------------------------------------

def test_rotation_keeps_n_files_each_well_formed(log_path: Path):
    line_len = len(entry(10).to_line())
    log = ResultsLog(log_path, max_bytes=len(EMPTY_LOG) + 3 * line_len, keep=3)
    log.open()
    written = [entry(n) for n in range(10, 40)]
    for e in written:
        log.append(e)
    log.close()
    files = [log_path] + [Path(f"{log_path}.{n}") for n in (1, 2, 3)]
    assert all(p.exists() for p in files)
    assert not Path(f"{log_path}.4").exists()
    assert log.rotated_paths() == [str(p) for p in files[1:]]
    seen: list[ResultEntry] = []
    for p in reversed(files):  # oldest first
        elements = parse(p)
        xmllint_ok(p)
        assert 1 <= len(elements) <= 3
        assert p.stat().st_size <= log.max_bytes
        seen += list(read_entries(p))
    assert seen == written[-len(seen):]  # the newest entries, in order, none lost in between
    assert len(seen) >= 8  # lines grow a little (bigger numbers): 2-3 per file


def test_rotation_with_an_entry_larger_than_max_bytes(log_path: Path):
    with ResultsLog(log_path, max_bytes=100, keep=2) as log:
        for n in range(4):
            log.append(entry(n, error_message="y" * 200))
    for p in [log_path, Path(f"{log_path}.1"), Path(f"{log_path}.2")]:
        assert len(parse(p)) == 1
    assert not Path(f"{log_path}.3").exists()


def test_rotation_keep_zero(log_path: Path):
    with ResultsLog(log_path, max_bytes=len(EMPTY_LOG) + 10, keep=0) as log:
        for n in range(3):
            log.append(entry(n))
        assert list(log.entries()) == [entry(2)]
    assert not Path(f"{log_path}.1").exists()


def test_two_log_objects_share_a_file_across_rotation(log_path: Path):
    """Two writers (as two processes would) each notice the other's rotation."""
    line_len = len(entry(10).to_line())
    a = ResultsLog(log_path, max_bytes=len(EMPTY_LOG) + 2 * line_len, keep=50)
    b = ResultsLog(log_path, max_bytes=len(EMPTY_LOG) + 2 * line_len, keep=50)
    a.open()
    b.open()
    written = []
    for n in range(10, 30):
        e = entry(n)
        (a if n % 3 else b).append(e)
        written.append(e)
    a.close()
    b.close()
    paths = [Path(p) for p in reversed(a.rotated_paths())] + [log_path]
    seen = [e for p in paths for e in read_entries(p)]
    assert seen == written


# --- concurrency --------------------------------------------------------------------------------

def test_eight_threads_append_200_each(rlog: ResultsLog, log_path: Path):
    def worker(t: int) -> None:
        for i in range(200):
            rlog.append(entry(i, workstation=f"t{t}-{i}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elements = parse(log_path)
    assert len(elements) == 1600
    names = [el.get("workstation") for el in elements]
    assert len(set(names)) == 1600
    for t in range(8):  # each thread's entries are in its own order
        mine = [n for n in names if n.startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(200)]
    assert ResultsLog(log_path).open().entries == 1600
    xmllint_ok(log_path)


def test_open_twice_and_close(log_path: Path):
    log = ResultsLog(log_path)
    log.open()
    with pytest.raises(ResultsLogError):
        log.open()
    log.close()
    log.close()
    assert not log.is_open
