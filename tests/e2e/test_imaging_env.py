"""End to end, the whole stack: a PXE-booted VM is imaged by the imaging environment.

    [dhcp ns] dnsmasq 192.168.77.1: address pool only
    [srv ns ] br0 192.168.77.2: proxydhcpd (IPXEScriptURL = http://{server}:8090/boot.ipxe),
              tftpd (iPXE builds), prebootpolicyd :8090 (its /boot/ serves preboot/linux
              and preboot/initrd from the same root over HTTP),
              imgsrvd :998 (ImageRoot holds lab/base.img); tap0 -- qemu

The policy (loaded with preboot-dir into the SQLite directory both policyd and imgsrvd read)
restores lab/base.img on machines whose SMBIOS product is "Imaging E2E". The image is made
beforehand on the host with `img make` from a disk file with an ext4 full of known files.

One BIOS VM (SeaBIOS + qemu's iPXE ROM, virtio NIC, blank virtio disk) boots: iPXE asks policyd,
which answers `preboot-answer: imaging restore lab/base.img` and loads the imaging environment
(packaging/imaging-env/build.sh) over HTTP from policyd's /boot/; its /init gets an address, runs `img auto`, which
asks imgsrvd, restores the image onto /dev/vda, reports the result, and the VM powers off.
Then the VM's disk file must hold the partition table and an ext4 with every file identical,
and imgsrvd must have logged a successful download and counted one image sent.

A UEFI VM (OVMF's PXE client, our ipxe.efi) is imaged the same way by a `platform = efi` rule.
A third VM (SMBIOS product "Imaging Make E2E") has a disk with that ext4 on it and the policy
makes an image of it to lab/captured.img: the environment's partclone maps the used blocks, img
uploads them, and the image on the server must store the ext4's used blocks only, verify, and
restore on the host into a disk whose ext4 is fsck-clean with every file identical; the VM's
disk must be unchanged.

Three more BIOS VMs restore a base image whose one partition is NTFS (the Windows case), XFS or
btrfs, and lay the same add-on onto it: ntfs-3g (FUSE) and the kernel's xfs and btrfs modules,
loaded on demand, in the environment. The partition must pass its own checker (ntfsfix -n,
xfs_repair -n, btrfs check) with the base files and the add-on's identical.

One more BIOS VM has a disk smaller than the base image's, and its rule says `shrink = yes`: the
environment's e2fsck and resize2fs shrink the ext4 (its scratch copy in the VM's RAM) and the
partition must end within the disk, fsck-clean, with every file identical.

And one BIOS VM's disk has 4096-byte logical sectors (a 4Kn disk: virtio-blk with
logical_block_size=4096): it restores an image made on the host from a 4Kn disk (a loop device
with 4096-byte sectors; MBR, an ext4 and a FAT in a logical partition). img in the environment
must ask the disk its sector size, and the disk, read back through a 4Kn loop device, must hold
the same table, fsck-clean filesystems and every file identical.
"""

from __future__ import annotations

import hashlib
import time
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import imagingenv
import netlab
from common.policy.capability import Capability, encode
from common.policy.keyring import read_keys
from tests import sectordisks

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

TIMEOUT = float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
MAC = "52:54:00:ab:00:01"
MAC_ID = MAC.replace(":", "").upper()          # how imgsrvd names a machine without a host name
SMBIOS = "type=1,manufacturer=Preboot Lab,product=Imaging E2E,serial=IMG-0001"
IMAGE = "lab/base.img"
ADDON = "lab/drivers.add"
UEFI_MAC = "52:54:00:ab:00:03"
LAB_NETWORK = "192.168.77.0/24"     # imgsrvd's AllowedClients in the first VM's run
OUTSIDE_ADDRESS = "10.99.0.1"       # a client of another network
UEFI_SMBIOS = "type=1,manufacturer=Preboot Lab,product=Imaging UEFI E2E,serial=IMG-0003"
MAKE_MAC = "52:54:00:ab:00:02"
MAKE_MAC_ID = MAKE_MAC.replace(":", "").upper()
MAKE_SMBIOS = "type=1,manufacturer=Preboot Lab,product=Imaging Make E2E,serial=IMG-0002"
CAPTURED = "lab/captured.img"
MiB = imagingenv.MiB
DISK_SIZE = 40 * MiB
PART = (1 * MiB, 32 * MiB)                     # (offset, size) of the ext4 partition
FILES = {
    "readme.txt": b"Preboot imaging environment e2e\n" * 100,
    "random.bin": random.Random(7).randbytes(3 * MiB + 5),
    "zeros.bin": bytes(1 * MiB),
    "etc/hostname": b"imaged-by-preboot\n",
    "docs/deep/notes.txt": b"".join(b"line %d\n" % n for n in range(3000)),
}

