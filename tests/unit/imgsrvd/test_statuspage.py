"""The status page (imgsrvd/statuspage.py): the pure renderer with hostile text in every field a
client or a status socket controls, the reply checks, the results log's tail and the cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html.parser
import json
import os
import socket
import threading
from datetime import datetime, timezone

import pytest

from common.daemon import services
from imgsrvd import statuspage
from imgsrvd.resultslog import ResultEntry, ResultsLog, tail_entries
from imgsrvd.statuspage import (CONTENT_SECURITY_POLICY, STYLE, DaemonView, PageData, StatusPage,
                                ask_daemon, render, result_row)


class Collect(html.parser.HTMLParser):
    """Tags and text of a page, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def parsed(page: str) -> Collect:
    collect = Collect()
    collect.feed(page)
    collect.close()
    return collect


def daemons(up: bool = True, **fields) -> tuple[DaemonView, ...]:
    return tuple(DaemonView(s, up, **fields) for s in services.SERVICES)


def page_with(workstation: str = "pc", error: str = "", image: str = "lab/w.zmg",
              **extra) -> str:
    row = {"timestamp": "2026-01-02 03:04:05Z", "workstation": workstation,
           "operation": "download", "image_path": image, "status": "failure",
           "error_message": error}
    return render(PageData(0.0, "imaging1", daemons(), (row,), **extra))


HOSTILE = [
    # (text, what must appear in the page's text once parsed)
    ("<script>window.__pwned=1</script>", "<script>window.__pwned=1</script>"),
    ('"><img src=x onerror=alert(1)>', '"><img src=x onerror=alert(1)>'),
    ("' onmouseover='alert(1)", "' onmouseover='alert(1)"),
    ("a & b &amp; c &lt;", "a & b &amp; c &lt;"),
    ("line\nbreak\x1b[2J\x00end", "line\\x0abreak\\x1b[2J\\x00end"),
    ("</td></tr></table><h1>x</h1>", "</td></tr></table><h1>x</h1>"),
    ("\u202eevil", "\\u202eevil"),
]


@pytest.mark.parametrize("text,shown", HOSTILE)
@pytest.mark.parametrize("field", ["workstation", "error", "image"])
def test_hostile_text_is_shown_as_text(text, shown, field):
    page = page_with(**{field: text})
    collect = parsed(page)
    assert "script" not in collect.tags and "img" not in collect.tags and \
        collect.tags.count("h1") == 1
    assert not any(name.startswith("on") for name, _ in collect.attrs)
    assert shown in "".join(collect.text)


def test_escape_table():
    cases = {
        "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&#x27;",
        "\x07": "\\x07", "\x7f": "\\x7f", "\t": "\\x09", "plain": "plain",
    }
    for raw, escaped in cases.items():
        assert statuspage._text(raw) == escaped, raw


def test_very_long_text_is_truncated():
    long = "A" * 100_000 + "<script>"
    page = page_with(workstation=long, error="e" * 5000)
    assert "A" * statuspage.MAX_TEXT_CHARS + "..." in page
    assert "A" * (statuspage.MAX_TEXT_CHARS + 1) not in page
    assert "e" * (statuspage.MAX_TEXT_CHARS + 1) not in page
    assert len(page) < 50_000


def test_counters_listen_and_state_are_rendered():
    tftpd = DaemonView(services.TFTPD, True, version="1.2", uptime_s=90061.5,
                       listen=({"proto": "udp", "address": "0.0.0.0", "port": 69},),
                       counters={"transfers_completed": 7, "errors": {"<b>": 2}})
    down = DaemonView(services.POLICYD, False, "not running")
    page = render(PageData(0.0, "h<1>", (tftpd, down)))
    assert 'data-daemon="tftpd" data-state="up"' in page
    assert 'data-daemon="policyd" data-state="down"' in page and "not running" in page
    assert 'data-counter="transfers_completed"' in page and ">7</td>" in page
    assert "&lt;b&gt; 2" in page and "<b>" not in page
    assert "1d 1:01:01" in page and "udp 0.0.0.0:69" in page
    assert "h&lt;1&gt;" in page
    assert '<meta http-equiv="refresh" content="10">' in page


def test_hostile_daemon_reply_is_escaped():
    evil = DaemonView(services.TFTPD, True, version="<script>x</script>",
                      listen=({"proto": "<i>", "address": '"', "port": "<b>"},),
                      counters={"<x>": 1, '"q': {"<k>": 1}})
    page = render(PageData(0.0, "h", (evil,)))
    collect = parsed(page)
    assert not {"script", "i", "x", "k", "b"} & set(collect.tags)


def test_style_hash_matches_the_policy():
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CONTENT_SECURITY_POLICY
    assert CONTENT_SECURITY_POLICY.startswith("default-src 'none';")
    assert f"<style>{STYLE}</style>" in render(PageData(0.0, "h", daemons()))


