"""End to end, multicast: PXE-booted VMs restore one image from a multicast session.

The lab of test_imaging_env.py (site DHCP, proxydhcpd, tftpd, policyd, imgsrvd on br0
192.168.77.2), with one tap per VM on the bridge and imgsrvd sending its sessions from
192.168.77.2 (MulticastInterface, TTL 1: the lab's bridge only).

- **A directory session** (server-initiated): the policy's session `room-e2e` (lab/mc.img,
  clients = 3) and a multicast rule for SMBIOS product "Multicast E2E". Two BIOS VMs (SeaBIOS +
  iPXE ROM) and one UEFI VM (OVMF's PXE client, ipxe.efi) boot at once; policyd sends each into
  the session (preboot.work=multicast), `img auto` joins it, the third join starts it, each
  restores and reports. Then every disk must hold the image's table and an ext4 with every file
  identical, the results log one successful entry per VM with the session and the path taken,
  imgsrvd must count three images sent, and the session, done, is deleted from the directory.
  **Identity** (issue 17): the image is a dual-boot disk, an ext4 Linux with NetworkManager and
  an NTFS holding a Windows SYSTEM hive (tests/winhive.py); the rule names the identity policy
  `lab` (counter names, a pool of addresses), so each VM comes back with its own name and
  address from the pool, read on the host from each disk (debugfs: the host name and the NM
  keyfile; ntfscat + hivexget: ComputerName and Tcpip; `img isd show --json`: the image-safe
  data), in its results entry and in `preboot-dir identities log`. Then the rule becomes a
  unicast restore and one VM is reimaged (one more boot): its disk's identity comes back
  (identity_source disk), the same name and address, nothing new handed out.
- **A workstation session** (client-initiated): two BIOS VMs (product "Session E2E") boot into
  the environment's maintenance shell; on their serial consoles, as an administrator types,
  one runs `img session lab-e2e client` and the other `img session lab-e2e master clients=1`
  with an operator's capability. The master stores its disk as multicast/lab-e2e.img on the
  imaging server, which opens the session and sends it; the client restores it. The client's
  disk must then hold the master's files, the master's disk be unchanged, and the results log
  have the master's store and the client's multicast restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import imagingenv
import netlab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

# three (then two) TCG VMs share the two cores: each boot is slower than alone
TIMEOUT = 3 * float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
MiB = imagingenv.MiB
DISK_SIZE = 40 * MiB
PART = (1 * MiB, 32 * MiB)
FILES = {
    "readme.txt": b"Preboot multicast e2e\n" * 100,
    "random.bin": random.Random(14).randbytes(2 * MiB + 3),
    "etc/hostname": b"imaged-by-multicast\n",
    "docs/notes.txt": b"".join(b"line %d\n" % n for n in range(2000)),
}
# the session's image: a dual-boot disk (issue 17's identity), inside DISK_SIZE
LINUX_PART = (1 * MiB, 22 * MiB)
WINDOWS_PART = (23 * MiB, 16 * MiB)
LINUX = {
    **FILES,
    "etc/os-release": b'NAME="Debian GNU/Linux"\nID=debian\n',
    "etc/hosts": b"127.0.0.1\tlocalhost\n127.0.1.1\timaged-by-multicast\n",
    "etc/NetworkManager/NetworkManager.conf": b"[main]\nplugins=keyfile\n",
    "etc/NetworkManager/system-connections/Wired.nmconnection":
        b"[connection]\nid=Wired\ntype=ethernet\n",
}
IDENTITY_WRITES = ("etc/hostname", "etc/hosts")   # what applying an identity changes of LINUX
HIVE = "Windows/System32/config/SYSTEM"
POOL = ("10.77.0.10", "10.77.0.11", "10.77.0.12", "10.77.0.13")
IMAGE = "lab/mc.img"
SESSION = "room-e2e"
WORKSTATION_SESSION = "lab-e2e"
WORKSTATION_IMAGE = f"multicast/{WORKSTATION_SESSION}.img"

POLICY = f"""\
format = 1
[menu]
display = never
timeout_s = 1
[rules]
[[Multicast lab]]
filter = "product = 'Multicast E2E'"
action = multicast
session = {SESSION}
identity = lab
[[Workstation session lab]]
filter = "product = 'Session E2E' and platform = pcbios"
action = maintenance
[sessions]
[[{SESSION}]]
image = {IMAGE}
clients = 3
timeout_min = 15
[identities]
[[lab]]
naming = counter
prefix = lab-
dns_suffix = lab.e2e
workgroup = LAB
ip = pool
addresses = {POOL[0]}-{POOL[-1]}
prefix_len = 24
gateway = 10.77.0.1
dns_servers = 10.77.0.2
"""

DONE = re.compile(r"preboot-env: done exit=(?P<code>\d+)[^\r\n]*[\r\n]")
SHELL = re.compile(r"preboot-env: shell \(maintenance\)")


@dataclass(frozen=True)
class Machine:
    name: str
    mac: str
    firmware: netlab.Firmware
    tap: str
    product: str

    @property
    def mac_id(self) -> str:
        return self.mac.replace(":", "").upper()

    def smbios(self) -> str:
        return (f"type=1,manufacturer=Preboot Lab,product={self.product},"
                f"serial=MC-{self.mac_id[-4:]}")


SESSION_MACHINES = (
    Machine("mc-bios-1", "52:54:00:ab:01:01", "bios", "tap0", "Multicast E2E"),
    Machine("mc-bios-2", "52:54:00:ab:01:02", "bios", "tap1", "Multicast E2E"),
    Machine("mc-uefi", "52:54:00:ab:01:03", "uefi", "tap2", "Multicast E2E"),
)
MASTER = Machine("ws-master", "52:54:00:ab:02:01", "bios", "tap0", "Session E2E")
CLIENT = Machine("ws-client", "52:54:00:ab:02:02", "bios", "tap1", "Session E2E")


@pytest.fixture(scope="module")
def source_disk(tmp_path_factory) -> Path:
    """A disk file with an MBR and an ext4 of FILES (the session's source)."""
    tmp = tmp_path_factory.mktemp("mcsource")
    return imagingenv.make_source_disk(tmp / "source.disk", FILES, DISK_SIZE, PART)


@pytest.fixture(scope="module")
def dual_boot_disk(tmp_path_factory) -> Path:
    """A disk file with an MBR, an ext4 shaped like a Linux with NetworkManager (LINUX) and an
    NTFS holding a SYSTEM hive shaped like Windows' (tests/winhive.py): the session's source."""
    missing = [t for t in ("mkntfs", "ntfs-3g", "ntfscat", "hivexget") if not shutil.which(t)]
    if missing:
        pytest.skip("e2e multicast identity: no " + ", ".join(missing))
    sys.path.insert(0, str(netlab.REPO_ROOT))
    from tests.winhive import windows_system_hive
    tmp = tmp_path_factory.mktemp("mcdual")
    windows_system_hive(str(tmp / "SYSTEM"))
    return imagingenv.make_linux_windows_disk(
        tmp / "source.disk", LINUX, {HIVE: (tmp / "SYSTEM").read_bytes()}, DISK_SIZE,
        LINUX_PART, WINDOWS_PART)


def _blank_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def _start(lab: netlab.Lab, stack: imagingenv.ImagingStack, machine: Machine, disk: Path,
           console: bool = False) -> netlab.Vm:
    if machine.tap != "tap0":                      # build_pxe_topology made tap0
        netlab.add_tap(stack.server_ns, machine.tap, "br0")
    spec = imagingenv.imaging_vm(machine.mac, machine.name, machine.smbios(), disk,
                                 machine.firmware, tap=machine.tap, console=console)
    return netlab.start_vm(lab, stack.server_ns, spec)


def _diag(stack: imagingenv.ImagingStack, vms: dict[str, netlab.Vm], reason: str = "") -> str:
    consoles = "".join(f"\n--- {name} serial ---\n{netlab.tail(vm.serial_log, 40)}"
                       for name, vm in vms.items())
    return f"{reason}{consoles}\n{stack.logs()}"


def _skip_without_uefi() -> None:
    missing = [str(f) for f in netlab.firmware_files("uefi") if not Path(f).exists()]
    if missing:
        pytest.skip("e2e multicast UEFI: no " + ", ".join(missing))


def test_three_vms_restore_from_a_directory_session_started_by_the_third_join(
        imaging_env: Path, dual_boot_disk: Path, lab: netlab.Lab, tmp_path: Path,
        record_boot_time):
    _skip_without_uefi()
    image_root = tmp_path / "images"
    (image_root / "lab").mkdir(parents=True)
    imagingenv.make_image(dual_boot_disk, image_root / IMAGE)
    stack = imagingenv.start_imaging_stack(
        lab, tmp_path / "tftproot", imaging_env, POLICY, image_root,
        imgsrvd_extra={"MulticastInterface": "192.168.77.2", "MulticastTTL": 1})
    assert SESSION in imagingenv.preboot_dir(stack.server_ns, stack.directory,
                                             "sessions", "list")

    disks = {m.name: _blank_disk(tmp_path / f"{m.name}.disk") for m in SESSION_MACHINES}
    vms = {m.name: _start(lab, stack, m, disks[m.name]) for m in SESSION_MACHINES}
    results = {name: netlab.wait_for_marker(vm, DONE, TIMEOUT) for name, vm in vms.items()}
    for vm in vms.values():
        imagingenv.wait_for_exit(vm, 30)
        lab.stop(vm.proc)
    diag = _diag(stack, vms, "; ".join(f"{n}: {r.reason}" for n, r in results.items()))

    for machine in SESSION_MACHINES:
        result = results[machine.name]
        assert result.ok and result.match["code"] == "0", diag
        record_boot_time(result.elapsed, f"(multicast, {machine.firmware}) {machine.name}")
        serial = result.serial_text()
        assert f"preboot-answer: imaging join multicast session {SESSION}" in serial, diag
        assert f"preboot-env: work multicast {IMAGE} session {SESSION}" in serial, diag
        assert re.search(rf"restored {re.escape(IMAGE)} from multicast session '{SESSION}' "
                         r"\(multicast\): \d+ chunks verified", serial), diag
        assert "identity (policy): name=lab-" in serial, diag
        _check_dual_boot_disk(disks[machine.name], tmp_path)

    # one entry per participant, each with what it verified; nothing else reported success
    entries = imagingenv.results(lab)
    reported = [e for e in entries if e.status in ("success", "failure")]
    assert sorted((e.workstation, e.operation, e.status, e.image_path, e.session, e.transfer)
                  for e in reported) == sorted((m.mac_id, "download", "success", IMAGE, SESSION,
                                                "multicast") for m in SESSION_MACHINES), \
        f"{entries}\n{diag}"
    # the same image (its digest) and every chunk of it verified, on each
    assert len({(e.image_digest, e.chunks_verified, e.bytes_written) for e in reported}) == 1
    assert reported[0].image_digest and reported[0].chunks_verified, reported
    counters = stack.imgsrvd.wait_counters(lambda c: c.get("images_sent", 0) >= 3)
    assert counters["images_sent"] == 3 and counters["failures"] == 0, counters
    log = netlab.read_text(stack.imgsrvd.log)
    # the third join started it (clients = 3), long before the 15 min timer
    assert f"multicast: session '{SESSION}' began: 3 receivers" in log, diag
    assert f"multicast: session '{SESSION}' ended (completed): 3 receivers, 3 done" in log, diag
    # delete_after (the default): the session is gone from the directory once it is done
    assert SESSION not in imagingenv.preboot_dir(stack.server_ns, stack.directory,
                                                 "sessions", "list"), diag

    # issue 17: three names and addresses from the pool, each on its machine's disk (both
    # systems and the image-safe data), in its results entry and in the assignment log
    given = _identities_log(stack)
    assert sorted(given) == sorted(m.mac_id for m in SESSION_MACHINES), given
    assert sorted(v["counter"] for v in given.values()) == ["1", "2", "3"], given
    assert sorted(v["address"] for v in given.values()) == list(POOL[:3]), given
    for machine in SESSION_MACHINES:
        name, address = _name_and_address(given[machine.mac_id])
        _check_identity(disks[machine.name], name, address, tmp_path)
        (entry,) = [e for e in reported if e.workstation == machine.mac_id]
        assert (entry.identity or "").startswith(_describe(name, address)), entry
        assert "identity stored in the disk's image-safe data" in entry.identity, entry

    # the reimage: one of them boots again, now sent a unicast restore by the same rule; its
    # disk's identity goes with the work query and comes back (identity_source disk)
    again = SESSION_MACHINES[0]
    name, address = _name_and_address(given[again.mac_id])
    imagingenv.preboot_dir(stack.server_ns, stack.directory, "rules", "set", "Multicast lab",
                           "--action", "restore", "--image", IMAGE, "--force", "yes")
    # a VM name of its own: its serial log must not be the first boot's (which ends in DONE)
    vm = _start(lab, stack, dataclasses.replace(again, name=f"{again.name}-again"),
                disks[again.name])
    result = netlab.wait_for_marker(vm, DONE, TIMEOUT)
    imagingenv.wait_for_exit(vm, 30)
    lab.stop(vm.proc)
    diag = _diag(stack, {again.name: vm}, f"reimage: {result.reason}")
    assert result.ok and result.match["code"] == "0", diag
    record_boot_time(result.elapsed, f"(reimage, unicast, {again.firmware}) {again.name}")
    serial = result.serial_text()
    assert f"identity on the disk: {_describe(name, address)}" in serial, diag
    assert f"identity (disk): {_describe(name, address)}" in serial, diag
    _check_dual_boot_disk(disks[again.name], tmp_path)
    _check_identity(disks[again.name], name, address, tmp_path)
    assert _identities_log(stack) == given, diag                 # nothing new handed out
    unicast = [e for e in imagingenv.results(lab)
               if e.status in ("success", "failure") and e not in reported]
    assert [(e.workstation, e.status, e.session, (e.identity or "")[:len(_describe(name,
            address))]) for e in unicast] == [(again.mac_id, "success", None,
                                               _describe(name, address))], f"{unicast}\n{diag}"
    counters = stack.imgsrvd.counters()
    assert (counters["identities_assigned"], counters["identities_from_disk"]) == (3, 1), \
        counters


def _identities_log(stack: imagingenv.ImagingStack) -> dict[str, dict[str, str]]:
    """`preboot-dir identities log lab`: {MAC: {kind: value}}."""
    text = imagingenv.preboot_dir(stack.server_ns, stack.directory, "identities", "log", "lab")
    given: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if "\t" not in line:                  # "the assignment log is empty"
            continue
        pool, kind, value, mac, _when = line.split("\t")
        assert pool == "lab", text
        given.setdefault(mac.upper(), {})[kind] = value
    return given


def _name_and_address(values: dict[str, str]) -> tuple[str, str]:
    return f"lab-{int(values['counter']):03d}", values["address"]


def _describe(name: str, address: str) -> str:
    """The identity as img reports it (MachineIdentity.describe())."""
    return (f"name={name} dns_suffix=lab.e2e workgroup=LAB ip={address}/24 gateway=10.77.0.1 "
            "dns=10.77.0.2")


def _check_dual_boot_disk(disk: Path, scratch: Path) -> None:
    """The image's table, and both filesystems as the image holds them (besides what applying
    an identity writes): the ext4's files identical, each filesystem checking clean."""
    assert imagingenv.partition_table(disk) == [(*LINUX_PART, "83"), (*WINDOWS_PART, "7")], \
        imagingenv.partition_table(disk)
    imagingenv.check_ext4_files(disk, {k: v for k, v in LINUX.items()
                                       if k not in IDENTITY_WRITES}, LINUX_PART, scratch)
    ntfs = imagingenv.partition_copy(disk, WINDOWS_PART, scratch / "restored.ntfs")
    imagingenv.run_checked(["ntfsfix", "--no-action", str(ntfs)], 120)
    ntfs.unlink()


def _check_identity(disk: Path, name: str, address: str, scratch: Path) -> None:
    """Read on the host what img applied and kept: the Linux host name and NetworkManager
    keyfile (debugfs), the Windows computer name and TCP/IP values (ntfscat, hivexget: a reader
    other than img's), and the image-safe data (img isd show --json)."""
    ext4 = imagingenv.partition_copy(disk, LINUX_PART, scratch / "identity.ext4")

    def cat(path: str) -> str:
        return imagingenv.run_checked(["debugfs", "-R", f"cat {path}", str(ext4)], 60).stdout
    assert cat("/etc/hostname") == f"{name}\n"
    assert f"127.0.1.1\t{name}.lab.e2e {name}" in cat("/etc/hosts")
    keyfile = cat("/etc/NetworkManager/system-connections/preboot-identity.nmconnection")
    assert f"method=manual\naddress1={address}/24,10.77.0.1\ndns=10.77.0.2;\n" \
           "dns-search=lab.e2e;\n" in keyfile, keyfile
    ext4.unlink()

    ntfs = imagingenv.partition_copy(disk, WINDOWS_PART, scratch / "identity.ntfs")
    hive = scratch / "SYSTEM.read"
    hive.write_bytes(subprocess.run(["ntfscat", str(ntfs), HIVE], check=True,
                                    capture_output=True, timeout=60).stdout)
    ntfs.unlink()

    def value(key: str, value_name: str) -> str:
        return imagingenv.run_checked(["hivexget", str(hive), "\\ControlSet001\\" + key,
                                       value_name], 60).stdout.rstrip("\n")
    from tests.winhive import HARDWARE_NIC
    assert value(r"Control\ComputerName\ComputerName", "ComputerName") == name.upper()
    tcpip = r"Services\Tcpip\Parameters"
    assert (value(tcpip, "Hostname"), value(tcpip, "NV Hostname"), value(tcpip, "Domain")) == \
        (name, name, "lab.e2e")
    nic = tcpip + "\\Interfaces\\" + HARDWARE_NIC
    assert (value(nic, "EnableDHCP"), value(nic, "IPAddress"), value(nic, "SubnetMask"),
            value(nic, "DefaultGateway"), value(nic, "NameServer")) == \
        ("0", address, "255.255.255.0", "10.77.0.1", "10.77.0.2")
    hive.unlink()

    shown = imagingenv.run_checked(
        [sys.executable, "-m", "img", "isd", "show", str(disk), "--json"], 60,
        cwd=netlab.REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT)))
    assert json.loads(shown.stdout)["identity"] == {
        "name": name, "dns_suffix": "lab.e2e", "workgroup": "LAB",
        "ip": {"address": address, "prefix_len": 24, "gateway": "10.77.0.1",
               "dns_servers": ["10.77.0.2"]}}, shown.stdout


