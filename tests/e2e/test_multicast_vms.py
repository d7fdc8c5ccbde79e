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
- **A workstation session** (client-initiated): two BIOS VMs (product "Session E2E") boot into
  the environment's maintenance shell; on their serial consoles, as an administrator types,
  one runs `img session lab-e2e client` and the other `img session lab-e2e master clients=1`
  with an operator's capability. The master stores its disk as multicast/lab-e2e.img on the
  imaging server, which opens the session and sends it; the client restores it. The client's
  disk must then hold the master's files, the master's disk be unchanged, and the results log
  have the master's store and the client's multicast restore.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
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
[[Workstation session lab]]
filter = "product = 'Session E2E' and platform = pcbios"
action = maintenance
[sessions]
[[{SESSION}]]
image = {IMAGE}
clients = 3
timeout_min = 15
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
        imaging_env: Path, source_disk: Path, lab: netlab.Lab, tmp_path: Path,
        record_boot_time):
    _skip_without_uefi()
    image_root = tmp_path / "images"
    (image_root / "lab").mkdir(parents=True)
    imagingenv.make_image(source_disk, image_root / IMAGE)
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
        imagingenv.check_restored_disk(disks[machine.name], FILES, PART, tmp_path)

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
