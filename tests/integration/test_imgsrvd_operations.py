"""One results log entry and one Update Request per imaging operation, not per HTTP request
(issue 13, item 4; the rules are imgsrvd/operations.py and docs/imaging-protocol.md,
"Operations"): a retrieve made of a HEAD, the header probe and ranged batches is one operation;
the engine's report of a store or retrieve it did here joins the server's record of it.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from imgsrvd.resultslog import read_entries
from tests.integration.test_imgsrvd_http import (  # noqa: F401 - fixtures
    Imgsrvd, image, imgsrvd, imgsrvd_factory, make_image, wait_for, workdir)

SESSION = "0123456789abcdef"


class Client:
    """A keep-alive HTTP client that speaks as img does (optionally with a session)."""

    def __init__(self, daemon: Imgsrvd, session: str = ""):
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        self.headers = {"X-Preboot-Workstation": "ws1"}
        if session:                 # as img does towards the server it reports to
            self.headers.update({"X-Preboot-Session": session, "X-Preboot-Reports": "yes"})

    def request(self, method: str, path: str, body: bytes | None = None,
                **headers: str) -> tuple[int, bytes]:
        self.conn.request(method, path, body, {**self.headers, **headers})
        response = self.conn.getresponse()
        return response.status, response.read()

    def head(self, name: str) -> int:
        return self.request("HEAD", f"/v1/images/{name}")[0]

    def range(self, name: str, first: int, last: int) -> bytes:
        status, data = self.request("GET", f"/v1/images/{name}", Range=f"bytes={first}-{last}")
        assert status == 206, status
        return data

    def report(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, data = self.request("POST", "/v1/results", json.dumps(body).encode(),
                                    **{"Content-Type": "application/json"})
        return status, json.loads(data)


def restore_like_img(client: Client, name: str, size: int, batch: int = 100_000) -> int:
    """What img restore sends: HEAD, the header, the trailer and index, then the chunks in
    batches. Returns the bytes received."""
    assert client.head(name) == 200
    got = len(client.range(name, 0, 4095)) + len(client.range(name, size - 4096, size - 1))
    for first in range(0, size, batch):
        got += len(client.range(name, first, min(size, first + batch) - 1))
    return got


def entries(daemon: Imgsrvd) -> list:
    path = daemon.workdir / "results.xml"
    return list(read_entries(path)) if path.exists() else []


def store(daemon: Imgsrvd, image: Path, name: str, session: str = "") -> int:
    client = Client(daemon, session)
    return client.request("PUT", f"/v1/images/{name}", image.read_bytes())[0]


def test_a_ranged_retrieve_is_one_operation_with_one_entry(imgsrvd, image):
    assert imgsrvd.upload(image, "r.img")[0] == 201
    before = imgsrvd.counters()["update_requests"]
    size = image.stat().st_size
    sent = restore_like_img(Client(imgsrvd), "r.img", size)
    counters = imgsrvd.counters()
    assert counters["update_requests"] - before == 1, counters
    assert counters["images_sent"] == 1
    assert wait_for(lambda: len(entries(imgsrvd)) == 2)
    retrieve = entries(imgsrvd)[1]
    assert (retrieve.operation, retrieve.status, retrieve.image_path, retrieve.workstation) == \
        ("download", "success", "r.img", "ws1")
    assert retrieve.bytes == sent > size            # every byte of the retrieve, probe included


def test_img_s_report_joins_its_retrieve_and_its_store(imgsrvd, image):
    client = Client(imgsrvd, SESSION)
    assert client.request("PUT", "/v1/images/j.img", image.read_bytes())[0] == 201
    assert client.report({"workstation": "ws1", "operation": "upload", "image_path": "j.img",
                          "status": "success", "session": SESSION})[0] == 200
    size = image.stat().st_size
    sent = restore_like_img(client, "j.img", size)
    status, answer = client.report({"mac": "52:54:00:00:00:01", "operation": "download",
                                    "image_path": "j.img", "status": "success",
                                    "session": SESSION})
    assert (status, answer["logged"]) == (200, True), answer
    counters = imgsrvd.counters()
    assert (counters["update_requests"], counters["images_sent"],
            counters["images_received"], counters["results_logged"]) == (2, 1, 1, 2), counters
    made, restored = entries(imgsrvd)               # written before the answers: no waiting
    assert (made.operation, made.status, made.bytes, made.image_type) == \
        ("upload", "success", size, "base")
    assert (restored.operation, restored.status, restored.bytes, restored.workstation,
            restored.requesting_address) == ("download", "success", sent, "525400000001",
                                                "127.0.0.1")


def test_a_failed_retrieve_reported_by_img_is_one_failure_entry(imgsrvd):
    client = Client(imgsrvd, SESSION)
    assert client.head("missing.img") == 404            # img's first request
    client.report({"workstation": "ws1", "operation": "download", "image_path": "missing.img",
                   "status": "failure", "error_message": "restore failed: 404"})
    assert client.report({"workstation": "ws1", "operation": "download", "session": SESSION,
                          "image_path": "missing.img", "status": "failure",
                          "error_message": "restore of missing.img failed: 404"})[0] == 200
    logged = entries(imgsrvd)
    # the report without a session is an operation of its own; the one with it joins the
    # refused HEAD, whose entry keeps the server's reason
    assert [(e.status, e.error_message) for e in logged][0] == ("failure", "restore failed: 404")
    assert len(logged) == 2 and logged[1].status == "failure", logged
    assert "missing.img" in logged[1].error_message and "restore of" not in \
        logged[1].error_message, logged
    assert imgsrvd.counters()["update_requests"] == 2


def test_two_sessions_behind_one_address_are_two_retrieves(imgsrvd, image):
    assert imgsrvd.upload(image, "t.img")[0] == 201
    size = image.stat().st_size
    one, two = Client(imgsrvd, "aaaa"), Client(imgsrvd, "bbbb")
    one.range("t.img", 0, size // 2)
    two.range("t.img", 0, size // 2)
    one.range("t.img", size // 2, size - 1)
    two.range("t.img", size // 2, size - 1)
    counters = imgsrvd.counters()
    assert (counters["update_requests"], counters["images_sent"]) == (3, 2), counters


def test_a_resumed_curl_download_is_one_retrieve(imgsrvd, image, workdir):
    assert imgsrvd.upload(image, "c.img")[0] == 201
    size = image.stat().st_size
    part = workdir / "part.img"
    assert imgsrvd.download("c.img", part, "-r", f"0-{size // 3 - 1}") == 206
    assert imgsrvd.download("c.img", part, "-C", "-") == 206
    counters = imgsrvd.counters()
    assert (counters["update_requests"], counters["images_sent"]) == (2, 1), counters
    assert wait_for(lambda: len(entries(imgsrvd)) == 2)
    assert entries(imgsrvd)[1].bytes == size


def test_a_store_without_a_session_is_logged_at_once(imgsrvd, image):
    assert store(imgsrvd, image, "n.img") == 201
    assert wait_for(lambda: len(entries(imgsrvd)) == 1)
    assert entries(imgsrvd)[0].bytes == image.stat().st_size


def test_an_unreported_store_is_logged_when_the_server_stops(imgsrvd, image):
    assert store(imgsrvd, image, "u.img", SESSION) == 201
    assert entries(imgsrvd) == []                          # waiting for img's report
    assert imgsrvd.stop() == 0
    assert [(e.operation, e.status) for e in entries(imgsrvd)] == [("upload", "success")]


def test_a_bad_session_in_a_report_is_400(imgsrvd):
    status, answer = Client(imgsrvd).report({"workstation": "w", "operation": "upload",
                                             "status": "success", "session": "x" * 65})
    assert status == 400 and "session" in answer["error"]


def test_a_session_that_reports_elsewhere_is_logged_at_once(imgsrvd, image):
    """A referred img reports to the server that referred it: the server that served it
    writes its own entry when the retrieve ends."""
    assert imgsrvd.upload(image, "e.img")[0] == 201
    client = Client(imgsrvd)
    client.headers["X-Preboot-Session"] = SESSION
    restore_like_img(client, "e.img", image.stat().st_size)
    assert wait_for(lambda: len(entries(imgsrvd)) == 2)
    assert (entries(imgsrvd)[1].operation, entries(imgsrvd)[1].status) == ("download", "success")
