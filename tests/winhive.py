"""A registry hive shaped like Windows' SYSTEM hive, made for the tests (docs/identity.md,
"The test hive"): an empty hive file written here (a regf header and one 4 KiB hbin holding
the root key and its security cell: the layout hivex and Windows read), then filled with
libhivex (img/hive.py) with the keys and values img's identity code reads and writes.
"""

from __future__ import annotations

import struct

from img.hive import Hive
from img.regvalue import (REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_SZ, encode_dword,
                          encode_multi_sz, encode_sz)

PAGE = 0x1000
HARDWARE_NIC = "{1A2B3C4D-0000-4000-8000-000000000001}"
VIRTUAL_NIC = "{1A2B3C4D-0000-4000-8000-000000000002}"
NETWORK_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"


def empty_hive(name: str = "SYSTEM") -> bytes:
    """A hive holding only its root key (what hivex needs to open it for writing)."""
    root_off = 0x20                                    # cell offsets count from the first hbin
    root_name = b"ROOT"

    def nk(sk_off: int) -> bytes:
        return struct.pack("<2sHqIIIIIIIIIIHHIIIIHH", b"nk", 0x2C, 0, 0, 0xFFFFFFFF, 0, 0,
                           0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, sk_off, 0xFFFFFFFF, 0, 0,
                           0, 0, 0, 0, len(root_name), 0) + root_name

    nk_cell = (4 + len(nk(0)) + 7) // 8 * 8
    sk_off = root_off + nk_cell
    # a self-relative security descriptor with a NULL DACL
    descriptor = struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 0)
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_off, sk_off, 1, len(descriptor)) + descriptor
    sk_cell = (4 + len(sk) + 7) // 8 * 8
    hbin = bytearray(PAGE)
    struct.pack_into("<4sII", hbin, 0, b"hbin", 0, PAGE)
    for offset, size, body in ((root_off, nk_cell, nk(sk_off)), (sk_off, sk_cell, sk)):
        struct.pack_into("<i", hbin, offset, -size)
        hbin[offset + 4:offset + 4 + len(body)] = body
    free = sk_off + sk_cell
    struct.pack_into("<i", hbin, free, PAGE - free)          # the rest: one free cell
    head = bytearray(PAGE)
    struct.pack_into("<4sIIqIIIIIII", head, 0, b"regf", 1, 1, 0, 1, 3, 0, 1, root_off, PAGE, 1)
    label = name.encode("utf-16-le")[:64]
    head[0x30:0x30 + len(label)] = label
    checksum = 0
    for (word,) in struct.iter_unpack("<I", head[:0x1FC]):
        checksum ^= word
    struct.pack_into("<I", head, 0x1FC, checksum)
    return bytes(head + hbin)


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
