"""proxydhcpd.decide: every branch, table-driven, on requests built with scapy and parsed by us."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from proxydhcpd import decide as d
from proxydhcpd import packet
from proxydhcpd.decide import BootFiles, BootMenu, Ignore, Policy, ProxyReply, decide

SERVER = "10.0.0.1"
MAC = bytes.fromhex("00c04fdc2ab5")
OTHER_MAC = bytes.fromhex("0250560000aa")

FILES = BootFiles(bios="undionly.kpxe", uefi32="ipxe-ia32.efi", uefi64="ipxe.efi",
                  arm64="ipxe-arm64.efi", http="http://{server}/ipxe.efi",
                  ipxe_script="http://{server}:8080/boot.ipxe")
NO_MENU = BootMenu(enabled=False, prompt="Press F8 for the boot menu", timeout_s=3)
MENU = BootMenu(enabled=True, prompt="Press F8 for the boot menu", timeout_s=5)
POLICY = Policy(FILES, uefi_via_4011=True, menu=NO_MENU, allowed_macs=frozenset(),
                denied_macs=frozenset())


def policy(**changes) -> Policy:
    return dataclasses.replace(POLICY, **changes)


def vendor_for(arch: int) -> bytes:
    kind = b"HTTPClient" if arch in d.HTTP_ARCHES else b"PXEClient"
    return kind + b":Arch:%05d:UNDI:003016" % arch


def request(msg="discover", *, vendor: bytes | None = None, arch: int | None = 0,
            extra=(), op=1, mac=MAC, ciaddr="0.0.0.0") -> packet.DhcpPacket:
    """A request as a ROM would send it: scapy builds the bytes, our codec parses them."""
    options = []
    if msg is not None:
        options.append(("message-type", msg))
    if vendor is None and arch is not None:
        vendor = vendor_for(arch)
    if vendor is not None:
        options.append((60, vendor))
    if arch is not None:
        options.append((93, arch.to_bytes(2, "big")))
    options += list(extra) + ["end"]
    raw = bytes(BOOTP(op=op, htype=1, hlen=6, xid=7, flags=0x8000, ciaddr=ciaddr,
                      chaddr=mac + bytes(10)) / DHCP(options=options))
    return packet.parse(raw)


BOOT_ITEM_NETWORK = (43, b"\x47\x04\x80\x00\x00\x00\xff")
BOOT_ITEM_LOCAL = (43, b"\x47\x04\x00\x00\x00\x00\xff")


# ---- who is ignored -------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", [None, b"", b"MSFT 5.0", b"android-dhcp-13", b"udhcp 1.36.1",
                                    b"pxeclient", b"PXE", b"Etherboot-5.4", b" PXEClient",
                                    b"HTTP"])
def test_non_pxe_vendor_class_is_ignored(vendor):
    options = [] if vendor is None else [(60, vendor)]
    plan = decide(request(arch=None, vendor=None, extra=options), 67, POLICY, SERVER)
    assert isinstance(plan, Ignore)
    assert plan.counter == "ignored_not_pxe"
    assert plan.reason.startswith("not a PXE request")
    shown = (vendor or b"").decode() or "none"
    assert repr(shown) in plan.reason


def test_non_pxe_is_ignored_on_4011_too():
    plan = decide(request("request", arch=None, extra=[(60, b"MSFT 5.0")]), 4011, POLICY, SERVER)
    assert isinstance(plan, Ignore) and plan.counter == "ignored_not_pxe"


def test_bootreply_is_ignored():
    plan = decide(request("offer", op=2), 67, POLICY, SERVER)
    assert plan == Ignore("not a BOOTREQUEST", "ignored_other")


@pytest.mark.parametrize("msg,port", [
    ("request", 67), ("inform", 67), ("release", 67), ("decline", 67), (None, 67),
    ("discover", 4011), ("release", 4011), ("decline", 4011), (None, 4011),
])
def test_wrong_message_type_for_the_port(msg, port):
    plan = decide(request(msg), port, POLICY, SERVER)
    assert isinstance(plan, Ignore) and plan.counter == "ignored_other"
    assert f"on port {port} is not ours to answer" in plan.reason
    if msg is not None:
        assert f"DHCP{msg.upper()}" in plan.reason


@pytest.mark.parametrize("msg,port,reply", [("discover", 67, packet.OFFER),
                                            ("request", 4011, packet.ACK),
                                            ("inform", 4011, packet.ACK)])
def test_message_types_we_answer(msg, port, reply):
    plan = decide(request(msg), port, POLICY, SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == reply


# ---- MAC lists ------------------------------------------------------------------------------


@pytest.mark.parametrize("allowed,denied,mac,answered,reason", [
    (set(), set(), MAC, True, None),
    (set(), {MAC}, MAC, False, "00:c0:4f:dc:2a:b5 is in DeniedMACs"),
    (set(), {OTHER_MAC}, MAC, True, None),
    ({MAC}, set(), MAC, True, None),
    ({OTHER_MAC}, set(), MAC, False, "00:c0:4f:dc:2a:b5 is not in AllowedMACs"),
    ({MAC}, {MAC}, MAC, False, "is in DeniedMACs"),        # denied wins
    ({MAC, OTHER_MAC}, set(), OTHER_MAC, True, None),
])
@pytest.mark.parametrize("msg,port", [("discover", 67), ("request", 4011)])
def test_mac_lists(allowed, denied, mac, answered, reason, msg, port):
    rules = policy(allowed_macs=frozenset(allowed), denied_macs=frozenset(denied))
    plan = decide(request(msg, mac=mac), port, rules, SERVER)
    if answered:
        assert isinstance(plan, ProxyReply)
    else:
        assert isinstance(plan, Ignore) and plan.counter == "denied_mac"
        assert reason in plan.reason


def test_mac_lists_do_not_hide_non_pxe_counting():
    rules = policy(denied_macs=frozenset({MAC}))
    plan = decide(request(arch=None, extra=[(60, b"MSFT 5.0")]), 67, rules, SERVER)
    assert plan.counter == "ignored_not_pxe"


# ---- architectures --------------------------------------------------------------------------

# arch, expected boot file (None: ignored), firmware name, vendor class of the reply
ARCHES = [
    (0, "undionly.kpxe", "bios", b"PXEClient"),
    (6, "ipxe-ia32.efi", "efi-ia32", b"PXEClient"),
    (7, "ipxe.efi", "efi-x64", b"PXEClient"),
    (9, "ipxe.efi", "efi-x64", b"PXEClient"),
    (10, None, "efi-arm32", None),
    (11, "ipxe-arm64.efi", "efi-arm64", b"PXEClient"),
    (15, "http://10.0.0.1/ipxe.efi", "http-ia32", b"HTTPClient"),
    (16, "http://10.0.0.1/ipxe.efi", "http-x64", b"HTTPClient"),
    (2, None, "arch-2", None),          # EFI Itanium: not ours
    (0x1234, None, "arch-4660", None),
]


@pytest.mark.parametrize("arch,boot_file,firmware,vendor", ARCHES)
@pytest.mark.parametrize("port", [67, 4011])
def test_every_architecture(arch, boot_file, firmware, vendor, port):
    plan = decide(request("discover" if port == 67 else "request", arch=arch), port, POLICY,
                  SERVER)
    if boot_file is None:
        assert isinstance(plan, Ignore) and plan.counter == "no_boot_file"
        assert f"architecture {arch} ({firmware})" in plan.reason
        return
    assert isinstance(plan, ProxyReply)
    assert (plan.boot_file, plan.firmware, plan.arch, plan.vendor_class) == \
        (boot_file, firmware, arch, vendor)
    assert plan.message_type == (packet.OFFER if port == 67 else packet.ACK)
    assert firmware in plan.reason


@pytest.mark.parametrize("arch,key", [(0, "bios"), (6, "uefi32"), (7, "uefi64"), (9, "uefi64"),
                                      (11, "arm64"), (16, "http")])
def test_architecture_without_a_configured_file_is_a_clear_reason(arch, key):
    rules = policy(files=dataclasses.replace(FILES, **{key: ""}))
    plan = decide(request(arch=arch), 67, rules, SERVER)
    assert isinstance(plan, Ignore) and plan.counter == "no_boot_file"
    assert plan.reason == (f"no boot file configured for architecture {arch} "
                           f"({d.ARCH_NAMES[arch]})")


@pytest.mark.parametrize("arch", [18, 19])
def test_arm_http_boot_is_not_given_the_x86_http_url(arch):
    plan = decide(request(arch=arch), 67, POLICY, SERVER)
    assert isinstance(plan, Ignore) and plan.counter == "no_boot_file"
    assert f"architecture {arch}" in plan.reason


@pytest.mark.parametrize("arch", [18, 19])
def test_arm_http_boot_is_an_http_reply(arch):
    """Whatever file it gets, an ARM HTTP client is answered as HTTPClient, never with 43."""
    plan = decide(request(arch=arch), 67, POLICY, SERVER)
    if isinstance(plan, ProxyReply):
        assert plan.vendor_class == b"HTTPClient" and plan.pxe_options is None
        assert plan.firmware == d.ARCH_NAMES[arch]


def test_arch_from_option_60_text_when_93_is_missing():
    plan = decide(request(arch=None, vendor=b"PXEClient:Arch:00007:UNDI:003016"), 67,
                  policy(uefi_via_4011=False), SERVER)
    assert isinstance(plan, ProxyReply)
    assert (plan.arch, plan.firmware, plan.boot_file) == (7, "efi-x64", "ipxe.efi")


@pytest.mark.parametrize("vendor,arch", [
    (b"PXEClient:Arch:00000:UNDI:002001", 0),
    (b"PXEClient:Arch:00011:UNDI:003000", 11),
    (b"PXEClient", 0),                                # no Arch: BIOS
    (b"PXEClient:Arch:0000x:UNDI:002001", 0),         # not digits: BIOS
    (b"PXEClient:Arch:", 0),                          # empty: BIOS
])
def test_client_arch_fallbacks(vendor, arch):
    assert d.client_arch(request(arch=None, vendor=vendor)) == arch


def test_option_93_wins_over_option_60_and_first_listed_arch_is_used():
    req = request(arch=None, vendor=b"PXEClient:Arch:00000:UNDI:002001",
                  extra=[(93, b"\x00\x07\x00\x00")])
    assert d.client_arch(req) == 7


def test_server_placeholder_in_any_boot_file():
    files = dataclasses.replace(FILES, bios="{server}/undionly.kpxe")
    plan = decide(request(arch=0), 67, policy(files=files), "192.168.3.4")
    assert plan.boot_file == "192.168.3.4/undionly.kpxe"


# ---- iPXE -----------------------------------------------------------------------------------

IPXE_MARKERS = [
    [(77, b"iPXE")],                        # bare string, what iPXE sends
    [(77, b"\x04iPXE")],                    # RFC 3004 framing
    [(77, b"\x03foo\x04iPXE")],             # framed, second class
    [(175, b"\x13\x01\x01")],               # iPXE's encapsulated options only
    [(77, b"iPXE"), (175, b"\x13\x01\x01\xb1\x05\x01\x10\xec\x00\x01")],
]


@pytest.mark.parametrize("markers", IPXE_MARKERS)
@pytest.mark.parametrize("arch", [0, 6, 7, 9, 11, 16])
@pytest.mark.parametrize("msg,port", [("discover", 67), ("request", 4011)])
def test_ipxe_gets_the_script_never_ipxe_again(markers, arch, msg, port):
    rules = policy(menu=MENU)
    plan = decide(request(msg, arch=arch, extra=markers), port, rules, SERVER)
    assert isinstance(plan, ProxyReply)
    assert plan.boot_file == "http://10.0.0.1:8080/boot.ipxe"
    assert not plan.boot_file.endswith((".kpxe", ".efi", ".pxe", ".0"))
    assert plan.firmware == "ipxe" and plan.arch == arch
    assert plan.message_type == (packet.OFFER if port == 67 else packet.ACK)
    # no boot menu and no boot server discovery for iPXE: take the file in the offer
    assert packet.parse_suboptions(plan.pxe_options) == {packet.PXE_DISCOVERY_CONTROL: b"\x08"}


@pytest.mark.parametrize("user_class", [b"gPXE", b"\x04gPXE", b"ipxe", b"iPXE2", b"\x05iPXE2"])
def test_not_ipxe(user_class):
    req = request(arch=0, extra=[(77, user_class)])
    assert not d.is_ipxe(req)
    assert decide(req, 67, POLICY, SERVER).boot_file == "undionly.kpxe"


def test_ipxe_without_a_script_is_ignored_with_a_reason():
    rules = policy(files=dataclasses.replace(FILES, ipxe_script=""))
    plan = decide(request(arch=0, extra=[(77, b"iPXE")]), 67, rules, SERVER)
    assert plan == Ignore("iPXE asked, but IPXEScriptURL is not set", "no_boot_file")


def test_ipxe_script_as_tftp_name():
    rules = policy(files=dataclasses.replace(FILES, ipxe_script="boot.ipxe"))
    plan = decide(request(arch=7, extra=[(77, b"iPXE")]), 67, rules, SERVER)
    assert plan.boot_file == "boot.ipxe"


# ---- UEFI HTTP boot -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [15, 16])
@pytest.mark.parametrize("port,msg", [(67, "discover"), (4011, "request")])
def test_http_client(arch, port, msg):
    plan = decide(request(msg, arch=arch, vendor=b"HTTPClient:Arch:%05d:UNDI:003001" % arch),
                  port, POLICY, SERVER)
    assert isinstance(plan, ProxyReply)
    assert plan.vendor_class == b"HTTPClient"
    assert plan.boot_file == "http://10.0.0.1/ipxe.efi"
    assert plan.pxe_options is None


def test_http_arch_with_pxeclient_vendor_still_gets_http_reply():
    plan = decide(request(arch=16, vendor=b"PXEClient:Arch:00016"), 67, POLICY, SERVER)
    assert plan.vendor_class == b"HTTPClient" and plan.boot_file == "http://10.0.0.1/ipxe.efi"


# ---- UEFI PXE: via 4011 or direct -----------------------------------------------------------


@pytest.mark.parametrize("arch", [6, 7, 9, 11])
def test_uefi_via_4011_offer_has_no_option_43(arch):
    plan = decide(request(arch=arch), 67, policy(uefi_via_4011=True), SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == packet.OFFER
    assert plan.pxe_options is None
    assert plan.vendor_class == b"PXEClient"
    assert "4011" in plan.reason


@pytest.mark.parametrize("arch", [6, 7, 9, 11])
@pytest.mark.parametrize("menu", [NO_MENU, MENU])
def test_uefi_direct_offer_has_discovery_control_8(arch, menu):
    plan = decide(request(arch=arch), 67, policy(uefi_via_4011=False, menu=menu), SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == packet.OFFER
    assert plan.pxe_options == d.discovery_control(0x08) + b"\xff"
    assert packet.parse_suboptions(plan.pxe_options) == {6: b"\x08"}


def test_bios_is_not_sent_to_4011():
    plan = decide(request(arch=0), 67, policy(uefi_via_4011=True), SERVER)
    assert packet.parse_suboptions(plan.pxe_options) == {6: b"\x08"}
    assert plan.boot_file == "undionly.kpxe"


# ---- BIOS boot menu -------------------------------------------------------------------------


def parse_menu(pxe_options: bytes) -> dict:
    sub = packet.parse_suboptions(pxe_options)
    items, raw = [], sub[packet.PXE_BOOT_MENU]
    i = 0
    while i < len(raw):
        kind, length = int.from_bytes(raw[i:i + 2], "big"), raw[i + 2]
        items.append((kind, raw[i + 3:i + 3 + length].decode()))
        i += 3 + length
    servers = sub[packet.PXE_BOOT_SERVERS]
    count = servers[2]
    return {
        "control": sub[packet.PXE_DISCOVERY_CONTROL],
        "servers": (int.from_bytes(servers[:2], "big"),
                    [socket.inet_ntoa(servers[3 + 4 * n:7 + 4 * n]) for n in range(count)]),
        "items": items,
        "timeout": sub[packet.PXE_MENU_PROMPT][0],
        "prompt": sub[packet.PXE_MENU_PROMPT][1:].decode(),
        "codes": set(sub),
    }


def test_bios_menu_has_suboptions_6_8_9_10():
    plan = decide(request(arch=0), 67, policy(menu=MENU), SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == packet.OFFER
    assert plan.boot_file == "undionly.kpxe"
    assert len(plan.pxe_options) <= 255
    assert plan.pxe_options.endswith(b"\xff")
    menu = parse_menu(plan.pxe_options)
    assert menu["codes"] == {6, 8, 9, 10}
    assert menu["control"] == b"\x07"
    assert menu["servers"] == (d.BOOT_TYPE_PREBOOT, [SERVER])
    assert menu["items"] == [(0x8000, "Preboot Services (network boot)"),
                             (0, "Boot from local disk")]
    assert (menu["timeout"], menu["prompt"]) == (5, "Press F8 for the boot menu")


def test_menu_not_for_uefi_direct_or_ipxe():
    rules = policy(menu=MENU, uefi_via_4011=False)
    assert decide(request(arch=7), 67, rules, SERVER).pxe_options == b"\x06\x01\x08\xff"
    ipxe = decide(request(arch=0, extra=[(77, b"iPXE")]), 67, rules, SERVER)
    assert ipxe.pxe_options == b"\x06\x01\x08\xff"


def test_menu_is_not_repeated_on_4011():
    plan = decide(request("request", arch=0, extra=[BOOT_ITEM_NETWORK]), 4011,
                  policy(menu=MENU), SERVER)
    assert packet.parse_suboptions(plan.pxe_options) == {71: b"\x80\x00\x00\x00"}


@pytest.mark.parametrize("prompt,timeout,label", [
    ("", 0, ""),
    ("P" * 80, 255, "L" * 60),
    ("Drücken Sie F8 für das Menü", 10, "Réseau"),
])
def test_menu_fits_in_255_bytes(prompt, timeout, label):
    menu = BootMenu(True, prompt, timeout, network_label=label, local_label=label)
    body = d.menu_options(menu, "255.255.255.255")
    assert len(body) <= 255
    parsed = parse_menu(body)
    assert parsed["timeout"] == min(timeout, 255)
    assert parsed["prompt"] == prompt.encode("ascii", "replace").decode()
    assert [kind for kind, _ in parsed["items"]] == [0x8000, 0]


@pytest.mark.parametrize("prompt,label", [("P" * 240, "L"), ("P", "L" * 200),
                                          ("Drücken Sie F8 für das Menü " * 5, "Réseau " * 20)])
def test_too_long_menu_raises_value_error(prompt, label):
    """Rejected (the config check turns this into a one-line error), never silently cut."""
    menu = BootMenu(True, prompt, 3, network_label=label, local_label=label)
    with pytest.raises(ValueError, match="option 43 holds 255"):
        d.menu_options(menu, SERVER)


# ---- port 4011: boot server requests --------------------------------------------------------


@pytest.mark.parametrize("arch,boot_file", [(0, "undionly.kpxe"), (7, "ipxe.efi")])
def test_4011_request_with_boot_item_echoes_71(arch, boot_file):
    plan = decide(request("request", arch=arch, extra=[BOOT_ITEM_NETWORK]), 4011, POLICY,
                  SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == packet.ACK
    assert plan.boot_file == boot_file
    assert plan.pxe_options == b"\x47\x04\x80\x00\x00\x00\xff"
    assert packet.parse_suboptions(plan.pxe_options) == {71: b"\x80\x00\x00\x00"}


def test_4011_boot_item_layer_is_echoed():
    plan = decide(request("request", extra=[(43, b"\x47\x04\x80\x00\x00\x02\xff")]), 4011,
                  POLICY, SERVER)
    assert packet.parse_suboptions(plan.pxe_options) == {71: b"\x80\x00\x00\x02"}


def test_4011_local_boot_item_is_ignored():
    plan = decide(request("request", extra=[BOOT_ITEM_LOCAL]), 4011, POLICY, SERVER)
    assert isinstance(plan, Ignore) and plan.counter == "ignored_other"
    assert "local boot" in plan.reason


@pytest.mark.parametrize("extra", [
    [],                                             # EDK2's BINL retry sends no option 43
    [(43, b"\x06\x01\x08\xff")],                    # 43 without 71
    [(43, b"\x47\x02\x80\x00\xff")],                # 71 too short
    [(43, b"\x47\x09\x80")],                        # broken encapsulation
])
@pytest.mark.parametrize("arch", [0, 7, 11])
def test_4011_without_a_usable_boot_item_acks_without_43(extra, arch):
    plan = decide(request("request", arch=arch, extra=extra), 4011, POLICY, SERVER)
    assert isinstance(plan, ProxyReply) and plan.message_type == packet.ACK
    assert plan.pxe_options is None
    assert plan.vendor_class == b"PXEClient"


def test_4011_is_independent_of_uefi_via_4011_and_menu():
    for rules in (policy(uefi_via_4011=False), policy(menu=MENU)):
        plan = decide(request("request", arch=7), 4011, rules, SERVER)
        assert plan.message_type == packet.ACK and plan.pxe_options is None


def test_discovery_control_encoding():
    assert d.discovery_control(8) == b"\x06\x01\x08"


# ---- the Secure Boot chain ----------------------------------------------------------------

def _secure(**kw) -> Policy:
    from proxydhcpd.secureboot import SecureBootClients
    return policy(secure_boot=SecureBootClients(**kw))


@pytest.mark.parametrize("arch", [7, 9])
@pytest.mark.parametrize("msg,port", [("discover", 67), ("request", 4011)])
def test_named_uefi_x64_clients_get_shim(arch, msg, port):
    plan = decide(request(msg, arch=arch), port, _secure(macs=frozenset({MAC})), SERVER)
    assert isinstance(plan, ProxyReply) and plan.boot_file == "shimx64.efi"
    assert "Secure Boot chain" in plan.reason and plan.firmware == d.ARCH_NAMES[arch]
    other = decide(request(msg, arch=arch, mac=OTHER_MAC), port, _secure(macs=frozenset({MAC})),
                   SERVER)
    assert other.boot_file == "ipxe.efi" and "Secure Boot" not in other.reason


@pytest.mark.parametrize("arch,boot_file", [(0, "undionly.kpxe"), (6, "ipxe-ia32.efi"),
                                            (11, "ipxe-arm64.efi")])
def test_other_architectures_never_get_shim(arch, boot_file):
    plan = decide(request(arch=arch), 67, _secure(everyone=True), SERVER)
    assert plan.boot_file == boot_file


def test_ipxe_itself_still_gets_the_script():
    plan = decide(request(arch=7, extra=[(77, b"iPXE")]), 67, _secure(everyone=True), SERVER)
    assert plan.boot_file == "http://10.0.0.1:8080/boot.ipxe"


def test_networks_match_the_relay_else_our_interface():
    import ipaddress
    secure = _secure(networks=(ipaddress.IPv4Network("10.20.0.0/16"),))
    relayed = packet.parse(bytes(BOOTP(op=1, htype=1, hlen=6, xid=7, giaddr="10.20.3.1",
                                       chaddr=MAC + bytes(10)) / DHCP(options=[
        ("message-type", "discover"), (60, vendor_for(7)), (93, b"\x00\x07"), "end"])))
    assert decide(relayed, 67, secure, SERVER).boot_file == "shimx64.efi"
    assert decide(request(arch=7), 67, secure, SERVER).boot_file == "ipxe.efi"
    assert decide(request(arch=7), 67, secure, "10.20.0.2").boot_file == "shimx64.efi"
