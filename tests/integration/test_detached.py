"""Without --foreground the daemon detaches (python-daemon) and keeps the sockets it bound
before detaching: it still serves files and answers its status socket, and its pidfile names
the detached process."""

import os
import signal
import subprocess
import sys
import time

import pytest

from support import REPO, query_status, write_config


@pytest.mark.root
def test_detached_daemon_serves_on_the_sockets_bound_before_detaching(tmp_path, tftp_root):
    content = os.urandom(300_000)
    (tftp_root / "f.bin").write_bytes(content)
    config = write_config(tmp_path / "t.conf", {
        "IPAddress": "127.0.0.1", "Port": 0, "Root": str(tftp_root),
        "StatusSocket": str(tmp_path / "s.sock"), "PidFile": str(tmp_path / "t.pid"),
        "StatusPort": 0, "LogLevel": "INFO", "LogFile": str(tmp_path / "t.log")})
    started = subprocess.run([sys.executable, "-m", "tftpd", "--config", str(config)], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    pid = None
    try:
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                status = query_status(str(tmp_path / "s.sock"))
            except OSError:
                time.sleep(0.05)
        assert status and status["ok"]
        pid = int((tmp_path / "t.pid").read_text())
        assert status["pid"] == pid  # the pidfile names the detached process that serves
        port = status["listen"][0]["port"]
        out = tmp_path / "out.bin"
        subprocess.run(["curl", "-sS", "-o", str(out), f"tftp://127.0.0.1:{port}/f.bin"],
                       check=True, timeout=30)
        assert out.read_bytes() == content
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (tmp_path / "t.pid").exists():
                time.sleep(0.05)
    assert not (tmp_path / "t.pid").exists() and not (tmp_path / "s.sock").exists()