# The add-on replaces one of the base image's files and adds a folder.
ADDON_FILES = {
    "etc/hostname": b"laid-on-by-an-add-on\n",
    "drivers/net/preboot.inf": b"[Version]\nSignature=$Windows NT$\n" * 40,
    "drivers/blob.bin": random.Random(8).randbytes(300_000),
}

POLICY = f"""\
format = 1
[menu]
display = never
timeout_s = 1
[rules]
[[Imaging lab]]
filter = "product = 'Imaging E2E' and platform = pcbios"
action = restore
image = {IMAGE}
addons = {ADDON}
[[UEFI lab]]
filter = "product = 'Imaging UEFI E2E' and platform = efi"
action = restore
image = {IMAGE}
[[Shrink lab]]
filter = "product = 'Imaging Shrink E2E' and platform = pcbios"
action = restore
image = {IMAGE}
shrink = yes
[[Capture lab]]
filter = "product = 'Imaging Make E2E' and platform = pcbios"
action = make
image = {CAPTURED}
"""

FOURKN_IMAGE = "lab/4kn.img"
POLICY += f"""[[4Kn lab]]
filter = "product = 'Imaging 4Kn E2E' and platform = pcbios"
action = restore
image = {FOURKN_IMAGE}
"""

# Add-on targets other than ext4, one VM each (machines told apart by SMBIOS product).
OTHER_TARGETS = tuple(imagingenv.OTHER_FILESYSTEMS)
TARGET_FILES = {
    "readme.txt": b"Preboot add-on target e2e\n" * 50,
    "etc/hostname": b"imaged-by-preboot\n",
    "Windows/System32/config.bin": random.Random(9).randbytes(200_000),
}
POLICY += "".join(f"""[[{fs} lab]]
filter = "product = 'Imaging {fs} E2E' and platform = pcbios"
action = restore
image = lab/{fs}.img
addons = {ADDON}
""" for fs in OTHER_TARGETS)

# Complete lines only: the serial log is read while the VM writes it.
ANSWER = re.compile(r"preboot-answer: imaging (?P<rest>[^\r\n]*)[\r\n]")
DONE = re.compile(r"preboot-env: done exit=(?P<code>\d+)[^\r\n]*[\r\n]")
ENV_MARKERS = (
    re.compile(r"preboot-env: work restore lab/base\.img addons lab/drivers\.add "
               r"server 192\.168\.77\.2 mac \S+"),
    re.compile(r"applied add-on //\S+/lab/drivers\.add"),
    re.compile(r"preboot-env: network \S+ ip=192\.168\.77\.\d+"),
    re.compile(r"preboot-env: disk /dev/vda 40 MiB"),
    re.compile(r"preboot-env: running img auto --disk /dev/vda --server 192\.168\.77\.2"),
)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> tuple[Path, Path]:
    """lab/base.img made on the host from a disk file with an ext4 of FILES, and the add-on
    lab/drivers.add of ADDON_FILES."""
    if os.geteuid() != 0 or imagingenv.missing_tools(imagingenv.DISK_TOOLS):
        pytest.skip("e2e imaging: needs root and " + ", ".join(imagingenv.DISK_TOOLS))
    tmp = tmp_path_factory.mktemp("image")
    disk = imagingenv.make_source_disk(tmp / "source.disk", FILES, DISK_SIZE, PART)
    image = tmp / "base.img"
    imagingenv.make_image(disk, image)
    addon = tmp / "drivers.add"
    imagingenv.make_addon(ADDON_FILES, tmp / "addon-tree", addon)
    return image, addon


