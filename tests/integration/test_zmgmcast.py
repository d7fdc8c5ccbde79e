"""zmgmcast -status against a real tftpd: local socket, TCP status port, JSON, not running."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402
from tftpclients import RawClient  # noqa: E402

NOT_RUNNING = 3


def zmgmcast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(tc.REPO))
    for name in ("PREBOOT_RUN_DIR", "PREBOOT_CONFIG_DIR"):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "zmgmcast", *args], cwd=str(tc.REPO),
                          env=full_env, capture_output=True, text=True, timeout=60)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((tc.HOST, 0))
        return sock.getsockname()[1]


def closed_tcp_port() -> int:
    """A port nothing listens on, so connect() is refused."""
    return free_tcp_port()


def do_some_transfers(daemon, root: Path) -> None:
    (root / "hello.txt").write_bytes(b"hello\n" * 100)
    with RawClient(daemon.port) as client:
        assert client.download("hello.txt") == b"hello\n" * 100
    with RawClient(daemon.port) as client:
        client.rrq("missing.txt")
        assert client.expect_error().code == 1
    tc.wait_counters(daemon, lambda c: c["transfers_completed"] == 1)


def counter_row(output: str, label: str) -> str:
    match = re.search(rf"^\s+{re.escape(label)}\s+(.+)$", output, re.M)
    assert match, f"no {label!r} row in:\n{output}"
    return match.group(1).strip()


def check_table(output: str, daemon, remote: bool = False) -> None:
    """remote: from the TCP port, which does not say the pid (or version, or config)."""
    assert "Preboot Services status on" in output
    header = next(line for line in output.splitlines() if line.startswith("Service"))
    assert "State" in header and "PID" in header and "Uptime" in header
    row = next(line for line in output.splitlines() if line.startswith("Preboot TFTP Service "))
    pid = "" if remote else rf"{daemon.pid}\s+"
    assert re.search(rf"\brunning\s+{pid}\d+:\d\d:\d\d$", row), row
    assert (str(daemon.pid) in output) is not remote
    assert f"Listening on udp 127.0.0.1:{daemon.port}" in output
    assert counter_row(output, "Transfers completed") == "1"
    assert counter_row(output, "Requests read") == "2"
    assert counter_row(output, "Active transfers") == "0"
    assert counter_row(output, "Bytes sent") == "600 B"
    assert re.search(r"^\s+Errors: .*file_not_found 1", output, re.M), output


def test_status_from_the_local_socket(tftpd, tftp_root):
    do_some_transfers(tftpd, tftp_root)
    result = zmgmcast("-status", "--socket", tftpd.status_socket)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_table(result.stdout, tftpd)




def test_status_from_the_tcp_port(tftpd_factory, tftp_root):
    port = free_tcp_port()
    daemon = tftpd_factory(StatusPort=port)
    do_some_transfers(daemon, tftp_root)
    result = zmgmcast("-status", "-i", "127.0.0.1", "-p", str(port))
    assert result.returncode == 0, result.stdout
    check_table(result.stdout, daemon, remote=True)
    assert "status on 127.0.0.1" in result.stdout


def test_status_from_the_well_known_tcp_port(tftpd_factory, tftp_root):
    """StatusPort 9969 (tftpd's well-known port), asked with and without -p."""
    try:
        with socket.socket() as probe:
            probe.bind((tc.HOST, 9969))
    except OSError:
        pytest.skip("port 9969 is in use on this machine")
    daemon = tftpd_factory(StatusPort=9969)
    do_some_transfers(daemon, tftp_root)
    result = zmgmcast("-status", "-i", "127.0.0.1", "-p", "9969")
    assert result.returncode == 0, result.stdout
    check_table(result.stdout, daemon, remote=True)
    result = zmgmcast("-status", "--json", "-i", "127.0.0.1")
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["tftpd"]["state"] == "running"
    assert data["tftpd"]["status"]["counters"]["transfers_completed"] == 1


def check_json(output: str, daemon, remote: bool = False) -> None:
    data = json.loads(output)
    assert list(data) == ["tftpd"]
    report = data["tftpd"]
    assert report["state"] == "running"
    status = report["status"]
    assert status.get("pid") == (None if remote else daemon.pid) and status["daemon"] == "tftpd"
    counters = status["counters"]
    assert counters == daemon.counters(), "zmgmcast and the status socket disagree"
    assert counters["transfers_completed"] == 1 and counters["requests_read"] == 2
    assert counters["errors"] == {"file_not_found": 1}


def test_status_json_from_the_socket(tftpd, tftp_root):
    do_some_transfers(tftpd, tftp_root)
    result = zmgmcast("-status", "--json", "--socket", tftpd.status_socket)
    assert result.returncode == 0, result.stderr
    check_json(result.stdout, tftpd)


def test_status_json_from_the_tcp_port(tftpd_factory, tftp_root):
    port = free_tcp_port()
    daemon = tftpd_factory(StatusPort=port)
    do_some_transfers(daemon, tftp_root)
    result = zmgmcast("-status", "--json", "-i", "127.0.0.1", "-p", str(port))
    assert result.returncode == 0, result.stdout
    check_json(result.stdout, daemon, remote=True)


def test_not_running_on_a_closed_tcp_port(tmp_path):
    port = closed_tcp_port()
    for args in (["-status", "-i", "127.0.0.1", "-p", str(port)],
                 ["-status", "--json", "-i", "127.0.0.1", "-p", str(port)]):
        result = zmgmcast(*args)
        assert result.returncode == NOT_RUNNING, result
        assert "Traceback" not in result.stdout + result.stderr
        assert "not running" in result.stdout
    data = json.loads(result.stdout)
    (report,) = data.values()
    assert report["state"] == "not running" and report["status"] is None


def test_not_running_on_a_missing_socket(tmp_path):
    result = zmgmcast("-status", "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == NOT_RUNNING
    assert "not running" in result.stdout and "Traceback" not in result.stderr


def test_stale_socket_file_is_not_running(tmp_path):
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()                                   # the file stays, nobody listens
    result = zmgmcast("-status", "--socket", str(path))
    assert result.returncode == NOT_RUNNING, result
    assert "not running" in result.stdout and "Traceback" not in result.stderr


def test_silent_tcp_peer_is_not_reachable():
    """Something accepts the connection but never answers: a timeout, reported, no traceback."""
    with socket.socket() as listener:
        listener.bind((tc.HOST, 0))
        listener.listen(1)                         # the kernel completes the handshake
        port = listener.getsockname()[1]
        result = zmgmcast("-status", "-i", "127.0.0.1", "-p", str(port))
    assert result.returncode == NOT_RUNNING, result
    assert "not reachable" in result.stdout and "timed out" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_garbage_answer_on_the_socket_is_an_error(tmp_path):
    path = tmp_path / "liar.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"this is not json\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = zmgmcast("-status", "--socket", str(path))
    finally:
        thread.join(10)
        server.close()
    assert result.returncode == NOT_RUNNING, result
    assert "error" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_plain_status_uses_the_run_dir(tftpd_factory, tftp_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    daemon = tftpd_factory(StatusSocket=str(run_dir / "tftpd.sock"))
    do_some_transfers(daemon, tftp_root)
    env = {"PREBOOT_RUN_DIR": str(run_dir), "PREBOOT_CONFIG_DIR": str(config_dir)}
    result = zmgmcast("-status", env=env)
    assert result.returncode == 0, result.stderr
    check_table(result.stdout, daemon)
    rows = {line[:30].strip(): line[30:].split()[0] for line in result.stdout.splitlines()
            if line.startswith("Preboot ") and "(pid" not in line
            and "status on" not in line}
    assert rows["Preboot TFTP Service"] == "running"
    assert rows["Preboot Proxy DHCP Service"] == "not"          # "not running"
    assert rows["Preboot Imaging Service"] == "not"


def test_plain_status_reads_status_socket_from_config_dir(tftpd_factory, tftp_root, tmp_path):
    """The StatusSocket a daemon's config names wins over the run dir's default name."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    elsewhere = tmp_path / "elsewhere.sock"
    daemon = tftpd_factory(StatusSocket=str(elsewhere))
    (config_dir / "tftpd.conf").write_text(f"# ours\nStatusSocket = {elsewhere}  # inline\n")
    env = {"PREBOOT_RUN_DIR": str(tmp_path / "empty-run"), "PREBOOT_CONFIG_DIR": str(config_dir)}
    result = zmgmcast("-status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tftpd"]["state"] == "running"
    assert data["tftpd"]["status"]["pid"] == daemon.pid
    assert all(data[name]["state"] == "not running" for name in data if name != "tftpd")


def test_nothing_running_anywhere(tmp_path):
    env = {"PREBOOT_RUN_DIR": str(tmp_path / "run"), "PREBOOT_CONFIG_DIR": str(tmp_path / "etc")}
    result = zmgmcast("-status", env=env)
    assert result.returncode == NOT_RUNNING
    assert result.stdout.count("not running") == 4
    assert "Traceback" not in result.stderr


def test_stopped_daemon_is_reported_not_running(tftpd_factory, tmp_path):
    daemon = tftpd_factory()
    path = daemon.status_socket
    assert zmgmcast("-status", "--socket", path).returncode == 0
    assert daemon.stop() == 0
    result = zmgmcast("-status", "--socket", path)
    assert result.returncode == NOT_RUNNING
    assert "not running" in result.stdout


def test_no_arguments_is_a_usage_error():
    result = zmgmcast()
    assert result.returncode == 2
    assert "zmgmcast -status" in result.stderr
