"""A root that has a shell, with the RPMs installed into it by rpm and their scriptlets run.

Owns three things, reusable by any test (tests/integration/test_rpm_install.py checks the
scriptlets; the administrator's guide runs its commands here):

- `base_root()`: a minimal Debian root (`debootstrap --variant=minbase`, plus python3 and
  systemd for `systemd-tmpfiles`, `systemctl` and `useradd`), built once per machine and cached
  under `PREBOOT_TEST_CACHE` (default /var/cache/preboot-tests), keyed by suite and packages.
- `build_rpms(out, dist=...)`: `rpmbuild -bb` of the work tree (committed and uncommitted files),
  optionally with the sources changed first (an upgrade's new config file).
- `RpmRoot`: a copy of the base root; `rpm(...)` runs the host's rpm with `--root` (scriptlets
  run chrooted in it), `run(...)` runs a command chrooted in it.

Both go through a private mount namespace (`unshare --mount`) in which the interpreter the RPMs
were built for (this test run's Python, with its packages: the root has none of the daemons'
Python dependencies) is bind-mounted read-only at its own path, and /proc and /dev are the
host's: nothing stays mounted after a command, whatever happens to the test. The root mimics a
system booted with systemd (`/run/systemd/system` exists), so the scriptlets take their systemd
branch, as on SLES, and has SUSE's default preset (`disable *`). No systemd runs in it:
`systemctl enable/disable/preset/is-enabled` work on the unit files (SYSTEMD_OFFLINE=1 is set),
`start`, `reload` and `enable --now` fail for want of a bus; a daemon is started in the
foreground by hand instead. docs/packaging.md lists how this root differs from SLES.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "packaging" / "rpm" / "preboot.spec"
VERSION = "0.1.0"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# python3: the root's own interpreter (SLES has one); systemd: systemctl, systemd-tmpfiles and
# systemd-sysusers, which the scriptlets and the guide call. minbase already has useradd.
INCLUDE = ("python3", "systemd")
# Where SLES keeps its RPM database (Debian's rpm defaults to ~/.rpmdb).
DBPATH = "/usr/lib/sysimage/rpm"
PACKAGES = ("common", "tftpd", "proxydhcpd", "policyd", "imgsrvd", "img", "imaging-env")
# The pinned .debs the imaging environment is built from: the cache the e2e tests fill
# (tests/e2e/imagingenv.py), so rpmbuild downloads nothing twice.
IMGENV_CACHE = Path(os.environ.get("PREBOOT_IMAGING_ENV", "/var/cache/preboot/imaging-env")) / ".cache"


def missing_tools() -> list[str]:
    """The host tools this module needs and does not find (a test skips naming them)."""
    tools = ["rpm", "rpmbuild", "debootstrap", "unshare", "chroot", "mount", "git", "tar"]
    return [tool for tool in tools if not shutil.which(tool)]


def cache_dir() -> Path:
    return Path(os.environ.get("PREBOOT_TEST_CACHE", "/var/cache/preboot-tests"))


def base_root() -> Path:
    """The pristine cached root, debootstrapped on first use (needs the Debian mirror)."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} minbase {' '.join(INCLUDE)}".encode()).hexdigest()
    root = cache_dir() / f"root-{SUITE}-minbase-{key[:12]}"
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions never debootstrap the same root
        if not (root / ".complete").exists():
            _debootstrap(root)
    return root


def _debootstrap(root: Path) -> None:
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE,
         str(partial), MIRROR], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"debootstrap {SUITE} from {MIRROR} failed: "
                           f"{result.stdout[-1500:]}{result.stderr[-1500:]}")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    (root / ".complete").write_text(f"debootstrap --variant=minbase {SUITE} {MIRROR}\n")


