"""bench/bootstormlib/proto.py, the boot storm bench's simulated client: its DHCP packets against
our own proxyDHCP decision and reply (in-process, no sockets) and a canned dnsmasq-style menu
offer, its reading of iPXE scripts (policyd's real boot.ipxe and answers, a peer's static one),
URLs and TFTP packets. No network, no daemons."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bootstormlib import proto  # noqa: E402
from prebootpolicyd.script import boot_script  # noqa: E402
from proxydhcpd import packet  # noqa: E402
from proxydhcpd.decide import BootFiles, BootMenu, Policy, decide  # noqa: E402
from proxydhcpd.reply import ReplyBuilder  # noqa: E402

SERVER = "10.78.0.1"
MAC = proto.mac_of(7, 0x42)
GUID = proto.guid_of(7)
POLICY = Policy(BootFiles(bios="undionly.kpxe", uefi32="", uefi64="ipxe.efi", arm64="",
                          http="", ipxe_script="http://{server}:8090/boot.ipxe"),
                uefi_via_4011=True, menu=BootMenu(False, "", 3), allowed_macs=frozenset(),
                denied_macs=frozenset())


def ours(request: bytes, port: int) -> proto.Reply:
    """Our proxydhcpd's answer to `request`, read back by the bench's parser."""
    req = packet.parse(request)
    plan = decide(req, port, POLICY, SERVER)
    assert not hasattr(plan, "counter"), plan      # not an Ignore
    reply = proto.parse_reply(ReplyBuilder().build(plan, req, SERVER, SERVER))
    assert reply is not None
    return reply


def test_bios_rom_gets_the_boot_file_in_the_offer() -> None:
    offer = ours(proto.discover(0x1234, MAC, proto.ARCH_BIOS, GUID), 67)
    assert (offer.xid, offer.mac, offer.message_type) == (0x1234, MAC, proto.OFFER)
    assert proto.pxe_next(offer) == proto.Step("tftp", server=SERVER, file="undionly.kpxe")


def test_uefi_rom_asks_the_boot_server_on_4011() -> None:
    offer = ours(proto.discover(0x99, MAC, proto.ARCH_EFI64, GUID), 67)
    step = proto.pxe_next(offer)
    assert (step.kind, step.server, step.item) == ("bootserver", SERVER, None)
    request = proto.bootserver_request(0x99, MAC, proto.ARCH_EFI64, GUID, "10.78.1.8", step.item)
    assert request[12:16] == bytes((10, 78, 1, 8))                 # ciaddr
    ack = ours(request, 4011)
    assert (ack.message_type, ack.file, ack.next_server()) == (proto.ACK, "ipxe.efi", SERVER)


def test_ipxe_gets_the_script_url() -> None:
    offer = ours(proto.discover(5, MAC, proto.ARCH_BIOS, GUID, ipxe=True), 67)
    step = proto.pxe_next(offer)
    assert step.kind == "tftp" and step.file == f"http://{SERVER}:8090/boot.ipxe"
    assert proto.parse_url(step.file, step.server) == proto.Url("http", SERVER, 8090,
                                                                 "/boot.ipxe")


def _offer(options: bytes, file: bytes = b"", siaddr: bytes = bytes(4)) -> bytes:
    head = bytearray(236)
    head[0:3] = bytes((2, 1, 6))
    struct.pack_into("!I", head, 4, 77)
    head[20:24] = siaddr
    head[28:34] = MAC
    head[108:108 + len(file)] = file
    return bytes(head) + proto.COOKIE + options + b"\xff"


def test_menu_offer_like_dnsmasq_goes_to_the_listed_boot_server() -> None:
    # option 43: discovery control 3, boot servers (type 0x8000 at 10.78.0.9), menu, prompt
    pxe = (bytes((6, 1, 3)) + bytes((8, 7, 0x80, 0x00, 1, 10, 78, 0, 9))
           + bytes((9, 8, 0x80, 0x00, 5)) + b"iPXE!" + bytes((10, 2, 0)) + b"x" + b"\xff")
    opts = (bytes((53, 1, 2, 54, 4, 10, 78, 0, 1, 60, 9)) + b"PXEClient"
            + bytes((43, len(pxe))) + pxe)
    step = proto.pxe_next(proto.parse_reply(_offer(opts)))
    assert step == proto.Step("bootserver", server="10.78.0.9", item=b"\x80\x00\x00\x00")
    request = proto.bootserver_request(77, MAC, 0, GUID, "10.78.1.1", step.item, ipxe=True)
    parsed = packet.parse(request)
    assert parsed.pxe_suboptions()[71] == b"\x80\x00\x00\x00"
    assert b"iPXE" in parsed.user_classes


def test_not_a_pxe_offer_fails() -> None:
    opts = bytes((53, 1, 2, 54, 4, 10, 78, 0, 1))
    assert proto.pxe_next(proto.parse_reply(_offer(opts, b"x"))).kind == "fail"
    assert proto.parse_reply(b"\x01" + bytes(300)) is None


SETTINGS = proto.ipxe_settings(MAC, "10.78.1.8", proto.ARCH_EFI64, GUID, "SN7")


def test_policyd_boot_script_chains_to_policy_with_the_machine() -> None:
    plan = proto.read_script(boot_script(f"{SERVER}:8090"), SETTINGS)
    url = proto.parse_url(plan.chain)
    assert (url.scheme, url.host, url.port) == ("http", SERVER, 8090)
    assert url.path.startswith("/policy?mac=02-42-00-00-00-07&")
    assert "platform=efi" in url.path and "ip=10.78.1.8" in url.path
    assert "serial=SN7" in url.path and "${" not in url.path


def test_policy_answer_kernel_and_initrd() -> None:
    answer = ("#!ipxe\necho preboot-answer: imaging restore images/x.img\n"
              "kernel tftp://10.78.0.1/preboot/linux initrd=initrd console=ttyS0 "
              "preboot.server=10.78.0.1 || goto failed\n"
              "initrd --name initrd tftp://10.78.0.1/preboot/initrd || goto failed\n"
              "boot || goto failed\n:failed\necho no\nexit\n")
    plan = proto.read_script(answer, SETTINGS)
    assert plan == proto.ScriptPlan(kernel="tftp://10.78.0.1/preboot/linux",
                                    initrd="tftp://10.78.0.1/preboot/initrd", answer="imaging")
    assert proto.parse_url(plan.initrd) == proto.Url("tftp", SERVER, 69, "preboot/initrd")
    http = answer.replace("tftp://10.78.0.1/", "http://10.78.0.1:8090/boot/")
    plan = proto.read_script(http, SETTINGS)
    assert proto.parse_url(plan.kernel) == proto.Url("http", SERVER, 8090,
                                                       "/boot/preboot/linux")


def test_local_answer_has_no_kernel_and_non_scripts_are_refused() -> None:
    plan = proto.read_script("#!ipxe\necho preboot-answer: local no work\nexit\n", SETTINGS)
    assert (plan.kernel, plan.chain, plan.answer) == (None, None, "local")
    with pytest.raises(ValueError):
        proto.read_script("<html>404</html>", SETTINGS)


def test_bare_file_names_and_bad_schemes() -> None:
    assert proto.parse_url("boot.ipxe", SERVER) == proto.Url("tftp", SERVER, 69, "boot.ipxe")
    with pytest.raises(ValueError):
        proto.parse_url("https://x/y")
    with pytest.raises(ValueError):
        proto.parse_url("boot.ipxe")


def test_tftp_packets() -> None:
    assert proto.rrq("preboot/linux") == (b"\0\x01preboot/linux\0octet\0blksize\x001432\0"
                                          b"tsize\x000\0")
    assert proto.tftp_ack(0x10001) == b"\0\x04\0\x01"
    assert proto.parse_oack(b"\0\x06blksize\x001432\0tsize\x00999\0") == {
        "blksize": "1432", "tsize": "999"}


# ---- the verdict over repeats (runner.py) ----------------------------------------------------

def _run(stack: str, seconds: float | None, failed: int = 0, clients: int = 100) -> dict:
    return {"stack": stack, "clients": clients, "time_to_all_s": seconds, "failed": failed}


@pytest.mark.parametrize("ours, peer, failed, expected", [
    ([2.0, 2.5, 2.2], [2.4, 2.2, 2.3], 0, "peer 2.30 s / ours 2.20 s = 1.05x -> met"),
    ([2.41, 2.4, 2.6], [2.4, 2.39, 2.5], 0, "= 0.996x -> NOT met"),
    ([2.0, 2.0], [3.0, 3.0], 1, "1.50x -> NOT met (ours did not serve every client"),
])
def test_the_goal_is_judged_on_the_medians(ours, peer, failed, expected):
    from bootstormlib.runner import _median_verdict
    runs = [_run("ours", t, failed if i == 0 else 0) for i, t in enumerate(ours)]
    runs += [_run("peer", t) for t in peer] + [_run("ours", 9.0, clients=500)]
    line = _median_verdict(runs, 100)
    assert expected in line and f"medians of {len(ours)} and {len(peer)} runs" in line, line
