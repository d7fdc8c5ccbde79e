"""Monitoring against the four real daemons: /metrics on every TCP status port and on policyd's
and imgsrvd's HTTP ports, parsed with prometheus_client's parser and compared with the status
socket's counters; zmgmcast -status as a health check (-expect, exit codes); zmgmcast -log on
imgsrvd's results log (docs/monitoring.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.daemon import services
from common.policy.directory import open_directory
from support import REPO, DaemonProcess, write_config

parser = pytest.importorskip("prometheus_client.parser")

PACKAGES = {"proxydhcpd": "proxydhcpd", "tftpd": "tftpd", "policyd": "prebootpolicyd",
            "imgsrvd": "imgsrvd"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_values(name: str, work: Path) -> dict[str, Any]:
    values: dict[str, Any] = {
        "StatusSocket": str(work / f"{name}.sock"), "PidFile": str(work / f"{name}.pid"),
        "StatusPort": free_port(), "LogLevel": "DEBUG", "LogFile": str(work / f"{name}.log"),
    }
    if name == "tftpd":
        (work / "root").mkdir(exist_ok=True)
        values.update(IPAddress="127.0.0.1", Port=0, Root=str(work / "root"))
    elif name == "proxydhcpd":
        values.update(IPAddress="127.0.0.1", DHCPPort=free_port(socket.SOCK_DGRAM),
                      BootServerPort=free_port(socket.SOCK_DGRAM),
                      ClientPort=free_port(socket.SOCK_DGRAM),
                      IPXEScriptURL="http://{server}:8080/boot.ipxe")
    elif name == "policyd":
        values.update(IPAddress="127.0.0.1", Port=0, Directory=f"sqlite://{work / 'dir.db'}",
                      TokenKeyFile=str(work / "imaging.key"))
    else:
        values.update(IPAddress="127.0.0.1", Port=0, ImageRoot=str(work / "images"),
                      Directory=f"sqlite://{work / 'dir.db'}", AllowAnonymous=True,
                      ResultsLog=str(work / "results.xml"), ServerName="imgsrv.test",
                      TokenKeyFile=str(work / "imaging.key"))
    return values


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    """The four daemons, each with a TCP status port; their configs in etc/ (as installed)."""
    work = Path(tempfile.mkdtemp(prefix="pbmon-", dir="/tmp"))
    etc = work / "etc"
    etc.mkdir()
    open_directory(f"sqlite://{work / 'dir.db'}", create=True).close()
    started: dict[str, DaemonProcess] = {}
    ports: dict[str, int] = {}
    try:
        for name, package in PACKAGES.items():
            values = config_values(name, work)
            config = write_config(etc / f"{name}.conf", values)
            daemon = DaemonProcess(package, config, values["StatusSocket"],
                                   Path(values["LogFile"]))
            started[name] = daemon.start(timeout_s=20)
            ports[name] = values["StatusPort"]
        yield {"work": work, "etc": etc, "daemons": started, "status_ports": ports}
    finally:
        for daemon in started.values():
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def check_against_counters(text: str, name: str, counters: dict[str, Any]) -> None:
    """Every counter of the status reply is in TEXT with the same value (or, for a busy
    daemon, one that is no smaller)."""
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    service = services.by_name(name)
    assert f"preboot_{name}_start_time_seconds" in families
    for key, value in counters.items():
        family = families[f"preboot_{name}_{key}"]
        assert family.type == ("gauge" if key in service.gauges else "counter")
        if isinstance(value, dict):
            got = {s.labels["kind"]: s.value for s in family.samples}
            assert set(got) >= set(value)
        else:
            (sample,) = family.samples
            assert sample.value == value or (key not in service.gauges
                                             and sample.value >= value)


def tftp_missing_file(port: int) -> None:
    """One RRQ for a file that is not there: tftpd counts errors{kind="file_not_found"}."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\x00\x01nothing.bin\x00octet\x00", ("127.0.0.1", port))
        data, _ = sock.recvfrom(1024)
        assert data[:4] == b"\x00\x05\x00\x01"


@pytest.mark.parametrize("name", list(PACKAGES))
def test_metrics_on_every_status_port(stack, name):
    daemon = stack["daemons"][name]
    if name == "tftpd":
        tftp_missing_file(daemon.port)
    status, kind, text = get(f"http://127.0.0.1:{stack['status_ports'][name]}/metrics")
    assert status == 200 and kind == "text/plain; version=0.0.4; charset=utf-8"
    check_against_counters(text, name, daemon.counters())
    if name == "tftpd":
        assert 'preboot_tftpd_errors_total{kind="file_not_found"} ' in text
    missing, _kind, _text = get(f"http://127.0.0.1:{stack['status_ports'][name]}/")
    assert missing == 404


