"""proxydhcpd's config keys (the schema) and the frozen settings the server runs on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key, Schema
from common.errors import SettingError
from common.daemon.runner import CommonSettings, common_keys
from common.daemon.services import PROXYDHCPD

from .decide import BootFiles, BootMenu, Policy, menu_options
from .secureboot import parse_clients

STATUS_PORT = PROXYDHCPD.status_port

SCHEMA = Schema((
    Key("IPAddress", "ipv4_addr", "0.0.0.0",
        "Server identity (option 54). 0.0.0.0: the address of the interface a request came in on."),
    Key("Interfaces", "strings", "",
        "Interface names to answer on, comma-separated; empty answers on all."),
    Key("ListenPort67", "boolean", "YES",
        "Answer DHCPDISCOVER on port 67. NO for the co-located mode, beside a DHCP server on "
        "this host that sends option 60 PXEClient itself."),
    Key("ListenPort4011", "boolean", "YES", "Answer boot server requests on port 4011."),
    Key("DHCPPort", "integer(min=1, max=65535)", "67", "Server port of the DHCP segment."),
    Key("BootServerPort", "integer(min=1, max=65535)", "4011", "PXE boot server port."),
    Key("ClientPort", "integer(min=1, max=65535)", "68", "Client port replies are sent to."),
    Key("NextServer", "ipv4_addr", "0.0.0.0",
        "TFTP server given to clients (siaddr); 0.0.0.0: this server."),
    Key("BootFileBIOS", "string", "undionly.kpxe", "Boot program for BIOS PXE ROMs (arch 0)."),
    Key("BootFileUEFI32", "string", "", "Boot program for IA32 UEFI (arch 6)."),
    Key("BootFileUEFI64", "string", "ipxe.efi", "Boot program for x64 UEFI (arch 7 and 9)."),
    Key("BootFileARM64", "string", "", "Boot program for ARM64 UEFI (arch 11)."),
    Key("SecureBootClients", "strings", "",
        "UEFI x64 clients that boot the Secure Boot chain (BootFileSecureBoot: shim, then the "
        "distribution's signed GRUB) instead of BootFileUEFI64: all, MAC addresses, IPv4 "
        "networks (of the relay agent, else of our interface), comma-separated; empty: none. "
        "GRUB needs the site DHCP's next-server to be this boot server (docs/secure-boot.md)."),
    Key("BootFileSecureBoot", "string", "shimx64.efi",
        "Boot program of the Secure Boot chain (shim; the signed GRUB beside it as grubx64.efi)."),
    Key("BootFileHTTP", "string", "",
        "URL for x86 UEFI HTTP boot clients (HTTPClient, arch 15/16); {server} is replaced."),
    Key("IPXEScriptURL", "string", "boot.ipxe",
        "What iPXE gets: a URL such as http://{server}:8080/boot.ipxe, or a TFTP file name."),
    Key("UEFIVia4011", "boolean", "YES",
        "Offer UEFI PXE clients no option 43, so they ask again on port 4011 (what most UEFI "
        "firmware needs); NO puts the boot file in the offer as for BIOS."),
    Key("BootMenu", "boolean", "NO",
        "Show a PXE boot menu (network boot / local disk) on BIOS PXE ROMs that are not iPXE."),
    Key("MenuPrompt", "string", "Press F8 for the boot menu", "Text of the menu prompt."),
    Key("MenuTimeout", "integer(min=0, max=255)", "3",
        "Seconds the menu prompt waits before booting from the network."),
    Key("AllowedMACs", "strings", "",
        "Answer only these MAC addresses (hex pairs, with or without separators); empty: all."),
    Key("DeniedMACs", "strings", "", "Never answer these MAC addresses."),
) + common_keys(PROXYDHCPD))


@dataclass(frozen=True)
class Settings:
    ip_address: str
    interfaces: tuple[str, ...]
    listen_67: bool
    listen_4011: bool
    dhcp_port: int
    boot_server_port: int
    client_port: int
    next_server: str
    policy: Policy
    common: CommonSettings


def parse_mac(text: str) -> bytes | None:
    digits = re.sub(r"[:\-.\s]", "", text)
    if not re.fullmatch(r"[0-9A-Fa-f]{12}", digits):
        return None
    return bytes.fromhex(digits)


def _macs(values: list[str], key: str) -> frozenset[bytes]:
    macs = set()
    for text in values:
        mac = parse_mac(text)
        if mac is None:
            raise SettingError(key, f"'{text}' is not a MAC address")
        macs.add(mac)
    return frozenset(macs)


def make_settings(values: dict[str, Any], common: CommonSettings) -> Settings:
    if not values["ListenPort67"] and not values["ListenPort4011"]:
        raise SettingError("ListenPort4011", "both ListenPort67 and ListenPort4011 are NO")
    if values["DHCPPort"] == values["BootServerPort"]:
        raise SettingError("BootServerPort", "must differ from DHCPPort")
    files = BootFiles(values["BootFileBIOS"], values["BootFileUEFI32"], values["BootFileUEFI64"],
                      values["BootFileARM64"], values["BootFileHTTP"], values["IPXEScriptURL"])
    for key, name in (("BootFileBIOS", files.bios), ("BootFileUEFI32", files.uefi32),
                      ("BootFileUEFI64", files.uefi64), ("BootFileARM64", files.arm64),
                      ("BootFileHTTP", files.http), ("IPXEScriptURL", files.ipxe_script)):
        if len(name.encode("ascii", "replace")) > 127:
            raise SettingError(key, "longer than the 127 bytes the DHCP file field holds")
    menu = BootMenu(values["BootMenu"], values["MenuPrompt"], values["MenuTimeout"])
    if menu.enabled:
        try:
            menu_options(menu, "0.0.0.0")
        except ValueError as exc:
            raise SettingError("MenuPrompt", str(exc)) from None
    secure = parse_clients(values["SecureBootClients"], parse_mac)
    if isinstance(secure, str):
        raise SettingError("SecureBootClients", secure)
    secure_file = values["BootFileSecureBoot"].strip()
    if secure.anyone and not secure_file:
        raise SettingError("BootFileSecureBoot", "empty, but SecureBootClients names clients")
    if len(secure_file.encode("ascii", "replace")) > 127:
        raise SettingError("BootFileSecureBoot", "longer than the 127 bytes the DHCP file field "
                                                 "holds")
    policy = Policy(files, values["UEFIVia4011"], menu, _macs(values["AllowedMACs"], "AllowedMACs"),
                    _macs(values["DeniedMACs"], "DeniedMACs"), secure, secure_file)
    return Settings(values["IPAddress"], tuple(values["Interfaces"]), values["ListenPort67"],
                    values["ListenPort4011"], values["DHCPPort"], values["BootServerPort"],
                    values["ClientPort"], values["NextServer"], policy, common)
