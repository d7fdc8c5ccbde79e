"""imgsrvd's status page (GET /status) in a real browser engine: Chromium (Debian's, from
scripts/install-deps.sh) driven by Playwright for Python with executable_path, against the real
imgsrvd and tftpd. What the DOM shows is compared with the daemons' status sockets; a result
reported with hostile text shows that text as text and runs no script (docs/monitoring.md,
docs/security.md)."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.policy.directory import open_directory
from support import DaemonProcess, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium (scripts/install-deps.sh installs Debian's chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip: .[test])")

HOSTILE_NAME = "<script>window.__pwned=1</script>"
HOSTILE_ERROR = "disk \"full\" & <img src=x onerror=\"window.__pwned=2\">\x1b[2J"
HOSTILE_IMAGE = "lab/<b>w10</b>.zmg"


def _post(port: int, path: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _tftp_miss(port: int) -> None:
    """One read request for a file tftpd does not have: its error counter moves."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\x00\x01no-such-file\x00octet\x00", ("127.0.0.1", port))
        data, _ = sock.recvfrom(1024)
        assert data[:2] == b"\x00\x05", data


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="pbstp-", dir="/tmp"))
    etc = work / "etc"
    etc.mkdir()
    (work / "root").mkdir()
    open_directory(f"sqlite://{work / 'dir.db'}", create=True).close()
    common = {"StatusPort": 0, "LogLevel": "DEBUG"}
    tftpd_values = {**common, "IPAddress": "127.0.0.1", "Port": 0, "Root": str(work / "root"),
                    "StatusSocket": str(work / "tftpd.sock"), "PidFile": str(work / "t.pid"),
                    "LogFile": str(work / "tftpd.log")}
    imgsrvd_values = {**common, "IPAddress": "127.0.0.1", "Port": 0,
                      "ImageRoot": str(work / "images"), "Directory": f"sqlite://{work}/dir.db",
                      "AllowAnonymous": True, "ResultsLog": str(work / "results.xml"),
                      "ServerName": "imgsrv.test", "TokenKeyFile": str(work / "imaging.key"),
                      "StatusSocket": str(work / "imgsrvd.sock"), "PidFile": str(work / "i.pid"),
                      "LogFile": str(work / "imgsrvd.log")}
    # the other daemons' sockets as zmgmcast finds them: StatusSocket of etc/<name>.conf;
    # the run dir is empty, so proxydhcpd and policyd (not started) are down
    env = {"PREBOOT_CONFIG_DIR": str(etc), "PREBOOT_RUN_DIR": str(work / "run")}
    started: list[DaemonProcess] = []
    try:
        tftpd = DaemonProcess("tftpd", write_config(etc / "tftpd.conf", tftpd_values),
                              tftpd_values["StatusSocket"], work / "tftpd.log")
        started.append(tftpd.start(timeout_s=20))
        imgsrvd = DaemonProcess("imgsrvd", write_config(etc / "imgsrvd.conf", imgsrvd_values),
                                imgsrvd_values["StatusSocket"], work / "imgsrvd.log",
                                extra_env=env)
        started.append(imgsrvd.start(timeout_s=20))
        yield {"work": work, "tftpd": tftpd, "imgsrvd": imgsrvd,
               "url": f"http://127.0.0.1:{imgsrvd.port}/status"}
    finally:
        for daemon in started:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(stack) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


def test_page_in_chromium(stack, browser):
    imgsrvd, tftpd = stack["imgsrvd"], stack["tftpd"]
    _tftp_miss(tftpd.port)
    assert _post(imgsrvd.port, "/v1/results", {
        "workstation": HOSTILE_NAME, "operation": "download", "status": "failure",
        "image_type": "base", "image_path": HOSTILE_IMAGE,
        "error_message": HOSTILE_ERROR}) == 200
    assert _post(imgsrvd.port, "/v1/results", {
        "workstation": "lab-pc8", "operation": "upload", "status": "success",
        "image_type": "base", "image_path": "lab/ok.zmg"}) == 200
    time.sleep(2.2)            # past the page's cache: what follows is all on the page
    tftp_counters = tftpd.counters()
    img_counters = imgsrvd.counters()

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text)
            if "Content Security Policy" in message.text else None)
    response = page.goto(stack["url"], wait_until="load")
    assert response is not None and response.status == 200
    headers = response.headers
    csp = headers.get("content-security-policy", "")
    assert csp.startswith("default-src 'none';") and "style-src 'sha256-" in csp
    assert headers["content-type"].startswith("text/html")
    assert headers.get("x-content-type-options") == "nosniff"

    # the daemons, up or down
    states = {name: page.get_attribute(f'[data-daemon="{name}"]', "data-state")
              for name in ("proxydhcpd", "tftpd", "policyd", "imgsrvd")}
    assert states == {"proxydhcpd": "down", "tftpd": "up", "policyd": "down",
                      "imgsrvd": "up"}
    assert page.inner_text('[data-daemon="policyd"] [data-field="detail"]') == "(not running)"
    assert page.inner_text('[data-daemon="tftpd"] [data-field="version"]') == \
        tftpd.status()["version"]
    listen = page.inner_text('[data-daemon="tftpd"] [data-field="listen"]')
    assert f"127.0.0.1:{tftpd.port}" in listen

    # the counters, as the status sockets say them
    def shown(daemon: str, counter: str) -> str:
        return page.inner_text(f'[data-daemon="{daemon}"] tr[data-counter="{counter}"] td')

    for name, value in tftp_counters.items():
        if isinstance(value, dict):
            text = shown("tftpd", name)
            assert all(f"{kind} {count}" in text for kind, count in value.items()), name
        else:
            assert shown("tftpd", name) == str(value), name
    assert tftp_counters["errors"].get("file_not_found") == 1
    for name in ("update_requests", "results_logged", "images_sent", "failures"):
        assert shown("imgsrvd", name) == str(img_counters[name]), name
    assert img_counters["results_logged"] == 2

    # the results, newest first, hostile text as text and no script run
    rows = page.locator("#results tr").all()[1:]
    workstations = [row.locator('[data-field="workstation"]').inner_text() for row in rows]
    assert workstations[:2] == ["lab-pc8", HOSTILE_NAME]
    hostile_row = rows[1]
    # (the results log keeps no C0 control: the escape is U+FFFD there, imgsrvd/resultslog.py)
    assert hostile_row.locator('[data-field="error_message"]').inner_text() == \
        HOSTILE_ERROR.replace("\x1b", "\ufffd")
    assert hostile_row.locator('[data-field="image_path"]').inner_text() == HOSTILE_IMAGE
    assert hostile_row.locator('[data-field="status"]').inner_text() == "failure"
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('script, img, b').length") == 0
    # the stylesheet's hash in the CSP is the one Chromium computes: the style applies
    assert page.evaluate("getComputedStyle(document.querySelector("
                         "'[data-daemon=tftpd] .up')).color") == "rgb(0, 102, 0)"
    assert errors == []
    page.close()


def test_read_only_and_head(stack):
    url = stack["url"]
    request = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET, HEAD"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as head:
        assert head.status == 200 and head.read() == b""
        assert head.headers["Content-Security-Policy"].startswith("default-src 'none';")
