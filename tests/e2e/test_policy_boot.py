"""End to end: three real PXE clients that differ only in SMBIOS and MAC boot through our
proxydhcpd, tftpd and prebootpolicyd, and each gets the answer its policy gives it.

    [dhcp ns] dnsmasq 192.168.77.1: address pool only
    [srv ns ] br0 192.168.77.2: proxydhcpd (IPXEScriptURL = http://{server}:8090/boot.ipxe),
              tftpd, prebootpolicyd :8090, and (LDAP case) slapd; tap0 -- qemu

The VMs are SeaBIOS with qemu's iPXE ROM. iPXE gets our proxy offer, fetches /boot.ipxe from
prebootpolicyd, which makes it report MAC, SMBIOS, platform and memory to /policy; the answer
script prints `preboot-answer: ...` on the serial console:

    lab-dell   manufacturer "Dell Inc.", serial LAB-...  rule "Dell lab"      -> imaging (restore)
    kiosk      registered, menu = always                 workstation record  -> menu
    visitor    manufacturer "Acme"                       no rule matches     -> local

The policy is loaded with the real preboot-dir CLI, once into SQLite and once into a real
slapd, and the same three boots must give the same three answers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import netlab

sys.path.insert(0, str(netlab.REPO_ROOT))
from tests import ldapserver  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

TIMEOUT = float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
POLICY_PORT = 8090
# The line must be complete: the serial log is read while the VM is still writing it.
ANSWER = re.compile(r"preboot-answer: (?P<answer>imaging|menu|local)(?P<rest>[^\r\n]*)[\r\n]")
MENU_DRAWN = re.compile(r"Exit \(boot the local disk\)")

POLICY = """\
format = 1
[menu]
display = never
timeout_s = 1
[rules]
[[Dell lab]]
filter = "manufacturer = 'Dell Inc.' and serial startswith LAB- and platform = pcbios"
action = restore
image = dell/base.img
addons = dell/drivers.add
[[Big HP]]
filter = "manufacturer startswith HP and ram_mb >= 64GB"
action = make
image = uploads/hp.img
[workstations]
[[52:54:00:aa:00:02]]
name = kiosk
menu = always
"""


@dataclass(frozen=True)
class Machine:
    name: str
    mac: str
    smbios: str
    answer: str          # imaging | menu | local
    detail: str          # what the rest of the marker line must contain
    reason: str          # what prebootpolicyd's log line for this machine must contain


MACHINES = (
    Machine("lab-dell", "52:54:00:aa:00:01",
            "type=1,manufacturer=Dell Inc.,product=OptiPlex 7010,serial=LAB-0001",
            "imaging", "restore dell/base.img + add-ons dell/drivers.add", "rule 'Dell lab' matches"),
    Machine("kiosk", "52:54:00:aa:00:02", "type=1,manufacturer=Dell Inc.,serial=KIOSK-7",
            "menu", "", "workstation kiosk is registered"),
    Machine("visitor", "52:54:00:aa:00:03", "type=1,manufacturer=Acme,serial=LAB-0003",
            "local", "no enabled rule matches", "no enabled rule matches"),
)


def _decision(log: Path, mac: str) -> str:
    """prebootpolicyd's log lines about one MAC."""
    text = netlab.read_text(log) if log.exists() else ""
    return "\n".join(line for line in text.splitlines() if mac in line)


def _preboot_dir(ns: netlab.Netns, url: str, *args: str, credentials: Path | None = None) -> str:
    command = [sys.executable, "-m", "common.dircli", "--config", "/nonexistent",
               "--directory", url]
    if credentials is not None:
        command += ["--credentials", str(credentials)]
    proc = subprocess.run(ns.cmd([*command, *args]), capture_output=True, text=True, timeout=60,
                          cwd=netlab.REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT)))
    assert proc.returncode == 0, f"preboot-dir {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("backend", ["sqlite", "ldap"])
