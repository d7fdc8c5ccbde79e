"""zmgmcast's health check (-status exit codes, -expect) and -log (the results log's tail)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import pytest

import zmgmcast.__main__ as zmg
from common.daemon import services
from imgsrvd.config import SCHEMA as IMGSRVD_SCHEMA
from imgsrvd.resultslog import ResultEntry, ResultsLog
from zmgmcast.results import DEFAULT_RESULTS_LOG, format_entry, tail_entries


def report(service, state):
    return zmg.DaemonReport(service, state, {"ok": True} if state == "running" else None)


def test_health_codes():
    up = [report(services.TFTPD, "running"), report(services.POLICYD, "not running"),
          report(services.IMGSRVD, "error")]
    assert zmg.health(up, [services.TFTPD]) == (0, [])
    assert zmg.health(up, []) == (0, [])
    assert zmg.health(up, [services.TFTPD, services.POLICYD, services.IMGSRVD]) == (
        4, ["policyd (not running)", "imgsrvd (error)"])
    down = [report(services.TFTPD, "not reachable")]
    assert zmg.health(down, [])[0] == 3 == zmg.health(down, [services.TFTPD])[0]


def test_parse_expect():
    assert zmg.parse_expect("tftpd, policyd") == [services.TFTPD, services.POLICYD]
    assert zmg.parse_expect("all") == list(services.SERVICES)
    problem = zmg.parse_expect("tftpd,\x1b[31mnope")
    assert isinstance(problem, str) and "unknown daemon" in problem and "\x1b" not in problem


def test_expected_by_default_are_the_configured_daemons(tmp_path, monkeypatch):
    monkeypatch.setattr(zmg, "CONFIG_DIR", str(tmp_path))
    (tmp_path / "tftpd.conf").write_text("")
    (tmp_path / "imgsrvd.conf").write_text("")
    local = argparse.Namespace(expect=None, socket=None, host=None, port=None)
    assert zmg.expected_daemons(local, []) == [services.TFTPD, services.IMGSRVD]
    remote = argparse.Namespace(expect=None, socket=None, host="h", port=None)
    assert zmg.expected_daemons(remote, []) == []
    remote.expect = "policyd"
    assert zmg.expected_daemons(remote, []) == [services.POLICYD]


def test_usage_errors(capsys):
    assert zmg.main(["-status", "-expect", "nope"]) == 2
    assert "unknown daemon" in capsys.readouterr().err
    assert zmg.main(["-log", "0"]) == 2
    assert zmg.main(["-log", "-status"]) == 2


def test_default_results_log_is_imgsrvds():
    (key,) = [k for k in IMGSRVD_SCHEMA.keys if k.name == "ResultsLog"]
    assert key.default == DEFAULT_RESULTS_LOG


def write_log(path, count, **fields):
    with ResultsLog(str(path)) as log:
        for i in range(count):
            log.append(ResultEntry(
                workstation=fields.get("workstation", f"ws{i:03d}"), operation="restore",
                status="success", image_type="base", image_path=f"lab/img{i}.zmg",
                requesting_address="192.0.2.7",
                error_message=fields.get("error_message"),
                timestamp=datetime(2026, 1, 2, 3, 4, i % 60, tzinfo=timezone.utc)))


def test_tail_reads_the_last_entries_in_order(tmp_path):
    path = tmp_path / "results.xml"
    write_log(path, 30)
    entries = tail_entries(str(path), 20)
    assert [e["workstation"] for e in entries] == [f"ws{i:03d}" for i in range(10, 30)]
    assert len(tail_entries(str(path), 100)) == 30
    # a small window: only whole lines, the newest
    assert [e["workstation"] for e in tail_entries(str(path), 100, tail_bytes=700)][-1] == \
        "ws029"
    line = format_entry(entries[-1])
    assert line == ("2026-01-02T03:04:29Z ws029 restore base lab/img29.zmg success "
                    "from 192.0.2.7")


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "results.xml"
    write_log(path, 3)
    data = path.read_bytes().replace(b"</imaging-results>\n", b"")
    path.write_bytes(data + b'<result timestamp="2026-01-02T0')
    assert [e["workstation"] for e in tail_entries(str(path), 10)] == ["ws000", "ws001", "ws002"]


def test_client_text_is_escaped(tmp_path, capsys):
    path = tmp_path / "results.xml"
    # the log itself stores ESC as U+FFFD (XML forbids it); newline and CR it keeps
    write_log(path, 1, workstation="evil\nFAKE LINE\x1b[2J", error_message="a\rb\u2028c")
    assert zmg.main(["-log", "5", "--results-log", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out and "\r" not in out
    assert "evil\\x0aFAKE LINE\ufffd[2J" in out and "(a\\x0db\\u2028c)" in out


def test_missing_log_is_exit_1(tmp_path, capsys):
    assert zmg.main(["-log", "--results-log", str(tmp_path / "none.xml")]) == 1
    assert "cannot read the results log" in capsys.readouterr().err


def test_results_log_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(zmg, "CONFIG_DIR", str(tmp_path))
    (tmp_path / "imgsrvd.conf").write_text("ResultsLog = logs/r.xml  # relative\n")
    args = argparse.Namespace(results_log=None)
    assert zmg.results_log_path(args) == str(tmp_path / "logs" / "r.xml")


@pytest.mark.parametrize("count", [1, 20])
def test_json(tmp_path, capsys, count):
    import json
    path = tmp_path / "results.xml"
    write_log(path, 25)
    assert zmg.main(["-log", str(count), "--json", "--results-log", str(path)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == count
