"""Helpers for end-to-end tests that boot the imaging environment and image a VM's disk.

This module owns the pieces around the network lab (netlab.py) that imaging needs:

* `build_imaging_env`: packaging/imaging-env/build.sh (cached: seconds when nothing changed),
  and `stage_imaging_env`, which puts its linux/initrd under `preboot/` in a TFTP root, which
  policyd serves over HTTP (BootFilesRoot) where its default ImagingKernel/ImagingInitrd look;
* `make_source_disk`, `make_image`, `check_restored_disk`: a small MBR disk file with an ext4
  partition full of known files, an image of it made with `img make` on the host, and the check
  that a restored disk has the same table and an ext4 that passes `e2fsck -fn` with every file
  identical (debugfs, no mount); `make_linux_windows_disk`: a dual-boot disk (an ext4 and an
  NTFS) for the identity tests;
* `start_imgsrvd`: our imaging server in a lab namespace, sharing the directory with policyd;
* `start_imaging_stack`: the whole stack for imaging VMs (site DHCP, proxydhcpd, tftpd with
  iPXE and the environment, policyd with a policy file imported by `preboot-dir`, imgsrvd);
* `wait_for_exit`: wait for a VM that powers itself off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import netlab

BUILD_SCRIPT = netlab.REPO_ROOT / "packaging" / "imaging-env" / "build.sh"
DEFAULT_ENV_DIR = Path(os.environ.get("PREBOOT_IMAGING_ENV", "/var/cache/preboot/imaging-env"))
MiB = 1 << 20
POLICY_PORT = 8090
# What the environment's build and the disk checks need on the host.
BUILD_TOOLS = ("tar", "xz", "dpkg-deb", "curl")
DISK_TOOLS = ("sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "partclone.ext4", "losetup")


def run_checked(args: list[str], timeout: float, input: str | None = None,
                env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; raise with its output when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input,
                          env=dict(env) if env is not None else None, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def missing_tools(tools: tuple[str, ...] = BUILD_TOOLS + DISK_TOOLS) -> list[str]:
    return [f"{tool} not installed" for tool in tools if shutil.which(tool) is None]


# ------------------------------------------------------------------------------ the environment


def build_imaging_env(out: Path = DEFAULT_ENV_DIR, timeout: float = 900) -> tuple[Path, float]:
    """Build (or find up to date) linux + initrd in `out`; returns (out, seconds taken)."""
    started = time.monotonic()
    run_checked(["bash", str(BUILD_SCRIPT), "--out", str(out)], timeout)
    for name in ("linux", "initrd"):
        if not (out / name).is_file():
            raise RuntimeError(f"{BUILD_SCRIPT} did not produce {out / name}")
    return out, time.monotonic() - started


def stage_imaging_env(env_dir: Path, tftp_root: Path) -> None:
    """linux and initrd as <tftp_root>/preboot/{linux,initrd} (policyd's default URLs, when
    its BootFilesRoot is tftp_root)."""
    dest = tftp_root / "preboot"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("linux", "initrd"):
        shutil.copyfile(env_dir / name, dest / name)


# ------------------------------------------------------------------------------ disks and images


def make_source_disk(path: Path, files: Mapping[str, bytes], disk_size: int,
                     part: tuple[int, int]) -> Path:
    """An MBR disk file of `disk_size` bytes with one Linux partition (offset, size) holding an
    ext4 made from `files` (mkfs.ext4 -d)."""
    work = path.parent / (path.name + ".src")
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    fs = path.parent / (path.name + ".ext4")
    with open(fs, "wb") as f:
        f.truncate(part[1])
    run_checked(["mkfs.ext4", "-q", "-F", "-d", str(work), str(fs)], 60)
    with open(path, "wb") as f:
        f.truncate(disk_size)
    run_checked(["sfdisk", "-q", str(path)], 60,
                input=f"label: dos\nstart={part[0] // 512}, size={part[1] // 512}, type=83\n")
    with open(path, "r+b") as disk, open(fs, "rb") as src:
        disk.seek(part[0])
        shutil.copyfileobj(src, disk)
    fs.unlink()
    shutil.rmtree(work)
    return path


def make_linux_windows_disk(path: Path, linux_files: Mapping[str, bytes],
                            windows_files: Mapping[str, bytes], disk_size: int,
                            linux_part: tuple[int, int], windows_part: tuple[int, int]) -> Path:
    """An MBR disk file of `disk_size` bytes with an ext4 of `linux_files` (mkfs.ext4 -d) on
    linux_part and an NTFS (mkntfs, the files written through ntfs-3g) of `windows_files` on
    windows_part, each (offset, size): a dual-boot disk for the identity tests."""
    ext4 = path.parent / (path.name + ".ext4")
    tree = path.parent / (path.name + ".src")
    for name, data in linux_files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    with open(ext4, "wb") as f:
        f.truncate(linux_part[1])
    run_checked(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(ext4)], 60)
    ntfs = path.parent / (path.name + ".ntfs")
    with open(ntfs, "wb") as f:
        f.truncate(windows_part[1])
    run_checked(["mkntfs", "-q", "-F", "-Q", str(ntfs)], 120)
    where = path.parent / (path.name + ".mnt")
    where.mkdir()
    run_checked(["ntfs-3g", str(ntfs), str(where)], 60)
    try:
        for name, data in windows_files.items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            (where / name).write_bytes(data)
    finally:
        run_checked(["umount", str(where)], 60)
    where.rmdir()
    with open(path, "wb") as f:
        f.truncate(disk_size)
    run_checked(["sfdisk", "-q", str(path)], 60, input=(
        f"label: dos\nstart={linux_part[0] // 512}, size={linux_part[1] // 512}, type=83\n"
        f"start={windows_part[0] // 512}, size={windows_part[1] // 512}, type=7\n"))
    with open(path, "r+b") as disk:
        for fs, (offset, _size) in ((ext4, linux_part), (ntfs, windows_part)):
            disk.seek(offset)
            with open(fs, "rb") as src:
                shutil.copyfileobj(src, disk)
            fs.unlink()
    shutil.rmtree(tree)
    return path


def partition_copy(disk: Path, part: tuple[int, int], out: Path) -> Path:
    """The bytes of one partition of a disk file, as a file of their own."""
    with open(disk, "rb") as src, open(out, "wb") as dst:
        src.seek(part[0])
        dst.write(src.read(part[1]))
    return out


# The add-on targets besides ext4 (made here; ext4 is make_source_disk's): the MBR type of their
# partition, how the host makes one on a device, and a read-only check of one.
OTHER_FILESYSTEMS = {
    "ntfs": ("7", ["mkntfs", "-q", "-F", "-Q"], ["ntfsfix", "--no-action"]),
    "xfs": ("83", ["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"]),
    "btrfs": ("83", ["mkfs.btrfs", "-q", "-f"], ["btrfs", "check", "--readonly"]),
}
# the smallest each will make (mkfs.xfs: 300 MB), plus room for the files
MIN_PARTITION = {"ntfs": 16 * MiB, "xfs": 320 * MiB, "btrfs": 128 * MiB}


def filesystem_tools(filesystem: str) -> tuple[str, ...]:
    _type, mkfs, check = OTHER_FILESYSTEMS[filesystem]
    return (mkfs[0], check[0], "ntfs-3g" if filesystem == "ntfs" else "mount")


@contextlib.contextmanager
def partition_device(disk: Path, part: tuple[int, int], writable: bool) -> Iterator[str]:
    """A loop device showing just one partition of a disk file."""
    device = run_checked(["losetup", "--find", "--show", *([] if writable else ["--read-only"]),
                          "--offset", str(part[0]), "--sizelimit", str(part[1]), str(disk)],
                         60).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


@contextlib.contextmanager
def mounted_partition(disk: Path, part: tuple[int, int], filesystem: str, where: Path,
                      writable: bool = False) -> Iterator[Path]:
    """The partition's filesystem mounted on `where` (ntfs-3g for NTFS, the kernel otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    options = "rw" if writable else "ro"
    with partition_device(disk, part, writable) as device:
        command = (["ntfs-3g", "-o", options, device, str(where)] if filesystem == "ntfs"
                   else ["mount", "-t", filesystem, "-o", options, device, str(where)])
        run_checked(command, 60)
        try:
            yield where
        finally:
            subprocess.run(["sync"], timeout=60)
            run_checked(["umount", str(where)], 60)