def test_three_machines_get_the_answers_their_policy_gives(backend: str, lab: netlab.Lab,
                                                           tmp_path: Path, record_boot_time):
    missing = netlab.missing_prerequisites(
        tools=("ip", "qemu-system-x86_64", "dnsmasq"),
        files=[*netlab.firmware_files("bios"), *(netlab.IPXE_DIR / n for n in netlab.IPXE_BINARIES)])
    if backend == "ldap" and ldapserver.missing():
        missing.append(ldapserver.missing())
    if missing:
        pytest.skip("e2e policy: " + "; ".join(missing))
    root = tmp_path / "tftproot"
    root.mkdir()
    netlab.stage_ipxe_binaries(root)
    setup = netlab.build_proxy_lab(lab, "flat", root, {
        "IPXEScriptURL": f"http://{{server}}:{POLICY_PORT}/boot.ipxe"})
    srv_ns = setup.vm_ns
    credentials = None
    if backend == "sqlite":
        url = f"sqlite:///{lab.workdir}/directory.db"
    else:
        slapd = ldapserver.Slapd(netns=srv_ns.name, host=setup.server_ip).start()
        lab.on_close(slapd.stop)
        url = slapd.url
        credentials = slapd.write_credentials(lab.workdir / "ldap.secret")
    policy_file = tmp_path / "site-policy.conf"
    policy_file.write_text(POLICY)
    _preboot_dir(srv_ns, url, "import", str(policy_file), credentials=credentials)
    settings = {"IPAddress": setup.server_ip, "Port": POLICY_PORT, "Directory": url,
                "BootFilesRoot": str(root), "KernelArgs": "console=ttyS0"}
    if credentials is not None:
        settings["DirectoryCredentials"] = credentials
    policyd = netlab.start_preboot_daemon(lab, srv_ns, "prebootpolicyd", settings)

    for machine in MACHINES:
        spec = netlab.VmSpec("bios", nic="e1000", mac=machine.mac, name=machine.name,
                             extra=("-smbios", machine.smbios))
        vm = netlab.start_vm(lab, srv_ns, spec)
        result = netlab.wait_for_marker(vm, ANSWER, TIMEOUT)
        if result.ok and machine.answer == "menu":
            # the menu is drawn after the marker line: wait for its last item too
            drawn = netlab.wait_for_marker(vm, MENU_DRAWN, TIMEOUT)
            assert drawn.ok, f"{machine.name}: the Preboot menu was not drawn: {drawn.reason}\n" \
                f"{netlab.tail(drawn.serial_log, 20)}"
        lab.stop(vm.proc)
        serial = result.serial_text() if result.serial_log.exists() else ""
        diag = (f"{machine.name}: {result.reason}\n--- serial ---\n{netlab.tail(result.serial_log, 40)}"
                f"\n--- policyd log ---\n{netlab.tail(policyd.log, 30)}")
        assert result.ok, diag
        record_boot_time(result.elapsed, f"({backend} {machine.name}) {result.match[0]}")
        assert result.match["answer"] == machine.answer, diag
        assert machine.detail in result.match["rest"], diag
        assert f"http://{setup.server_ip}:{POLICY_PORT}/policy... ok" in serial, diag
        # the decision prebootpolicyd logged for this MAC names the reason the policy gives
        mac = machine.mac.replace(":", "").upper()
        assert netlab.wait_for(lambda: machine.reason in _decision(policyd.log, mac), 5), diag

    counters = policyd.wait_counters(lambda c: c.get("queries", 0) >= 3)
    assert counters["queries"] == 3, counters
    assert counters["work_assigned"] >= 1 and counters["menus_shown"] >= 1, counters
    assert counters["no_work"] >= 1, counters
    assert counters["directory_errors"] == 0 and counters["fallback_answers"] == 0, counters
    assert counters["by_platform"].get("pcbios", 0) == 3, counters
    code = lab.stop(policyd.proc, timeout=10)
    assert code == 0, f"prebootpolicyd exited with {code} on SIGTERM"
