"""zmgmcast -status -i HOST against a status port that is not one of ours: escape sequences,
wrong types, endless or slow replies. Each is reported ("bad reply from HOST", "not
reachable"), never a traceback, and nothing the remote sent reaches the terminal raw."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

import zmgmcast.__main__ as zmg
from common.daemon import services, statussock

GOOD = {"ok": True, "daemon": "imgsrvd", "service": "Preboot Imaging Service",
        "uptime_s": 5.0, "listen": [{"proto": "tcp", "address": "0.0.0.0", "port": 998}],
        "counters": {"update_requests": 1}}


class Liar:
    """A TCP 'status port' that reads one line and answers with REPLY (bytes), then either
    closes or, with trickle_s, sends it one byte at a time."""

    def __init__(self, reply: bytes, trickle_s: float = 0.0):
        self.reply, self.trickle_s = reply, trickle_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                conn.recv(4096)
                if self.trickle_s:
                    for byte in self.reply:
                        conn.sendall(bytes([byte]))
                        time.sleep(self.trickle_s)
                else:
                    conn.sendall(self.reply)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def liar():
    made: list[Liar] = []

    def make(reply: bytes, trickle_s: float = 0.0) -> Liar:
        made.append(Liar(reply, trickle_s))
        return made[-1]
    yield make
    for each in made:
        each.close()


def line(value) -> bytes:
    return json.dumps(value).encode() + b"\n"


def run(capsys, port: int) -> tuple[int, str]:
    code = zmg.main(["-status", "-i", "127.0.0.1", "-p", str(port)])
    return code, capsys.readouterr().out


def test_escape_sequences_from_a_remote_are_escaped(liar, capsys):
    evil = "\x1b]0;owned\x07\x1b[2J\nFORGED row"
    reply = {**GOOD, "service": evil, "version": evil, "error": evil,
             "listen": [{"proto": evil, "address": evil, "port": evil}],
             "counters": {"update_requests": 1, "x\x1b[31m": evil, "errors": {evil: 1}}}
    code, out = run(capsys, liar(line(reply)).port)
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert not any(row.startswith("FORGED") for row in out.splitlines())
    assert "\\x1b[2J" in out


@pytest.mark.parametrize("reply", [
    {**GOOD, "uptime_s": "long"}, {**GOOD, "uptime_s": 1e300}, {**GOOD, "pid": "x"},
    {**GOOD, "counters": [1, 2]}, {**GOOD, "counters": {"a": [1]}},
    {**GOOD, "listen": "everywhere"}, {**GOOD, "listen": [1]}, {**GOOD, "daemon": 7},
    {**GOOD, "ok": "yes"}, [1, 2], "status",
])
def test_a_wrong_typed_reply_is_a_bad_reply(liar, capsys, reply):
    daemon = liar(line(reply))
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", daemon.port)
    assert report.state == "error"
    assert report.detail.startswith(f"bad reply from 127.0.0.1:{daemon.port}"), report.detail
    code, out = run(capsys, liar(line(reply)).port)
    assert code == 3 and "bad reply from 127.0.0.1" in out


@pytest.mark.parametrize("raw", [b"\xff\xfe\n", b"[" * 100_000 + b"\n",
                                 b'{"pid": ' + b"9" * 5000 + b"}\n"])
def test_a_reply_that_is_not_json_is_a_bad_reply(liar, raw):
    daemon = liar(raw)
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", daemon.port)
    assert report.state == "error" and "bad reply from" in report.detail, report.detail


def test_an_endless_reply_is_cut_at_the_bound(liar):
    daemon = liar(b"x" * (statussock.MAX_REPLY_BYTES + 100_000))
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", daemon.port)
    assert report.state == "error" and "longer than" in report.detail, report.detail


def test_a_trickled_reply_is_cut_at_the_deadline(liar, monkeypatch):
    daemon = liar(line(GOOD), trickle_s=0.2)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        statussock.query_tcp("127.0.0.1", daemon.port, timeout_s=1.0)
    assert time.monotonic() - started < 2.0
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", liar(line(GOOD), 0.2).port)
    assert report.state == "not reachable" and "timed out" in report.detail
