"""packaging/imaging-env/build.sh: the imaging environment is reproducible (two builds in
different folders, with different umasks and time zones, give the same bytes) and built only
from .debs that match packages.lock.

The builds share the cache the end-to-end tests use ($PREBOOT_IMAGING_ENV/.cache, default
/var/cache/preboot/imaging-env/.cache; PREBOOT_IMAGING_ENV_CACHE overrides it): after the first
run, nothing is downloaded and each build takes about 15 s.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "imaging-env" / "build.sh"
LOCK = REPO / "packaging" / "imaging-env" / "packages.lock"
ENV_DIR = Path(os.environ.get("PREBOOT_IMAGING_ENV", "/var/cache/preboot/imaging-env"))
CACHE = Path(os.environ.get("PREBOOT_IMAGING_ENV_CACHE", ENV_DIR / ".cache"))
OUTPUTS = ("linux", "initrd", "modules", "manifest.txt")

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None and shutil.which("ar") is None,
                                reason="needs dpkg-deb or ar to unpack .debs")


def build(out: Path, umask: str, tz: str, extra_env: dict | None = None,
          cache: Path = CACHE) -> subprocess.CompletedProcess:
    env = dict(os.environ, TZ=tz, **(extra_env or {}))
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run(["bash", "-c", f'umask {umask}; exec bash "$@"', "build",
                           str(BUILD), "--out", str(out), "--cache", str(cache), "--force"],
                          capture_output=True, text=True, timeout=1200, env=env)


def lock_entries() -> list[list[str]]:
    return [line.split() for line in LOCK.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_two_builds_give_the_same_bytes(tmp_path):
    first = build(tmp_path / "a", "022", "UTC")
    assert first.returncode == 0, first.stderr[-3000:]
    second = build(tmp_path / "elsewhere" / "b", "077", "Pacific/Auckland")
    assert second.returncode == 0, second.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == \
            (tmp_path / "elsewhere" / "b" / name).read_bytes(), f"{name} differs"
    manifest = (tmp_path / "a" / "manifest.txt").read_text()
    for name in ("linux", "initrd", "modules"):
        digest = subprocess.run(["sha256sum", str(tmp_path / "a" / name)], capture_output=True,
                                text=True, check=True).stdout.split()[0]
        assert f"output: {name} {digest}" in manifest
    for name, version, sha256, _path in lock_entries():
        assert f"package: {name} {version} {sha256}" in manifest
    assert str(tmp_path) not in manifest
    initrd = subprocess.run(f"zcat {tmp_path / 'a' / 'initrd'} | strings",
                            shell=True, capture_output=True, text=True).stdout
    assert str(tmp_path) not in initrd                # no build path in any file
    # the initramfs holds the pinned kernel's modules, as the modules list says
    listing = subprocess.run(f"zcat {tmp_path / 'a' / 'initrd'} | cpio -t --quiet",
                             shell=True, capture_output=True, text=True).stdout.split()
    modules = (tmp_path / "a" / "modules").read_text().split()
    kver = next(line.split()[1] for line in manifest.splitlines()
                if line.startswith("kernel-version:"))
    assert modules and all(f"lib/modules/{kver}/{m}" in listing for m in modules)


def test_a_deb_that_differs_from_the_lock_is_refused(tmp_path):
    """A tampered .deb in the cache stops the build before anything is unpacked from it."""
    name, version, sha256, path = next(e for e in lock_entries() if e[0] == "busybox-static")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    (cache / "debs" / Path(path).name).write_bytes(b"!<arch>\nnot the pinned package\n")
    lock = tmp_path / "packages.lock"
    lock.write_text(f"{name} {version} {sha256} {path}\n")
    result = build(tmp_path / "out", "022", "UTC", {"PREBOOT_IMGENV_LOCK": str(lock)}, cache)
    assert result.returncode != 0
    assert "does not match packages.lock" in result.stderr
    assert (cache / "debs" / (Path(path).name + ".bad")).exists()


@pytest.mark.parametrize("line,reason", [
    ("busybox-static", "is not 'name version sha256 path'"),           # added, not pinned
    ("busybox-static 1:1.35 abc debian/pool/x.deb", "is not 'name version sha256 path'"),
    ("busybox-static 1 " + "a" * 64 + " p extra", "is not 'name version sha256 path'"),
    ("# only a comment", "pins no package"),
])
def test_malformed_lock_lines(tmp_path, line, reason):
    lock = tmp_path / "packages.lock"
    lock.write_text(line + "\n")
    result = build(tmp_path / "out", "022", "UTC", {"PREBOOT_IMGENV_LOCK": str(lock)},
                   tmp_path / "cache")
    assert result.returncode != 0 and reason in result.stderr, result.stderr


def test_fetch_only_downloads_from_the_mirror_and_checks(tmp_path):
    """--fetch-only with a mirror in a folder (file://): the .deb lands in the cache, checked."""
    name, version, sha256, path = next(e for e in lock_entries() if e[0] == "busybox-static")
    source = CACHE / "debs" / Path(path).name
    if not source.exists():
        pytest.skip(f"{source} not cached yet (test_two_builds_give_the_same_bytes fetches it)")
    mirror = tmp_path / "mirror"
    (mirror / path).parent.mkdir(parents=True)
    shutil.copy(source, mirror / path)
    lock = tmp_path / "packages.lock"
    lock.write_text(f"{name} {version} {sha256} {path}\n")
    env = {"PREBOOT_IMGENV_LOCK": str(lock), "PREBOOT_DEBIAN_MIRROR": f"file://{mirror}"}
    result = subprocess.run(["bash", str(BUILD), "--fetch-only", "--out", str(tmp_path / "o"),
                             "--cache", str(tmp_path / "cache")], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / "debs" / Path(path).name).read_bytes() == source.read_bytes()
