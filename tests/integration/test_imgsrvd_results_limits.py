"""The results log under a flood (issue 13): per-host rate limit, a bounded write queue, a report
acknowledged only once it is durable, rotation by size with every file well-formed XML.

The writer is held up by taking the log's own exclusive flock from the test (the daemon's
ResultsLog.append waits for it), so a slow disk is simulated without timing luck.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from imgsrvd.resultslog import ResultsLog, read_entries
from tests.integration.test_imgsrvd_http import (  # noqa: F401 - fixtures
    Imgsrvd, imgsrvd_factory, wait_for, workdir)

REPORT = {"mac": "52:54:00:00:00:01", "operation": "upload", "image_path": "lab/a.img",
          "status": "failure", "error_message": "disk error"}


def post_result(daemon: Imgsrvd, body: dict[str, Any], source: str = "127.0.0.1",
                timeout_s: float = 10.0) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON answer) of one POST /v1/results from the source address."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(daemon), timeout=timeout_s,
                                      source_address=(source, 0))
    try:
        conn.request("POST", "/v1/results", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def port_of(daemon: Imgsrvd) -> int:
    """The daemon's port, asked of its status socket once."""
    port = getattr(daemon, "cached_port", None)
    if port is None:
        port = daemon.cached_port = daemon.port
    return port


@contextmanager
def writer_held(path: Path) -> Iterator[None]:
    """The results log's exclusive lock held here: the daemon's writer waits for it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def results_path(daemon: Imgsrvd) -> Path:
    return daemon.workdir / "results.xml"


def test_reports_are_rate_limited_per_host(imgsrvd_factory):
    daemon = imgsrvd_factory(ResultsPerMinute=5)
    answers = [post_result(daemon, REPORT)[0] for _ in range(5)]
    assert answers == [200] * 5
    status, headers, body = post_result(daemon, REPORT)
    assert status == 429 and "ResultsPerMinute" in body["error"], body
    assert 1 <= int(headers["Retry-After"]) <= 13            # one report every 12 s
    assert post_result(daemon, REPORT, source="127.0.0.2")[0] == 200   # another host
    counters = daemon.counters()
    assert (counters["results_rate_limited"], counters["results_logged"]) == (1, 6)
    assert len(list(read_entries(results_path(daemon)))) == 6


def test_a_report_is_acknowledged_only_after_its_write(imgsrvd_factory):
    daemon = imgsrvd_factory()
    path = results_path(daemon)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with writer_held(path):
            answer = pool.submit(post_result, daemon, REPORT)
            time.sleep(1.0)
            assert not answer.done(), "answered while the entry could not be written"
        status, _, body = answer.result(10)
    assert (status, body["logged"]) == (200, True), body
    # acknowledged: it is in the file already, no waiting
    assert [e.image_path for e in read_entries(path)] == ["lab/a.img"]


def test_a_full_queue_answers_503_and_counts(imgsrvd_factory):
    daemon = imgsrvd_factory(ResultsQueue=2, ResultsPerMinute=0)
    path = results_path(daemon)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with writer_held(path):
            waiting = [pool.submit(post_result, daemon, REPORT) for _ in range(2)]
            assert wait_for(lambda: daemon.counters()["update_requests"] == 2, 5)
            refused = [post_result(daemon, REPORT, timeout_s=5) for _ in range(4)]
            assert all(not f.done() for f in waiting)
        assert [f.result(10)[0] for f in waiting] == [200, 200]
    assert [(s, h.get("Retry-After")) for s, h, _ in refused] == [(503, "5")] * 4, refused
    assert "ResultsQueue" in refused[0][2]["error"]
    counters = daemon.counters()
    assert (counters["results_queue_full"], counters["results_logged"]) == (4, 2)
    assert len(list(read_entries(path))) == 2


def _send_and_forget(port: int, payload: bytes) -> None:
    """One report; the answer is awaited briefly (a held-up report is not waited for)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(0.3)
        try:
            sock.recv(4096)
        except OSError:
            pass


