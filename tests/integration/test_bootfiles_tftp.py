"""A fresh stack root serves every boot program proxydhcpd names: place-bootfiles.sh (as
scripts/stack.sh runs it: --download, the signed shim and GRUB fetched with apt-get download
into /var/cache/preboot/bootfiles) fills an empty temporary TFTP root, our tftpd serves it on
127.0.0.1, and tftp-hpa's client fetches each boot program proxydhcpd's defaults name (and the
other files the script places), each equal to the file in the distribution's package."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from proxydhcpd.config import SCHEMA as PROXY_SCHEMA
from support import REPO, DaemonProcess, tftpd_on_loopback

SCRIPT = REPO / "packaging" / "bootfiles" / "place-bootfiles.sh"
CACHE = Path("/var/cache/preboot/bootfiles")
# Debian: where each placed file comes from (installed package, or the download cache).
SOURCES = {
    "undionly.kpxe": Path("/usr/lib/ipxe/undionly.kpxe"),
    "ipxe.efi": Path("/usr/lib/ipxe/ipxe.efi"),
    "snponly.efi": Path("/usr/lib/ipxe/snponly.efi"),
    "shimx64.efi": CACHE / "shim-signed/root/usr/lib/shim/shimx64.efi.signed",
    "grubx64.efi": CACHE / "grub-efi-amd64-signed/root/usr/lib/grub/x86_64-efi-signed/"
                           "grubnetx64.efi.signed",
}

pytestmark = [
    pytest.mark.skipif(not shutil.which("tftp"), reason="tftp-hpa's tftp not installed"),
    pytest.mark.skipif(not Path("/etc/debian_version").exists() or not shutil.which("apt-get"),
                       reason="the Debian sources of place-bootfiles.sh"),
    pytest.mark.skipif(not SOURCES["ipxe.efi"].exists(), reason="package ipxe not installed"),
]


def proxydhcpd_boot_files() -> list[str]:
    """The boot programs proxydhcpd's defaults name (BootFile* keys with a file name default;
    a Secure Boot key defaulting to shimx64.efi is picked up the same way)."""
    return sorted({key.default for key in PROXY_SCHEMA.keys
                   if key.name.startswith("BootFile") and key.default
                   and "://" not in key.default})


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbtftproot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def placed(root: Path) -> str:
    done = subprocess.run(["bash", str(SCRIPT), "--download", "--cache", str(CACHE), str(root)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "apt-get download" in done.stderr:
        pytest.skip(f"no package download here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def tftpd(root: Path, placed: str) -> Iterator[DaemonProcess]:
    work = Path(tempfile.mkdtemp(prefix="pbtftpd-", dir="/tmp"))
    daemon = tftpd_on_loopback(root, work)
    yield daemon
    assert daemon.stop() in (0, None), daemon.log()
    shutil.rmtree(work, ignore_errors=True)


def tftp_get(port: int, name: str, out: Path) -> None:
    done = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", name,
                           str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and out.exists(), f"{name}: {done.stdout}{done.stderr}"


def test_every_boot_program_proxydhcpd_names_is_served(root, placed, tftpd, tmp_path):
    port = tftpd.status()["listen"][0]["port"]
    named = proxydhcpd_boot_files()
    assert {"undionly.kpxe", "ipxe.efi"} <= set(named), named
    for name in named + sorted(set(SOURCES) - set(named)):
        out = tmp_path / name
        tftp_get(port, name, out)
        assert out.read_bytes() == SOURCES[name].read_bytes(), f"{name} differs from its package"
        assert f" {name}: " in placed                  # and the script said where it came from
    # the script says which package and version each came from
    assert "shimx64.efi: shim-signed " in placed and "grubx64.efi: grub-efi-amd64-signed " in placed
    assert (root / ".preboot-bootfiles").read_text().count("\n") == len(SOURCES)
