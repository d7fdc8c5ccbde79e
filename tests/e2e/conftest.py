"""Fixtures for end-to-end tests: qemu PXE clients in network namespaces (root only).

`netlab` (next to this file) is the reusable harness; this file makes it importable as `netlab`
and gives tests a `lab` (cleaned up even on failure) and a `pxe_topology` on top of it.

Environment:
  PREBOOT_E2E_TFTPD=hpa   serve TFTP with tftpd-hpa (`in.tftpd`) instead of ours, to tell a
                          harness problem from a daemon problem (counter checks are skipped).
  PREBOOT_E2E_TIMEOUT=S   seconds to wait for a VM's marker (default 120).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import netlab  # noqa: E402  (needs the path above)


def skip_unless_ready(tools: tuple[str, ...] = ("ip", "qemu-system-x86_64", "dnsmasq"),
                      files: tuple[Path, ...] = ()) -> None:
    """pytest.skip with every reason this machine cannot run the lab."""
    reasons = netlab.missing_prerequisites(tools, files)
    if reasons:
        pytest.skip("e2e: " + "; ".join(reasons))


@pytest.fixture(scope="session")
def imaging_env() -> Path:
    """The built imaging environment (packaging/imaging-env/build.sh, cached: seconds when
    nothing changed), for the tests that boot it."""
    import imagingenv
    missing = netlab.missing_prerequisites() + imagingenv.missing_tools()
    if missing:
        pytest.skip("e2e imaging: " + "; ".join(missing))
    env_dir, seconds = imagingenv.build_imaging_env()
    print(f"imaging environment ready in {seconds:.1f} s: {env_dir}")
    return env_dir


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[netlab.Lab]:
    """A `netlab.Lab` with its logs in tmp_path; everything it made is undone afterwards."""
    skip_unless_ready()
    with netlab.Lab(tmp_path / "lab") as the_lab:
        yield the_lab


@pytest.fixture
def pxe_topology(lab: netlab.Lab) -> netlab.PxeTopology:
    """Server namespace with bridge br0 (192.168.77.2) and tap0, site-DHCP namespace (.1)."""
    return netlab.build_pxe_topology(lab)


_BOOT_TIMES: list[tuple[str, str]] = []


@pytest.fixture
def record_boot_time(request: pytest.FixtureRequest, record_property):
    """Call with (seconds, note): shown in the terminal summary and the JUnit properties."""

    def record(seconds: float, note: str = "") -> None:
        record_property("boot_seconds", f"{seconds:.1f}")
        _BOOT_TIMES.append((request.node.nodeid, f"{seconds:.1f} s {note}".rstrip()))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if _BOOT_TIMES:
        terminalreporter.section("e2e boot times (TCG)")
        for nodeid, text in _BOOT_TIMES:
            terminalreporter.write_line(f"{nodeid}: {text}")
