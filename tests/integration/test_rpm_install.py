"""The RPMs installed with their scriptlets into a root that has a shell (issue 16): the user
and group, the units as systemctl sees them, files with their owners and modes, the commands
running from the root, `%config(noreplace)` kept on upgrade, and erase.

The root ("SLES-like": docs/packaging.md says how it differs from SLES) is a debootstrapped
Debian minbase with python3 and systemd, cached once per machine (tests/rpmroot.py,
`python3 tests/rpmroot.py` builds it; scripts/install-deps.sh does). Per session the RPMs of
the work tree are built once and installed once into a copy of it.

Reuse (the administrator's guide runs its commands here): ask for the session fixture
`rpm_root` (tests/conftest.py), an `rpmroot.RpmRoot` with all six RPMs installed, and run
commands chrooted in it:

    def test_guide_step(rpm_root):
        result = rpm_root.run("preboot-dir", "workstations", "list")     # check=True raises
        rpm_root.run("sh", "-c", "systemctl enable preboot-tftpd.service")
        assert rpm_root.stat("/var/lib/preboot") == "preboot:preboot 750"
        rpm_root.rpm("-q", "preboot-common")                            # the host's rpm, --root

`run(*argv, check=True, timeout_s=120, stdin=None)` returns `Result(returncode, stdout,
stderr)`. The root is shared by the session: do not erase packages from it; for a root of your
own, `rpmroot.make_root(path)` and `rpmroot.install(root, built_rpms)`. Nothing in it listens on
a network: a daemon started in it (in the foreground, `preboot-tftpd --foreground ...`) shares
the host's network, so give it loopback and free ports, or run it in a network namespace.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import rpmroot

pytestmark = [pytest.mark.root, pytest.mark.slow]

DAEMONS = ("tftpd", "proxydhcpd", "policyd", "imgsrvd")
UNITS = tuple(f"preboot-{name}.service" for name in DAEMONS)
# What the admin guide enables: the three started at boot; proxydhcpd is optional.
ENABLED = ("preboot-tftpd.service", "preboot-policyd.service", "preboot-imgsrvd.service")
ALL = tuple(f"preboot-{name}" for name in rpmroot.PACKAGES)
UPGRADE_MARK = "# rpm -U test: the packaged file changed in release 1.2\n"


def test_user_and_group_from_the_pre_scriptlet(rpm_root):
    user = rpm_root.run("getent", "passwd", "preboot").stdout.strip().split(":")
    assert user[0] == "preboot" and user[5:] == ["/srv/tftp", "/sbin/nologin"], user
    assert int(user[2]) < 1000, "a system user"
    group = rpm_root.run("getent", "group", "preboot").stdout.strip().split(":")
    assert group[2] == user[3], "the user's primary group is preboot"


@pytest.mark.parametrize("path, owner_mode", [
    ("/var/lib/preboot", "preboot:preboot 750"),
    ("/var/lib/preboot/images", "preboot:preboot 750"),
    ("/var/log/preboot", "preboot:preboot 750"),
    ("/run/preboot", "preboot:preboot 755"),      # %ghost: made by systemd-tmpfiles in %post
    ("/var/lib/preboot/directory.db", "preboot:preboot 644"),  # preboot-dir init in %post
    ("/etc/preboot", "root:root 755"),
    ("/etc/preboot/imgsrvd.conf", "root:root 644"),
    ("/usr/sbin/preboot-imgsrvd", "root:root 755"),
    ("/usr/lib/preboot/python/common/__init__.py", "root:root 644"),
    ("/usr/lib/sysusers.d/preboot.conf", "root:root 644"),
    ("/etc/logrotate.d/preboot-common", "root:root 644"),
    ("/srv/tftp", "root:root 755"),
])
def test_files_in_place_with_owner_and_mode(rpm_root, path, owner_mode):
    assert rpm_root.stat(path) == owner_mode


def test_rpm_verify_finds_every_file_as_packaged(rpm_root):
    """rpm -V: every file's digest, size, owner, group and mode as in the RPM database; only
    /run/preboot's mtime differs (a %ghost directory, made by tmpfiles after the install)."""
    result = rpm_root.rpm("-V", "--nodeps", *ALL, check=False)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert all(re.fullmatch(r"\.{7}T\.\s+g? /run/preboot", line) for line in lines), lines


def test_units_present_and_left_off_as_suses_preset_says(rpm_root):
    for unit in UNITS:
        assert (rpm_root.path / "usr/lib/systemd/system" / unit).is_file(), unit
    # What %service_add_post does on a fresh SUSE install: apply the presets; with SUSE's
    # default "disable *" no preboot unit is enabled by installing it.
    rpm_root.run("systemctl", "preset", *UNITS)
    states = rpm_root.run("systemctl", "is-enabled", *UNITS, check=False).stdout.split()
    assert states == ["disabled"] * 4


def test_enable_as_the_guide_says_and_systemctl_root_sees_it(rpm_root):
    rpm_root.run("systemctl", "enable", *ENABLED)
    listed = subprocess.run(["systemctl", "--root", str(rpm_root.path), "list-unit-files",
                             "--no-legend", "preboot-*"], capture_output=True, text=True,
                            check=True).stdout
    states = {line.split()[0]: line.split()[1] for line in listed.splitlines()}
    assert states == {**{unit: "enabled" for unit in ENABLED},
                      "preboot-proxydhcpd.service": "disabled"}
    wants = rpm_root.path / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.glob("preboot-*")} == set(ENABLED)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_shipped_configs_pass_the_daemons_check(rpm_root, daemon):
    """The wrappers, the private Python prefix and the shipped config work together."""
    result = rpm_root.run(f"preboot-{daemon}", "--check", "--config",
                          f"/etc/preboot/{daemon}.conf")
    assert result.stdout.strip() == f"OK: /etc/preboot/{daemon}.conf"


