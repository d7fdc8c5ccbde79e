"""Log targets: plain priority-prefixed lines under journald, timestamped lines in a file."""

import re
import signal
import subprocess
import sys
import time

from support import REPO, query_status, write_config


def test_journald_lines_have_priority_and_no_timestamp(tmp_path, tftp_root):
    config = write_config(tmp_path / "t.conf", {
        "IPAddress": "127.0.0.1", "Port": 0, "Root": str(tftp_root),
        "StatusSocket": str(tmp_path / "s.sock"), "PidFile": str(tmp_path / "t.pid"),
        "StatusPort": 0, "LogLevel": "INFO"})
    env = {"PYTHONPATH": str(REPO), "JOURNAL_STREAM": "8:12345", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "tftpd", "--foreground", "--config",
                             str(config)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if query_status(str(tmp_path / "s.sock"))["ok"]:
                    break
            except OSError:
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in stderr.splitlines() if line]
    assert any("Preboot TFTP Service" in line and "started" in line for line in lines)
    for line in lines:
        assert re.match(r"^<[0-7]>", line), line
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line), line


def test_log_file_has_timestamps_and_honours_the_level(tftpd_factory):
    daemon = tftpd_factory(LogLevel="WARNING")
    daemon.stop()
    assert "started" not in daemon.log()  # INFO is below WARNING
    daemon2 = tftpd_factory(LogLevel="INFO")
    daemon2.stop()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ preboot-tftpd\[\d+\]: INFO .*started",
                     daemon2.log(), re.M)
