"""zmgmcast against a real status server (common.daemon.statussock on a Unix socket and a TCP port,
served in the test): remote and local reads, a daemon down, and the JSON output. The end-to-end
runs against a real tftpd are tests/integration/test_zmgmcast.py."""

from __future__ import annotations

import json
import re
import socket

import pytest

import zmgmcast.__main__ as zmg
from common.daemon import services

NOT_RUNNING = 3
IMAGING = {"active_transfers": 0, "bytes_sent": 2048, "client_referrals": 1, "failures": 0,
           "images_received": 3, "images_sent": 4, "update_requests": 9}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """zmgmcast's run and config folders, empty (PREBOOT_RUN_DIR, PREBOOT_CONFIG_DIR)."""
    run, etc = tmp_path / "run", tmp_path / "etc"
    run.mkdir()
    etc.mkdir()
    monkeypatch.setattr(zmg, "RUN_DIR", str(run))
    monkeypatch.setattr(zmg, "CONFIG_DIR", str(etc))
    return run, etc


def test_remote_read_from_a_status_port(fake_daemon, capsys):
    daemon = fake_daemon("imgsrvd", IMAGING)
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", daemon.port)
    assert report.state == "running" and report.reply["counters"] == IMAGING
    # -p with a port the registry does not know: the reply names the daemon
    assert zmg.main(["-status", "-i", "127.0.0.1", "-p", str(daemon.port)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Preboot Services status on 127.0.0.1\n")
    assert "\nPreboot Imaging Service\n" in out          # a status port says no pid, version
    assert "4242" not in out and "9.9.9" not in out
    assert f"    {'Update Requests':<28}9" in out and f"    {'Bytes sent':<28}2.0 KiB" in out


def test_remote_read_of_the_wrong_daemon_is_an_error(fake_daemon):
    daemon = fake_daemon("tftpd", {})
    report = zmg.ask_remote(services.IMGSRVD, "127.0.0.1", daemon.port)
    assert report.state == "error"
    assert report.detail == f"127.0.0.1:{daemon.port} answers as tftpd"


def test_local_read_from_a_status_socket(fake_daemon, tmp_path, capsys):
    path = str(tmp_path / "imgsrvd.sock")
    fake_daemon("imgsrvd", IMAGING, unix_path=path, tcp=False)
    assert zmg.main(["-status", "--socket", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Preboot Imaging Service\s+running\s+4242\s+1:02:03$", out, re.M), out


def test_every_local_daemon_from_the_run_dir(fake_daemon, dirs, capsys):
    run, _etc = dirs
    fake_daemon("policyd", {"queries": 1}, unix_path=str(run / "policyd.sock"), tcp=False)
    assert zmg.main(["-status"]) == 0
    out = capsys.readouterr().out
    states = {line[:30].strip(): line[30:45].strip() for line in out.splitlines()
              if line.startswith("Preboot ") and "(pid" not in line and "status on" not in line}
    assert states == {"Preboot Proxy DHCP Service": "not running",
                      "Preboot TFTP Service": "not running",
                      "Preboot Policy Service": "running",
                      "Preboot Imaging Service": "not running"}


def test_the_config_dir_names_the_status_socket(fake_daemon, dirs, tmp_path):
    _run, etc = dirs
    elsewhere = tmp_path / "elsewhere.sock"
    (etc / "tftpd.conf").write_text(f"StatusSocket = {elsewhere}  # ours\n")
    fake_daemon("tftpd", {}, unix_path=str(elsewhere), tcp=False)
    assert zmg.socket_path(services.TFTPD) == str(elsewhere)
    assert zmg.ask_local(services.TFTPD).state == "running"


def test_a_daemon_down(dirs, tmp_path, capsys):
    port = closed_port()
    report = zmg.ask_remote(services.TFTPD, "127.0.0.1", port)
    assert (report.state, report.detail) == ("not running", f"nothing on 127.0.0.1:{port}")
    assert zmg.ask_local(services.TFTPD, str(tmp_path / "missing.sock")).state == "not running"
    assert zmg.main(["-status", "-i", "127.0.0.1", "-p", str(port)]) == NOT_RUNNING
    assert f"Port {port}: nothing on 127.0.0.1:{port}" in capsys.readouterr().out
    assert zmg.main(["-status"]) == NOT_RUNNING
    out = capsys.readouterr().out
    assert out.count("not running") == len(services.SERVICES)


def test_a_stopped_daemon_is_not_running(fake_daemon, tmp_path):
    path = str(tmp_path / "tftpd.sock")
    daemon = fake_daemon("tftpd", {}, unix_path=path, tcp=True)
    port = daemon.port
    assert zmg.ask_local(services.TFTPD, path).state == "running"
    daemon.stop()
    assert zmg.ask_remote(services.TFTPD, "127.0.0.1", port).state == "not running"
    assert zmg.ask_local(services.TFTPD, path).state == "not running"


def test_json_output(fake_daemon, dirs, capsys):
    run, _etc = dirs
    fake_daemon("imgsrvd", IMAGING, unix_path=str(run / "imgsrvd.sock"), tcp=False)
    assert zmg.main(["-status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == [service.name for service in services.SERVICES]
    assert data["imgsrvd"]["state"] == "running" and data["imgsrvd"]["detail"] == ""
    status = data["imgsrvd"]["status"]
    assert status["ok"] is True and status["pid"] == 4242 and status["counters"] == IMAGING
    for name in ("proxydhcpd", "tftpd", "policyd"):
        assert data[name] == {"state": "not running", "detail": "", "status": None}


def test_json_output_of_one_remote_daemon(fake_daemon, capsys):
    daemon = fake_daemon("policyd", {"queries": 2})
    assert zmg.main(["-status", "--json", "-i", "127.0.0.1", "-p", str(daemon.port)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["policyd"]
    assert data["policyd"]["status"]["counters"] == {"queries": 2}


def test_no_status_option_is_a_usage_error(capsys):
    assert zmg.main([]) == 2
    assert "zmgmcast -status" in capsys.readouterr().err
