"""The demo (`bash scripts/demo.sh`): the whole product in five minutes, in network namespaces.

What it does, each step printed with its time:

1. builds the imaging environment (cached: seconds the second time) and stages the boot
   programs: Debian's iPXE builds, shim and Debian 13's signed network GRUB (which reads the
   proxyDHCP offer, docs/secure-boot.md), downloaded and unpacked, never installed;
2. makes a sample disk that boots by itself: an MBR whose boot code prints a line (BIOS), an
   EFI system partition with shim, the signed GRUB and a grub.cfg that prints a line (UEFI
   with Secure Boot on), and an ext4 with a few files; `img make` makes an image of it;
3. starts the stack in a lab of namespaces (a site DHCP server giving addresses only, our
   proxydhcpd, tftpd, prebootpolicyd and imgsrvd) with one rule: machines whose SMBIOS product
   is "Preboot Demo" restore demo/sample.img; UEFI machines of the demo take the Secure Boot
   chain (SecureBootClients);
4. PXE-boots a BIOS VM with a blank disk: iPXE asks policyd, the imaging environment restores
   the image and powers off; then boots that disk (no network) until its line shows;
5. the same with a UEFI VM with Secure Boot on and Microsoft's keys: shim, GRUB, the signed
   kernel under lockdown, the restore; then its disk boots through shim and GRUB.

Everything it starts lives in namespaces and a folder it deletes at the end (--keep keeps the
folder, with every log and console). It drives the same lab code as the end-to-end tests
(tests/e2e/netlab.py, tests/e2e/imagingenv.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "e2e")]

import imagingenv  # noqa: E402
import netlab  # noqa: E402

MiB = 1 << 20
IMAGE = "demo/sample.img"
DISK_BYTES = 64 * MiB
ESP = (1 * MiB, 16 * MiB)                   # (offset, size): FAT, type 0xEF
DATA = (17 * MiB, DISK_BYTES - 17 * MiB)    # ext4
MARKER = "preboot-demo: the restored disk boots"
POLICY = f"""\
format = 1
[menu]
display = never
timeout_s = 1
[rules]
[[Demo]]
filter = "product = 'Preboot Demo'"
action = restore
image = {IMAGE}
"""
MACHINES = (("bios", "52:54:00:de:00:01"), ("uefi-secboot", "52:54:00:de:00:02"))
TIMEOUT_S = 300.0

# 16-bit boot code at 0x7c00: print the message with BIOS teletype (int 10h, AH=0Eh; SeaBIOS
# mirrors it to the serial port), then halt.
#   cli; xor ax,ax; mov ds,ax; mov es,ax; mov ss,ax; mov sp,7c00h; sti; mov si,msg
#   next: lodsb; or al,al; jz done; mov ah,0Eh; mov bx,7; int 10h; jmp next
#   done: cli; hlt; jmp $-1
BOOT_CODE = bytes.fromhex("FA31C08ED88EC08ED0BC007CFBBE227CAC08C07409B40EBB0700CD10EBF2FAF4EBFD")


class Steps:
    """Prints each step with the time since the start and its own duration."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def run(self, what: str, action, *args, **kwargs):
        begun = time.monotonic()
        print(f"[{begun - self.started:6.1f} s] {what} ...", flush=True)
        result = action(*args, **kwargs)
        print(f"[{time.monotonic() - self.started:6.1f} s]   done in "
              f"{time.monotonic() - begun:.1f} s", flush=True)
        return result


