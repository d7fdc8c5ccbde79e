"""Applying a machine's identity to an offline Windows installation: the computer name and the
TCP/IP settings, written into its SYSTEM registry hive (Windows/System32/config/SYSTEM on the
NTFS volume, mounted by ntfs-3g) with libhivex (img/hive.py). docs/identity.md, "Applying an
identity after a restore", lists every value.

Which control set: the ones Select\\Current and Select\\Default name (usually both
ControlSet001); Windows copies the current one to CurrentControlSet at boot.

Which interfaces: the interface keys under Tcpip\\Parameters\\Interfaces whose adapter is
hardware (Control\\Network\\{4D36E972-...}\\{GUID}\\Connection\\PnPInstanceId starts with PCI\\,
USB\\ or VMBUS\\); when the hive names no hardware adapter, every interface key. Static settings
go to the first of them (name order) only, so two adapters never get one address; DHCP to all.

The workgroup is not applied: Windows keeps it in the SECURITY hive's LSA policy
(Policy\\PolPrDmN, a binary record beside the machine's domain SID), not in SYSTEM; the report
says so. Every key is checked before the first value is set, and the hive is written once at
the end: a hive without the expected keys is left as it was.
"""

from __future__ import annotations

import os

from common.identity import MachineIdentity

from .errors import IdentityError
from .hive import Hive, HiveError
from .regvalue import (REG_DWORD, REG_MULTI_SZ, REG_SZ, encode_dword, encode_multi_sz,
                       encode_sz)

HIVE_PATH = ("Windows", "System32", "config", "SYSTEM")
NETWORK_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"
HARDWARE_BUSES = ("PCI\\", "USB\\", "VMBUS\\")
SZ, MULTI, DWORD = REG_SZ, REG_MULTI_SZ, REG_DWORD


def find_hive(root: str) -> str | None:
    """The SYSTEM hive under a mounted NTFS root, matching names without case (ntfs-3g
    matches them exactly); None when there is none."""
    path = root
    for name in HIVE_PATH:
        try:
            entries = os.listdir(path)
        except OSError:
            return None
        match = next((e for e in entries if e.lower() == name.lower()), None)
        if match is None:
            return None
        path = os.path.join(path, match)
    return path if os.path.isfile(path) else None


def apply_windows(root: str, identity: MachineIdentity) -> list[str]:
    """Apply identity to the Windows under root; the lines saying what was set. Raises
    IdentityError (nothing written) when the hive is not as Windows makes it."""
    path = find_hive(root)
    if path is None:
        raise IdentityError(f"no {'/'.join(HIVE_PATH)} under {root}")
    shown = "/".join(HIVE_PATH)
    try:
        with Hive(path, writable=True) as hive:
            lines = []
            for control_set in _control_sets(hive, shown):
                lines += _apply_control_set(hive, control_set, identity, shown)
            hive.commit()
    except HiveError as exc:
        raise IdentityError(f"{shown}: {exc}") from None
    if identity.workgroup:
        lines.append(f"workgroup {identity.workgroup} NOT applied: Windows keeps it in the "
                     "SECURITY hive's LSA policy, which img does not edit")
    return lines


def _control_sets(hive: Hive, shown: str) -> list[str]:
    """ControlSet00N for Select's Current and Default values (one name when they agree)."""
    select = hive.key(("Select",))
    if select is None:
        raise IdentityError(f"{shown} has no Select key: not a Windows SYSTEM hive")
    names = []
    for value in ("Current", "Default"):
        number = hive.value(select, value)
        if not isinstance(number, int) or not 1 <= number <= 999:
            raise IdentityError(f"{shown}: Select\\{value} is {number!r}, not a control set "
                                "number")
        name = f"ControlSet{number:03d}"
        if name not in names:
            names.append(name)
    return names


def _need(hive: Hive, path: tuple[str, ...], shown: str) -> int:
    node = hive.key(path)
    if node is None:
        key = "\\".join(path)
        raise IdentityError(f"{shown} has no key {key}; the identity was not "
                            "applied (the hive was left as it was)")
    return node