def _type_line(vm: netlab.Vm, line: str) -> None:
    assert vm.console is not None
    vm.console.type(line + "\r")


def test_workstation_session_between_two_vms_typed_at_their_consoles(
        imaging_env: Path, source_disk: Path, lab: netlab.Lab, tmp_path: Path,
        record_boot_time):
    image_root = tmp_path / "images"
    image_root.mkdir()
    stack = imagingenv.start_imaging_stack(
        lab, tmp_path / "tftproot", imaging_env, POLICY, image_root,
        imgsrvd_extra={"MulticastInterface": "192.168.77.2"})
    token = imagingenv.preboot_dir(
        stack.server_ns, stack.directory, "token", "--operator", "e2e-admin",
        "--allow", "retrieve,store,result", "--image", "multicast/*",
        "--key-file", str(lab.workdir / "imaging.key")).strip()

    master_disk = tmp_path / "master.disk"
    master_disk.write_bytes(source_disk.read_bytes())
    master_before = hashlib.sha256(master_disk.read_bytes()).hexdigest()
    client_disk = _blank_disk(tmp_path / "client.disk")
    vms = {MASTER.name: _start(lab, stack, MASTER, master_disk, console=True),
           CLIENT.name: _start(lab, stack, CLIENT, client_disk, console=True)}
    for name, vm in vms.items():
        result = netlab.wait_for_marker(vm, SHELL, TIMEOUT)
        assert result.ok, _diag(stack, vms, f"{name}: {result.reason}")
        record_boot_time(result.elapsed, f"(maintenance shell) {name}")

    common = f"--server 192.168.77.2 --disk /dev/vda --token {token}"
    _type_line(vms[CLIENT.name], f"img session {WORKSTATION_SESSION} client {common}")
    _type_line(vms[MASTER.name],
               f"img session {WORKSTATION_SESSION} master clients=1 {common}")
    restored = netlab.wait_for_marker(
        vms[CLIENT.name], re.compile(
            rf"restored {re.escape(WORKSTATION_IMAGE)} from (multicast )?session "
            rf"'{WORKSTATION_SESSION}' "
            r"\((?P<path>[a-z+]+)\)|img: session .* failed[^\r\n]*[\r\n]"), TIMEOUT)
    ended = netlab.wait_for_marker(
        vms[MASTER.name], re.compile(rf"session '{WORKSTATION_SESSION}' has ended"), 60)
    for vm in vms.values():
        _type_line(vm, "exit")                       # the shell ends: /init powers off
    for vm in vms.values():
        imagingenv.wait_for_exit(vm, 30)
        lab.stop(vm.proc)
    diag = _diag(stack, vms, f"client: {restored.reason}; master: {ended.reason}")

    assert restored.ok and restored.match["path"] == "multicast", diag
    assert ended.ok, diag
    imagingenv.check_restored_disk(client_disk, FILES, PART, tmp_path)
    assert hashlib.sha256(master_disk.read_bytes()).hexdigest() == master_before, \
        "the master's disk changed"
    entries = imagingenv.results(lab)
    reported = sorted((e.workstation, e.operation, e.status, e.image_path)
                      for e in entries if e.status in ("success", "failure"))
    assert reported == sorted([(MASTER.mac_id, "upload", "success", WORKSTATION_IMAGE),
                               (CLIENT.mac_id, "download", "success", WORKSTATION_IMAGE)]), \
        f"{entries}\n{diag}"