@dataclass
class ImagingBoot:
    """What one VM's trip through the imaging environment left: its console, the daemons."""

    result: netlab.BootResult
    exit_status: int | None
    serial: str
    diag: str
    imgsrvd: netlab.Daemon
    policyd: netlab.Daemon
    server_ns: netlab.Netns
    pin: str | None = None         # imgsrvd's certificate, when it speaks TLS


def _boot_into_imaging(lab: netlab.Lab, tmp_path: Path, imaging_env: Path,
                       images: dict[str, bytes], image_root: Path, vm_disk: Path, mac: str,
                       smbios: str, name: str, firmware: netlab.Firmware = "bios",
                       sector_size: int = 512, tls: bool = False,
                       imgsrvd_extra: dict[str, object] | None = None) -> ImagingBoot:
    """The whole stack in the lab (the policy above, `images` under ImageRoot), one VM with
    vm_disk booted until its environment says done and powers off. BIOS: SeaBIOS with qemu's
    iPXE ROM; UEFI: OVMF's own PXE client (architecture 7), which loads our ipxe.efi. tls:
    imgsrvd speaks TLS with a certificate `preboot-dir tls create` made, and policyd pins it
    on the kernel line (ImagingServerCertificate)."""
    for path, data in images.items():
        (image_root / path).parent.mkdir(parents=True, exist_ok=True)
        (image_root / path).write_bytes(data)
    (image_root / "lab").mkdir(parents=True, exist_ok=True)
    stack = imagingenv.start_imaging_stack(lab, tmp_path / "tftproot", imaging_env, POLICY,
                                           image_root, tls=tls, imgsrvd_extra=imgsrvd_extra)
    srv_ns, imgsrvd, policyd = stack.server_ns, stack.imgsrvd, stack.policyd
    spec = imagingenv.imaging_vm(mac, name, smbios, vm_disk, firmware, sector_size=sector_size)
    vm = netlab.start_vm(lab, srv_ns, spec)
    result = netlab.wait_for_marker(vm, DONE, TIMEOUT)
    exit_status = imagingenv.wait_for_exit(vm, 30) if result.ok else None
    lab.stop(vm.proc)
    diag = f"{result.reason}\n--- serial ---\n{netlab.tail(result.serial_log, 60)}\n{stack.logs()}"
    return ImagingBoot(result, exit_status, result.serial_text(), diag, imgsrvd, policyd, srv_ns,
                       stack.pin)


def _check_boot(boot: ImagingBoot, record_boot_time, label: str, answer: str,
                markers: tuple[re.Pattern[str], ...]) -> None:
    """The VM got `answer` from policyd, its console showed every marker, img exited 0 and
    the VM powered itself off."""
    result, diag = boot.result, boot.diag
    assert result.ok, diag
    record_boot_time(result.elapsed, f"({label}) {result.match[0].strip()}")
    found = ANSWER.search(boot.serial)
    assert found and found["rest"].startswith(answer), diag
    for marker in markers:
        assert marker.search(boot.serial), f"no {marker.pattern!r} on the console\n{diag}"
    assert result.match["code"] == "0", diag
    assert boot.exit_status is not None, f"the VM did not power off after the imaging\n{diag}"