def test_a_flood_of_big_reports_keeps_memory_bounded(imgsrvd_factory):
    """2,000 reports of ~48 KiB each (4,000 astral characters in three fields) while the disk
    is stuck: the daemon's RSS grows by less than 24 MiB (it grew by the whole flood, ~100 MiB,
    when every entry was queued)."""
    daemon = imgsrvd_factory(ResultsQueue=64, ResultsPerMinute=0)
    wide = "\U0001F600" * 4000
    body = json.dumps({**REPORT, "workstation": wide, "image_path": wide,
                       "error_message": wide}, ensure_ascii=False).encode()
    payload = (f"POST /v1/results HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    process = psutil.Process(daemon.pid)
    before = process.memory_info().rss
    peak = before
    with writer_held(results_path(daemon)):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            port = port_of(daemon)
            futures = [pool.submit(_send_and_forget, port, payload) for _ in range(2000)]
            for n, future in enumerate(futures):
                future.result(60)
                if n % 100 == 0:
                    peak = max(peak, process.memory_info().rss)
        peak = max(peak, process.memory_info().rss)
    grown_mib = (peak - before) / (1 << 20)
    assert grown_mib < 24, f"RSS grew {grown_mib:.0f} MiB"
    # Every report the daemon read was queued (64 at most) or refused; on a loaded machine some
    # clients give up (0.3 s) before the daemon reads theirs, so the refusals are counted
    # against what was written, not against the 2,000 sent.
    counters = daemon.counters()
    assert counters["results_logged"] <= 64 + 1, counters
    assert counters["results_queue_full"] >= 1000, counters


def test_rotation_by_size_keeps_every_file_well_formed(imgsrvd_factory):
    daemon = imgsrvd_factory(ResultsLogMaxSize=1, ResultsLogKeep=3, ResultsPerMinute=0)
    path = results_path(daemon)
    for n in range(30):
        assert post_result(daemon, {**REPORT, "image_path": f"lab/{n}.img"})[0] == 200
    files = [path] + [Path(f"{path}.{n}") for n in (1, 2, 3)]
    assert all(f.exists() for f in files) and not Path(f"{path}.4").exists()
    assert all(f.stat().st_size <= 1024 for f in files), [f.stat().st_size for f in files]
    _well_formed(files)
    seen = [e.image_path for f in reversed(files) for e in read_entries(f)]
    assert seen == [f"lab/{n}.img" for n in range(30 - len(seen), 30)]   # newest, in order


def test_rotated_files_stay_well_formed_after_kill_9(imgsrvd_factory):
    daemon = imgsrvd_factory(ResultsLogMaxSize=2, ResultsLogKeep=50, ResultsPerMinute=0)
    path = results_path(daemon)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                post_result(daemon, REPORT, timeout_s=2)
            except OSError:
                return

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: Path(f"{path}.3").exists(), 20)
    daemon.signal(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(10)
    daemon.proc.wait(10)
    rotated = sorted(path.parent.glob("results.xml.*"))
    assert len(rotated) >= 3
    _well_formed(rotated)                        # never torn: renamed only when complete
    ResultsLog(path).open()                      # the current one: recovered at start
    _well_formed([path])


def _well_formed(files: list[Path]) -> None:
    if shutil.which("xmllint"):
        result = subprocess.run(["xmllint", "--noout", *map(str, files)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    for f in files:
        list(read_entries(f))


def test_a_reload_applies_the_limits_and_rotation(imgsrvd_factory):
    daemon = imgsrvd_factory(ResultsPerMinute=2)
    path = results_path(daemon)
    assert [post_result(daemon, REPORT)[0] for _ in range(3)] == [200, 200, 429]
    text = daemon.config.read_text().replace("ResultsPerMinute = 2", "ResultsPerMinute = 0")
    daemon.config.write_text(text + "ResultsLogMaxSize = 1\nResultsLogKeep = 1\n")
    daemon.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in daemon.log())
    assert [post_result(daemon, REPORT)[0] for _ in range(6)] == [200] * 6
    assert Path(f"{path}.1").exists() and not Path(f"{path}.2").exists()
    _well_formed([path, Path(f"{path}.1")])
