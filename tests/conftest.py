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


# The RPMs installed with their scriptlets into a root with a shell (tests/rpmroot.py): built
# and installed once per session; tests/integration/test_rpm_install.py says how to use them.
def _rpmroot_skip() -> None:
    import rpmroot
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mount namespaces, file owners in the root)")
    missing = rpmroot.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/install-deps.sh installs them)")


@pytest.fixture(scope="session")
def built_rpms(tmp_path_factory):
    """This work tree's six RPMs (release 1), built once per session."""
    _rpmroot_skip()
    import rpmroot
    return rpmroot.build_rpms(tmp_path_factory.mktemp("rpms"))


@pytest.fixture(scope="session")
def rpm_root(tmp_path_factory, built_rpms):
    """A root with the RPMs installed by `rpm -i` (scriptlets run): an `rpmroot.RpmRoot`.
    Shared by the session: use it, do not erase from it (make your own with make_root)."""
    import shutil

    import rpmroot
    root = rpmroot.make_root(tmp_path_factory.mktemp("rpmroot") / "root")
    try:
        rpmroot.install(root, built_rpms)
        yield root
    finally:
        shutil.rmtree(root.path, ignore_errors=True)  # a root is 300 MB: never keep one
