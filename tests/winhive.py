"""A registry hive shaped like Windows' SYSTEM hive, made for the tests (docs/identity.md,
"The test hive"): an empty hive file (img.hive.empty_hive: a regf header and one 4 KiB hbin
holding the root key and its security cell) filled with libhivex (img/hive.py) with the keys
and values img's identity code reads and writes.
"""

from __future__ import annotations

from img.hive import Hive, empty_hive
from img.regvalue import (REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_SZ, encode_dword,
                          encode_multi_sz, encode_sz)

HARDWARE_NIC = "{1A2B3C4D-0000-4000-8000-000000000001}"
VIRTUAL_NIC = "{1A2B3C4D-0000-4000-8000-000000000002}"
NETWORK_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"


def _set(hive: Hive, path: tuple[str, ...], values: dict[str, tuple[int, object]]) -> None:
    node = hive.ensure_key(path)
    for name, (kind, value) in values.items():
        data = {REG_SZ: encode_sz, REG_EXPAND_SZ: encode_sz, REG_DWORD: encode_dword,
                REG_MULTI_SZ: encode_multi_sz}[kind](value)      # type: ignore[operator]
        hive.set_value(node, name, kind, data)


def windows_system_hive(path: str, control_set: int = 1, keys: bool = True) -> None:
    """Write a SYSTEM hive at path: Select, and (keys) the ControlSet00N keys identity code
    uses, with an old identity, one hardware NIC and one virtual adapter."""
    with open(path, "wb") as handle:
        handle.write(empty_hive())
    cs = f"ControlSet{control_set:03d}"
    with Hive(path, writable=True) as hive:
        _set(hive, ("Select",), {"Current": (REG_DWORD, control_set),
                                 "Default": (REG_DWORD, control_set),
                                 "LastKnownGood": (REG_DWORD, control_set + 1)})
        if keys:
            _set(hive, (cs, "Control", "ComputerName", "ComputerName"),
                 {"ComputerName": (REG_SZ, "GOLDEN-IMAGE")})
            tcpip = (cs, "Services", "Tcpip", "Parameters")
            _set(hive, tcpip, {"Hostname": (REG_SZ, "golden-image"),
                               "NV Hostname": (REG_SZ, "golden-image"),
                               "Domain": (REG_SZ, ""), "NV Domain": (REG_SZ, ""),
                               "DataBasePath": (REG_EXPAND_SZ, r"%SystemRoot%\System32\drivers\etc")})
            for guid in (HARDWARE_NIC, VIRTUAL_NIC):
                _set(hive, tcpip + ("Interfaces", guid),
                     {"EnableDHCP": (REG_DWORD, 1), "Domain": (REG_SZ, ""),
                      "NameServer": (REG_SZ, "")})
            _set(hive, (cs, "Control", "Network", NETWORK_CLASS, HARDWARE_NIC, "Connection"),
                 {"Name": (REG_SZ, "Ethernet"),
                  "PnPInstanceId": (REG_SZ, r"PCI\VEN_8086&DEV_100E&SUBSYS_11001AF4&REV_03\3&1")})
            _set(hive, (cs, "Control", "Network", NETWORK_CLASS, VIRTUAL_NIC, "Connection"),
                 {"Name": (REG_SZ, "vEthernet"), "PnPInstanceId": (REG_SZ, r"ROOT\NET\0000")})
        hive.commit()