def test_vm_is_imaged_by_the_imaging_environment(imaging_env: Path, base_image: tuple[Path, Path],
                                                 lab: netlab.Lab, tmp_path: Path,
                                                 record_boot_time):
    image, addon = base_image
    vm_disk = tmp_path / "vm.disk"
    with open(vm_disk, "wb") as f:
        f.truncate(DISK_SIZE)
    boot = _boot_into_imaging(lab, tmp_path, imaging_env,
                              {IMAGE: image.read_bytes(), ADDON: addon.read_bytes()},
                              tmp_path / "images", vm_disk, MAC, SMBIOS, "imaging",
                              imgsrvd_extra={"AllowedClients": LAB_NETWORK})
    _check_boot(boot, record_boot_time, "imaging env", f"restore {IMAGE}", ENV_MARKERS)
    diag = boot.diag

    imagingenv.check_restored_disk(vm_disk, {**FILES, **ADDON_FILES}, PART, tmp_path)

    # every request (work query, image ranges, the engine's own report) names the machine by
    # its MAC: the environment has no host name of its own to report
    entries = imagingenv.results(lab)
    assert entries and all(e.workstation == MAC_ID for e in entries), f"{entries}\n{diag}"
    assigned = [(e.operation, e.image_path) for e in entries if e.status == "assigned"]
    assert assigned == [("download", IMAGE)], f"{entries}\n{diag}"
    reported = [e for e in entries if e.operation == "download" and e.image_type == "base"]
    assert [(e.status, e.image_path) for e in reported] == [("success", IMAGE)], \
        f"{entries}\n{diag}"
    laid_on = [e for e in entries if e.operation == "download" and e.image_type == "addon"]
    assert [(e.status, e.image_path) for e in laid_on] == [("success", ADDON)], \
        f"{entries}\n{diag}"
    counters = boot.imgsrvd.wait_counters(lambda c: c.get("images_sent", 0) >= 2)
    assert counters["images_sent"] == 2, counters      # the base image and the add-on
    assert counters["failures"] == 0, counters
    policy_counters = boot.policyd.counters()
    assert policy_counters["work_assigned"] == 1, policy_counters
    # the kernel and initrd came over HTTP from policyd's /boot/, not over TFTP
    assert policy_counters["boot_files_sent"] >= 2, policy_counters
    assert policy_counters["boot_files_refused"] == 0, policy_counters
    policy_log = netlab.read_text(boot.policyd.log)
    assert "sent boot file preboot/initrd to 192.168.77." in policy_log, diag
    _check_refusals(lab, boot)
    _check_outside_allowed_clients(boot)


