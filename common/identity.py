"""A machine's identity: what a reimaged machine must keep and a new one gets from the policy
(issue 17, docs/identity.md): its computer name, DNS suffix, workgroup or domain, and its IP
settings (static, or DHCP when `ip` is None).

This is the one shape every part speaks: the image-safe data on the disk (img/isd.py), the
work query and answer of the imaging protocol (common.imaging.protocol), the policy's naming
rules and address pools (common.policy) and the code that applies an identity to a restored
system (img). Values are validated once, here: a MachineIdentity that exists is well formed.
Standard library only (the foundation).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

MAX_NAME = 63            # a DNS label (RFC 1123); Windows' NetBIOS name is the first 15
NETBIOS_NAME = 15
MAX_DNS_SUFFIX = 253     # a DNS name (RFC 1035 section 2.3.4)
MAX_WORKGROUP = 15       # a NetBIOS workgroup or domain name
MAX_DNS_SERVERS = 3      # what resolv.conf and the Windows dialog take

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# NetBIOS names exclude \ / : * ? " < > | and a leading period; we allow the safe subset.
_WORKGROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


class BadIdentity(ValueError):
    """An identity value that is not well formed; the text names the field."""


@dataclass(frozen=True)
class IpSettings:
    """Static IPv4 settings. `prefix_len` is the mask's length (24 for 255.255.255.0)."""

    address: str
    prefix_len: int
    gateway: str = ""                        # "" when there is none
    dns_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _ipv4(self.address, "ip.address")
        if isinstance(self.prefix_len, bool) or not isinstance(self.prefix_len, int) \
                or not 1 <= self.prefix_len <= 32:
            raise BadIdentity("ip.prefix_len: a whole number from 1 to 32")
        if self.gateway:
            _ipv4(self.gateway, "ip.gateway")
            network = ipaddress.ip_network(f"{self.address}/{self.prefix_len}", strict=False)
            if ipaddress.ip_address(self.gateway) not in network:
                raise BadIdentity(f"ip.gateway: {self.gateway} is not in {network}")
        if len(self.dns_servers) > MAX_DNS_SERVERS:
            raise BadIdentity(f"ip.dns_servers: at most {MAX_DNS_SERVERS}")
        for server in self.dns_servers:
            _ipv4(server, "ip.dns_servers")

    @property
    def netmask(self) -> str:
        """255.255.255.0 for prefix_len 24 (Windows and wicked's ifcfg want the mask)."""
        return str(ipaddress.ip_network(f"0.0.0.0/{self.prefix_len}").netmask)


@dataclass(frozen=True)
class MachineIdentity:
    """Who a machine is. `ip` None means DHCP."""

    name: str
    dns_suffix: str = ""
    workgroup: str = ""
    ip: IpSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LABEL.fullmatch(self.name) \
                or self.name.isdigit():
            raise BadIdentity(f"name: {self.name!r} is not a host name (letters, digits and "
                              f"hyphens, 1 to {MAX_NAME}, not all digits)")
        if self.dns_suffix:
            labels = self.dns_suffix.rstrip(".").split(".")
            if len(self.dns_suffix) > MAX_DNS_SUFFIX or \
                    not all(_LABEL.fullmatch(label) for label in labels):
                raise BadIdentity(f"dns_suffix: {self.dns_suffix!r} is not a DNS name")
        if self.workgroup and not _WORKGROUP.fullmatch(self.workgroup):
            raise BadIdentity(f"workgroup: {self.workgroup!r} is not a workgroup name "
                              f"(1 to {MAX_WORKGROUP} letters, digits, '_', '.', '-')")

    @property
    def netbios_name(self) -> str:
        """The Windows computer name: the host name's first 15 characters, upper case."""
        return self.name[:NETBIOS_NAME].upper()

    def describe(self) -> str:
        """One line for logs and the results log: name=pc-01 dns_suffix=lab ip=10.0.0.5/24."""
        parts = [f"name={self.name}"]
        if self.dns_suffix:
            parts.append(f"dns_suffix={self.dns_suffix}")
        if self.workgroup:
            parts.append(f"workgroup={self.workgroup}")
        if self.ip is None:
            parts.append("ip=dhcp")
        else:
            parts.append(f"ip={self.ip.address}/{self.ip.prefix_len}")
            if self.ip.gateway:
                parts.append(f"gateway={self.ip.gateway}")
            if self.ip.dns_servers:
                parts.append("dns=" + ",".join(self.ip.dns_servers))
        return " ".join(parts)


def _ipv4(text: Any, field: str) -> None:
    if not isinstance(text, str):
        raise BadIdentity(f"{field}: an IPv4 address as text")
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise BadIdentity(f"{field}: {text!r} is not an IPv4 address") from None


def identity_to_wire(identity: MachineIdentity) -> dict[str, Any]:
    """The JSON object the protocol and the image-safe data carry (docs/identity.md)."""
    ip = identity.ip
    return {
        "name": identity.name,
        "dns_suffix": identity.dns_suffix,
        "workgroup": identity.workgroup,
        "ip": None if ip is None else {
            "address": ip.address, "prefix_len": ip.prefix_len, "gateway": ip.gateway,
            "dns_servers": list(ip.dns_servers)},
    }


def identity_from_wire(value: Any) -> MachineIdentity:
    """The inverse of identity_to_wire; BadIdentity naming the field for anything else.
    Unknown fields are refused, so a typo is not silently lost."""
    if not isinstance(value, dict):
        raise BadIdentity("identity: must be a JSON object")
    unknown = sorted(set(value) - {"name", "dns_suffix", "workgroup", "ip"})
    if unknown:
        raise BadIdentity(f"{unknown[0]}: not an identity field")
    texts = {}
    for name in ("name", "dns_suffix", "workgroup"):
        text = value.get(name, "")
        if not isinstance(text, str):
            raise BadIdentity(f"{name}: must be a string")
        texts[name] = text
    return MachineIdentity(ip=_ip_from_wire(value.get("ip")), **texts)


def _ip_from_wire(value: Any) -> IpSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadIdentity("ip: a JSON object, or null for DHCP")
    unknown = sorted(set(value) - {"address", "prefix_len", "gateway", "dns_servers"})
    if unknown:
        raise BadIdentity(f"ip.{unknown[0]}: not an IP settings field")
    servers = value.get("dns_servers", [])
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise BadIdentity("ip.dns_servers: a list of IPv4 addresses")
    gateway = value.get("gateway", "")
    if not isinstance(gateway, str):
        raise BadIdentity("ip.gateway: an IPv4 address as text, or empty")
    return IpSettings(value.get("address"), value.get("prefix_len"), gateway, tuple(servers))


__all__ = ["BadIdentity", "IpSettings", "MachineIdentity", "identity_from_wire",
           "identity_to_wire"]