def test_multicast_sessions_are_shown_when_any():
    assert "Multicast" not in render(PageData(0.0, "h", daemons(), multicast={
        "enabled": True, "sessions": []}))
    page = render(PageData(0.0, "h", daemons(), multicast={"enabled": True, "sessions": [{
        "name": "lab<1>", "image": "w.zmg", "state": "sending", "receivers": 2,
        "bytes_sent": 50, "image_bytes": 200, "rate_kbit_s": 1000,
        "participants": [{"mac": "52:54:00:00:00:01", "address": "192.0.2.1",
                          "state": "receiving", "progress": 0.25}]}]}))
    assert "lab&lt;1&gt;" in page and "25.0 %" in page and "sending" in page


def test_bad_replies_are_daemons_down():
    view = statuspage._view_of_reply(services.TFTPD, ["not", "a", "dict"])
    assert not view.up
    view = statuspage._view_of_reply(services.TFTPD, {"ok": True, "daemon": "policyd"})
    assert not view.up and "answers as policyd" in view.detail
    view = statuspage._view_of_reply(services.TFTPD, {
        "ok": True, "daemon": "tftpd", "counters": {"a": 1, "b": "x", "c": {"k": "v"}},
        "listen": ["x", {"port": 1}], "uptime_s": -5, "version": 3})
    assert view.up and view.counters == {"a": 1} and view.listen == ({"port": 1},)
    assert view.uptime_s is None and view.version == ""


def test_ask_daemon_not_running_and_silent(tmp_path):
    assert ask_daemon(services.TFTPD, str(tmp_path / "none.sock")).detail == "not running"
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        view = ask_daemon(services.TFTPD, path, timeout_s=0.3)
        assert not view.up and "0.3" in view.detail
    finally:
        server.close()


def test_tail_entries_newest_last_and_skips_torn_lines(tmp_path):
    path = tmp_path / "results.xml"
    with ResultsLog(str(path)) as results:
        for n in range(60):
            results.append(ResultEntry(f"pc{n}", "download", "success",
                                       error_message=f"e\n<{n}>"))
    entries = tail_entries(path, 50)
    assert [e.workstation for e in entries] == [f"pc{n}" for n in range(10, 60)]
    assert entries[-1].error_message == "e\n<59>"
    # a window that cuts an entry in two: that entry is skipped, not misread
    size = path.stat().st_size
    cut = tail_entries(path, 100, tail_bytes=size // 2)
    assert cut and cut[-1].workstation == "pc59" and len(cut) < 60
    with open(path, "ab") as handle:      # a torn append after the closing tag
        handle.write(b'<result timestamp="2026-01-01T00:00:00Z" workstation="tor')
    assert tail_entries(path, 1)[0].workstation == "pc59"


def test_result_row():
    entry = ResultEntry("pc", "upload", "denied", image_path="a.zmg", error_message="no",
                        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert result_row(entry) == {"timestamp": "2026-01-02 03:04:05Z", "workstation": "pc",
                                 "operation": "upload", "image_path": "a.zmg",
                                 "status": "denied", "error_message": "no"}


def test_page_is_cached_and_rendered_once_for_many_viewers(tmp_path):
    now = [100.0]
    own = DaemonView(services.IMGSRVD, True, counters={"update_requests": 1})
    page = StatusPage(lambda: own, lambda: None, lambda: None, config_dir=str(tmp_path),
                      run_dir=str(tmp_path), clock=lambda: now[0])

    async def many() -> list[bytes]:
        return await asyncio.gather(*(page.page() for _ in range(20)))

    bodies = asyncio.run(many())
    assert len(set(bodies)) == 1 and page.renders == 1
    assert b'data-daemon="tftpd" data-state="down"' in bodies[0]
    assert b"not open" in bodies[0]
    now[0] += statuspage.CACHE_S + 0.1
    asyncio.run(page.page())
    assert page.renders == 2


def test_gather_reads_sockets_from_the_config_dir(tmp_path):
    """The other daemons' sockets as zmgmcast finds them: StatusSocket of CONFIG_DIR/<name>.conf."""
    path = str(tmp_path / "t.sock")
    (tmp_path / "tftpd.conf").write_text(f"StatusSocket = {path}  # here\n")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    reply = {"ok": True, "daemon": "tftpd", "version": "9.9", "uptime_s": 5,
             "listen": [], "counters": {"transfers_completed": 42}}

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    own = DaemonView(services.IMGSRVD, True)
    page = StatusPage(lambda: own, lambda: str(tmp_path / "none.xml"), lambda: None,
                      config_dir=str(tmp_path), run_dir=str(tmp_path / "run"))
    try:
        data = asyncio.run(page.gather())
    finally:
        thread.join(5)
        server.close()
    views = {view.service.name: view for view in data.daemons}
    assert list(views) == [s.name for s in services.SERVICES]
    assert views["tftpd"].up and views["tftpd"].counters == {"transfers_completed": 42}
    assert not views["policyd"].up and data.results == () and data.results_problem == ""
    assert os.path.basename(path) == "t.sock"