def make_filesystem_disk(path: Path, filesystem: str, files: Mapping[str, bytes],
                         disk_size: int, part: tuple[int, int]) -> Path:
    """An MBR disk file with one partition (offset, size) holding a `filesystem` (ntfs, xfs or
    btrfs, made by its own mkfs) with `files` written through a real mount."""
    part_type, mkfs, _check = OTHER_FILESYSTEMS[filesystem]
    with open(path, "wb") as f:
        f.truncate(disk_size)
    run_checked(["sfdisk", "-q", str(path)], 60, input=(
        f"label: dos\nstart={part[0] // 512}, size={part[1] // 512}, type={part_type}\n"))
    with partition_device(path, part, writable=True) as device:
        run_checked([*mkfs, device], 120)
    mount_point = path.parent / (path.name + ".mnt")
    with mounted_partition(path, part, filesystem, mount_point, writable=True) as root:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    mount_point.rmdir()
    return path


def check_filesystem_disk(disk: Path, filesystem: str, files: Mapping[str, bytes],
                          part: tuple[int, int], scratch: Path) -> None:
    """Assert the disk has the one partition, its filesystem passes its own read-only check,
    and every file in `files` reads back identical through a read-only mount."""
    part_type, _mkfs, check = OTHER_FILESYSTEMS[filesystem]
    assert partition_table(disk) == [(part[0], part[1], part_type)], partition_table(disk)
    with partition_device(disk, part, writable=False) as device:
        run_checked([*check, device], 120)
    with mounted_partition(disk, part, filesystem, scratch / f"check-{filesystem}") as root:
        for name, data in files.items():
            assert (root / name).read_bytes() == data, f"{name} differs on the {filesystem}"


