"""prebootpolicyd on a real slapd: the policy loaded with preboot-dir, changed with the real
ldapmodify, and the very next query answers by the change, with no restart or reload."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from ldapserver import Slapd, missing
from support import REPO, DaemonProcess, write_config

pytestmark = [pytest.mark.skipif(missing() is not None, reason=str(missing())),
              pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")]

POLICY = """\
[menu]
display = never
[rules]
[[Dell lab]]
filter = "manufacturer = 'Dell Inc.'"
action = restore
image = dell/base.img
[workstations]
[[52:54:00:00:00:09]]
name = kiosk
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbldap-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def slapd() -> Iterator[Slapd]:
    with Slapd() as server:
        yield server


def _answer(port: int, **params: str) -> str:
    args = ["curl", "-sS", "--max-time", "20", "-G"]
    for key, value in params.items():
        args += ["--data-urlencode", f"{key}={value}"]
    result = subprocess.run([*args, f"http://127.0.0.1:{port}/policy"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if "preboot-answer:" in line)


def test_ldapmodify_changes_take_effect_on_the_next_query(slapd: Slapd, workdir: Path):
    credentials = slapd.write_credentials(workdir / "ldap.secret")
    (workdir / "policy.conf").write_text(POLICY)
    loaded = subprocess.run(
        [sys.executable, "-m", "common.dircli", "--config", "/nonexistent", "--directory",
         slapd.url, "--credentials", str(credentials), "import", str(workdir / "policy.conf")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert loaded.returncode == 0, loaded.stderr
    config = write_config(workdir / "policyd.conf", {
        "IPAddress": "127.0.0.1", "Port": 0, "Directory": slapd.url,
        "DirectoryCredentials": credentials, "DirectoryTimeout": 3, "StatusPort": 0,
        "StatusSocket": workdir / "p.sock", "PidFile": workdir / "p.pid", "LogLevel": "DEBUG",
        "LogFile": workdir / "p.log", "TokenKeyFile": workdir / "imaging.key"})
    daemon = DaemonProcess("prebootpolicyd", config, str(workdir / "p.sock"),
                           workdir / "p.log").start(timeout_s=20)
    try:
        port = daemon.port
        dell = {"mac": "52:54:00:00:00:01", "manufacturer": "Dell Inc.", "platform": "pcbios"}
        assert "imaging restore dell/base.img" in _answer(port, **dell)

        rule = f"cn=Dell lab,ou=rules,{slapd.base_dn}"
        slapd.ldapmodify(f"dn: {rule}\nchangetype: modify\nreplace: prebootImage\n"
                         "prebootImage: dell/new.img\n")
        assert "imaging restore dell/new.img" in _answer(port, **dell)

        slapd.ldapmodify(f"dn: {rule}\nchangetype: modify\nreplace: prebootFilter\n"
                         "prebootFilter: manufacturer = HP\n")
        assert "preboot-answer: local" in _answer(port, **dell)

        kiosk = f"prebootMAC=525400000009,ou=workstations,{slapd.base_dn}"
        slapd.ldapmodify(f"dn: {kiosk}\nchangetype: modify\nreplace: prebootImageOnNextBoot\n"
                         "prebootImageOnNextBoot: TRUE\n-\nreplace: prebootImage\n"
                         "prebootImage: kiosk.img\n")
        assert "imaging restore kiosk.img" in _answer(port, mac="52-54-00-00-00-09")

        counters = daemon.counters()
        assert counters["queries"] == 4 and counters["directory_errors"] == 0, counters
    finally:
        assert daemon.stop() == 0


def test_ldaps_with_a_trusted_ca_works_and_an_untrusted_one_falls_back(workdir: Path):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    with Slapd(tls=True) as server:
        credentials = server.write_credentials(workdir / "ldap.secret")
        (workdir / "policy.conf").write_text(POLICY)
        loaded = subprocess.run(
            [sys.executable, "-m", "common.dircli", "--config", "/nonexistent", "--directory",
             server.url, "--credentials", str(credentials), "import",
             str(workdir / "policy.conf")],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert loaded.returncode == 0, loaded.stderr
        dell = {"mac": "52:54:00:00:00:01", "manufacturer": "Dell Inc.", "platform": "efi"}
        for name, trusted in (("trusted", True), ("untrusted", False)):
            config = write_config(workdir / f"{name}.conf", {
                "IPAddress": "127.0.0.1", "Port": 0, "Directory": server.ldaps_url,
                "DirectoryCredentials": credentials, "DirectoryTimeout": 3, "StatusPort": 0,
                "StatusSocket": workdir / f"{name}.sock", "PidFile": workdir / f"{name}.pid",
                "LogLevel": "DEBUG", "LogFile": workdir / f"{name}.log",
                "TokenKeyFile": workdir / "imaging.key"})
            # libldap takes the CA from the environment (or TLS_CACERT in /etc/ldap/ldap.conf)
            env = {"LDAPTLS_CACERT": str(server.ca_file)} if trusted else {
                "LDAPTLS_CACERT": "/nonexistent-ca.pem"}
            daemon = DaemonProcess("prebootpolicyd", config, str(workdir / f"{name}.sock"),
                                   workdir / f"{name}.log", extra_env=env).start(timeout_s=20)
            try:
                answer = _answer(daemon.port, **dell)
                counters = daemon.counters()
            finally:
                assert daemon.stop() == 0
            if trusted:
                assert "imaging restore dell/base.img" in answer
                assert counters["directory_errors"] == 0, counters
            else:
                assert "preboot-answer: local" in answer
                assert counters["fallback_answers"] == 1, counters
                log = (workdir / f"{name}.log").read_text()
                assert "ldaps://" in log and "FallbackAnswer" in log, log[-2000:]
