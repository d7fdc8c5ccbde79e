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
DAEMONS = ["tftpd", "proxydhcpd", "policyd", "imgsrvd"]  # one preboot-<name>.service each
PACKAGES = {"policyd": "prebootpolicyd"}  # the Python package, where it differs from the name
# Started by hand, never enabled by the package (DOMAIN.md: proxyDHCP is optional).
BY_HAND = {"proxydhcpd"}
# RestrictAddressFamilies: exactly what each daemon needs, and why.
FAMILIES = {
    # IPv4 and IPv6 (IPAddress may be either), the Unix status socket and the journal
    "tftpd": {"AF_INET", "AF_INET6", "AF_UNIX"},
    # DHCPv4 only (IPAddress is IPv4); netlink: psutil.net_if_addrs() is getifaddrs(3) over
    # NETLINK_ROUTE, and scapy (>= 2.6) loads its interface and route tables over rtnetlink when
    # imported, so without AF_NETLINK the daemon dies at start
    "proxydhcpd": {"AF_INET", "AF_UNIX", "AF_NETLINK"},
    # HTTP on IPv4 or IPv6 (IPAddress may be either), LDAP directories over either, the Unix
    # status socket and the journal
    "policyd": {"AF_INET", "AF_INET6", "AF_UNIX"},
    # the same as policyd: HTTP on either family, LDAP, the status socket and the journal
    "imgsrvd": {"AF_INET", "AF_INET6", "AF_UNIX"},
}
# CapabilityBoundingSet: ports below 1024 (69, 67, 4011, 998) need CAP_NET_BIND_SERVICE;
# policyd's 8090 needs nothing.
CAPABILITIES = {"tftpd": {"CAP_NET_BIND_SERVICE"}, "proxydhcpd": {"CAP_NET_BIND_SERVICE"},
                "policyd": set(), "imgsrvd": {"CAP_NET_BIND_SERVICE"}}

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
    # Ports below 1024 and nothing else: UDP broadcasts (SO_BROADCAST) need no capability,
    # CAP_NET_RAW and CAP_NET_BROADCAST are for raw/packet sockets, which no daemon opens.
    caps = set(one(unit, svc, "CapabilityBoundingSet").split())
    assert caps == CAPABILITIES[name]
    assert one(unit, svc, "User") == "preboot"
    if caps:
        assert set(one(unit, svc, "AmbientCapabilities").split()) <= caps
    else:
        assert not "".join(values(unit, svc, "AmbientCapabilities")).strip()
    assert set(one(unit, svc, "RestrictAddressFamilies").split()) == FAMILIES[name]
    assert one(unit, svc, "MemoryDenyWriteExecute") == "yes"
    assert "@system-service" in values(unit, svc, "SystemCallFilter")
    # writes only where configured: no blanket ReadWritePaths in the shipped unit
    assert values(unit, svc, "ReadWritePaths") == []


def test_no_socket_activation_for_tftpd():
    assert not (UNIT_DIR / "preboot-tftpd.socket").exists()


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_started_by_hand_units_are_pulled_in_by_nothing(name):
    """Only `systemctl enable` (the init script's `install`) may start it at boot: no other unit
    wants, requires or aliases it, and its [Install] section enables nothing else."""
    service = f"preboot-{name}.service"
    for unit in UNITS:
        for _section, key, value in parse_unit(unit):
            if key in ("Wants", "Requires", "BindsTo", "Upholds", "PartOf", "Also"):
                assert service not in value.split(), f"{unit.name}: {key}={value}"
    unit = UNIT_DIR / service
    for key in ("Also", "Alias", "RequiredBy", "UpheldBy"):
        assert values(unit, "Install", key) == [], key


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
    for name in DAEMONS:
        # the wrapper runs the package from the private prefix, which ships it
        package = PACKAGES.get(name, name)
        assert f"-m {package} " in spec
        assert f"%{{_sbindir}}/preboot-{name}" in spec
        assert f"%{{pyprefix}}/{package}/" in spec
        assert f"%{{_sbindir}}/rcpreboot-{name}" in spec


def scriptlet(spec: str, kind: str, package: str) -> str:
    """The body of `%<kind> <package>` up to the next section."""
    section = r"^%(?:pre|post|preun|postun|files|changelog)\b"
    match = re.search(rf"^%{kind} {package}\n(.*?)(?={section})", spec, re.M | re.S)
    assert match, f"no %{kind} {package} in the spec"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_spec_does_not_enable_or_start_by_hand_daemons(name):
    spec = SPEC.read_text()
    for kind in ("pre", "post"):
        body = "\n".join(line for line in scriptlet(spec, kind, name).splitlines()
                         if not line.lstrip().startswith("#"))
        assert f"preboot-{name} install" not in body
        assert f"preboot-{name} start" not in body
        assert "systemctl" not in body  # only the distribution macros, which apply presets
    # upgrades restart it only where it runs; removal stops it
    assert "restart" in scriptlet(spec, "postun", name)
    assert "stop" in scriptlet(spec, "preun", name)


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
    assert {"preboot-common", "preboot-img"} | {f"preboot-{name}" for name in DAEMONS} <= \
        set(result.stdout.split())


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


NOTIFY_RELOAD = UNIT_DIR / "notify-reload" / "notify-reload.conf"


@pytest.mark.skipif(not shutil.which("systemd-analyze") or systemd_version() < 253,
                    reason="Type=notify-reload needs the systemd-analyze of systemd 253 or later "
                           "(this machine's is older)")
@pytest.mark.parametrize("name", DAEMONS)
def test_notify_reload_drop_in_verifies(name, tmp_path):
    """The documented switch (docs/packaging.md) on a systemd that knows the type."""
    copy = stubbed_copy(UNIT_DIR / f"preboot-{name}.service", tmp_path)
    drop_dir = copy.parent / f"{copy.name}.d"
    drop_dir.mkdir()
    shutil.copy(NOTIFY_RELOAD, drop_dir / "notify-reload.conf")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "notify-reload" not in result.stdout + result.stderr
