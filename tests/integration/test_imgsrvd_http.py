"""imgsrvd end to end: the real daemon on 127.0.0.1 (free port), real images made with
common.imaging.imagefile.ImageWriter, curl as the HTTP client (store, retrieve, resume), a SQLite
directory filled through the Directory API, the status socket and zmgmcast.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.policy.directory import open_directory
from common.imaging.imagefile import ImageWriter
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings, Rule,
                                 Workstation)
from support import REPO, DaemonProcess, write_config

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")

NEVER = MenuSettings(MenuDisplay.NEVER, 5)
CHUNK = 64 * 1024


def make_image(path: Path, chunks: int = 8, seed: int = 1) -> Path:
    """A real (small) base image: random chunks, a zero chunk, index and trailer."""
    rand = __import__("random").Random(seed)
    metadata = {"format": 1, "type": "base", "tool": "test", "streams": [
        {"number": 0, "role": "partition", "partition": 1, "size": chunks * CHUNK,
         "fill": "zero"}]}
    with open(path, "wb") as out:
        writer = ImageWriter(out, metadata, chunk_size=CHUNK)
        for n in range(chunks):
            data = bytes(CHUNK) if n == 1 else rand.randbytes(CHUNK)
            writer.add(0, n * CHUNK, data)
        writer.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Imgsrvd(DaemonProcess):
    workdir: Path
    db: Path
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def directory(self):
        return open_directory(f"sqlite://{self.db}")

    def curl(self, *args: str, path: str = "", max_time: int = 30) -> tuple[int, str]:
        """(HTTP status, body) of one curl run."""
        command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time",
                   str(max_time), *args]
        if path:
            command.append(self.url + path)
        result = subprocess.run(command, capture_output=True, text=True, timeout=max_time + 10)
        assert result.returncode == 0, result.stderr
        body, _, code = result.stdout.rpartition("\n")
        return int(code), body

    def upload(self, local: Path, name: str, *headers: str) -> tuple[int, str]:
        extra = [x for h in headers for x in ("-H", h)]
        return self.curl("-T", str(local), *extra, path=f"/v1/images/{name}")

    def download(self, name: str, out: Path, *args: str) -> int:
        result = subprocess.run(["curl", "-sS", "-o", str(out), "-w", "%{http_code}",
                                 "--max-time", "30", *args, f"{self.url}/v1/images/{name}"],
                                capture_output=True, text=True, timeout=40)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code, text = self.curl("-H", "Content-Type: application/json", "--data-binary",
                               json.dumps(body), path=path)
        return code, json.loads(text)

    def leftovers(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(".*.part-*"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbimg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def imgsrvd_factory(workdir: Path):
    started: list[Imgsrvd] = []

    def start(config_name: str = "", **overrides: Any) -> Imgsrvd:
        n = len(started)
        root = workdir / "images"
        db = workdir / "directory.db"
        if not db.exists():                 # as preboot-dir init does
            open_directory(f"sqlite://{db}", create=True).close()
        values: dict[str, Any] = {
            "IPAddress": "127.0.0.1", "Port": 0, "ImageRoot": str(root),
            "Directory": f"sqlite://{db}", "DirectoryTimeout": 2, "StatusPort": 0,
            "ResultsLog": str(workdir / "results.xml"), "ServerName": "imgsrv.test",
            "StatusSocket": str(workdir / f"i{n}.sock"), "PidFile": str(workdir / f"i{n}.pid"),
            "LogLevel": "DEBUG", "LogFile": str(workdir / f"i{n}.log"),
            # the protocol as such; capabilities: tests/integration/test_trust.py
            "AllowAnonymous": True, "TokenKeyFile": str(workdir / "imaging.key"),
        }
        values.update(overrides)
        config = write_config(workdir / (config_name or f"imgsrvd{n}.conf"), values)
        daemon = Imgsrvd("imgsrvd", config, values["StatusSocket"], Path(values["LogFile"]))
        daemon.workdir, daemon.db, daemon.root = workdir, db, root
        started.append(daemon)
        return daemon.start(timeout_s=20)

    yield start
    for daemon in started:
        assert daemon.stop() in (0, None, -9), daemon.log()


@pytest.fixture
def imgsrvd(imgsrvd_factory) -> Imgsrvd:
    return imgsrvd_factory()


@pytest.fixture
def image(workdir: Path) -> Path:
    return make_image(workdir / "source.img")


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ------------------------------------------------------------------------- store and retrieve

def test_store_and_retrieve_with_curl(imgsrvd, image, workdir):
    code, body = imgsrvd.upload(image, "lab/base.img", "X-Preboot-Workstation: 525400123456")
    assert code == 201, body
    assert json.loads(body)["size"] == image.stat().st_size
    stored = imgsrvd.root / "lab" / "base.img"
    assert sha256(stored) == sha256(image)
    out = workdir / "back.img"
    assert imgsrvd.download("lab/base.img", out) == 200
    assert sha256(out) == sha256(image)
    # HEAD tells the size without sending the image or counting it
    code, _ = imgsrvd.curl("-I", path="/v1/images/lab/base.img")
    assert code == 200
    # percent-encoded slashes are the same path
    assert imgsrvd.download("lab%2Fbase.img", workdir / "again.img") == 200
    counters = imgsrvd.counters()
    assert counters["images_received"] == 1
    assert counters["images_sent"] == 2
    assert counters["update_requests"] == 3
    assert counters["bytes_received"] == image.stat().st_size
    assert counters["active_transfers"] == 0
    assert imgsrvd.leftovers() == []


def test_missing_image_is_404(imgsrvd, workdir):
    assert imgsrvd.download("nope.img", workdir / "x") == 404


def test_resume_with_range_and_curl_continue(imgsrvd, image, workdir):
    assert imgsrvd.upload(image, "r.img")[0] == 201
    size = image.stat().st_size
    part = workdir / "partial.img"
    # an interrupted download: the first third, from this server
    assert imgsrvd.download("r.img", part, "-r", f"0-{size // 3 - 1}") == 206
    assert imgsrvd.counters()["images_sent"] == 0
    assert imgsrvd.download("r.img", part, "-C", "-") == 206       # resumed: now complete
    assert sha256(part) == sha256(image)
    # a Range that does not complete a client's copy is not an image sent (e.g. the trailer)
    assert imgsrvd.download("r.img", workdir / "head.bin", "-r", "0-99") == 206
    assert (workdir / "head.bin").read_bytes() == image.read_bytes()[:100]
    assert imgsrvd.download("r.img", workdir / "tail.bin", "-r", f"-32") == 206
    counters = imgsrvd.counters()
    assert counters["images_sent"] == 1
    assert counters["bytes_sent"] == size + 100 + 32


def test_ranged_downloads_share_one_kept_alive_connection(imgsrvd, image):
    """img fetches chunks in batches of Range GETs: each 206 must leave the connection open."""
    assert imgsrvd.upload(image, "k.img")[0] == 201
    data = image.read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", imgsrvd.port, timeout=10)
    try:
        sockets = set()
        for first, last in ((0, 99), (100, 4195), (len(data) - 32, len(data) - 1)):
            conn.request("GET", "/v1/images/k.img", headers={"Range": f"bytes={first}-{last}"})
            response = conn.getresponse()
            assert response.status == 206
            assert response.read() == data[first:last + 1]
            assert not response.will_close, response.getheaders()
            sockets.add(conn.sock.getsockname())
        assert len(sockets) == 1, f"reconnected: {sockets}"
    finally:
        conn.close()
    assert "Unhandled exception" not in imgsrvd.log()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_downloads_go_out_with_sendfile(imgsrvd, image, workdir):
    """Zero-copy, as docs/imaging-protocol.md says: the image's bytes leave with sendfile(2),
    not read into Python and written (what aiohttp falls back to on a loop without sendfile)."""
    assert imgsrvd.upload(image, "z.img")[0] == 201
    counts = workdir / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(counts), "-e",
                               "trace=sendfile,write,sendto,sendmsg", "-p", str(imgsrvd.pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: "attached" in (tracer.stderr.readline() or ""), 10)
        assert imgsrvd.download("z.img", workdir / "z.out") == 200
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=20)
    assert sha256(workdir / "z.out") == sha256(image)
    # strace -c rows: % time, seconds, usecs/call, calls, [errors], syscall
    calls = {line.split()[-1]: int(line.split()[3]) for line in counts.read_text().splitlines()
             if line.strip() and line.split()[-1] in ("sendfile", "write", "sendto", "sendmsg")}
    assert calls.get("sendfile", 0) >= 1, counts.read_text()


def test_overwrite_refused_then_allowed_after_reload(imgsrvd, image, workdir):
    assert imgsrvd.upload(image, "o.img")[0] == 201
    other = make_image(workdir / "other.img", seed=2)
    code, body = imgsrvd.upload(other, "o.img")
    assert code == 409, body
    assert "overwriting is not allowed" in body
    # Expect: 100-continue: a refused upload is answered before the image is invited,
    # an accepted one is invited at once
    result = subprocess.run(["curl", "-sS", "-i", "-H", "Expect: 100-continue", "-T", str(other),
                             f"{imgsrvd.url}/v1/images/o.img"], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.startswith("HTTP/1.1 409 "), result.stdout
    result = subprocess.run(["curl", "-sS", "-i", "-H", "Expect: 100-continue", "-T", str(other),
                             f"{imgsrvd.url}/v1/images/o2.img"], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.startswith("HTTP/1.1 100 Continue"), result.stdout
    assert "HTTP/1.1 201 " in result.stdout
    assert sha256(imgsrvd.root / "o.img") == sha256(image)
    # SIGHUP with AllowOverwrite = YES
    text = imgsrvd.config.read_text() + "AllowOverwrite = YES\n"
    imgsrvd.config.write_text(text)
    imgsrvd.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in imgsrvd.log())
    code, body = imgsrvd.upload(other, "o.img")
    assert code == 201, body
    assert sha256(imgsrvd.root / "o.img") == sha256(other)
    assert imgsrvd.leftovers() == []


def test_overwrite_allowed_when_configured(imgsrvd_factory, image, workdir):
    daemon = imgsrvd_factory(AllowOverwrite=True)
    assert daemon.upload(image, "o.img")[0] == 201
    assert daemon.upload(image, "o.img")[0] == 201
    assert daemon.counters()["images_received"] == 2


@pytest.mark.parametrize("name", [
    "../escape.img", "%2E%2E/escape.img", "a/%2e%2e/%2e%2e/escape.img", "%2Fetc%2Fpasswd",
    "a/.hidden.img", "a%00b.img", "a%0Ab.img", "a%5Cb.img",
])
def test_traversal_and_bad_names_are_refused(imgsrvd, image, name):
    code, body = imgsrvd.curl("--path-as-is", "-T", str(image), path=f"/v1/images/{name}")
    assert code in (403, 404), body
    if code == 403:
        assert json.loads(body)["error"]
    code, body = imgsrvd.curl("--path-as-is", path=f"/v1/images/{name}")
    assert code in (403, 404), body
    assert not (imgsrvd.workdir / "escape.img").exists()
    assert imgsrvd.leftovers() == []


def test_symlink_out_of_the_root_is_refused(imgsrvd, image, workdir):
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "secret.img").write_bytes(b"secret")
    imgsrvd.root.mkdir(exist_ok=True)
    (imgsrvd.root / "link").symlink_to(outside)
    code, body = imgsrvd.curl(path="/v1/images/link/secret.img")
    assert code == 403, body
    assert "outside the image root" in body
    code, body = imgsrvd.upload(image, "link/new.img")
    assert code == 403, body
    assert not (outside / "new.img").exists()


def test_uploads_only_to_allowed_dirs(imgsrvd_factory, image):
    daemon = imgsrvd_factory(AllowedUploadDirs="lab, uploads/new")
    code, body = daemon.upload(image, "other/x.img")
    assert code == 403
    assert json.loads(body)["error"].startswith("uploads to other are not allowed")
    code, body = daemon.upload(image, "labx.img")
    assert code == 403
    assert daemon.upload(image, "lab/x.img")[0] == 201
    assert daemon.upload(image, "uploads/new/deep/x.img")[0] == 201
    # any file under the root is readable
    assert daemon.curl("-I", path="/v1/images/lab/x.img")[0] == 200


def test_incomplete_or_damaged_upload_is_refused(imgsrvd, image, workdir):
    data = image.read_bytes()
    truncated = workdir / "truncated.img"
    truncated.write_bytes(data[:-100])
    code, body = imgsrvd.upload(truncated, "t.img")
    assert code == 422, body
    assert "t.img" in json.loads(body)["error"]
    damaged = workdir / "damaged.img"
    middle = len(data) // 2
    damaged.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    assert imgsrvd.upload(damaged, "d.img")[0] == 422
    garbage = workdir / "garbage.img"
    garbage.write_bytes(b"not an image at all\n" * 100)
    assert imgsrvd.upload(garbage, "g.img")[0] == 422
    assert not any(imgsrvd.root.glob("*.img"))
    assert imgsrvd.leftovers() == []
    assert imgsrvd.counters()["images_received"] == 0


SLOW_CLIENT = r"""
import socket, sys, time
host, port, name, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data = open(path, "rb").read()
sock = socket.create_connection((host, port))
sock.sendall(f"PUT /v1/images/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
sock.sendall(data[:len(data) // 2])
print("sent half", flush=True)
while True:
    time.sleep(1)
"""


def start_slow_client(daemon: Imgsrvd, image: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLIENT, "127.0.0.1", str(daemon.port),
                             name, str(image)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "sent half"
    assert wait_for(lambda: daemon.leftovers() != []), "no temporary file appeared"
    return proc


def kill_client(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_client_killed_mid_upload_leaves_nothing(imgsrvd, image):
    proc = start_slow_client(imgsrvd, image, "k.img")
    assert imgsrvd.counters()["active_transfers"] == 1
    kill_client(proc)
    assert wait_for(lambda: imgsrvd.leftovers() == []), imgsrvd.leftovers()
    assert not (imgsrvd.root / "k.img").exists()
    assert wait_for(lambda: imgsrvd.counters()["active_transfers"] == 0)
    counters = imgsrvd.counters()
    assert counters["images_received"] == 0
    assert counters["failures"] == 1


def test_server_killed_mid_upload_leaves_nothing_after_restart(imgsrvd_factory, image):
    daemon = imgsrvd_factory(config_name="crash.conf")
    proc = start_slow_client(daemon, image, "crash/k.img")
    try:
        daemon.signal(signal.SIGKILL)
        assert daemon.proc is not None
        daemon.proc.wait(10)
    finally:
        kill_client(proc)
    assert daemon.leftovers() != []          # what a crash leaves ...
    os.unlink(daemon.status_socket)
    daemon.start(timeout_s=20)               # ... is cleaned when the server starts
    assert daemon.leftovers() == []
    assert not (daemon.root / "crash" / "k.img").exists()
    assert "left by an upload that did not finish" in daemon.log()


def test_ten_concurrent_uploads_and_downloads(imgsrvd_factory, workdir):
    # every client here is 127.0.0.1: allow it more than the default per-host share
    imgsrvd = imgsrvd_factory(MaxTransfersPerClient=20)
    images = [make_image(workdir / f"src{n}.img", chunks=6, seed=10 + n) for n in range(10)]
    results: dict[int, Any] = {}

    def one(n: int) -> None:
        try:
            code, _ = imgsrvd.upload(images[n], f"many/{n}.img")
            out = workdir / f"back{n}.img"
            results[n] = (code, imgsrvd.download(f"many/{n}.img", out),
                          sha256(out) == sha256(images[n]))
        except Exception as exc:  # reported below
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(results[n] == (201, 200, True) for n in range(10)), results
    counters = imgsrvd.counters()
    assert (counters["images_received"], counters["images_sent"]) == (10, 10)
    assert counters["active_transfers"] == 0


# ------------------------------------------------------------------- work, referrals, results

MACHINE = {"mac": "52:54:00:00:00:01", "manufacturer": "QEMU", "ram_mb": 8192,
           "disk_mb": 20480, "mode": "auto"}
SMALL = {**MACHINE, "mac": "52:54:00:00:00:02", "ram_mb": "2048", "disk_mb": 10240}


def set_policy(daemon: Imgsrvd, *rules: Rule) -> None:
    with daemon.directory() as directory:
        directory.replace_policy(ImagingPolicy(tuple(rules), NEVER))


def test_work_follows_ram_and_disk_rules(imgsrvd):
    set_policy(imgsrvd,
               Rule.from_text("big", "ram_mb >= 4096 and disk_mb >= 20000",
                              Action(ActionKind.RESTORE, "lab/big.img", ("lab/apps.img",))),
               Rule.from_text("small", "disk_mb < 20000",
                              Action(ActionKind.RESTORE, "lab/small.img")))
    code, answer = imgsrvd.post("/v1/work", MACHINE)
    assert code == 200, answer
    assert answer["work"] == "restore"
    assert answer["image"] == "lab/big.img"
    assert answer["addons"] == ["lab/apps.img"]
    assert answer["rule"] == "big"
    code, answer = imgsrvd.post("/v1/work", SMALL)
    assert (code, answer["work"], answer["image"], answer["rule"]) == \
        (200, "restore", "lab/small.img", "small")
    code, answer = imgsrvd.post("/v1/work", {**SMALL, "disk_mb": 30000})
    assert (code, answer["work"]) == (200, "none")
    code, answer = imgsrvd.post("/v1/work", {"ram_mb": "lots"})
    assert code == 400 and "ram_mb" in answer["error"]
    assert imgsrvd.counters()["update_requests"] == 4


def test_referral_in_auto_mode_denial_in_manual_mode(imgsrvd):
    set_policy(imgsrvd, Rule.from_text("elsewhere", "",
                                       Action(ActionKind.RESTORE, "//other.example/img/x.img")))
    code, answer = imgsrvd.post("/v1/work", MACHINE)
    assert code == 200, answer
    assert (answer["work"], answer["server"], answer["path"], answer["action"]) == \
        ("referral", "other.example", "img/x.img", "restore")
    code, answer = imgsrvd.post("/v1/work", {**MACHINE, "mode": "manual"})
    assert code == 403 and "manual imaging mode" in answer["error"]
    code, body = imgsrvd.curl(path="/v1/images//other.example/img/x.img")
    assert code == 403 and "manual imaging mode" in body
    code, body = imgsrvd.curl(path="/v1/images/%2F%2Fother.example%2Fimg%2Fx.img")
    assert code == 403
    # our own name is no referral
    set_policy(imgsrvd, Rule.from_text("here", "",
                                       Action(ActionKind.RESTORE, "//imgsrv.test/img/x.img")))
    code, answer = imgsrvd.post("/v1/work", MACHINE)
    assert (answer["work"], answer["image"]) == ("restore", "img/x.img")
    # a retrieve naming another server in auto mode is redirected there
    code, body = imgsrvd.curl("-H", "X-Preboot-Mode: auto",
                              path="/v1/images//other.example/img/x.img")
    assert code == 307
    assert json.loads(body)["server"] == "other.example"
    counters = imgsrvd.counters()
    assert counters["client_referrals"] == 2
    assert counters["update_requests"] == 6


def test_directory_unavailable_is_503(imgsrvd_factory, workdir):
    blocker = workdir / "notadir"
    blocker.write_text("x")
    daemon = imgsrvd_factory(Directory=f"sqlite://{blocker}/sub/directory.db")
    code, answer = daemon.post("/v1/work", MACHINE)
    assert code == 503
    assert "directory" in answer["error"]
    assert daemon.counters()["directory_errors"] == 1


def test_result_clears_the_next_boot_flag(imgsrvd):
    with imgsrvd.directory() as directory:
        directory.put_workstation(Workstation("525400000001", "lab-1", True, "lab/base.img"))
    code, answer = imgsrvd.post("/v1/work", MACHINE)
    assert (answer["work"], answer["image"]) == ("restore", "lab/base.img")
    code, answer = imgsrvd.post("/v1/results", {
        "mac": "52:54:00:00:00:01", "operation": "download", "image_type": "base",
        "image_path": "lab/base.img", "status": "success"})
    assert (code, answer["cleared"]) == (200, True), answer
    with imgsrvd.directory() as directory:
        assert directory.workstation("525400000001").image_on_next_boot is False
    code, answer = imgsrvd.post("/v1/work", MACHINE)
    assert answer["work"] == "none"
    code, answer = imgsrvd.post("/v1/results", {"mac": "x", "operation": "download",
                                                "status": "success"})
    assert code == 400
    code, answer = imgsrvd.post("/v1/results", {
        "workstation": "lab-2", "operation": "upload", "image_path": "lab/l2.img",
        "status": "failure", "error_message": "Unable to find an image to download"})
    assert (code, answer["cleared"]) == (200, False)
    assert imgsrvd.counters()["results_logged"] == 2


def test_statistics_and_zmgmcast_after_a_session(imgsrvd, image, workdir):
    set_policy(imgsrvd, Rule.from_text("elsewhere", "",
                                       Action(ActionKind.RESTORE, "//other.example/x.img")))
    assert imgsrvd.upload(image, "s.img")[0] == 201                     # 1 received
    assert imgsrvd.upload(image, "s.img")[0] == 409                     # 2 denied
    assert imgsrvd.download("s.img", workdir / "s1") == 200             # 3 sent
    assert imgsrvd.download("s.img", workdir / "s2") == 200             # 4 sent
    assert imgsrvd.download("missing.img", workdir / "s3") == 404       # 5 failed
    assert imgsrvd.post("/v1/work", MACHINE)[0] == 200                  # 6 referred
    assert imgsrvd.post("/v1/work", {**MACHINE, "mode": "manual"})[0] == 403   # 7 denied
    assert imgsrvd.post("/v1/results", {"mac": MACHINE["mac"], "operation": "download",
                                         "status": "failure"})[0] == 200       # 8
    counters = imgsrvd.counters()
    size = image.stat().st_size
    assert {k: counters[k] for k in ("update_requests", "images_sent", "images_received",
                                     "client_referrals", "bytes_sent", "bytes_received",
                                     "active_transfers", "failures")} == {
        "update_requests": 8, "images_sent": 2, "images_received": 1, "client_referrals": 1,
        "bytes_sent": 2 * size, "bytes_received": size, "active_transfers": 0,
        "failures": 3}
    result = subprocess.run([sys.executable, "-m", "zmgmcast", "-status", "--socket",
                             imgsrvd.status_socket], capture_output=True, text=True,
                            cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)),
                            timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    for label, value in (("Update Requests", "8"), ("Images Sent", "2"),
                         ("Images Received", "1"), ("Client Referrals", "1")):
        assert f"{label} {value}" in lines, result.stdout
    labels = [line.strip() for line in result.stdout.splitlines() if line.startswith("    ")]
    order = [next(i for i, line in enumerate(labels) if line.startswith(name))
             for name in ("Update Requests", "Images Sent", "Images Received",
                          "Client Referrals")]
    assert order == sorted(order)


def test_results_log_has_every_request(imgsrvd, image):
    try:
        from imgsrvd.resultslog import read_entries
    except ImportError:
        pytest.skip("imgsrvd.resultslog not there")
    assert imgsrvd.upload(image, "l.img", "X-Preboot-Workstation: ws1")[0] == 201
    assert imgsrvd.upload(image, "l.img", "X-Preboot-Workstation: ws1")[0] == 409
    path = imgsrvd.workdir / "results.xml"
    assert wait_for(lambda: path.exists() and len(list(read_entries(path))) == 2)
    first, second = list(read_entries(path))
    assert (first.workstation, first.operation, first.status, first.image_path) == \
        ("ws1", "upload", "success", "l.img")
    assert second.status == "denied" and "overwriting" in second.error_message


def test_bad_config_is_exit_78(workdir):
    config = write_config(workdir / "bad.conf", {"Port": "abc"})
    result = subprocess.run([sys.executable, "-m", "imgsrvd", "--check", "--config",
                             str(config)], capture_output=True, text=True, cwd=str(REPO),
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    assert result.returncode == 78
    assert "Port" in result.stderr and "Traceback" not in result.stderr


def test_max_clients_answers_503_with_retry_after(imgsrvd_factory, image):
    daemon = imgsrvd_factory(MaxClients=1)
    proc = start_slow_client(daemon, image, "busy1.img")
    try:
        result = subprocess.run(["curl", "-sS", "-i", "-T", str(image),
                                 f"{daemon.url}/v1/images/busy2.img"],
                                capture_output=True, text=True, timeout=30)
        # refused before the body is invited: no "100 Continue" first
        assert result.stdout.startswith("HTTP/1.1 503 "), result.stdout
        assert "Retry-After: 5" in result.stdout
    finally:
        kill_client(proc)
    assert wait_for(lambda: daemon.counters()["active_transfers"] == 0)
    assert daemon.upload(image, "busy2.img")[0] == 201
    assert daemon.counters()["busy_refusals"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_full_disk_is_507_and_leaves_nothing(imgsrvd_factory, workdir):
    root = workdir / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(root)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        daemon = imgsrvd_factory(ImageRoot=str(root))
        big = make_image(workdir / "big.img", chunks=12, seed=5)       # ~770 KiB
        assert big.stat().st_size > 256 * 1024
        # told up front (Content-Length) ...
        code, body = daemon.upload(big, "a.img")
        assert code == 507, body
        assert "no space left" in json.loads(body)["error"]
        # ... and found out while writing (chunked: no length announced)
        code, body = daemon.curl("-H", "Transfer-Encoding: chunked", "-T", str(big),
                                 path="/v1/images/b.img")
        assert code == 507, body
        assert list(root.iterdir()) == []
        small = make_image(workdir / "smallimg.img", chunks=2, seed=6)
        assert daemon.upload(small, "c.img")[0] == 201                 # still serving
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)


def test_sigterm_mid_upload_stops_promptly_and_keeps_nothing(imgsrvd_factory, image):
    daemon = imgsrvd_factory()
    proc = start_slow_client(daemon, image, "term/k.img")
    try:
        started = time.monotonic()
        assert daemon.stop(timeout_s=10) == 0, daemon.log()
        assert time.monotonic() - started < 5
    finally:
        kill_client(proc)
    assert daemon.leftovers() == []
    assert not (daemon.root / "term" / "k.img").exists()


def test_status_tcp_port_and_zmgmcast_remote(imgsrvd_factory, image):
    import socket as _socket
    with _socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = imgsrvd_factory(StatusPort=port)
    assert daemon.upload(image, "remote.img")[0] == 201
    result = subprocess.run([sys.executable, "-m", "zmgmcast", "-status", "-i", "127.0.0.1",
                             "-p", str(port)], capture_output=True, text=True, cwd=str(REPO),
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "Update Requests 1" in lines and "Images Received 1" in lines, result.stdout
