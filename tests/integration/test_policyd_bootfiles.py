"""policyd's /boot/: the real daemon on 127.0.0.1 (free port) serving a temporary root, curl as
the client: whole files, ranges, HEAD, 404, 403 for every way out of the root (symlink
included), the concurrency limit (503), a stalled and an interrupted download, the counters,
the log lines, sendfile(2), and the answer's URLs pointing at /boot/ on the port iPXE used."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.policy.directory import open_directory
from support import DaemonProcess, write_config

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")

SIZE = 6 * 1024 * 1024 + 123          # more than a socket buffer takes at once
IDLE_S = 2


class Policyd(DaemonProcess):
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def curl(self, path: str, *args: str, out: str = "-") -> tuple[int, bytes, str]:
        """(status, body, stderr) with curl; --path-as-is: '..' goes out as typed."""
        result = subprocess.run(["curl", "-sS", "--path-as-is", "--max-time", "20", "-o", out,
                                 "-w", "\n%{http_code}", *args, self.url + path],
                                capture_output=True, timeout=30)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), body, result.stderr.decode(errors="replace")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbboot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root(workdir: Path) -> Path:
    root = workdir / "tftproot"
    (root / "preboot").mkdir(parents=True)
    (root / "preboot" / "initrd").write_bytes(os.urandom(SIZE))
    (root / "preboot" / "linux").write_bytes(b"kernel" * 1000)
    (root / "empty").write_bytes(b"")
    (workdir / "secret").write_text("outside the root\n")
    os.symlink(workdir / "secret", root / "escape-link")
    os.symlink(workdir, root / "escape-dir")
    os.symlink("preboot/linux", root / "inside-link")
    return root


@pytest.fixture
def policyd_factory(workdir: Path, root: Path):
    started: list[Policyd] = []

    def start(**overrides: Any) -> Policyd:
        n = len(started)
        db = workdir / "directory.db"
        if not db.exists():
            open_directory(f"sqlite://{db}", create=True).close()
        values: dict[str, Any] = {
            "IPAddress": "127.0.0.1", "Port": 0, "Directory": f"sqlite://{db}",
            "StatusPort": 0, "StatusSocket": str(workdir / f"p{n}.sock"),
            "PidFile": str(workdir / f"p{n}.pid"), "LogLevel": "DEBUG",
            "LogFile": str(workdir / f"p{n}.log"), "TokenKeyFile": str(workdir / "imaging.key"),
            "BootFilesRoot": str(root), "BootFileIdleTimeout": IDLE_S,
        }
        values.update(overrides)
        config = write_config(workdir / f"policyd{n}.conf", values)
        daemon = Policyd("prebootpolicyd", config, values["StatusSocket"],
                         Path(values["LogFile"]))
        daemon.root = root
        started.append(daemon)
        return daemon.start(timeout_s=20)

    yield start
    for daemon in started:
        assert daemon.stop() in (0, None), daemon.log()


@pytest.fixture
def policyd(policyd_factory) -> Policyd:
    return policyd_factory()


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_whole_file_range_and_head(policyd, root, workdir):
    out = workdir / "got"
    code, _, err = policyd.curl("/boot/preboot/initrd", out=str(out))
    assert code == 200, err
    assert sha256(out) == sha256(root / "preboot" / "initrd")

    code, body, _ = policyd.curl("/boot/preboot/initrd", "-r", "100-199")
    assert code == 206 and body == (root / "preboot" / "initrd").read_bytes()[100:200]
    code, body, _ = policyd.curl("/boot/preboot/initrd", "-r", "-10")
    assert code == 206 and body == (root / "preboot" / "initrd").read_bytes()[-10:]
    code, body, _ = policyd.curl("/boot/preboot/initrd", "-r", f"{SIZE}-")
    assert code == 416

    # a resumed download (curl -C -): the rest of the file, byte-exact
    part = workdir / "part"
    part.write_bytes((root / "preboot" / "initrd").read_bytes()[:SIZE // 3])
    code, _, err = policyd.curl("/boot/preboot/initrd", "-C", "-", out=str(part))
    assert code == 206, err
    assert sha256(part) == sha256(root / "preboot" / "initrd")

    head = subprocess.run(["curl", "-sS", "-I", policyd.url + "/boot/preboot/initrd"],
                          capture_output=True, text=True, timeout=30).stdout
    assert head.startswith("HTTP/1.1 200")
    assert f"Content-Length: {SIZE}" in head and "Accept-Ranges: bytes" in head

    code, body, _ = policyd.curl("/boot/inside-link")        # a symlink inside the root
    assert code == 200 and body == b"kernel" * 1000
    code, body, _ = policyd.curl("/boot/empty")
    assert code == 200 and body == b""

    counters = policyd.counters()
    # whole, two ranges, resumed, inside-link, empty (HEAD and 416 move no bytes)
    assert counters["boot_files_sent"] == 6, counters
    assert counters["boot_bytes_sent"] == SIZE + 100 + 10 + (SIZE - SIZE // 3) + 6000
    assert counters["boot_files_refused"] == 1 and counters["boot_transfers_active"] == 0
    log = policyd.log()
    assert f"sent boot file preboot/initrd to 127.0.0.1: {SIZE} bytes in " in log
    assert f"(bytes 100-199 of {SIZE})" in log


@pytest.mark.parametrize("path, status", [
    ("/boot/../policyd0.conf", 403),
    ("/boot/preboot/../../secret", 403),
    ("/boot/%2e%2e/secret", 403),
    ("/boot/%2E%2E%2fsecret", 403),
    ("/boot//etc/passwd", 403),
    ("/boot/%2fetc/passwd", 403),
    ("/boot/escape-link", 403),
    ("/boot/escape-dir/secret", 403),
    ("/boot/..%5csecret", 400),
    ("/boot/a%00b", 400),
    ("/boot/preboot", 403),
    ("/boot/preboot/", 400),
    ("/boot/missing", 404),
    ("/boot/", 404),
])
def test_nothing_escapes_the_root(policyd, path, status):
    code, body, err = policyd.curl(path)
    assert code == status, (path, body, err)
    assert b"outside the root" not in body and b"Directory" not in body
    counters = policyd.counters()
    assert counters["boot_files_sent"] == 0
    assert counters["boot_files_refused" if status != 404 else "boot_files_not_found"] == 1
    assert f"refused to 127.0.0.1: {status} " in policyd.log()


def test_other_methods_are_refused(policyd):
    code, _, _ = policyd.curl("/boot/preboot/linux", "-X", "PUT", "--data", "x")
    assert code == 405
    code, _, _ = policyd.curl("/boot/preboot/linux", "-X", "DELETE")
    assert code == 405
    assert (policyd.root / "preboot" / "linux").read_bytes() == b"kernel" * 1000


def stalled_client(url_port: int, path: str = "/boot/preboot/initrd") -> socket.socket:
    """A client that asks for the file and then reads nothing: the kernel's buffers fill and
    the server's sendfile waits."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", url_port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def test_concurrency_limit_and_idle_timeout(policyd_factory):
    policyd = policyd_factory(MaxBootFileTransfers=2)
    port = policyd.port
    stalled = [stalled_client(port), stalled_client(port)]
    try:
        assert wait_for(lambda: policyd.counters()["boot_transfers_active"] == 2)
        code, body, _ = policyd.curl("/boot/preboot/linux")
        assert code == 503 and b"busy" in body
        head = subprocess.run(["curl", "-sS", "-I", policyd.url + "/boot/preboot/linux"],
                              capture_output=True, text=True, timeout=30).stdout
        assert head.startswith("HTTP/1.1 200")    # HEAD moves nothing: never busy
        # the stalled downloads are cut after BootFileIdleTimeout; the slots come back
        assert wait_for(lambda: policyd.counters()["boot_transfers_active"] == 0,
                        IDLE_S * 3 + 5)
    finally:
        for sock in stalled:
            sock.close()
    counters = policyd.counters()
    assert counters["boot_files_busy"] == 1 and counters["boot_files_aborted"] == 2, counters
    assert "took nothing for 2 s (BootFileIdleTimeout)" in policyd.log()
    assert "(MaxBootFileTransfers)" in policyd.log()
    code, _, _ = policyd.curl("/boot/preboot/linux")
    assert code == 200


