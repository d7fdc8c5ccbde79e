"""The README's first command on a fresh clone: `bash scripts/stack.sh` places the boot programs
and serves every one proxydhcpd's defaults name over TFTP (tftp-hpa asks for each), and policyd
serves the imaging environment over HTTP. Run inside a network namespace of its own, so its
127.0.0.1 ports are not the host's."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import netlab
from proxydhcpd.config import SCHEMA as PROXY_SCHEMA

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

# what proxydhcpd's defaults name, and what sits beside them (shim asks for grubx64.efi)
BOOT_KEYS = ("BootFileBIOS", "BootFileUEFI64", "BootFileSecureBoot")
BESIDE = ("snponly.efi", "grubx64.efi")


def _running_stack() -> bool:
    pidfile = Path("/run/preboot/tftpd.pid")
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def test_stack_serves_every_boot_program_proxydhcpd_names(tmp_path):
    if not shutil.which("tftp") or _running_stack():
        pytest.skip("needs tftp-hpa, and no stack already running on this host")
    names = [key.default for key in PROXY_SCHEMA.keys if key.name in BOOT_KEYS] + list(BESIDE)
    assert len(names) == 5 and all(names), names
    ns = netlab.unique_prefix("pstk")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    in_ns = ["ip", "netns", "exec", ns]
    try:
        subprocess.run(in_ns + ["ip", "link", "set", "lo", "up"], check=True)
        started = subprocess.run(in_ns + ["bash", "scripts/stack.sh", "start"],
                                 cwd=netlab.REPO_ROOT, capture_output=True, text=True,
                                 timeout=900)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        root = netlab.REPO_ROOT / "samples" / "tftproot"
        for name in names:
            out = tmp_path / name
            got = subprocess.run(in_ns + ["tftp", "127.0.0.1", "-m", "binary", "-c", "get",
                                          name, str(out)], capture_output=True, text=True,
                                 timeout=120)
            assert out.exists() and out.read_bytes() == (root / name).read_bytes(), \
                (name, got.stdout, got.stderr)
            assert out.stat().st_size > 50_000, name           # a real program, not a stub
        # the imaging environment over HTTP from policyd, as iPXE fetches it by default
        head = subprocess.run(in_ns + ["curl", "-sSfI", "http://127.0.0.1:8090/boot/preboot/initrd"],
                              capture_output=True, text=True, timeout=60)
        assert head.returncode == 0 and "200" in head.stdout.splitlines()[0], head.stderr
    finally:
        subprocess.run(in_ns + ["bash", "scripts/stack.sh", "stop"], cwd=netlab.REPO_ROOT,
                       capture_output=True, timeout=120)
        subprocess.run(["ip", "netns", "del", ns], check=False)
