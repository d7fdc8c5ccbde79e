"""What the proxyDHCP answers, and why: a parsed request in, a reply plan or a reason out.

Pure: no sockets and no clock, so every branch is unit-tested. The rules (PXE 2.1 section 2,
RFC 4578, RFC 3004; the "Why" of each is in the comments):

- Only PXE clients get an answer: option 60 starting with "PXEClient" (or "HTTPClient" for
  UEFI HTTP boot). A proxyDHCP never hands out an address, so anything else is the site DHCP
  server's business and is ignored with a reason.
- Port 67 answers DHCPDISCOVER with a ProxyDHCPOFFER; port 4011 answers DHCPREQUEST (boot
  server discovery, or the "BINL" request UEFI firmware sends after an offer without option 43)
  with a DHCPACK.
- The boot file follows the client architecture (option 93). iPXE (user class "iPXE" or option
  175) is never given iPXE again, but the policy script URL, so there is no chainload loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import packet
from .packet import DhcpPacket
from .secureboot import SecureBootClients

# IANA "Processor Architecture Types" (after RFC 4578 section 2.1)
ARCH_BIOS = 0
ARCH_NAMES = {0: "bios", 6: "efi-ia32", 7: "efi-x64", 9: "efi-x64", 10: "efi-arm32",
              11: "efi-arm64", 15: "http-ia32", 16: "http-x64", 18: "http-arm32",
              19: "http-arm64"}
UEFI_ARCHES = {6, 7, 9, 10, 11}
HTTP_ARCHES = {15, 16, 18, 19}

# PXE 2.1 boot server types used in our menu (table 2-3): 0 is "local boot".
BOOT_TYPE_LOCAL = 0
BOOT_TYPE_PREBOOT = 0x8000  # vendor-specific range: "Preboot Services"


@dataclass(frozen=True)
class BootFiles:
    """Boot program per firmware family, from config (empty: we have none for it)."""

    bios: str
    uefi32: str
    uefi64: str
    arm64: str
    http: str          # URL for UEFI HTTP boot clients
    ipxe_script: str   # URL (or TFTP path) given to iPXE


@dataclass(frozen=True)
class BootMenu:
    enabled: bool
    prompt: str
    timeout_s: int
    network_label: str = "Preboot Services (network boot)"
    local_label: str = "Boot from local disk"


@dataclass(frozen=True)
class Policy:
    files: BootFiles
    uefi_via_4011: bool
    menu: BootMenu
    allowed_macs: frozenset[bytes]
    denied_macs: frozenset[bytes]
    secure_boot: SecureBootClients = SecureBootClients()
    secure_boot_file: str = "shimx64.efi"    # what those clients get instead of files.uefi64


class ProxyReply(NamedTuple):
    """Everything about a reply except the per-client fields, which reply.py fills in.
    (NamedTuples here: one is made per packet, and they hash fast as template keys.)"""

    message_type: int              # OFFER or ACK
    vendor_class: bytes            # b"PXEClient" or b"HTTPClient"
    boot_file: str
    pxe_options: bytes | None      # option 43 content, None to leave it out
    arch: int
    firmware: str                  # "bios", "efi-x64", "ipxe", "http-x64", ...
    reason: str
    # The client must come back to us on port 4011: siaddr has to be this server then, since
    # EDK2 sends that request to siaddr when it is set (PxeBcRetryBinlOffer), not to option 54.
    to_boot_server: bool = False


class Ignore(NamedTuple):
    reason: str
    counter: str                   # which status counter it goes to


def _pxe_kind(request: DhcpPacket) -> bytes | None:
    vendor = request.options.get(packet.OPT_VENDOR_CLASS, b"")
    if vendor.startswith(b"PXEClient"):
        return b"PXEClient"
    if vendor.startswith(b"HTTPClient"):
        return b"HTTPClient"
    return None


def client_arch(request: DhcpPacket) -> int:
    """Option 93, else the 'Arch:xxxxx' in option 60 (PXE 2.1), else BIOS."""
    arches = request.architectures
    if arches:
        return arches[0]
    vendor = request.vendor_class
    marker = vendor.find("Arch:")
    if marker >= 0 and vendor[marker + 5:marker + 10].isdigit():
        return int(vendor[marker + 5:marker + 10])
    return ARCH_BIOS


def is_ipxe(request: DhcpPacket) -> bool:
    return b"iPXE" in request.user_classes or packet.OPT_IPXE_ENCAP in request.options


def _file_for_arch(arch: int, files: BootFiles) -> str:
    if arch == ARCH_BIOS:
        return files.bios
    if arch in (6,):
        return files.uefi32
    if arch in (7, 9):
        return files.uefi64
    if arch == 11:
        return files.arm64
    if arch in (15, 16):
        return files.http  # x86 only: an ARM HTTP client (18, 19) must not get an x86 URL
    return ""


def discovery_control(value: int) -> bytes:
    return bytes((packet.PXE_DISCOVERY_CONTROL, 1, value))


def menu_options(menu: BootMenu, server: str) -> bytes:
    """Option 43 with a boot menu (PXE 2.1 section 2.4.2), kept within 255 bytes."""
    import socket

    def item(kind: int, label: str) -> bytes:
        text = label.encode("ascii", "replace")
        return kind.to_bytes(2, "big") + bytes((len(text),)) + text

    items = item(BOOT_TYPE_PREBOOT, menu.network_label) + item(BOOT_TYPE_LOCAL, menu.local_label)
    prompt_text = menu.prompt.encode("ascii", "replace")
    prompt = bytes((min(menu.timeout_s, 255),)) + prompt_text
    servers = BOOT_TYPE_PREBOOT.to_bytes(2, "big") + b"\x01" + socket.inet_aton(server)
    body = (discovery_control(0x07)  # no broadcast/multicast discovery: use the server list
            + packet.encode_option(packet.PXE_BOOT_SERVERS, servers)
            + packet.encode_option(packet.PXE_BOOT_MENU, items)
            + packet.encode_option(packet.PXE_MENU_PROMPT, prompt)
            + b"\xff")
    if len(body) > 255:
        raise ValueError(f"boot menu takes {len(body)} bytes; option 43 holds 255")
    return body


def _mac_allowed(request: DhcpPacket, policy: Policy) -> Ignore | None:
    mac = request.mac
    if mac in policy.denied_macs:
        return Ignore(f"{request.mac_text} is in DeniedMACs", "denied_mac")
    if policy.allowed_macs and mac not in policy.allowed_macs:
        return Ignore(f"{request.mac_text} is not in AllowedMACs", "denied_mac")
    return None


def decide(request: DhcpPacket, port: int, policy: Policy, server: str) -> ProxyReply | Ignore:
    """The answer to `request` received on `port`, served from address `server`."""
    if request.op != packet.BOOTREQUEST:
        return Ignore("not a BOOTREQUEST", "ignored_other")
    kind = _pxe_kind(request)
    if kind is None:
        shown = request.vendor_class or "none"
        return Ignore(f"not a PXE request: option 60 is {shown!r}", "ignored_not_pxe")
    wanted = packet.DISCOVER if port == 67 else packet.REQUEST
    if request.message_type != wanted and not (port != 67 and
                                               request.message_type == packet.INFORM):
        name = packet.MESSAGE_NAMES.get(request.message_type or 0, str(request.message_type))
        return Ignore(f"DHCP{name} on port {port} is not ours to answer", "ignored_other")
    denied = _mac_allowed(request, policy)
    if denied:
        return denied
    arch = client_arch(request)
    arch_name = ARCH_NAMES.get(arch, f"arch-{arch}")
    reply_type = packet.OFFER if port == 67 else packet.ACK
    files = policy.files

    if is_ipxe(request):
        if not files.ipxe_script:
            return Ignore("iPXE asked, but IPXEScriptURL is not set", "no_boot_file")
        script = files.ipxe_script.replace("{server}", server)
        return ProxyReply(reply_type, kind, script, discovery_control(0x08) + b"\xff",
                          arch, "ipxe", f"iPXE ({arch_name}): policy script")
    if kind == b"HTTPClient" and arch not in HTTP_ARCHES:
        arch, arch_name = 16, ARCH_NAMES[16]  # an HTTP boot client that did not say which
    secure = arch in (7, 9) and policy.secure_boot.takes(request.mac, request.giaddr, server)
    boot_file = (policy.secure_boot_file if secure else _file_for_arch(arch, files)
                 ).replace("{server}", server)
    label = f"{arch_name}, Secure Boot chain" if secure else arch_name   # for the reasons
    if not boot_file:
        return Ignore(f"no boot file configured for architecture {arch} ({arch_name})",
                      "no_boot_file")
    if kind == b"HTTPClient" or arch in HTTP_ARCHES:
        # UEFI HTTP boot (UEFI 2.5+ section 24.7): the URL in `file`, option 60 echoed.
        return ProxyReply(reply_type, b"HTTPClient", boot_file, None, arch, arch_name,
                          f"UEFI HTTP boot ({arch_name})")
    if port != 67:
        item = _boot_item(request)
        if item is not None and item[0] == BOOT_TYPE_LOCAL:
            return Ignore("boot item 0 is local boot: nothing to send", "ignored_other")
        options = None
        if item is not None:
            options = packet.encode_option(packet.PXE_BOOT_ITEM, item[1]) + b"\xff"
        return ProxyReply(packet.ACK, kind, boot_file, options, arch, arch_name,
                          f"boot server reply ({label})")
    if arch in UEFI_ARCHES and policy.uefi_via_4011:
        # Many UEFI PXE stacks ignore a proxy offer that bypasses boot server discovery;
        # without option 43 they ask us again on 4011 (EDK2's "ProxyBinl" path).
        return ProxyReply(packet.OFFER, kind, boot_file, None, arch, arch_name,
                          f"UEFI ({label}): continue on port 4011", to_boot_server=True)
    if policy.menu.enabled and arch == ARCH_BIOS:
        return ProxyReply(packet.OFFER, kind, boot_file, menu_options(policy.menu, server),
                          arch, arch_name, f"PXE ROM ({arch_name}): boot menu")
    return ProxyReply(packet.OFFER, kind, boot_file, discovery_control(0x08) + b"\xff", arch,
                      arch_name, f"PXE ROM ({label}): boot file in the offer")


def _boot_item(request: DhcpPacket) -> tuple[int, bytes] | None:
    """Option 43 sub-option 71 of a boot server request: (type, raw 4 bytes)."""
    try:
        sub = request.pxe_suboptions()
    except packet.MalformedPacket:
        return None
    raw = sub.get(packet.PXE_BOOT_ITEM)
    if raw is None or len(raw) < 4:
        return None
    return int.from_bytes(raw[:2], "big"), raw[:4]
