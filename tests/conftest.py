"""Shared fixtures; the helpers behind them live in tests/support.py (importable as `support`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import REPO, DaemonProcess, query_status, write_config  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "upload").mkdir()
    return root


@pytest.fixture
def tftpd_factory(tmp_path: Path, tftp_root: Path):
    """Start tftpd with overrides of a loopback, port-0 config; stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(_env: dict[str, str] | None = None, **overrides: Any) -> DaemonProcess:
        n = len(started)
        values: dict[str, Any] = {
            "IPAddress": "127.0.0.1", "Port": 0, "Root": str(tftp_root),
            "StatusSocket": str(tmp_path / f"tftpd{n}.sock"),
            "PidFile": str(tmp_path / f"tftpd{n}.pid"), "StatusPort": 0,
            "LogLevel": "DEBUG", "LogFile": str(tmp_path / f"tftpd{n}.log"),
        }
        values.update(overrides)
        config = write_config(tmp_path / f"tftpd{n}.conf", values)
        daemon = DaemonProcess("tftpd", config, values["StatusSocket"], Path(values["LogFile"]),
                               extra_env=dict(_env or {}))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def tftpd(tftpd_factory) -> DaemonProcess:
    return tftpd_factory()
