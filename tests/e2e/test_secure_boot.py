"""End to end, Secure Boot: OVMF with Secure Boot on and Microsoft's keys enrolled boots shim,
Debian's signed network GRUB and the signed kernel through our stack, and is imaged.

    [dhcp ns] dnsmasq 192.168.77.1: address pool, and (Debian 12's GRUB) next-server
              192.168.77.2, no boot file; with Debian 13's GRUB the pool only
    [srv ns ] br0 192.168.77.2: proxydhcpd (SecureBootClients = the VM's MAC: shimx64.efi),
              tftpd (shimx64.efi, grubx64.efi, preboot/linux + initrd; grub/grub.cfg and
              preboot/policy.grub/... from policyd through PolicyGateway), policyd, imgsrvd

The firmware gets shimx64.efi from the proxy (port 4011), shim fetches grubx64.efi beside it,
GRUB (which takes its TFTP server from the site DHCP's next-server, docs/secure-boot.md) reads
grub/grub.cfg (policyd's bootstrap), which sources the machine's answer: the same rule, work
and capability an iPXE client gets, here a restore. GRUB loads the signed kernel (shim checks
it) and our initrd; the environment restores the disk under the kernel's lockdown; the disk is
verified on the host and imgsrvd logged the success.

The same firmware given Debian's unsigned ipxe.efi (a MAC not in SecureBootClients) refuses it:
proof that Secure Boot was on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import imagingenv
import netlab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

TIMEOUT = 1.5 * float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
MiB = imagingenv.MiB
DISK_SIZE = 40 * MiB
PART = (1 * MiB, 32 * MiB)
FILES = {
    "readme.txt": b"Preboot Secure Boot e2e\n" * 100,
    "etc/hostname": b"imaged-under-secure-boot\n",
    "data.bin": bytes(range(256)) * 4096,
}
IMAGE = "lab/sb.img"
MAC = "52:54:00:ab:03:01"
MAC_ID = MAC.replace(":", "").upper()
UNSIGNED_MAC = "52:54:00:ab:03:02"
SMBIOS = "type=1,manufacturer=Preboot Lab,product=Secure Boot E2E,serial=SB-0001"
POLICY = f"""\
format = 1
[menu]
display = never
timeout_s = 1
[rules]
[[Secure Boot lab]]
filter = "product = 'Secure Boot E2E' and platform = efi"
action = restore
image = {IMAGE}
"""
DONE = re.compile(r"preboot-env: done exit=(?P<code>\d+)[^\r\n]*[\r\n]")
REFUSED = re.compile(r"Access Denied|Security Violation")


@pytest.fixture(autouse=True)
def secure_boot_firmware() -> None:
    missing = [str(f) for f in netlab.firmware_files("uefi-secboot") if not f.exists()]
    if missing:
        pytest.skip("e2e Secure Boot: no " + ", ".join(missing))


SETUPS = [
    # Debian 12's signed GRUB 2.06 takes its server only from the site DHCP's next-server
    pytest.param(None, "192.168.77.2", id="grub-2.06-site-next-server"),
    # Debian 13's signed GRUB 2.12 reads the proxyDHCP offer: the site DHCP gives a pool only
    pytest.param("trixie", None, id="grub-2.12-proxy-only"),
]


@pytest.mark.parametrize("grub_release,site_next_server", SETUPS)
def test_secure_boot_vm_boots_shim_grub_and_the_signed_kernel_and_is_imaged(
        grub_release, site_next_server, imaging_env: Path, lab: netlab.Lab, tmp_path: Path,
        record_boot_time):
    image_root = tmp_path / "images"
    (image_root / "lab").mkdir(parents=True)
    source = imagingenv.make_source_disk(tmp_path / "source.disk", FILES, DISK_SIZE, PART)
    imagingenv.make_image(source, image_root / IMAGE)
    tftp_root = tmp_path / "tftproot"
    tftp_root.mkdir()
    imagingenv.stage_secure_boot_chain(tftp_root, grub_release)
    stack = imagingenv.start_imaging_stack(
        lab, tftp_root, imaging_env, POLICY, image_root,
        proxy_extra={"SecureBootClients": MAC}, site_next_server=site_next_server)

    disk = tmp_path / "vm.disk"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    vm = netlab.start_vm(lab, stack.server_ns, imagingenv.imaging_vm(
        MAC, "secboot", SMBIOS, disk, "uefi-secboot"))
    result = netlab.wait_for_marker(vm, DONE, TIMEOUT)
    imagingenv.wait_for_exit(vm, 30) if result.ok else None
    lab.stop(vm.proc)
    serial = result.serial_text()
    diag = f"{result.reason}\n--- serial ---\n{netlab.tail(result.serial_log, 60)}\n{stack.logs()}"
    assert result.ok and result.match["code"] == "0", diag
    record_boot_time(result.elapsed, "(Secure Boot: shim, GRUB, signed kernel) imaged")

    # the chain, as the servers saw it: shim by the proxy, grubx64.efi beside it, the bootstrap
    # and the machine's answer through the gateway, the kernel and initrd over TFTP
    proxy_log = netlab.read_text(stack.setup.proxy.log)
    assert "Secure Boot chain" in proxy_log and "shimx64.efi" in proxy_log, diag
    tftpd_log = netlab.read_text(stack.setup.tftpd.log)
    for name in ("shimx64.efi", "grubx64.efi", "preboot/linux", "preboot/initrd"):
        assert re.search(rf"sent '/?{re.escape(name)}' to 192\.168\.77\.\d+", tftpd_log), \
            (name, diag)
    counters = stack.setup.tftpd.counters()
    assert counters["gateway_answers"] >= 2, counters           # grub.cfg + the answer
    policy_log = netlab.read_text(stack.policyd.log)
    assert f"{MAC_ID} (efi, GRUB): imaging; rule 'Secure Boot lab'" in policy_log, diag
    assert f"preboot-answer: imaging restore {IMAGE}" in serial, diag
    # the kernel ran with Secure Boot on and locked down, and the environment still imaged
    assert re.search(r"preboot-env: start \S+ uptime \S+ s lockdown \[integrity\]", serial), diag
    assert re.search(r"preboot-env: work restore lab/sb\.img server 192\.168\.77\.2", serial)
    assert "error:" not in serial, diag                    # GRUB complained of nothing
    imagingenv.check_restored_disk(disk, FILES, PART, tmp_path)
    entries = imagingenv.results(lab)
    assert [(e.workstation, e.status) for e in entries
            if e.operation == "download" and e.image_type == "base"] == [(MAC_ID, "success")]

    if grub_release:                     # the refusal below is the firmware's: proven once
        return
    # the same firmware refuses Debian's unsigned ipxe.efi (what a MAC not named gets)
    unsigned = netlab.start_vm(lab, stack.server_ns, imagingenv.imaging_vm(
        UNSIGNED_MAC, "secboot-unsigned", SMBIOS, disk, "uefi-secboot"))
    refused = netlab.wait_for_marker(unsigned, REFUSED, 90)
    lab.stop(unsigned.proc)
    assert refused.ok, f"{refused.reason}\n{netlab.tail(refused.serial_log, 40)}"
    assert "sent 'ipxe.efi'" in netlab.read_text(stack.setup.tftpd.log)
    assert "iPXE" not in refused.serial_text()