def make_image(disk: Path, image: Path) -> str:
    """`img make --disk DISK IMAGE` on the host (the project's own interpreter); its output."""
    env = dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT))
    proc = run_checked([sys.executable, "-m", "img", "make", "--disk", str(disk), str(image)],
                       300, env=env)
    return proc.stdout


def make_addon(tree: Mapping[str, bytes], folder: Path, image: Path) -> str:
    """`img addon make --from FOLDER IMAGE` of the files in `tree`; its output."""
    for name, data in tree.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    env = dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT))
    proc = run_checked([sys.executable, "-m", "img", "addon", "make", "--from", str(folder),
                        str(image)], 300, env=env)
    return proc.stdout


def image_metadata(image: Path) -> dict:
    """The metadata of an image file (common/imaging/imagefile.py's reader)."""
    sys.path.insert(0, str(netlab.REPO_ROOT))
    from common.imaging.imagefile import ImageReader

    with open(image, "rb") as handle:
        return ImageReader(handle, str(image)).metadata


def partition_table(disk: Path) -> list[tuple[int, int, str]]:
    """(start, size, type) in bytes of each partition, from sfdisk --json."""
    table = json.loads(run_checked(["sfdisk", "--json", str(disk)], 30).stdout)["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512, p["type"]) for p in table["partitions"]]


def check_restored_disk(disk: Path, files: Mapping[str, bytes], part: tuple[int, int],
                        scratch: Path) -> None:
    """Assert the restored disk has the one partition and an ext4 there that passes e2fsck -fn
    with every file identical (read with debugfs from a copy of the partition)."""
    assert partition_table(disk) == [(part[0], part[1], "83")], partition_table(disk)
    check_ext4_files(disk, files, part, scratch)


def check_ext4_files(disk: Path, files: Mapping[str, bytes], part: tuple[int, int],
                     scratch: Path) -> None:
    """Assert the ext4 on `part` of the disk passes e2fsck -fn and holds every file in `files`
    identical (debugfs on a copy of the partition, no mount)."""
    fs = partition_copy(disk, part, scratch / "restored.ext4")
    run_checked(["e2fsck", "-fn", str(fs)], 120)
    for name, data in files.items():
        dumped = scratch / "dumped.bin"
        run_checked(["debugfs", "-R", f"dump /{name} {dumped}", str(fs)], 60)
        assert dumped.read_bytes() == data, f"{name} differs after the restore"
        dumped.unlink()
    fs.unlink()


# ------------------------------------------------------------------------------ imgsrvd


def start_imgsrvd(lab: netlab.Lab, ns: netlab.Netns, address: str, image_root: Path,
                  directory: str, port: int = 998,
                  extra: Mapping[str, object] | None = None) -> netlab.Daemon:
    """Our imaging server on address:port in `ns`, images under `image_root`, the policy from
    `directory` (the one policyd reads); results log '<workdir>/imgsrvd-results.xml'; `extra`:
    more keys (TLS, AllowedClients)."""
    return netlab.start_preboot_daemon(lab, ns, "imgsrvd", {
        "IPAddress": address, "Port": port, "ImageRoot": image_root, "Directory": directory,
        "ResultsLog": lab.workdir / "imgsrvd-results.xml", "ServerName": "imgsrv.e2e",
        **(extra or {}),
    })


def preboot_dir(ns: netlab.Netns, url: str, *args: str) -> str:
    """`preboot-dir --directory URL ARGS...` in `ns`; its output (fails the test on an error)."""
    command = [sys.executable, "-m", "common.dircli", "--config", "/nonexistent",
               "--directory", url, *args]
    proc = subprocess.run(ns.cmd(command), capture_output=True, text=True, timeout=60,
                          cwd=netlab.REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT)))
    assert proc.returncode == 0, f"preboot-dir {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@dataclass
