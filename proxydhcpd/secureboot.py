"""Which UEFI x64 clients get the Secure Boot chain (shim -> signed GRUB) instead of iPXE
(docs/secure-boot.md, "Which clients boot shim").

A PXE request does not say whether the firmware has Secure Boot on (UEFI's PXE base code
sends only its architecture, RFC 4578 option 93), and shim + GRUB boot with it off too, but
GRUB lacks what iPXE has (HTTP, the proxy's offer: it takes its TFTP server only from the site
DHCP's next-server). So the administrator says which clients take the signed chain:

    SecureBootClients = all                              every UEFI x64 client
    SecureBootClients = 00:C0:4F:DC:2A:B5, 10.20.0.0/16  these MACs, and clients of that network

A network matches a relayed request by its relay agent's address (giaddr, RFC 2131 section
4.1: the client's segment) and a local one by the address of our interface it came in on.
Pure: settings in, a yes or no out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

ALL = "all"


@dataclass(frozen=True)
class SecureBootClients:
    everyone: bool = False
    macs: frozenset[bytes] = frozenset()
    networks: tuple[ipaddress.IPv4Network, ...] = ()

    @property
    def anyone(self) -> bool:
        return self.everyone or bool(self.macs) or bool(self.networks)

    def takes(self, mac: bytes, giaddr: str, server: str) -> bool:
        """Whether the client `mac`, relayed by `giaddr` ("0.0.0.0": not relayed) and heard on
        our address `server`, boots the Secure Boot chain."""
        if self.everyone or mac in self.macs:
            return True
        if not self.networks:
            return False
        where = giaddr if giaddr and giaddr != "0.0.0.0" else server
        try:
            address = ipaddress.IPv4Address(where)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def parse_clients(values: list[str], parse_mac) -> SecureBootClients | str:
    """SecureBootClients from the config's list; a str is the reason one entry is wrong."""
    everyone, macs, networks = False, set(), []
    for text in (v.strip() for v in values):
        if not text:
            continue
        if text.lower() == ALL:
            everyone = True
            continue
        mac = parse_mac(text)
        if mac is not None:
            macs.add(mac)
            continue
        try:
            networks.append(ipaddress.IPv4Network(text, strict=False))
        except ValueError:
            return f"'{text}' is not all, a MAC address or an IPv4 network"
    return SecureBootClients(everyone, frozenset(macs), tuple(networks))