def test_interrupted_download_frees_its_slot(policyd):
    sock = socket.socket()
    sock.connect(("127.0.0.1", policyd.port))
    sock.sendall(b"GET /boot/preboot/initrd HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()                                 # RST in the middle of the file
    assert wait_for(lambda: policyd.counters()["boot_files_aborted"] == 1, 10), \
        policyd.counters()
    counters = policyd.counters()
    assert counters["boot_transfers_active"] == 0 and counters["boot_files_sent"] == 0
    assert "cut short after" in policyd.log()
    assert "internal error" not in policyd.log() and "Traceback" not in policyd.log()
    code, _, _ = policyd.curl("/boot/preboot/linux")          # the service goes on
    assert code == 200


def test_off_and_missing_root(policyd_factory, workdir):
    off = policyd_factory(MaxBootFileTransfers=0)
    assert off.curl("/boot/preboot/linux")[0] == 404
    missing = policyd_factory(BootFilesRoot=str(workdir / "nowhere"))
    assert missing.curl("/boot/preboot/linux")[0] == 404
    assert "is not a folder: /boot/ answers 404" in missing.log()


def test_allowed_clients_apply(policyd_factory):
    policyd = policyd_factory(AllowedClients="10.99.0.0/24")
    code, body, _ = policyd.curl("/boot/preboot/linux")
    assert code == 403 and b"AllowedClients" in body


def test_fallback_answer_uses_http_urls(policyd_factory, workdir):
    """The default ImagingKernel/ImagingInitrd: this service's /boot/, on the port iPXE used
    (FallbackAnswer maintenance shows them without a policy)."""
    policyd = policyd_factory(Directory=f"sqlite://{workdir}/missing.db",
                              FallbackAnswer="maintenance")
    code, body, _ = policyd.curl("/policy?mac=52:54:00:12:34:56&platform=efi")
    assert code == 200
    text = body.decode()
    port = policyd.port
    assert f"kernel http://127.0.0.1:{port}/boot/preboot/linux initrd=initrd " in text
    assert f"initrd --name initrd http://127.0.0.1:{port}/boot/preboot/initrd || goto " in text
    code, body, _ = policyd.curl("/boot/preboot/linux")   # and the URL serves the file
    assert code == 200 and body == b"kernel" * 1000


def test_sent_with_sendfile(policyd, workdir):
    """Zero-copy: the file's bytes leave with sendfile(2), from the handler and from the sender
    thread (aiohttp's own file answer would copy every byte through Python on uvloop)."""
    if not shutil.which("strace"):
        pytest.skip("strace not installed")
    counts = workdir / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(counts), "-e",
                               "trace=sendfile,write,sendto,sendmsg", "-p", str(policyd.pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: "attached" in (tracer.stderr.readline() or ""), 10)
        assert policyd.curl("/boot/preboot/initrd", out=str(workdir / "o"))[0] == 200
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=20)
    calls = {line.split()[-1]: int(line.split()[3]) for line in counts.read_text().splitlines()
             if line.strip() and line.split()[-1] in ("sendfile", "write", "sendto", "sendmsg")}
    assert calls.get("sendfile", 0) >= 2, counts.read_text()     # more than a socket buffer
    assert sum(calls.get(k, 0) for k in ("write", "sendto", "sendmsg")) < 10, counts.read_text()


def test_root_link_repointed_is_followed(policyd_factory, workdir, root):
    """BootFilesRoot as a symlink an administrator re-points to a new tree (an atomic deploy):
    /boot/ serves from the new tree within a second or so (policyd looks again at where the
    root leads at most once a second), and a link out of the new tree is still refused."""
    new = workdir / "tftproot-2"
    (new / "preboot").mkdir(parents=True)
    (new / "preboot" / "linux").write_bytes(b"new kernel")
    os.symlink(workdir / "secret", new / "escape-link")
    link = workdir / "current"
    os.symlink(root, link)
    policyd = policyd_factory(BootFilesRoot=str(link))
    assert policyd.curl("/boot/preboot/linux")[1] == b"kernel" * 1000
    swap = workdir / "current.new"
    os.symlink(new, swap)
    os.replace(swap, link)
    assert wait_for(lambda: policyd.curl("/boot/preboot/linux")[1] == b"new kernel", 5)
    assert policyd.curl("/boot/escape-link")[0] == 403
