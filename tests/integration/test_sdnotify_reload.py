"""The sd_notify reload protocol of Type=notify-reload (systemd 253+), spoken by a real daemon
on a real unix datagram socket: SIGHUP -> `RELOADING=1` with `MONOTONIC_USEC=` (the reload's
start on CLOCK_MONOTONIC) -> `READY=1` when the new config is in force, and also when a bad
config was refused (the old one kept). The drop-in systemd/notify-reload/notify-reload.conf
is verified in tests/unit/test_systemd_units.py."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from support import REPO, DaemonProcess, write_config

DROP_IN = REPO / "systemd" / "notify-reload" / "notify-reload.conf"


def receive(listener: socket.socket, prefix: str) -> str:
    """The next message starting with `prefix`; STATUS= lines in between are skipped."""
    while True:
        message = listener.recv(4096).decode()
        if message.startswith(prefix):
            return message
        assert message.startswith("STATUS="), message


@pytest.fixture
def tftpd_with_notify():
    short = Path(tempfile.mkdtemp(prefix="pbrld-", dir="/tmp"))  # AF_UNIX paths are short
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(short / "notify"))
    listener.settimeout(10)
    (short / "root").mkdir()
    values = {"IPAddress": "127.0.0.1", "Port": 0, "Root": str(short / "root"),
              "StatusSocket": str(short / "tftpd.sock"), "PidFile": str(short / "tftpd.pid"),
              "StatusPort": 0, "LogLevel": "DEBUG", "LogFile": str(short / "tftpd.log")}
    config = write_config(short / "tftpd.conf", values)
    daemon = DaemonProcess("tftpd", config, values["StatusSocket"], Path(values["LogFile"]),
                           extra_env={"NOTIFY_SOCKET": str(short / "notify")})
    try:
        daemon.start(timeout_s=20)
        assert receive(listener, "READY=1").startswith("READY=1")
        yield daemon, listener, config
    finally:
        daemon.stop()
        listener.close()
        shutil.rmtree(short, ignore_errors=True)


def reload_messages(daemon: DaemonProcess, listener: socket.socket) -> tuple[int, str, str]:
    before_us = time.monotonic_ns() // 1000
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = receive(listener, "RELOADING=1")
    ready = receive(listener, "READY=1")
    return before_us, reloading, ready


def test_sighup_sends_reloading_with_monotonic_usec_then_ready(tftpd_with_notify):
    daemon, listener, config = tftpd_with_notify
    config.write_text(config.read_text().replace("LogLevel = DEBUG", "LogLevel = INFO"))
    before_us, reloading, ready = reload_messages(daemon, listener)
    fields = dict(line.split("=", 1) for line in reloading.splitlines())
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}, reloading
    stamp_us = int(fields["MONOTONIC_USEC"])
    # CLOCK_MONOTONIC is one clock for every process: the stamp lies between our SIGHUP and now.
    assert before_us <= stamp_us <= time.monotonic_ns() // 1000
    assert ready.splitlines()[0] == "READY=1"


def test_a_refused_config_still_ends_the_reload(tftpd_with_notify):
    daemon, listener, config = tftpd_with_notify
    config.write_text(config.read_text() + "NoSuchKey = 1\n")
    _, reloading, ready = reload_messages(daemon, listener)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert ready.splitlines()[0] == "READY=1"
    assert daemon.proc.poll() is None  # the old config is kept, the daemon runs on


def test_units_ship_type_notify_with_a_kill_hup_reload():
    """What every systemd the RPMs target understands (SLES 15 SP5 has 249)."""
    for unit in sorted((REPO / "systemd").glob("preboot-*.service")):
        text = unit.read_text()
        assert "\nType=notify\n" in text, unit.name
        assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in text, unit.name


def test_drop_in_switches_to_notify_reload():
    lines = [line for line in DROP_IN.read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines == ["[Service]", "Type=notify-reload", "ExecReload="]