class ImagingStack:
    """What start_imaging_stack started: the boot services, imgsrvd and policyd."""

    setup: netlab.ProxyLab
    imgsrvd: netlab.Daemon
    policyd: netlab.Daemon
    directory: str                 # the SQLite directory URL both daemons read
    pin: str | None = None         # imgsrvd's certificate, when it speaks TLS

    @property
    def server_ns(self) -> netlab.Netns:
        return self.setup.vm_ns

    @property
    def server_ip(self) -> str:
        return self.setup.server_ip

    def logs(self) -> str:
        """The daemons' last lines, for a failing test's message."""
        return (f"--- policyd log ---\n{netlab.tail(self.policyd.log, 15)}"
                f"\n--- imgsrvd log ---\n{netlab.tail(self.imgsrvd.log, 25)}"
                f"\n--- tftpd log ---\n{netlab.tail(self.setup.tftpd.log, 10)}")


def start_imaging_stack(lab: netlab.Lab, tftp_root: Path, imaging_env: Path, policy: str,
                        image_root: Path, tls: bool = False,
                        imgsrvd_extra: Mapping[str, object] | None = None,
                        proxy_extra: Mapping[str, object] | None = None,
                        site_next_server: str | None = None) -> ImagingStack:
    """The flat lab (site DHCP with a pool, proxydhcpd and tftpd on br0 192.168.77.2) with
    iPXE and the imaging environment in `tftp_root`, `policy` imported into a SQLite
    directory, imgsrvd serving `image_root` and policyd pointing iPXE at it. tls: imgsrvd
    speaks TLS with a certificate `preboot-dir tls create` made, and policyd pins it on the
    kernel line (ImagingServerCertificate). proxy_extra: more proxydhcpd keys;
    site_next_server: see netlab.build_proxy_lab."""
    netlab.stage_ipxe_binaries(tftp_root)
    stage_imaging_env(imaging_env, tftp_root)
    setup = netlab.build_proxy_lab(lab, "flat", tftp_root, {
        "IPXEScriptURL": f"http://{{server}}:{POLICY_PORT}/boot.ipxe", **(proxy_extra or {})},
        site_next_server=site_next_server)
    url = f"sqlite:///{lab.workdir}/directory.db"
    policy_file = lab.workdir / "site-policy.conf"
    policy_file.write_text(policy)
    preboot_dir(setup.vm_ns, url, "import", str(policy_file))
    extra, pinned, pin = dict(imgsrvd_extra or {}), {}, None
    if tls:
        cert, key, pin = make_tls_pair(lab, setup.server_ip)
        extra.update(TLSCertificate=cert, TLSKey=key)
        pinned = {"ImagingServerCertificate": cert}
    imgsrvd = start_imgsrvd(lab, setup.vm_ns, setup.server_ip, image_root, url, extra=extra)
    # quiet: the kernel's messages over an emulated UART cost seconds; panic=-1: a failing
    # /init reboots, which -no-reboot turns into a qemu exit instead of a hang
    # iPXE fetches linux and initrd from policyd's /boot/ over HTTP (the default URLs)
    policyd = netlab.start_preboot_daemon(lab, setup.vm_ns, "prebootpolicyd", {
        "IPAddress": setup.server_ip, "Port": POLICY_PORT, "Directory": url,
        "BootFilesRoot": str(tftp_root), "KernelArgs": "console=ttyS0 quiet panic=-1",
        **pinned})
    return ImagingStack(setup, imgsrvd, policyd, url, pin)