def build_rpms(out: Path, dist: str = "", edit: Callable[[Path], None] | None = None,
               python: str = sys.executable) -> list[Path]:
    """rpmbuild -bb of the work tree into `out`; `dist` makes a higher release ("1" + dist),
    `edit(tree)` changes the staged sources first. --nodeps: the build host is Debian."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    tree = out / "src" / f"preboot-{VERSION}"
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    if edit is not None:
        edit(tree)
    (out / "SOURCES").mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-czf", str(out / "SOURCES" / f"preboot-{VERSION}.tar.gz"),
                    "-C", str(out / "src"), f"preboot-{VERSION}"], check=True)
    result = subprocess.run(
        ["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {out}",
         "--define", f"preboot_python {python}",
         "--define", f"preboot_imgenv_cache {IMGENV_CACHE}",
         *(["--define", f"dist {dist}"] if dist else []), str(SPEC)],
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"rpmbuild failed: {result.stderr[-3000:]}")
    rpms = sorted((out / "RPMS").glob("*/preboot-*.rpm"))
    assert len(rpms) == len(PACKAGES), rpms
    return rpms


def _interpreter_trees() -> list[str]:
    """The folders the RPMs' interpreter needs: its prefix (stdlib, site-packages) and, in a
    virtual environment, the environment too."""
    trees = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return sorted(trees)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class RpmRoot:
    """A root with a shell; `run` and `rpm` are the only ways into it."""

    path: Path

    def _namespace_argv(self, inner: list[str]) -> list[str]:
        root = shlex.quote(str(self.path))
        mounts = []
        for tree in _interpreter_trees() + ["/proc", "/dev"]:
            target = f"{root}{shlex.quote(tree)}"
            ro = "-o ro " if tree not in ("/proc", "/dev") else ""
            mounts.append(f"mkdir -p {target} && mount --bind {ro}{shlex.quote(tree)} {target}")
        script = " && ".join(mounts) + ' && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                "rpmroot", *inner]

    # SYSTEMD_OFFLINE: systemctl edits unit files (enable, disable, preset, is-enabled)
    # without asking a running systemd, which this root has not; start and --now fail.
    ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
           "SYSTEMD_OFFLINE": "1"}

    def _argv(self, inner: list[str], netns: str | None) -> list[str]:
        argv = self._namespace_argv(inner)
        return ["ip", "netns", "exec", netns, *argv] if netns else argv

    def _call(self, inner: list[str], check: bool, timeout_s: float,
              stdin: str | None, netns: str | None = None) -> Result:
        done = subprocess.run(self._argv(inner, netns), capture_output=True, text=True,
                              timeout=timeout_s, env=self.ENV, input=stdin)
        result = Result(done.returncode, done.stdout, done.stderr)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(inner)} exited {done.returncode}:\n"
                                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return result

    def run(self, *argv: str, check: bool = True, timeout_s: float = 120,
            stdin: str | None = None, netns: str | None = None) -> Result:
        """`argv` chrooted in the root (as root), e.g. run("sh", "-c", "..."); in the network
        namespace `netns` (made with `ip netns add`) if given, else in the host's network."""
        return self._call(["chroot", str(self.path), *argv], check, timeout_s, stdin, netns)

    def popen(self, *argv: str, netns: str | None = None, **kwargs) -> subprocess.Popen:
        """`argv` chrooted in the root, not waited for (a daemon in the foreground). Every
        step up to it execs the next, so the Popen's pid is the command's own: stop it by
        that pid."""
        return subprocess.Popen(self._argv(["chroot", str(self.path), *argv], netns),
                                env=self.ENV, **kwargs)

    def rpm(self, *args: str, check: bool = True, timeout_s: float = 300) -> Result:
        """The host's rpm on the root (its database at DBPATH in the root); scriptlets run
        chrooted. --nodeps: the root's software came from dpkg, so rpm knows none of it."""
        return self._call(["rpm", "--root", str(self.path), "--dbpath", DBPATH, *args],
                          check, timeout_s, None)

    def stat(self, path: str) -> str:
        """'owner:group mode' of a path, names resolved by the root's own passwd and group."""
        return self.run("stat", "-c", "%U:%G %a", path).stdout.strip()


def make_root(where: Path) -> RpmRoot:
    """A fresh copy of the cached base root at `where`, with an empty RPM database."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_root()), str(where)], check=True)
    (where / "run" / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    # SUSE's default preset (systemd-presets-common-SUSE): what no preset names stays off.
    (where / "usr/lib/systemd/system-preset/99-default.preset").write_text("disable *\n")
    root = RpmRoot(where)
    root.rpm("--initdb")
    return root


def install(root: RpmRoot, rpms: list[Path]) -> Result:
    """rpm -i of the RPMs, in one transaction, scriptlets and all."""
    return root.rpm("-i", "--nodeps", *map(str, rpms))


@contextlib.contextmanager
def installed_root(work: Path | None = None) -> Iterator[RpmRoot]:
    """A root with this work tree's RPMs installed; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="preboot-rpmroot-", dir=work))
    try:
        rpms = build_rpms(base / "build")
        root = make_root(base / "root")
        install(root, rpms)
        yield root
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    # scripts/install-deps.sh builds the cached root ahead of the tests (needs the mirror).
    print(base_root())