def _check_outside_allowed_clients(boot: ImagingBoot) -> None:
    """imgsrvd allows only the lab's network (AllowedClients), where the VM was served: a
    client from another network (an address of 10.99.0.0/24 added in the server's namespace,
    curl bound to it) is refused with the reason, even with a valid-looking request."""
    boot.server_ns.run(["ip", "addr", "add", f"{OUTSIDE_ADDRESS}/24", "dev", "lo"])
    done = subprocess.run(boot.server_ns.cmd(
        ["curl", "-s", "-w", "\n%{http_code}", "--interface", OUTSIDE_ADDRESS,
         f"http://192.168.77.2:998/v1/images/{IMAGE}"]),
        capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    reason = f"{OUTSIDE_ADDRESS} is not in AllowedClients"
    assert code == "403" and reason in body, done.stdout[-300:] + done.stderr[-300:]
    assert reason in boot.imgsrvd.log.read_text(errors="replace")


def _check_refusals(lab: netlab.Lab, boot: ImagingBoot) -> None:
    """With capabilities on (the lab's default), the image the VM restored is refused to a
    request without one, with another machine's, with an expired one and with a forged one,
    each with its reason in the answer and in imgsrvd's log (docs/security.md)."""
    key_id, secret = read_keys(str(lab.workdir / "imaging.key")).signing
    now = int(time.time())

    def capability(mac: str, issued: int, lifetime_s: int, image: str = IMAGE) -> str:
        return encode(Capability(mac, frozenset({"retrieve"}), (image,), issued,
                                 issued + lifetime_s), key_id, secret)

    cases = (
        ((), 401, "'retrieve' needs a capability"),
        # another machine's capability names that machine's image, not this one
        (("-H", f"Authorization: Bearer {capability('5254009900FF', now, 600, 'lab/x.img')}"),
         403, f"does not name the image {IMAGE}"),
        (("-H", f"Authorization: Bearer {capability(MAC_ID, now - 7200, 600)}"), 401,
         "expired"),
        (("-H", f"Authorization: Bearer {capability(MAC_ID, now, 600)[:-4]}AAAA"), 401,
         "signature does not match"),
    )
    for args, status, reason in cases:
        done = subprocess.run(boot.server_ns.cmd(
            ["curl", "-s", "-w", "\n%{http_code}", *args,
             f"http://192.168.77.2:998/v1/images/{IMAGE}"]),
            capture_output=True, text=True, timeout=30)
        body, _, code = done.stdout.rpartition("\n")
        assert code == str(status) and reason in body, (reason, done.stdout[-300:])
        assert reason in boot.imgsrvd.log.read_text(errors="replace"), reason


def test_uefi_vm_is_imaged_by_the_imaging_environment(imaging_env: Path,
                                                      base_image: tuple[Path, Path],
                                                      lab: netlab.Lab, tmp_path: Path,
                                                      record_boot_time):
    """The same environment (Debian's kernel is an EFI stub) booted by OVMF -> ipxe.efi ->
    policyd's script -> linux + initrd; the efi rule restores the base image."""
    missing = [str(f) for f in netlab.firmware_files("uefi") if not Path(f).exists()]
    if missing:
        pytest.skip("e2e imaging UEFI: no " + ", ".join(missing))
    image, _addon = base_image
    vm_disk = tmp_path / "vm.disk"
    with open(vm_disk, "wb") as f:
        f.truncate(DISK_SIZE)
    boot = _boot_into_imaging(lab, tmp_path, imaging_env, {IMAGE: image.read_bytes()},
                              tmp_path / "images", vm_disk, UEFI_MAC, UEFI_SMBIOS, "uefi-imaging",
                              firmware="uefi", tls=True)
    _check_boot(boot, record_boot_time, "imaging env, UEFI, TLS", f"restore {IMAGE}",
                (re.compile(r"preboot-env: work restore lab/base\.img server 192\.168\.77\.2"),
                 re.compile(re.escape(f"(TLS to the certificate sha256:{boot.pin})"))))
    diag = boot.diag
    assert "answering on https://192.168.77.2:998/v1/" in netlab.read_text(boot.imgsrvd.log), diag
    imagingenv.check_restored_disk(vm_disk, FILES, PART, tmp_path)
    policy_log = netlab.read_text(boot.policyd.log)
    assert "(efi): imaging; rule 'UEFI lab'" in policy_log, diag
    entries = imagingenv.results(lab)
    reported = [(e.workstation, e.status, e.image_path) for e in entries
                if e.operation == "download" and e.image_type == "base"]
    assert reported == [(UEFI_MAC.replace(":", "").upper(), "success", IMAGE)], \
        f"{entries}\n{diag}"


@pytest.mark.parametrize("filesystem", OTHER_TARGETS)
def test_addon_is_laid_onto_ntfs_xfs_and_btrfs_in_the_environment(
        filesystem: str, imaging_env: Path, base_image: tuple[Path, Path], lab: netlab.Lab,
        tmp_path: Path, record_boot_time):
    missing = imagingenv.missing_tools(imagingenv.filesystem_tools(filesystem))
    if missing:
        pytest.skip(f"e2e imaging {filesystem}: " + "; ".join(missing))
    _image, addon = base_image
    part = (1 * MiB, imagingenv.MIN_PARTITION[filesystem])
    disk_size = part[0] + part[1] + 1 * MiB
    source = imagingenv.make_filesystem_disk(tmp_path / "source.disk", filesystem,
                                             TARGET_FILES, disk_size, part)
    image_path = f"lab/{filesystem}.img"
    image = tmp_path / f"{filesystem}.img"
    imagingenv.make_image(source, image)
    source.unlink()
    vm_disk = tmp_path / "vm.disk"
    with open(vm_disk, "wb") as f:
        f.truncate(disk_size)
    mac = f"52:54:00:ab:01:{OTHER_TARGETS.index(filesystem):02x}"
    smbios = (f"type=1,manufacturer=Preboot Lab,product=Imaging {filesystem} E2E,"
              f"serial=IMG-1{OTHER_TARGETS.index(filesystem)}")
    boot = _boot_into_imaging(lab, tmp_path, imaging_env,
                              {image_path: image.read_bytes(), ADDON: addon.read_bytes()},
                              tmp_path / "images", vm_disk, mac, smbios, f"imaging-{filesystem}")
    markers = (
        re.compile(rf"preboot-env: work restore lab/{filesystem}\.img addons lab/drivers\.add "),
        re.compile(rf"preboot-env: disk /dev/vda {disk_size // MiB} MiB"),
        re.compile(rf"applied add-on //\S+/lab/drivers\.add onto /dev/vda partition 1 "
                   rf"\({filesystem}\): {len(ADDON_FILES)} files"),
    )
    _check_boot(boot, record_boot_time, f"imaging env, {filesystem} add-on",
                f"restore {image_path}", markers)
    imagingenv.check_filesystem_disk(vm_disk, filesystem, {**TARGET_FILES, **ADDON_FILES},
                                     part, tmp_path)
    counters = boot.imgsrvd.wait_counters(lambda c: c.get("images_sent", 0) >= 2)
    assert (counters["images_sent"], counters["failures"]) == (2, 0), f"{counters}\n{boot.diag}"


SHRINK_MAC = "52:54:00:ab:00:04"
SHRINK_SMBIOS = "type=1,manufacturer=Preboot Lab,product=Imaging Shrink E2E,serial=IMG-0004"
SMALL_DISK = 24 * MiB                            # the image's ext4 ends at 33 MiB


def test_vm_with_a_smaller_disk_is_shrunk_to_fit_as_its_rule_says(
        imaging_env: Path, base_image: tuple[Path, Path], lab: netlab.Lab, tmp_path: Path,
        record_boot_time):
    image, _addon = base_image
    vm_disk = tmp_path / "vm.disk"
    with open(vm_disk, "wb") as f:
        f.truncate(SMALL_DISK)
    boot = _boot_into_imaging(lab, tmp_path, imaging_env, {IMAGE: image.read_bytes()},
                              tmp_path / "images", vm_disk, SHRINK_MAC, SHRINK_SMBIOS,
                              "imaging-shrink")
    new_size = SMALL_DISK - PART[0]                # cut at the disk's end, on a MiB boundary
    markers = (
        re.compile(r"preboot-env: disk /dev/vda 24 MiB"),
        re.compile(r"192\.168\.77\.2\S*: restore lab/base\.img \(shrink to fit\)"),
        re.compile(rf"shrunk partition 1 \(ext4\): {PART[1] // MiB}(\.0)? MiB -> "
                   rf"{new_size // MiB}(\.0)? MiB"),
    )
    _check_boot(boot, record_boot_time, "imaging env, shrink", f"restore {IMAGE}", markers)
    imagingenv.check_restored_disk(vm_disk, FILES, (PART[0], new_size), tmp_path)
    entries = imagingenv.results(lab)
    reported = [(e.status, e.image_path) for e in entries
                if e.operation == "download" and e.image_type == "base"]
    assert reported == [("success", IMAGE)], f"{entries}\n{boot.diag}"


MAKE_MARKERS = (
    re.compile(r"preboot-env: work make lab/captured\.img server 192\.168\.77\.2 mac \S+"),
    re.compile(r"preboot-env: running img auto --disk /dev/vda --server 192\.168\.77\.2"),
    re.compile(r"made //192\.168\.77\.2(:998)?/lab/captured\.img"),
)


def test_vm_disk_is_captured_by_the_imaging_environment(imaging_env: Path, lab: netlab.Lab,
                                                        tmp_path: Path, record_boot_time):
    if os.geteuid() != 0 or imagingenv.missing_tools(imagingenv.DISK_TOOLS):
        pytest.skip("e2e imaging: needs root and " + ", ".join(imagingenv.DISK_TOOLS))
    vm_disk = imagingenv.make_source_disk(tmp_path / "vm.disk", FILES, DISK_SIZE, PART)
    before = hashlib.sha256(vm_disk.read_bytes()).hexdigest()
    image_root = tmp_path / "images"
    boot = _boot_into_imaging(lab, tmp_path, imaging_env, {}, image_root, vm_disk, MAKE_MAC,
                              MAKE_SMBIOS, "capture")
    _check_boot(boot, record_boot_time, "imaging env, make", f"make an image to {CAPTURED}",
                MAKE_MARKERS)
    diag = boot.diag
    assert hashlib.sha256(vm_disk.read_bytes()).hexdigest() == before, \
        "making an image changed the VM's disk"

    # The image on the server: complete (nothing but it in the folder), sound, and made from
    # partclone's map of the ext4 (used blocks only), not from the whole partition.
    captured = image_root / CAPTURED
    assert sorted(p.name for p in captured.parent.iterdir()) == ["captured.img"], diag
    env = dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT))
    imagingenv.run_checked([sys.executable, "-m", "img", "verify", str(captured)], 120, env=env)
    meta = imagingenv.image_metadata(captured)
    ext4 = [s for s in meta["streams"] if s.get("partition") == 1]
    assert len(ext4) == 1 and ext4[0].get("filesystem") == "ext4", meta["streams"]
    assert "partclone" in ext4[0].get("map", ""), ext4[0]
    assert ext4[0]["used_bytes"] < PART[1] // 2, ext4[0]
    assert meta["source"].get("mac", "").upper().replace(":", "") == MAKE_MAC_ID, meta["source"]
    assert meta["source"].get("product") == "Imaging Make E2E", meta["source"]

    restored = tmp_path / "restored.disk"
    with open(restored, "wb") as f:
        f.truncate(DISK_SIZE)
    imagingenv.run_checked([sys.executable, "-m", "img", "restore", "--disk", str(restored),
                            str(captured)], 120, env=env)
    imagingenv.check_restored_disk(restored, FILES, PART, tmp_path)

    # The assignment, then the store: one entry (issue 13), the server's record joined with
    # the engine's report; all of the machine, named by its MAC.
    entries = imagingenv.results(lab)
    uploads = [(e.workstation, e.image_type, e.status, e.image_path)
               for e in entries if e.operation == "upload"]
    assert uploads == [(MAKE_MAC_ID, None, "assigned", CAPTURED),
                       (MAKE_MAC_ID, "base", "success", CAPTURED)], f"{entries}\n{diag}"
    assert [e.bytes for e in entries if e.operation == "upload"][1] == captured.stat().st_size
    counters = boot.imgsrvd.wait_counters(lambda c: c.get("images_received", 0) >= 1)
    assert counters["images_received"] == 1 and counters["failures"] == 0, counters