SECURE_BOOT_CACHE = Path(os.environ.get("PREBOOT_SB_CACHE", "/var/cache/preboot/secure-boot"))
SECURE_BOOT_FILES = {       # name in the TFTP root: (Debian package, file in it)
    "shimx64.efi": ("shim-signed", "usr/lib/shim/shimx64.efi.signed"),
    "grubx64.efi": ("grub-efi-amd64-signed",
                    "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
}


DEBIAN_MIRROR = "http://deb.debian.org/debian"


def stage_secure_boot_chain(tftp_root: Path, grub_release: str | None = None) -> None:
    """shim (signed by Microsoft's UEFI CA) and Debian's signed network GRUB, as the names
    shim asks for, into `tftp_root`. The packages are downloaded and unpacked into a cache,
    never installed (their scripts would touch this host's EFI system partition): from this
    host's apt sources, or GRUB from another Debian release's index (`grub_release`, e.g.
    "trixie": its GRUB 2.12 reads the proxyDHCP offer, bookworm's 2.06 does not)."""
    for name, (package, member) in SECURE_BOOT_FILES.items():
        release = grub_release if package == "grub-efi-amd64-signed" else None
        unpacked = SECURE_BOOT_CACHE / f"{package}-{release or 'host'}"
        if not (unpacked / member).is_file():
            debs = SECURE_BOOT_CACHE / "debs"
            debs.mkdir(parents=True, exist_ok=True)
            deb = (_download_from_release(package, release, debs) if release else None)
            if deb is None:
                run_checked(["apt-get", "download", package], 300, cwd=debs)
                deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
            run_checked(["dpkg-deb", "-x", str(deb), str(unpacked)], 120)
        shutil.copyfile(unpacked / member, tftp_root / name)


def _download_from_release(package: str, release: str, folder: Path) -> Path:
    """The current .deb of `package` in Debian `release` (main, amd64), by its Packages index,
    checked against the index's SHA-256."""
    import hashlib
    import lzma
    import urllib.request
    index_url = f"{DEBIAN_MIRROR}/dists/{release}/main/binary-amd64/Packages.xz"
    with urllib.request.urlopen(index_url, timeout=120) as answer:
        index = lzma.decompress(answer.read()).decode("utf-8", "replace")
    for stanza in index.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package:
            break
    else:
        raise RuntimeError(f"{package} is not in {index_url}")
    target = folder / Path(fields["Filename"]).name
    if not target.exists():
        with urllib.request.urlopen(f"{DEBIAN_MIRROR}/{fields['Filename']}",
                                    timeout=300) as answer:
            data = answer.read()
        if hashlib.sha256(data).hexdigest() != fields["SHA256"]:
            raise RuntimeError(f"{target.name}: SHA-256 differs from {index_url}")
        target.write_bytes(data)
    return target


def imaging_vm(mac: str, name: str, smbios: str, disk: Path, firmware: netlab.Firmware = "bios",
               tap: str = "tap0", sector_size: int = 512, console: bool = False) -> netlab.VmSpec:
    """A VM for the imaging environment: virtio NIC (BIOS: qemu's iPXE ROM; UEFI: OVMF's own
    PXE client), 512 MiB, the SMBIOS the policy matches, `disk` as its virtio disk (with
    `sector_size`-byte logical sectors when not 512)."""
    drive: tuple[str, ...] = ("-drive", f"file={disk},if=virtio,format=raw")
    if sector_size != 512:       # the same virtio disk, telling the guest its logical sectors
        drive = ("-drive", f"file={disk},if=none,id=disk0,format=raw",
                 "-device", f"virtio-blk-pci,drive=disk0,logical_block_size={sector_size},"
                            f"physical_block_size={sector_size}")
    return netlab.VmSpec(firmware, nic="virtio-net-pci", nic_rom=firmware == "bios", mac=mac,
                         tap=tap, name=name, memory_mb=512, console=console,
                         extra=("-smbios", smbios, *drive))


def make_tls_pair(lab: netlab.Lab, name: str) -> tuple[Path, Path, str]:
    """A self-signed pair for the imaging server, made by `preboot-dir tls create` (openssl):
    (certificate, key, pin)."""
    cert, key = lab.workdir / "tls" / "server.crt", lab.workdir / "tls" / "server.key"
    run_checked([sys.executable, "-m", "common.dircli", "tls", "create", "--cert", str(cert),
                 "--key", str(key), "--name", name, "--force"], 60,
                env=dict(os.environ, PYTHONPATH=str(netlab.REPO_ROOT)))
    sys.path.insert(0, str(netlab.REPO_ROOT))
    from common.tlspin import pem_fingerprint
    return cert, key, pem_fingerprint(str(cert))


def results(lab: netlab.Lab) -> list:
    """The entries of imgsrvd's results log (empty if it has none yet)."""
    sys.path.insert(0, str(netlab.REPO_ROOT))
    from imgsrvd.resultslog import read_entries

    path = lab.workdir / "imgsrvd-results.xml"
    return list(read_entries(path)) if path.exists() else []


# ------------------------------------------------------------------------------ VMs


def wait_for_exit(vm: netlab.Vm, timeout: float) -> int | None:
    """Wait up to `timeout` s for qemu to exit by itself (the guest powered off); its status,
    or None if it still runs."""
    try:
        return vm.proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