def test_commands_run_from_the_root(rpm_root):
    # The embedded directory %post made is there and empty.
    assert rpm_root.run("preboot-dir", "workstations", "list").stdout == ""
    assert rpm_root.run("img", "--help").stdout.startswith("usage: img")
    assert rpm_root.run("zmgmcast", "--help").returncode == 0


def test_the_installed_tftpd_has_its_c_loop(rpm_root):
    """preboot-tftpd (architecture-specific) ships tftpd/_lockstep.c compiled; the installed
    interpreter imports it from the private prefix, and no C source is shipped."""
    import sys
    result = rpm_root.run("env", "PYTHONPATH=/usr/lib/preboot/python", sys.executable, "-s",
                          "-P", "-c", "import tftpd.lockstep as l; print(l.native.__file__)")
    assert result.stdout.startswith("/usr/lib/preboot/python/tftpd/_lockstep."), result.stdout
    assert not (rpm_root.path / "usr/lib/preboot/python/tftpd/_lockstep.c").exists()


# ---- upgrade and erase: a root of their own (the shared one stays installed) ----


def _changed_tftpd_conf(tree: Path) -> None:
    conf = tree / "packaging" / "etc" / "tftpd.conf"
    conf.write_text(conf.read_text() + UPGRADE_MARK)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory, built_rpms):
    """A root with release 1, an edited tftpd.conf and a directory entry, then `rpm -U` to
    release 1.2 whose packaged tftpd.conf changed."""
    work = tmp_path_factory.mktemp("upgrade")
    newer = rpmroot.build_rpms(work / "build", dist=".2", edit=_changed_tftpd_conf)
    root = rpmroot.make_root(work / "root")
    try:
        rpmroot.install(root, built_rpms)
        root.run("sh", "-c", "echo 'LogLevel = DEBUG' >> /etc/preboot/tftpd.conf")
        root.run("preboot-dir", "workstations", "add", "52:54:00:12:34:56", "--name", "lab-1")
        db = root.path / "var/lib/preboot/directory.db"
        before = {"uid": root.run("id", "-u", "preboot").stdout,
                  "db": hashlib.sha256(db.read_bytes()).hexdigest()}
        root.rpm("-U", "--nodeps", *map(str, newer))
        yield root, before
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_upgrade_keeps_the_edited_config_and_writes_rpmnew(upgraded):
    root, _ = upgraded
    versions = root.rpm("-q", "--qf", "%{NAME} %{VERSION}-%{RELEASE}\n", *ALL).stdout
    assert versions.split("\n")[:-1] == [f"{name} 0.1.0-1.2" for name in ALL]
    etc = root.path / "etc/preboot"
    kept = (etc / "tftpd.conf").read_text()
    assert kept.endswith("LogLevel = DEBUG\n") and UPGRADE_MARK not in kept
    assert (etc / "tftpd.conf.rpmnew").read_text().endswith(UPGRADE_MARK)
    # A config left as packaged, whose packaged copy did not change, gets no .rpmnew.
    assert sorted(p.name for p in etc.glob("*.rpmnew")) == ["tftpd.conf.rpmnew"]


def test_upgrade_keeps_the_user_and_the_directory(upgraded):
    root, before = upgraded
    assert root.run("id", "-u", "preboot").stdout == before["uid"]
    db = root.path / "var/lib/preboot/directory.db"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before["db"]  # no second init
    assert "lab-1" in root.run("preboot-dir", "workstations", "list").stdout


def test_erase_removes_every_packaged_file(upgraded, built_rpms):
    root, _ = upgraded
    listed = root.rpm("-ql", *ALL).stdout.split()
    root.run("systemctl", "enable", *ENABLED)
    root.rpm("-e", "--nodeps", *ALL)
    assert root.rpm("-q", "preboot-common", check=False).returncode != 0
    left = sorted(path for path in set(listed) if (root.path / path.lstrip("/")).exists()
                  or (root.path / path.lstrip("/")).is_symlink())
    # Folders with files nobody packaged: the directory, and the configs rpm set aside; the
    # shared system folders other packages own too.
    assert set(left) <= {"/var/lib/preboot", "/etc/preboot", "/srv/tftp", "/etc/logrotate.d",
                         "/usr/lib/firewalld", "/usr/lib/firewalld/services",
                         "/usr/share/bash-completion",
                         "/usr/share/bash-completion/completions"}, left
    assert (root.path / "var/lib/preboot/directory.db").exists(), "the data stays"
    etc = sorted(p.name for p in (root.path / "etc/preboot").iterdir())
    assert etc == ["tftpd.conf.rpmnew", "tftpd.conf.rpmsave"]
    # The user stays (files it owns may remain; distributions never delete system users).
    assert root.run("getent", "passwd", "preboot").returncode == 0
    # %service_del_preun (SUSE) disables a unit on erase; the Debian-built RPMs here have
    # empty systemd macros, so the enable links stay, dangling (docs/packaging.md).
    wants = root.path / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.glob("preboot-*")} == set(ENABLED)
