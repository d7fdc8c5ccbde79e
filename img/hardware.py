"""What this machine is, as the imaging server's rules compare it (common/machine.py's
attributes): MAC, SMBIOS strings, RAM and the first disk's size, read from /sys and /proc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DMI = Path("/sys/class/dmi/id")


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _mac() -> str | None:
    """The first wired interface's MAC (the one that PXE-booted, in the imaging environment)."""
    base = Path("/sys/class/net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    for name in names:
        if name == "lo" or (base / name / "wireless").exists():
            continue
        mac = _read(base / name / "address")
        if mac and mac != "00:00:00:00:00:00":
            return mac.replace(":", "").upper()
    return None


def _ram_mb() -> int | None:
    text = _read(Path("/proc/meminfo"))
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def disks(base: Path = Path("/sys/block")) -> list[dict[str, Any]]:
    """The machine's disks (not loop, RAM, device-mapper or optical ones): name, size in MiB,
    logical sector size, model."""
    found = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return found
    for name in names:
        if name.startswith(("loop", "ram", "zram", "dm-", "sr", "fd")):
            continue
        # /sys/block/*/size counts 512-byte units whatever the disk's sectors (the kernel's
        # sector_t); the logical sector size the partition table counts in is told apart.
        sectors = _read(base / name / "size")
        logical = _read(base / name / "queue" / "logical_block_size")
        if sectors and sectors.isdigit() and int(sectors) > 0:
            found.append({"name": name, "size_mb": int(sectors) * 512 // (1 << 20),
                          "sector_size": int(logical) if logical and logical.isdigit() else 512,
                          "model": _read(base / name / "device" / "model") or ""})
    return found


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "mac": _mac(),
        "uuid": _read(DMI / "product_uuid"),
        "manufacturer": _read(DMI / "sys_vendor"),
        "product": _read(DMI / "product_name"),
        "serial": _read(DMI / "product_serial"),
        "asset_tag": _read(DMI / "chassis_asset_tag"),
        "platform": "efi" if Path("/sys/firmware/efi").exists() else "pcbios",
        "arch": os.uname().machine,
        "ram_mb": _ram_mb(),
        "hostname": os.uname().nodename,
    }
    found = disks()
    if found:
        facts["disk_mb"] = found[0]["size_mb"]
    facts["disks"] = found
    return {key: value for key, value in facts.items() if value not in (None, "")}