def run(args: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def make_sample_disk(path: Path, work: Path, chain: Path) -> None:
    """The bootable sample disk (see the module's docstring)."""
    with open(path, "wb") as disk:
        disk.truncate(DISK_BYTES)
    table = (f"label: dos\nstart={ESP[0] // 512}, size={ESP[1] // 512}, type=ef\n"
             f"start={DATA[0] // 512}, type=83\n")
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    # the blank before the line's end: SeaBIOS's serial mirror drops a line's last character
    message = f"{MARKER} (BIOS) \r\n".encode() + b"\0"
    with open(path, "r+b") as disk:             # the boot code, before the partition table
        disk.write(BOOT_CODE + message)
    esp = work / "esp.fat"
    with open(esp, "wb") as f:
        f.truncate(ESP[1])
    run(["mkfs.fat", "-F", "16", "-n", "DEMOESP", str(esp)])
    grub_cfg = work / "grub.cfg"
    grub_cfg.write_text(f'echo "{MARKER} (UEFI, Secure Boot)"\nsleep 1\nhalt\n')
    run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    for source, target in ((chain / "shimx64.efi", "::/EFI/BOOT/BOOTX64.EFI"),
                           (chain / "grubx64-disk.efi", "::/EFI/BOOT/grubx64.efi"),
                           (grub_cfg, "::/EFI/BOOT/grub.cfg"),
                           (grub_cfg, "::/EFI/debian/grub.cfg")):
        run(["mcopy", "-i", str(esp), str(source), target])
    files = work / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("preboot-demo\n")
    (files / "readme.txt").write_text("Restored by Preboot Services.\n" * 100)
    data = work / "data.ext4"
    with open(data, "wb") as f:
        f.truncate(DATA[1])
    run(["mkfs.ext4", "-q", "-d", str(files), str(data)])
    with open(path, "r+b") as disk:
        for part, (offset, _size) in ((esp, ESP), (data, DATA)):
            disk.seek(offset)
            with open(part, "rb") as source:
                shutil.copyfileobj(source, disk, 4 * MiB)


def stage_chain(tftp_root: Path, work: Path) -> Path:
    """shim and GRUB 2.12 (network build) into the TFTP root; the disk's GRUB (the monolithic
    signed build, which reads grub.cfg beside itself) into `work`."""
    imagingenv.stage_secure_boot_chain(tftp_root, "trixie")
    chain = work / "chain"
    chain.mkdir()
    shutil.copyfile(tftp_root / "shimx64.efi", chain / "shimx64.efi")
    monolithic = (imagingenv.SECURE_BOOT_CACHE / "grub-efi-amd64-signed-trixie" / "usr" / "lib"
                  / "grub" / "x86_64-efi-signed" / "grubx64.efi.signed")
    shutil.copyfile(monolithic, chain / "grubx64-disk.efi")
    return chain


def pxe_restore(lab: netlab.Lab, stack: imagingenv.ImagingStack, firmware: str, mac: str,
                disk: Path) -> None:
    spec = imagingenv.imaging_vm(mac, f"demo-{firmware}", "type=1,manufacturer=Preboot,"
                                 "product=Preboot Demo,serial=DEMO-1", disk, firmware)
    vm = netlab.start_vm(lab, stack.server_ns, spec)
    done = netlab.wait_for_marker(vm, re.compile(r"preboot-env: done exit=(\d+)"), TIMEOUT_S)
    imagingenv.wait_for_exit(vm, 30)
    lab.stop(vm.proc)
    serial = done.serial_text()
    for line in serial.splitlines():
        if line.startswith(("preboot-answer:", "preboot-env: start", "restored ")) or \
                "Fetching Netboot Image" in line:
            print(f"           | {line.strip()[:110]}")
    if not (done.ok and done.match[1] == "0"):
        raise SystemExit(f"demo: the {firmware} VM was not imaged ({done.reason}); its "
                         f"console:\n{netlab.tail(done.serial_log, 30)}\n{stack.logs()}")


def boot_disk(lab: netlab.Lab, stack: imagingenv.ImagingStack, firmware: str,
              disk: Path) -> None:
    spec = netlab.VmSpec(firmware, name=f"demo-{firmware}-disk", memory_mb=256, network=False,
                         extra=("-drive", f"file={disk},if=virtio,format=raw"))
    vm = netlab.start_vm(lab, stack.server_ns, spec)
    seen = netlab.wait_for_marker(vm, re.compile(re.escape(MARKER) + r" \([^)\r\n]*\)"), 120)
    lab.stop(vm.proc)
    if not seen.ok:
        raise SystemExit(f"demo: the restored {firmware} disk did not boot ({seen.reason}):\n"
                         f"{netlab.tail(seen.serial_log, 30)}")
    print(f"           | {seen.match[0].strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    missing = netlab.missing_prerequisites() + imagingenv.missing_tools() + [
        str(f) for f in netlab.firmware_files("uefi-secboot") if not f.exists()] + [
        tool for tool in ("mkfs.fat", "mmd", "mcopy") if not shutil.which(tool)]
    if missing:
        print("demo: missing " + "; ".join(missing) + " (bash scripts/install-deps.sh)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="preboot-demo-", dir="/tmp"))
    steps = Steps()
    print(f"Preboot Services demo; work folder {work}")
    try:
        with netlab.Lab(work / "lab", netlab.unique_prefix("pdemo")) as lab:
            env = steps.run("building the imaging environment",
                            lambda: imagingenv.build_imaging_env()[0])
            tftp_root, image_root = work / "tftproot", work / "images"
            tftp_root.mkdir()
            (image_root / "demo").mkdir(parents=True)
            chain = steps.run("staging shim and the signed GRUB (Debian packages, unpacked)",
                              stage_chain, tftp_root, work)
            sample = work / "sample.disk"
            steps.run("making a sample disk that boots (BIOS and UEFI Secure Boot)",
                      make_sample_disk, sample, work, chain)
            steps.run(f"img make: the sample disk into {IMAGE}", imagingenv.make_image,
                      sample, image_root / IMAGE)
            stack = steps.run(
                "starting the stack (site DHCP, proxydhcpd, tftpd, policyd, imgsrvd)",
                imagingenv.start_imaging_stack, lab, tftp_root, env, POLICY, image_root,
                proxy_extra={"SecureBootClients": MACHINES[1][1]})
            for firmware, mac in MACHINES:
                label = "BIOS VM" if firmware == "bios" else "UEFI VM with Secure Boot on"
                disk = work / f"{firmware}.disk"
                with open(disk, "wb") as f:
                    f.truncate(DISK_BYTES)
                steps.run(f"PXE-booting a {label} and a blank disk: restore {IMAGE}",
                          pxe_restore, lab, stack, firmware, mac, disk)
                steps.run(f"booting the restored disk ({label}, no network)", boot_disk, lab,
                          stack, firmware, disk)
        print(f"[{time.monotonic() - steps.started:6.1f} s] demo done: both machines were "
              "imaged over the network and boot the image")
        return 0
    finally:
        if args.keep:
            print(f"demo: logs and consoles kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
