"""Hostile input to the HTTP daemons (issue 13, the lesser items): malformed JSON bodies get a
400 with a reason, never a 500 with a traceback; text a client chose cannot forge a line in the
daemon log; a client that never reads is disconnected. The real daemons on 127.0.0.1, with the
fixtures of test_imgsrvd_http.py and test_policyd_http.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # --import-mode=importlib
from test_imgsrvd_http import imgsrvd, imgsrvd_factory, workdir  # noqa: F401 (fixtures)
from test_policyd_http import policyd, policyd_factory  # noqa: F401 (fixtures)

MALFORMED = {
    "a 5,000-digit number": b'{"mac": "525400000001", "ram_mb": ' + b"9" * 5000 + b"}",
    "a 5,000-digit number as mode": b'{"mode": ' + b"9" * 5000 + b"}",
    "60,000 [": b"[" * 60_000,          # under the 64 KiB bound: the parser must cope
    "100,000 [": b"[" * 100_000,
    "deep objects": b'{"a": ' * 5000 + b"1" + b"}" * 5000,
    "not UTF-8": b'{"mac": "\xff\xfe"}',
    "not an object": b"[1, 2, 3]",
    "a bare string": b'"525400000001"',
    "NaN": b'{"ram_mb": NaN}',
    "oversize": b'{"x": "' + b"a" * 200_000 + b'"}',
}


def post_raw(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/v1/work", "/v1/results"])
@pytest.mark.parametrize("what", list(MALFORMED))
def test_imgsrvd_malformed_json_is_400_with_a_reason(imgsrvd, path, what):
    code, answer = post_raw(imgsrvd.port, path, MALFORMED[what])
    assert code == 400, (what, answer)
    assert answer["error"]
    log = imgsrvd.log()
    assert "Traceback" not in log and "internal error" not in log


FORGED = "\nFORGED preboot-imgsrvd[1]: INFO 525400000009: restore lab/x.img: success"


def forged_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("FORGED")]


def test_imgsrvd_newlines_in_client_fields_cannot_forge_a_log_line(imgsrvd):
    code, answer = post_raw(imgsrvd.port, "/v1/results", json.dumps({
        "workstation": "lab-1" + FORGED, "operation": "upload", "status": "failure",
        "image_path": "lab/a.img\r" + FORGED, "error_message": "disk full\x1b[2J" + FORGED,
    }).encode())
    assert code == 200, answer
    code, answer = post_raw(imgsrvd.port, "/v1/work", json.dumps(
        {"mac": "52540000000z" + FORGED}).encode())
    assert code == 400
    log = imgsrvd.log()
    assert forged_lines(log) == []
    assert "lab-1\\x0aFORGED" in log and "\\x1b[2J" in log and "\x1b" not in log


def test_policyd_a_bad_mac_cannot_forge_a_log_line(policyd):
    code, _ctype, body = policyd.curl("/policy", params={"mac": "00c04f" + FORGED})
    assert code == 400, body
    code, _ctype, body = policyd.curl("/policy", params={
        "mac": "00:c0:4f:dc:2a:b5", "platform": "efi" + FORGED, "manufacturer": "x" + FORGED})
    assert code in (200, 400), body
    time.sleep(0.2)
    log = policyd.log()
    assert forged_lines(log) == [], log


# ---- a missing SQLite directory is an error, not an empty policy -------------------------------

def test_imgsrvd_missing_directory_file_is_a_directory_error(imgsrvd_factory, workdir):
    missing = workdir / "typo" / "directory.db"
    daemon = imgsrvd_factory(Directory=f"sqlite://{missing}")
    code, answer = post_raw(daemon.port, "/v1/work", b'{"mac": "525400000001"}')
    assert code == 503, answer
    assert "no such database file" in answer["error"]
    assert daemon.counters()["directory_errors"] == 1
    assert not missing.parent.exists()


def test_policyd_missing_directory_file_answers_fallback(policyd_factory, workdir):
    missing = workdir / "typo.db"
    daemon = policyd_factory(Directory=f"sqlite://{missing}")
    body = daemon.policy(mac="00:c0:4f:dc:2a:b5")
    assert "preboot-answer: local directory unavailable" in body
    counters = daemon.counters()
    assert counters["directory_errors"] == 1 and counters["no_work"] == 0
    assert not missing.exists()
    assert "no such database file" in daemon.log()


# ---- the TCP status port: loopback unless configured, and no pid, version or config ------------

def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_tcp(pid: int) -> set[tuple[str, int]]:
    psutil = pytest.importorskip("psutil")
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_status_port_is_on_loopback_even_when_the_service_is_on_every_address(imgsrvd_factory):
    status_port = free_tcp_port()
    daemon = imgsrvd_factory(IPAddress="0.0.0.0", StatusPort=status_port)
    assert ("127.0.0.1", status_port) in listening_tcp(daemon.pid)
    assert ("0.0.0.0", status_port) not in listening_tcp(daemon.pid)
    with socket.create_connection(("127.0.0.1", status_port), timeout=5) as sock:
        sock.sendall(b'{"cmd": "status"}\n')
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] and reply["daemon"] == "imgsrvd"
    assert not {"pid", "version", "config"} & set(reply), reply


def test_status_address_opens_the_status_port_wider_when_asked(imgsrvd_factory):
    status_port = free_tcp_port()
    daemon = imgsrvd_factory(StatusPort=status_port, StatusAddress="0.0.0.0")
    assert ("0.0.0.0", status_port) in listening_tcp(daemon.pid)


# ---- a client that never reads ------------------------------------------------------------------

def connections_from(pid: int, local_port: int) -> list:
    psutil = pytest.importorskip("psutil")
    return [c for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == local_port]


def stuff_without_reading(port: int) -> socket.socket:
    """Pipeline requests and never read the answers, until the server stops taking them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2.0)
    request = b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    try:
        for _ in range(10_000):
            sock.sendall(request)
    except socket.timeout:
        pass                                  # the server stopped reading: it is stuck on us
    return sock


def test_policyd_closes_a_client_that_never_reads(policyd):
    from prebootpolicyd import server
    KEEPALIVE_S, SEND_TIMEOUT_S = server.KEEPALIVE_S, getattr(server, "SEND_TIMEOUT_S", 10.0)
    sock = stuff_without_reading(policyd.port)
    local_port = sock.getsockname()[1]
    try:
        assert connections_from(policyd.pid, local_port), "the connection should be open now"
        deadline = time.monotonic() + max(KEEPALIVE_S, SEND_TIMEOUT_S) + 8
        while connections_from(policyd.pid, local_port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert connections_from(policyd.pid, local_port) == [], \
            "a client that never reads still holds its connection"
        # and the service still answers everyone else
        assert policyd.curl("/boot.ipxe")[0] == 200
    finally:
        sock.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("what", list(MALFORMED))
def test_policyd_malformed_bodies_are_never_a_500(policyd, method, what):
    """policyd reads no body (GET only): whatever one holds, a 4xx or the answer, no 500."""
    conn = http.client.HTTPConnection("127.0.0.1", policyd.port, timeout=20)
    try:
        conn.request(method, "/policy?mac=00:c0:4f:dc:2a:b5", body=MALFORMED[what],
                     headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (200, 400, 405, 413), status
    assert "Traceback" not in policyd.log()