FOURKN_MAC = "52:54:00:ab:00:05"
FOURKN_SMBIOS = "type=1,manufacturer=Preboot Lab,product=Imaging 4Kn E2E,serial=IMG-0005"
FOURKN_DISK = sectordisks.DiskSpec("mbr", 4096, 64, (
    sectordisks.Part("ext4", 1, 32), sectordisks.Part("vfat", 34, 24)))


def test_vm_with_a_4kn_disk_is_imaged_by_the_imaging_environment(
        imaging_env: Path, lab: netlab.Lab, tmp_path: Path, record_boot_time):
    if os.geteuid() != 0 or imagingenv.missing_tools(sectordisks.TOOLS):
        pytest.skip("e2e 4Kn: needs root and " + ", ".join(sectordisks.TOOLS))
    source = sectordisks.build_disk(tmp_path / "4kn-source.disk", FOURKN_DISK, FILES)
    image = tmp_path / "4kn.img"
    with sectordisks.loop(source, 4096, read_only=True) as device:
        imagingenv.make_image(Path(device), image)
    assert imagingenv.image_metadata(image)["disk"]["sector_size"] == 4096
    vm_disk = sectordisks.blank_disk(tmp_path / "vm.disk", FOURKN_DISK.size)
    boot = _boot_into_imaging(lab, tmp_path, imaging_env, {FOURKN_IMAGE: image.read_bytes()},
                              tmp_path / "images", vm_disk, FOURKN_MAC, FOURKN_SMBIOS,
                              "imaging-4kn", sector_size=4096)
    markers = (
        re.compile(r"preboot-env: running img auto --disk /dev/vda --server 192\.168\.77\.2"),
        re.compile(r"disk /dev/vda: 67108864 bytes, 4096-byte logical sectors"),
        re.compile(r"restored //\S+/lab/4kn\.img onto /dev/vda: [\d.]+ \w+ \(\d+ bytes\) in \d+ chunks"),
    )
    _check_boot(boot, record_boot_time, "imaging env, 4Kn disk", f"restore {FOURKN_IMAGE}",
                markers)
    assert "converted" not in boot.serial, boot.diag
    sectordisks.check_disk(vm_disk, FOURKN_DISK, FILES)
    entries = imagingenv.results(lab)
    reported = [(e.status, e.image_path) for e in entries
                if e.operation == "download" and e.image_type == "base"]
    assert reported == [("success", FOURKN_IMAGE)], f"{entries}\n{boot.diag}"