def _apply_control_set(hive: Hive, control_set: str, identity: MachineIdentity, shown: str
                       ) -> list[str]:
    computer = _need(hive, (control_set, "Control", "ComputerName", "ComputerName"), shown)
    tcpip = (control_set, "Services", "Tcpip", "Parameters")
    parameters = _need(hive, tcpip, shown)
    interfaces = _chosen_interfaces(hive, control_set, _need(hive, tcpip + ("Interfaces",),
                                                             shown))
    suffix = identity.dns_suffix.rstrip(".")
    _set(hive, computer, "ComputerName", SZ, identity.netbios_name)
    for name, text in (("Hostname", identity.name), ("NV Hostname", identity.name),
                       ("Domain", suffix), ("NV Domain", suffix), ("SearchList", suffix)):
        _set(hive, parameters, name, SZ, text)
    lines = [f"{control_set}: computer name {identity.netbios_name}, host name {identity.name}"
             + (f", DNS suffix {suffix}" if suffix else "")]
    if not interfaces:
        lines.append(f"{control_set}: no network interface keys: TCP/IP settings not applied")
    for index, (guid, node) in enumerate(interfaces):
        if identity.ip is not None and index > 0:
            lines.append(f"{control_set}: interface {guid} left as it was (the static "
                         "address goes to one interface)")
            continue
        lines.append(f"{control_set}: interface {guid}: {_apply_interface(hive, node, identity)}")
    return lines


def _chosen_interfaces(hive: Hive, control_set: str, interfaces: int) -> list[tuple[str, int]]:
    """The interface keys to configure (module docstring), in name order."""
    every = sorted((name, node) for name, node in hive.children(interfaces)
                   if name.startswith("{"))
    hardware = [(name, node) for name, node in every
                if _is_hardware(hive, control_set, name)]
    return hardware or every


def _is_hardware(hive: Hive, control_set: str, guid: str) -> bool:
    connection = hive.key((control_set, "Control", "Network", NETWORK_CLASS, guid,
                           "Connection"))
    if connection is None:
        return False
    instance = hive.value(connection, "PnPInstanceId")
    return isinstance(instance, str) and instance.upper().startswith(HARDWARE_BUSES)


def _apply_interface(hive: Hive, node: int, identity: MachineIdentity) -> str:
    """Set one interface key's values; what was set, for the report."""
    ip = identity.ip
    suffix = identity.dns_suffix.rstrip(".")
    _set(hive, node, "Domain", SZ, suffix)
    if ip is None:
        _set(hive, node, "EnableDHCP", DWORD, 1)
        _set(hive, node, "IPAddress", MULTI, ["0.0.0.0"])
        _set(hive, node, "SubnetMask", MULTI, ["0.0.0.0"])
        _set(hive, node, "DefaultGateway", MULTI, [])
        _set(hive, node, "NameServer", SZ, "")
        return "DHCP"
    _set(hive, node, "EnableDHCP", DWORD, 0)
    _set(hive, node, "IPAddress", MULTI, [ip.address])
    _set(hive, node, "SubnetMask", MULTI, [ip.netmask])
    _set(hive, node, "DefaultGateway", MULTI, [ip.gateway] if ip.gateway else [])
    _set(hive, node, "DefaultGatewayMetric", MULTI, ["0"] if ip.gateway else [])
    _set(hive, node, "NameServer", SZ, ",".join(ip.dns_servers))
    said = f"{ip.address} mask {ip.netmask}"
    if ip.gateway:
        said += f" gateway {ip.gateway}"
    if ip.dns_servers:
        said += " DNS " + ",".join(ip.dns_servers)
    return said


def _set(hive: Hive, node: int, name: str, kind: int, value: object) -> None:
    if kind == SZ:
        data = encode_sz(str(value))
    elif kind == DWORD:
        data = encode_dword(int(value))         # type: ignore[call-overload]
    else:
        data = encode_multi_sz(list(value))     # type: ignore[call-overload]
    hive.set_value(node, name, kind, data)