@pytest.mark.parametrize("name", ["policyd", "imgsrvd"])
def test_metrics_on_the_http_port(stack, name):
    daemon = stack["daemons"][name]
    status, kind, text = get(f"http://127.0.0.1:{daemon.port}/metrics")
    assert status == 200 and kind == "text/plain; version=0.0.4; charset=utf-8"
    check_against_counters(text, name, daemon.counters())


def test_the_status_port_still_speaks_json(stack):
    from common.daemon.statussock import query_tcp
    reply = query_tcp("127.0.0.1", stack["status_ports"]["tftpd"])
    assert reply["ok"] is True and reply["daemon"] == "tftpd" and "pid" not in reply


def zmgmcast(stack, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PREBOOT_CONFIG_DIR=str(stack["etc"]),
               PREBOOT_RUN_DIR=str(stack["work"] / "no-run"))
    return subprocess.run([sys.executable, "-m", "zmgmcast", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=60)


def test_health_check_all_configured_daemons_answer(stack):
    result = zmgmcast(stack, "-status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "" and "not running" not in result.stdout


def test_health_check_names_the_daemon_that_is_down(stack):
    result = zmgmcast(stack, "-status", "-expect", "tftpd,imgsrvd")
    assert result.returncode == 0, result.stderr
    # a daemon configured whose socket answers nothing: move policyd's config to a socket
    # path nobody listens on (a copy of the config dir, so the running daemons are untouched)
    etc2 = stack["work"] / "etc2"
    shutil.copytree(stack["etc"], etc2, dirs_exist_ok=True)
    text = (etc2 / "policyd.conf").read_text()
    (etc2 / "policyd.conf").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("StatusSocket"))
        + f"\nStatusSocket = {stack['work'] / 'gone.sock'}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PREBOOT_CONFIG_DIR=str(etc2),
               PREBOOT_RUN_DIR=str(stack["work"] / "no-run"))
    result = subprocess.run([sys.executable, "-m", "zmgmcast", "-status"], cwd=str(REPO),
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "expected but not answering: policyd (not running)" in result.stderr


def test_health_check_remote_with_expect(stack):
    port = stack["status_ports"]["tftpd"]
    result = zmgmcast(stack, "-status", "-i", "127.0.0.1", "-p", str(port), "-expect", "tftpd")
    assert result.returncode == 0, result.stdout + result.stderr
    result = zmgmcast(stack, "-status", "-i", "127.0.0.1", "-p", str(port),
                      "-expect", "tftpd,imgsrvd")
    assert result.returncode == 4 and "imgsrvd (not asked)" in result.stderr


def test_log_reads_imgsrvds_results_log(stack):
    """A result reported over HTTP shows up in zmgmcast -log (path from imgsrvd.conf)."""
    daemon = stack["daemons"]["imgsrvd"]
    body = json.dumps({"workstation": "lab-pc\x1b[2J7", "operation": "download",
                       "status": "failure", "error_message": "disk\nfull",
                       "image_path": "lab/w.zmg", "image_type": "base"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}/v1/results", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"POST /v1/results: {exc.code} {exc.read()[:300]!r}")
    result = zmgmcast(stack, "-log", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and "lab-pc" in lines[-1] and "download" in lines[-1]
    assert "\x1b" not in result.stdout and "(disk\\x0afull)" in lines[-1]


def test_status_lines_to_systemd(tmp_path):
    """Under systemd (NOTIFY_SOCKET): READY=1, then a STATUS= line of the main counters."""
    short = Path(tempfile.mkdtemp(prefix="pbntf-", dir="/tmp"))
    notify_path = str(short / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    values = config_values("tftpd", short)
    values["StatusPort"] = 0
    daemon = DaemonProcess("tftpd", write_config(short / "tftpd.conf", values),
                           values["StatusSocket"], Path(values["LogFile"]),
                           extra_env={"NOTIFY_SOCKET": notify_path})
    try:
        daemon.start(timeout_s=20)
        said = [listener.recv(4096).decode() for _ in range(2)]
        assert said[0].startswith("READY=1")
        assert said[1].startswith("STATUS=Requests read 0, ")
    finally:
        daemon.stop()
        listener.close()
        shutil.rmtree(short, ignore_errors=True)
