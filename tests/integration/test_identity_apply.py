"""Applying an identity to restored systems on real filesystems (issue 17): disk images with an
ext4 Linux root shaped like a NetworkManager, a systemd-networkd and a SUSE wicked system, and
an NTFS volume holding a Windows SYSTEM hive (tests/winhive.py), each on a partition of an MBR
disk image. `img identity apply` runs on the disk (loop devices, the kernel's ext4, ntfs-3g);
the files are then read back from the partition with debugfs and ntfscat (no mount), the hive
with hivexget (libhivex-bin's own reader), and the filesystems checked with e2fsck -fn and
ntfsfix -n. Unusual layouts (no /etc, an immutable file, a hive without the keys) each get one
clear line and leave the disk clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.winhive import HARDWARE_NIC, VIRTUAL_NIC, windows_system_hive
from tests.support import disk_tool_marks

TOOLS = ("sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "mkntfs", "ntfs-3g", "ntfscat", "ntfsfix",
         "hivexget", "losetup", "mount", "umount", "chattr")
pytestmark = disk_tool_marks(TOOLS, fuse=True)

MiB = 1 << 20
PART_MiB = 16
REPO = Path(__file__).resolve().parents[2]
STATIC = ["--name", "lab-pc-07", "--dns-suffix", "lab.example.org", "--ip", "10.20.0.57/24",
          "--gateway", "10.20.0.1", "--dns", "10.20.0.2,10.20.0.3"]
DHCP = ["--name", "lab-pc-08", "--dns-suffix", "lab.example.org"]


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=120,
                          **kwargs)


def img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "img", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("->"):
            path.symlink_to(text[2:])
        else:
            path.write_text(text)


def ext4_from(tree: Path, out: Path) -> Path:
    run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(out), f"{PART_MiB}M")
    return out


def ntfs_with_hive(tmp: Path, out: Path, **hive_options) -> Path:
    with open(out, "wb") as handle:
        handle.truncate(PART_MiB * MiB)
    run("mkntfs", "-q", "-F", "-Q", str(out))
    hive = tmp / "SYSTEM"
    windows_system_hive(str(hive), **hive_options)
    where = tmp / "ntfs-mount"
    where.mkdir()
    run("ntfs-3g", str(out), str(where))
    try:
        (where / "Windows/System32/config").mkdir(parents=True)
        shutil.copy(hive, where / "Windows/System32/config/SYSTEM")
    finally:
        run("umount", str(where))
    return out


def disk_of(tmp: Path, partitions: list[tuple[Path, str]]) -> Path:
    """An MBR disk image with each file as a partition (sfdisk type: 83 Linux, 7 NTFS)."""
    disk = tmp / "disk.img"
    size = MiB + len(partitions) * PART_MiB * MiB + MiB
    with open(disk, "wb") as handle:
        handle.truncate(size)
    script = "label: dos\n" + "".join(
        f"start={2048 + i * PART_MiB * 2048}, size={PART_MiB * 2048}, type={kind}\n"
        for i, (_, kind) in enumerate(partitions))
    run("sfdisk", "-q", str(disk), input=script)
    with open(disk, "r+b") as out:
        for i, (path, _) in enumerate(partitions):
            out.seek(MiB + i * PART_MiB * MiB)
            out.write(path.read_bytes())
    return disk


def partition_file(disk: Path, number: int, out: Path) -> Path:
    with open(disk, "rb") as handle:
        handle.seek(MiB + (number - 1) * PART_MiB * MiB)
        out.write_bytes(handle.read(PART_MiB * MiB))
    return out


def ext4_cat(part: Path, path: str) -> str:
    return run("debugfs", "-R", f"cat {path}", str(part)).stdout


def ext4_mode(part: Path, path: str) -> int:
    out = run("debugfs", "-R", f"stat {path}", str(part)).stdout
    mode = out.split("Mode:", 1)[1].split()[0]
    return int(mode, 8)


def check_ext4(part: Path) -> None:
    done = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def hive_of(tmp: Path, part: Path) -> Path:
    hive = tmp / "SYSTEM.read"
    hive.write_bytes(subprocess.run(["ntfscat", str(part), "Windows/System32/config/SYSTEM"],
                                    check=True, capture_output=True, timeout=60).stdout)
    return hive


def hivexget(hive: Path, key: str, value: str) -> str:
    return run("hivexget", str(hive), key, value).stdout.rstrip("\n")


def check_ntfs(part: Path) -> None:
    done = subprocess.run(["ntfsfix", "-n", str(part)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


OS_RELEASE = {"etc/os-release": 'NAME="Debian GNU/Linux"\nID=debian\n'}
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tgolden-image\n::1\tlocalhost ip6-localhost\n"


def test_networkmanager_static(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {**OS_RELEASE, "etc/hostname": "golden-image\n", "etc/hosts": HOSTS,
                      "etc/NetworkManager/NetworkManager.conf": "[main]\nplugins=keyfile\n",
                      "etc/NetworkManager/system-connections/Wired.nmconnection":
                          "[connection]\nid=Wired\ntype=ethernet\n",
                      "etc/systemd/system/multi-user.target.wants/NetworkManager.service":
                          "->/lib/systemd/system/NetworkManager.service"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    done = img("identity", "apply", "--disk", str(disk), *STATIC)
    assert done.returncode == 0, done.stderr
    assert "NetworkManager.service is enabled" in done.stdout
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert ext4_cat(part, "/etc/hostname") == "lab-pc-07\n"
    hosts = ext4_cat(part, "/etc/hosts").splitlines()
    assert hosts == ["127.0.0.1\tlocalhost", "127.0.1.1\tlab-pc-07.lab.example.org lab-pc-07",
                     "::1\tlocalhost ip6-localhost"]
    keyfile = "/etc/NetworkManager/system-connections/preboot-identity.nmconnection"
    text = ext4_cat(part, keyfile)
    assert "method=manual\naddress1=10.20.0.57/24,10.20.0.1\ndns=10.20.0.2;10.20.0.3;\n" \
           "dns-search=lab.example.org;\n" in text
    assert "type=ethernet" in text and "autoconnect-priority=100" in text
    assert ext4_mode(part, keyfile) & 0o7777 == 0o600
    assert "id=Wired" in ext4_cat(part, "/etc/NetworkManager/system-connections/Wired.nmconnection")
    check_ext4(part)


def test_networkd_dhcp(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {"usr/lib/os-release": "ID=arch\n", "etc/hostname": "golden\n",
                      "etc/systemd/network/20-wired.network": "[Match]\nName=en*\n[Network]\n"
                                                              "Address=10.9.9.9/24\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    done = img("identity", "apply", "--disk", str(disk), *DHCP)
    assert done.returncode == 0, done.stderr
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert ext4_cat(part, "/etc/hostname") == "lab-pc-08\n"
    # no /etc/hosts before: one is written with the machine's line
    assert "127.0.1.1\tlab-pc-08.lab.example.org lab-pc-08" in ext4_cat(part, "/etc/hosts")
    network = ext4_cat(part, "/etc/systemd/network/00-preboot-identity.network")
    assert "[Match]\nType=ether\n" in network
    assert "DHCP=ipv4\nDomains=lab.example.org\n" in network
    assert "Address=" not in network
    check_ext4(part)


def test_wicked_static_suse(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {"etc/os-release": 'NAME="openSUSE Leap"\n', "etc/HOSTNAME": "golden.old\n",
                      "etc/hosts": "127.0.0.1\tlocalhost\n",
                      "etc/sysconfig/network/ifcfg-lo": "STARTMODE='nfsroot'\nBOOTPROTO='static'\n",
                      "etc/sysconfig/network/ifcfg-eth0":
                          "# made by YaST\nBOOTPROTO='dhcp'\nSTARTMODE='auto'\nNAME='NIC'\n",
                      "etc/sysconfig/network/config":
                          "## DNS\nNETCONFIG_DNS_STATIC_SERVERS=\"\"\nNETCONFIG_DNS_POLICY='auto'\n",
                      "etc/sysconfig/network/routes": "default 192.168.1.1 - -\n10.1.0.0/16 10.20.0.9 - -\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    done = img("identity", "apply", "--disk", str(disk), *STATIC)
    assert done.returncode == 0, done.stderr
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert ext4_cat(part, "/etc/HOSTNAME") == "lab-pc-07.lab.example.org\n"
    assert ext4_cat(part, "/etc/hostname") == "lab-pc-07\n"
    ifcfg = ext4_cat(part, "/etc/sysconfig/network/ifcfg-eth0").splitlines()
    assert ifcfg == ["# made by YaST", "BOOTPROTO='static'", "STARTMODE='auto'", "NAME='NIC'",
                     "IPADDR='10.20.0.57/24'", "NETMASK='255.255.255.0'"]
    assert "BOOTPROTO='static'" in ext4_cat(part, "/etc/sysconfig/network/ifcfg-lo")  # untouched
    config = ext4_cat(part, "/etc/sysconfig/network/config")
    assert "NETCONFIG_DNS_STATIC_SERVERS='10.20.0.2 10.20.0.3'" in config
    assert "NETCONFIG_DNS_STATIC_SEARCHLIST='lab.example.org'" in config
    assert "NETCONFIG_DNS_POLICY='auto'" in config
    assert ext4_cat(part, "/etc/sysconfig/network/routes").splitlines() == [
        "10.1.0.0/16 10.20.0.9 - -", "default 10.20.0.1 - -"]
    check_ext4(part)


def test_windows_hive_static(tmp_path: Path) -> None:
    ntfs = ntfs_with_hive(tmp_path, tmp_path / "p1")
    disk = disk_of(tmp_path, [(ntfs, "7")])
    done = img("identity", "apply", "--disk", str(disk), *STATIC, "--workgroup", "LAB")
    assert done.returncode == 0, done.stderr
    assert "workgroup LAB NOT applied" in done.stdout
    part = partition_file(disk, 1, tmp_path / "p1.read")
    hive = hive_of(tmp_path, part)
    cs = r"\ControlSet001"
    assert hivexget(hive, cs + r"\Control\ComputerName\ComputerName", "ComputerName") == "LAB-PC-07"
    tcpip = cs + r"\Services\Tcpip\Parameters"
    for name, want in (("Hostname", "lab-pc-07"), ("NV Hostname", "lab-pc-07"),
                       ("Domain", "lab.example.org"), ("NV Domain", "lab.example.org"),
                       ("SearchList", "lab.example.org"),
                       ("DataBasePath", r"%SystemRoot%\System32\drivers\etc")):   # kept
        assert hivexget(hive, tcpip, name) == want, name
    nic = tcpip + "\\Interfaces\\" + HARDWARE_NIC
    assert hivexget(hive, nic, "EnableDHCP") == "0"
    assert hivexget(hive, nic, "IPAddress") == "10.20.0.57"
    assert hivexget(hive, nic, "SubnetMask") == "255.255.255.0"
    assert hivexget(hive, nic, "DefaultGateway") == "10.20.0.1"
    assert hivexget(hive, nic, "NameServer") == "10.20.0.2,10.20.0.3"
    assert hivexget(hive, nic, "Domain") == "lab.example.org"
    types = run("hivexget", str(hive), nic).stdout
    assert '"IPAddress"=hex(7):' in types and '"NameServer"="' in types
    assert '"EnableDHCP"=dword:00000000' in types
    virtual = tcpip + "\\Interfaces\\" + VIRTUAL_NIC
    assert hivexget(hive, virtual, "EnableDHCP") == "1"          # not a hardware adapter
    check_ntfs(part)


def test_dual_boot_dhcp(tmp_path: Path) -> None:
    """Windows and a NetworkManager Linux on one disk: both get the identity."""
    ntfs = ntfs_with_hive(tmp_path, tmp_path / "p1")
    tree = tmp_path / "root"
    write_tree(tree, {**OS_RELEASE, "etc/hostname": "golden\n",
                      "etc/NetworkManager/system-connections/a.nmconnection": "[connection]\n"})
    disk = disk_of(tmp_path, [(ntfs, "7"), (ext4_from(tree, tmp_path / "p2"), "83")])
    done = img("identity", "apply", "--disk", str(disk), *DHCP)
    assert done.returncode == 0, done.stderr
    assert "partition 1 (windows" in done.stdout and "partition 2 (linux" in done.stdout
    hive = hive_of(tmp_path, partition_file(disk, 1, tmp_path / "p1.read"))
    nic = r"\ControlSet001\Services\Tcpip\Parameters\Interfaces" + "\\" + HARDWARE_NIC
    assert hivexget(hive, nic, "EnableDHCP") == "1"
    assert hivexget(hive, nic, "IPAddress") == "0.0.0.0"
    part = partition_file(disk, 2, tmp_path / "p2.read")
    assert "method=auto\ndns-search=lab.example.org;" in ext4_cat(
        part, "/etc/NetworkManager/system-connections/preboot-identity.nmconnection")
    check_ext4(part)


# ------------------------------------------------------------------ unusual layouts

def _fails(disk: Path, *args: str) -> str:
    done = img("identity", "apply", "--disk", str(disk), *(args or DHCP))
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_no_etc_is_no_system(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {"home/user/notes.txt": "x\n", "os-release": "ID=debian\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    line = _fails(disk)
    assert "no installed Linux or Windows system found (partition 1: ext4, no system)" in line
    check_ext4(partition_file(disk, 1, tmp_path / "p1.read"))


def test_immutable_hostname(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {**OS_RELEASE, "etc/hostname": "golden\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    device = run("losetup", "--find", "--show", "--offset", str(MiB), str(disk)).stdout.strip()
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        run("mount", device, str(where))
        run("chattr", "+i", str(where / "etc/hostname"))
        run("umount", str(where))
    finally:
        run("losetup", "--detach", device)
    line = _fails(disk)
    assert "partition 1 (ext4): cannot write /etc/hostname: Operation not " \
           "permitted" in line
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert ext4_cat(part, "/etc/hostname") == "golden\n"
    check_ext4(part)


def test_etc_link_out_of_root(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {"etc": "->/tmp", "usr/lib/os-release": "ID=debian\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    line = _fails(disk)
    assert line == ("img: partition 1 (ext4): /etc leads out of the system's root (a symbolic "
                    "link); not followed")


def test_etc_systemd_link_out_of_root(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    write_tree(tree, {**OS_RELEASE, "etc/sysconfig": "->/etc",
                      "etc/hostname": "golden\n",
                      "etc/systemd/system/multi-user.target.wants/wicked.service": "->/x"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    line = _fails(disk)
    assert "/etc/sysconfig/network leads out of the system's root" in line
    assert not os.path.exists("/etc/sysconfig/network/ifcfg-eth0.img-identity")


def test_hive_without_keys(tmp_path: Path) -> None:
    ntfs = ntfs_with_hive(tmp_path, tmp_path / "p1", keys=False)
    disk = disk_of(tmp_path, [(ntfs, "7")])
    before = hive_of(tmp_path, partition_file(disk, 1, tmp_path / "p1.before")).read_bytes()
    line = _fails(disk)
    assert ("Windows/System32/config/SYSTEM has no key "
            r"ControlSet001\Control\ComputerName\ComputerName") in line
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert hive_of(tmp_path, part).read_bytes() == before
    check_ntfs(part)


def test_not_a_hive(tmp_path: Path) -> None:
    ntfs = ntfs_with_hive(tmp_path, tmp_path / "p1")
    where = tmp_path / "m2"
    where.mkdir()
    run("ntfs-3g", str(ntfs), str(where))
    (where / "Windows/System32/config/SYSTEM").write_bytes(b"regf" + b"\0" * 100)
    run("umount", str(where))
    disk = disk_of(tmp_path, [(ntfs, "7")])
    line = _fails(disk)
    assert "not a registry hive libhivex can open" in line


def test_bad_arguments(tmp_path: Path) -> None:
    done = img("identity", "apply", "--disk", str(tmp_path / "none"), "--name", "bad_name")
    assert done.returncode == 2 and "name:" in done.stderr and "Traceback" not in done.stderr
    done = img("identity", "apply", "--disk", str(tmp_path / "none"), "--name", "ok",
               "--gateway", "10.0.0.1")
    assert done.returncode == 2 and "--gateway" in done.stderr


# ------------------------------------------------------------------ img auto's step

def test_auto_identity_step(tmp_path: Path) -> None:
    """What img auto runs after a restore when the work answer carries an identity."""
    import argparse

    from img.auto import identity_step

    tree = tmp_path / "root"
    write_tree(tree, {**OS_RELEASE, "etc/hostname": "golden\n"})
    disk = disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")])
    args = argparse.Namespace(disk=str(disk), sector_size=None)
    assert identity_step(args, {"work": "restore"}) is None
    step = identity_step(args, {"identity": {"name": "pc-9", "ip": None},
                                "identity_source": "policy"})
    assert step is not None
    text = step()
    assert text.splitlines()[0] == "name=pc-9 ip=dhcp"
    assert "host name pc-9" in text
    assert ext4_cat(partition_file(disk, 1, tmp_path / "p1.read"), "/etc/hostname") == "pc-9\n"
    with pytest.raises(ValueError, match="name:"):
        identity_step(args, {"identity": {"name": "no_underscores"}})
