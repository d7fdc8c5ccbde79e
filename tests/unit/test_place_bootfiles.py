"""packaging/bootfiles/place-bootfiles.sh (preboot-bootfiles) on a fake distribution: the
package files under a temporary system root (PREBOOT_BOOTFILES_SYSROOT), no package database.
It copies each boot program under the name proxydhcpd uses, names what is missing and the
package to get it from, updates its own files, and never overwrites an administrator's file
(nor writes through a symlink) without --force."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "bootfiles" / "place-bootfiles.sh"

DEBIAN = {
    "undionly.kpxe": "usr/lib/ipxe/undionly.kpxe",
    "ipxe.efi": "usr/lib/ipxe/ipxe.efi",
    "snponly.efi": "usr/lib/ipxe/snponly.efi",
    "shimx64.efi": "usr/lib/shim/shimx64.efi.signed",
    "grubx64.efi": "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
}
SUSE = {
    "undionly.kpxe": "usr/share/ipxe/undionly.kpxe",
    "ipxe.efi": "usr/share/ipxe/ipxe-x86_64.efi",
    "snponly.efi": "usr/share/ipxe/snp-x86_64.efi",
    "shimx64.efi": "usr/share/efi/x86_64/shim.efi",
    "grubx64.efi": "usr/share/efi/x86_64/grub.efi",
    "ipxe-arm64.efi": "usr/share/ipxe/snp-arm64.efi",
}


def distribution(sysroot: Path, files: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    for name, path in files.items():
        if name in skip:
            continue
        target = sysroot / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"{name} from the distribution\n".encode())


def run(sysroot: Path, root: Path, *args: str, family: str = "debian"
        ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREBOOT_BOOTFILES_SYSROOT=str(sysroot))
    return subprocess.run(["bash", str(SCRIPT), "--family", family, "--cache",
                           str(sysroot / "cache"), *args, str(root)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    sysroot, root = tmp_path / "sys", tmp_path / "tftproot"
    sysroot.mkdir()
    root.mkdir()
    return sysroot, root


@pytest.mark.parametrize("family, files", [("debian", DEBIAN), ("suse", SUSE)])
def test_every_boot_program_is_copied_under_its_name(dirs, family, files):
    sysroot, root = dirs
    distribution(sysroot, files)
    done = run(sysroot, root, family=family)
    assert done.returncode == 0, done.stderr
    for name, path in files.items():
        placed = root / name
        assert placed.is_file() and not placed.is_symlink()
        assert placed.read_bytes() == (sysroot / path).read_bytes()
        assert oct(placed.stat().st_mode & 0o777) == "0o644"
        assert f"placed {name}: " in done.stdout
    again = run(sysroot, root, family=family)
    assert again.returncode == 0 and again.stdout.count("unchanged ") == len(files)


def test_missing_packages_are_named(dirs):
    sysroot, root = dirs
    distribution(sysroot, DEBIAN, skip=("shimx64.efi", "grubx64.efi"))
    done = run(sysroot, root)
    assert done.returncode == 1
    assert ("missing shimx64.efi: from shim-signed (/usr/lib/shim/shimx64.efi.signed); "
            "install it, or run with --download") in done.stderr
    assert "missing grubx64.efi: from grub-efi-amd64-signed " in done.stderr
    # what is there is still placed
    assert (root / "ipxe.efi").read_bytes() == b"ipxe.efi from the distribution\n"
    assert not (root / "shimx64.efi").exists()


def test_an_administrators_file_is_kept_unless_forced(dirs):
    sysroot, root = dirs
    distribution(sysroot, DEBIAN)
    (root / "ipxe.efi").write_bytes(b"my own iPXE build\n")
    done = run(sysroot, root)
    assert done.returncode == 1
    assert f"kept {root}/ipxe.efi: it differs from ipxe " in done.stderr
    assert "--force replaces it" in done.stderr
    assert (root / "ipxe.efi").read_bytes() == b"my own iPXE build\n"
    assert (root / "undionly.kpxe").is_file()          # the others are placed all the same
    forced = run(sysroot, root, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (root / "ipxe.efi").read_bytes() == b"ipxe.efi from the distribution\n"


def test_its_own_files_follow_a_distribution_update(dirs):
    sysroot, root = dirs
    distribution(sysroot, DEBIAN)
    assert run(sysroot, root).returncode == 0
    (sysroot / DEBIAN["shimx64.efi"]).write_bytes(b"shim, a newer version\n")
    done = run(sysroot, root)
    assert done.returncode == 0, done.stderr
    assert "placed shimx64.efi: " in done.stdout
    assert (root / "shimx64.efi").read_bytes() == b"shim, a newer version\n"


def test_a_symlink_in_the_root_is_never_written_through(dirs, tmp_path):
    sysroot, root = dirs
    distribution(sysroot, DEBIAN)
    outside = tmp_path / "outside.efi"
    outside.write_bytes(b"not ours\n")
    os.symlink(outside, root / "ipxe.efi")
    done = run(sysroot, root)
    assert done.returncode == 1 and "kept" in done.stderr
    assert (root / "ipxe.efi").is_symlink()
    forced = run(sysroot, root, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (root / "ipxe.efi").is_symlink()        # replaced by a copy ...
    assert outside.read_bytes() == b"not ours\n"       # ... the target untouched


def test_usage(dirs):
    sysroot, _root = dirs
    done = run(sysroot, sysroot / "nowhere")
    assert done.returncode == 2 and "is not a folder" in done.stderr
