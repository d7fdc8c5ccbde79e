"""What a machine is, as far as policy is concerned: the facts iPXE (and later `img info`)
reports, normalised once so rules and the directory compare like with like.

MAC addresses are kept as 12 upper-case hex digits without separators, the form the original's
rules use (00C04FDC2AB5); every other spelling (colons, hyphens, dots, lower case) is accepted on
input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

_MAC_SEPARATORS = re.compile(r"[:\-.\s]")
_MAC_DIGITS = re.compile(r"[0-9A-F]{12}")


class AttributeKind(Enum):
    STRING = "string"   # compared case-insensitively: SMBIOS strings vary in case between models
    NUMBER = "number"   # whole megabytes (RAM, disk size)
    MAC = "mac"         # 12 hex digits
    IP = "ip"           # dotted IPv4 (or IPv6) address


def normalize_mac(text: str) -> str | None:
    """'00:c0:4f:dc:2a:b5', '00-C0-4F-DC-2A-B5', '00c0.4fdc.2ab5' -> '00C04FDC2AB5'; None if
    the text is not a MAC address."""
    if not text.isascii():   # "ﬀ".upper() is "FF": only ASCII spellings count
        return None
    digits = _MAC_SEPARATORS.sub("", text).upper()
    return digits if _MAC_DIGITS.fullmatch(digits) else None


@dataclass(frozen=True)
class MachineFacts:
    """One machine's attributes. None means "not reported": a rule on it does not match."""

    mac: str | None = None            # normalised, see normalize_mac
    uuid: str | None = None           # SMBIOS system UUID
    ip: str | None = None
    hostname: str | None = None
    manufacturer: str | None = None   # SMBIOS type 1
    product: str | None = None
    serial: str | None = None
    asset_tag: str | None = None      # SMBIOS type 3 asset tag
    platform: str | None = None       # iPXE ${platform}: pcbios or efi
    arch: str | None = None           # iPXE ${buildarch}: i386, x86_64, arm64
    ram_mb: int | None = None
    disk_mb: int | None = None        # size of the first (imaged) disk
    base_image: str | None = None     # the base image already on the disk, as the engine reports

    def describe(self) -> str:
        known = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if getattr(self, f.name) is not None]
        return " ".join(known) or "(nothing known)"


ATTRIBUTE_KINDS: dict[str, AttributeKind] = {
    "mac": AttributeKind.MAC,
    "uuid": AttributeKind.STRING,
    "ip": AttributeKind.IP,
    "hostname": AttributeKind.STRING,
    "manufacturer": AttributeKind.STRING,
    "product": AttributeKind.STRING,
    "serial": AttributeKind.STRING,
    "asset_tag": AttributeKind.STRING,
    "platform": AttributeKind.STRING,
    "arch": AttributeKind.STRING,
    "ram_mb": AttributeKind.NUMBER,
    "disk_mb": AttributeKind.NUMBER,
    "base_image": AttributeKind.STRING,
}
assert set(ATTRIBUTE_KINDS) == {f.name for f in fields(MachineFacts)}


def facts_from_strings(values: dict[str, str]) -> tuple[MachineFacts, list[str]]:
    """Build facts from text values (an HTTP query, a CLI). Returns the facts and a list of
    problems ("ram_mb: 'lots' is not a whole number"); an empty string counts as unknown."""
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        kind = ATTRIBUTE_KINDS.get(name)
        if kind is None:
            problems.append(f"{name}: not a machine attribute")
            continue
        text = raw.strip()
        if not text:
            continue
        if kind is AttributeKind.MAC:
            mac = normalize_mac(text)
            if mac is None:
                problems.append(f"{name}: '{text}' is not a MAC address")
            kwargs[name] = mac
        elif kind is AttributeKind.NUMBER:
            if not (text.isascii() and text.isdigit()):   # "²".isdigit() is True
                problems.append(f"{name}: '{text}' is not a whole number")
                continue
            kwargs[name] = int(text)
        elif kind is AttributeKind.IP:
            try:
                kwargs[name] = str(ipaddress.ip_address(text))
            except ValueError:
                problems.append(f"{name}: '{text}' is not an IP address")
        else:
            kwargs[name] = text
    return MachineFacts(**kwargs), problems
