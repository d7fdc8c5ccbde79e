"""The unit files in systemd/: `systemd-analyze verify` accepts them, and they keep the contract
(Type=notify, foreground ExecStart, reload by SIGHUP, hardening) that packaging relies on.

verify insists that every Exec*= program exists, so each unit is verified from a temp copy whose
missing programs (/usr/sbin/preboot-*, not installed on a build machine) point at stubs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
SPEC = REPO / "packaging" / "rpm" / "preboot.spec"
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".target", ".mount")
UNITS = sorted(p for p in UNIT_DIR.iterdir() if p.suffix in UNIT_SUFFIXES) \
    if UNIT_DIR.is_dir() else []
DAEMONS = ["tftpd"]  # one preboot-<name>.service each; add proxydhcpd, policyd, imgsrvd here

EXEC_LINE = re.compile(r"^(Exec[A-Za-z]+=)([-@:+!]*)(/\S+)(.*)$")


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys stay separate, as systemd reads them."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in parse_unit(path) if s == section and k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key} appears {len(found)} times"
    return found[0]


def stubbed_copy(unit: Path, tmp: Path) -> Path:
    """The unit, with every Exec*= program that does not exist here replaced by a stub."""
    lines = []
    for line in unit.read_text().splitlines():
        match = EXEC_LINE.match(line)
        if match and not Path(match.group(3)).exists():
            stub = tmp / "stubs" / match.group(3).lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
            line = f"{match.group(1)}{match.group(2)}{stub}{match.group(4)}"
        lines.append(line)
    copy = tmp / "units" / unit.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text("\n".join(lines) + "\n")
    return copy


def test_there_are_units():
    assert UNITS, "no unit files in systemd/"
    for name in DAEMONS:
        assert (UNIT_DIR / f"preboot-{name}.service").exists()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify(unit, tmp_path):
    copy = stubbed_copy(unit, tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    # Complaints about other units on this machine are not ours; any about this one fail.
    ours = [line for line in output.splitlines() if unit.name in line or str(copy) in line]
    assert result.returncode == 0, output
    assert not ours, "\n".join(ours)


@pytest.mark.parametrize("name", DAEMONS)
def test_daemon_service_contract(name):
    unit = UNIT_DIR / f"preboot-{name}.service"
    svc = "Service"
    assert one(unit, svc, "Type") == "notify"
    assert one(unit, svc, "ExecStart") == \
        f"/usr/sbin/preboot-{name} --foreground --config /etc/preboot/{name}.conf"
    assert one(unit, svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, svc, "Restart") == "on-failure"
    assert "78" in one(unit, svc, "RestartPreventExitStatus").split()
    # the pidfile and status socket live in /run/preboot, shared by every preboot daemon
    assert one(unit, svc, "RuntimeDirectory") == "preboot"
    assert one(unit, svc, "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, svc, "RuntimeDirectoryMode") == "0755"
    assert "multi-user.target" in one(unit, "Install", "WantedBy")


@pytest.mark.parametrize("name", DAEMONS)
def test_daemon_service_hardening(name):
    unit = UNIT_DIR / f"preboot-{name}.service"
    svc = "Service"
    for key, expected in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "PrivateDevices": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert one(unit, svc, key) == expected, key
    caps = set(one(unit, svc, "CapabilityBoundingSet").split())
    assert "CAP_NET_BIND_SERVICE" in caps
    assert caps <= {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_BROADCAST"}
    user = values(unit, svc, "User")
    if user and user != ["root"]:
        assert set(one(unit, svc, "AmbientCapabilities").split()) <= caps
    assert set(one(unit, svc, "RestrictAddressFamilies").split()) == \
        {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in values(unit, svc, "SystemCallFilter")
    # writes only where configured: no blanket ReadWritePaths in the shipped unit
    assert values(unit, svc, "ReadWritePaths") == []


def test_no_socket_activation_for_tftpd():
    assert not (UNIT_DIR / "preboot-tftpd.socket").exists()


# ------------------------------------------------------------------------ the RPM spec

def test_spec_ships_every_unit_and_init_script():
    spec = SPEC.read_text()
    for unit in UNITS:
        assert f"systemd/{unit.name}" in spec, f"{unit.name} is not installed by the spec"
        assert f"%{{_unitdir}}/{unit.name}" in spec, f"{unit.name} is not in a %files list"
    for name in DAEMONS:
        assert f"packaging/init.d/preboot-{name}" in spec
        assert f"%{{_initddir}}/preboot-{name}" in spec
        assert f"%config(noreplace) %{{_sysconfdir}}/preboot/{name}.conf" in spec
        assert f"packaging/etc/{name}.conf" in spec
        assert f"%package {name}" in spec
    assert "%package common" in spec
    assert "packaging/init.d/preboot-functions" in spec


@pytest.mark.skipif(not shutil.which("rpmspec"), reason="rpmspec not installed")
def test_spec_parses():
    result = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    parsed = result.stdout
    assert "/usr/lib/preboot/python" in parsed
    code = [line for line in parsed.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "site-packages" in line]
    result = subprocess.run(["rpmspec", "-q", "--qf", "%{NAME}\n", str(SPEC)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {"preboot-common", "preboot-tftpd"} <= set(result.stdout.split())
