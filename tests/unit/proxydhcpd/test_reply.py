"""proxydhcpd.reply: the bytes we send, read back with scapy and with our own codec."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from proxydhcpd import packet, reply
from proxydhcpd.decide import ProxyReply
from proxydhcpd.reply import ReplyBuilder, Shape

SERVER, NEXT = "10.0.0.1", "10.0.0.2"
MAC = bytes.fromhex("00c04fdc2ab5")
GUID = b"\x00" + bytes(range(0xA0, 0xB0))


def request(*, xid=0xCAFEBABE, flags=0x8000, ciaddr="0.0.0.0", giaddr="0.0.0.0", chaddr=MAC,
            hlen=6, htype=1, guid: bytes | None = GUID, msg="discover") -> packet.DhcpPacket:
    options = [("message-type", msg), (60, b"PXEClient:Arch:00000:UNDI:002001"),
               (93, b"\x00\x00")]
    if guid is not None:
        options.append((97, guid))
    raw = bytes(BOOTP(op=1, htype=htype, hlen=hlen, hops=1, xid=xid, secs=9, flags=flags,
                      ciaddr=ciaddr, yiaddr="10.9.9.9", siaddr="10.8.8.8", giaddr=giaddr,
                      chaddr=chaddr + bytes(16 - len(chaddr)), sname=b"client-sname",
                      file=b"client-file") / DHCP(options=options + ["end"]))
    return packet.parse(raw)


def plan(message_type=packet.OFFER, boot_file="undionly.kpxe", pxe=b"\x06\x01\x08\xff",
         vendor=b"PXEClient") -> ProxyReply:
    return ProxyReply(message_type, vendor, boot_file, pxe, 0, "bios", "test")


def scapy_options(raw: bytes) -> dict:
    layer = BOOTP(raw)
    assert layer.haslayer(DHCP)
    found = {}
    for item in layer[DHCP].options:
        if isinstance(item, tuple):
            found[item[0]] = item[1] if len(item) == 2 else item[1:]
        else:
            found[item] = True
    return found


@pytest.mark.parametrize("flags", [0x8000, 0x0000, 0x8001, 0x7FFF])
@pytest.mark.parametrize("ciaddr,giaddr", [("0.0.0.0", "0.0.0.0"), ("10.0.0.77", "0.0.0.0"),
                                           ("0.0.0.0", "10.1.0.1")])
def test_offer_fields_with_scapy(flags, ciaddr, giaddr):
    req = request(flags=flags, ciaddr=ciaddr, giaddr=giaddr)
    raw = ReplyBuilder().build(plan(), req, SERVER, NEXT)
    layer = BOOTP(raw)
    assert layer.op == 2
    assert (layer.htype, layer.hlen, layer.hops) == (1, 6, 0)
    assert layer.xid == 0xCAFEBABE
    assert layer.flags == 0x8000   # offers always ask to be broadcast (yiaddr is 0)
    assert layer.ciaddr == ciaddr and layer.giaddr == giaddr
    assert layer.yiaddr == "0.0.0.0"                 # a proxyDHCP never assigns an address
    assert layer.siaddr == NEXT
    assert layer.chaddr == MAC + bytes(10)
    assert layer.file.rstrip(b"\0") == b"undionly.kpxe"
    assert layer.secs == 0
    opts = scapy_options(raw)
    assert opts["message-type"] == 2
    assert opts["server_id"] == SERVER
    assert opts["vendor_class_id"] == b"PXEClient"
    assert opts["vendor_specific"] == b"\x06\x01\x08\xff"
    assert opts["pxe_client_machine_identifier"] == GUID
    assert opts.get("end") is True
    assert len(raw) >= reply.MIN_REPLY_LEN


def test_offer_fields_with_our_codec():
    req = request()
    raw = ReplyBuilder().build(plan(), req, SERVER, NEXT)
    back = packet.parse(raw)
    assert back.op == packet.BOOTREPLY and back.message_type == packet.OFFER
    assert (back.xid, back.flags, back.chaddr) == (req.xid, 0x8000, req.chaddr)
    assert back.yiaddr == "0.0.0.0" and back.siaddr == NEXT
    assert back.file == b"undionly.kpxe"
    assert back.options[packet.OPT_SERVER_ID] == bytes((10, 0, 0, 1))
    assert back.options[packet.OPT_VENDOR_CLASS] == b"PXEClient"
    assert back.options[packet.OPT_CLIENT_GUID] == GUID
    assert back.pxe_suboptions() == {6: b"\x08"}
    assert set(back.options) == {53, 54, 60, 43, 97}
    # END is there, followed only by padding
    tail = raw[packet.MIN_LEN:]
    end = _end_offset(tail)
    assert set(tail[end + 1:]) <= {0}


def _end_offset(area: bytes) -> int:
    i = 0
    while area[i] != packet.OPT_END:
        i += 1 if area[i] == packet.OPT_PAD else 2 + area[i + 1]
    return i


def test_ack_without_option_43_and_without_guid():
    req = request(msg="request", guid=None, flags=0, ciaddr="10.0.0.50")
    raw = ReplyBuilder().build(plan(packet.ACK, "ipxe.efi", None), req, SERVER, SERVER)
    back = packet.parse(raw)
    assert back.message_type == packet.ACK
    assert set(back.options) == {53, 54, 60}
    assert back.siaddr == SERVER and back.file == b"ipxe.efi"
    opts = scapy_options(raw)
    assert "vendor_specific" not in opts and "pxe_client_machine_identifier" not in opts
    assert opts["message-type"] == 5 and opts.get("end") is True
    assert len(raw) >= reply.MIN_REPLY_LEN


def test_http_client_reply():
    url = "http://10.0.0.1/boot/ipxe.efi"
    raw = ReplyBuilder().build(plan(boot_file=url, pxe=None, vendor=b"HTTPClient"), request(),
                               SERVER, NEXT)
    back = packet.parse(raw)
    assert back.options[packet.OPT_VENDOR_CLASS] == b"HTTPClient"
    assert back.file == url.encode()
    assert packet.OPT_VENDOR_SPECIFIC not in back.options


def test_boot_item_ack_echo():
    pxe = packet.encode_option(71, b"\x80\x00\x00\x00") + b"\xff"
    raw = ReplyBuilder().build(plan(packet.ACK, pxe=pxe), request(msg="request"), SERVER, NEXT)
    assert packet.parse(raw).pxe_suboptions() == {71: b"\x80\x00\x00\x00"}


@pytest.mark.parametrize("guid", [b"", b"\x00", GUID, GUID + b"extra", b"\xff" * 255])
def test_option_97_is_echoed_exactly(guid):
    raw = ReplyBuilder().build(plan(), request(guid=guid), SERVER, NEXT)
    assert packet.parse(raw).client_guid == guid


def test_menu_option_43_survives_scapy_template():
    from proxydhcpd.decide import BootMenu, menu_options
    body = menu_options(BootMenu(True, "P" * 80, 255, "N" * 60, "L" * 60), SERVER)
    raw = ReplyBuilder().build(plan(pxe=body), request(), SERVER, NEXT)
    assert packet.parse(raw).options[43] == body
    assert scapy_options(raw)["vendor_specific"] == body


@pytest.mark.parametrize("hlen,htype", [(6, 1), (16, 1), (0, 1), (8, 6)])
def test_hardware_type_and_length_copied(hlen, htype):
    chaddr = bytes(range(1, 17))[:hlen]
    req = request(chaddr=chaddr, hlen=hlen, htype=htype)
    back = packet.parse(ReplyBuilder().build(plan(), req, SERVER, NEXT))
    assert (back.htype, back.hlen) == (htype, hlen)
    assert back.chaddr == req.chaddr and back.mac == chaddr


def test_per_client_fields_do_not_leak_between_clients():
    builder = ReplyBuilder()
    first = packet.parse(builder.build(plan(), request(xid=1, flags=0x8000, giaddr="10.1.0.1",
                                                       chaddr=b"\x02" * 6), SERVER, NEXT))
    second = packet.parse(builder.build(plan(), request(xid=2, flags=0, guid=None,
                                                        chaddr=b"\x04" * 6), SERVER, NEXT))
    assert (first.xid, first.flags, first.giaddr, first.client_guid) == \
        (1, 0x8000, "10.1.0.1", GUID)
    assert (second.xid, second.flags, second.giaddr, second.client_guid) == \
        (2, 0x8000, "0.0.0.0", None)   # an offer is always broadcast, whatever the client set
    assert second.mac == b"\x04" * 6


def test_boot_file_length_limit():
    builder = ReplyBuilder()
    raw = builder.build(plan(boot_file="a" * 127), request(), SERVER, NEXT)
    assert raw[108:108 + 127] == b"a" * 127 and raw[235] == 0       # still NUL-terminated
    for length in (128, 129, 300):
        with pytest.raises(ValueError, match=f"{length} bytes does not fit"):
            builder.build(plan(boot_file="a" * length), request(), SERVER, NEXT)


def test_non_ascii_boot_file_is_a_value_error():
    with pytest.raises(ValueError):
        ReplyBuilder().build(plan(boot_file="bööt.efi"), request(), SERVER, NEXT)


# ---- template cache -------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    calls: list[Shape] = []
    real = reply.build_template

    def counting(shape: Shape) -> bytes:
        calls.append(shape)
        return real(shape)

    monkeypatch.setattr(reply, "build_template", counting)
    return calls


def test_same_shape_is_built_once(counted):
    builder = ReplyBuilder()
    for xid in range(50):
        builder.build(plan(), request(xid=xid, chaddr=bytes((2, 0, 0, 0, 0, xid))), SERVER, NEXT)
    assert len(counted) == 1
    builder.build(plan(boot_file="ipxe.efi"), request(), SERVER, NEXT)
    builder.build(plan(packet.ACK), request(), SERVER, NEXT)
    builder.build(plan(), request(), "10.0.0.3", NEXT)
    builder.build(plan(), request(), SERVER, "10.0.0.3")
    builder.build(plan(pxe=None), request(), SERVER, NEXT)
    builder.build(plan(vendor=b"HTTPClient"), request(), SERVER, NEXT)
    assert len(counted) == 7
    builder.build(plan(), request(xid=999), SERVER, NEXT)
    assert len(counted) == 7


def test_cached_template_is_not_mutated_by_fill(counted):
    builder = ReplyBuilder()
    builder.build(plan(), request(xid=1, giaddr="10.1.0.1"), SERVER, NEXT)
    template = builder.template(Shape(packet.OFFER, SERVER, NEXT, b"PXEClient", "undionly.kpxe",
                                      b"\x06\x01\x08\xff"))
    assert template[4:8] == bytes(4) and template[24:28] == bytes(4)
    assert len(counted) == 1


def test_cache_is_bounded(counted):
    builder = ReplyBuilder()
    extra = 10
    for n in range(reply.MAX_TEMPLATES + extra):
        builder.build(plan(boot_file=f"file{n}.efi"), request(), SERVER, NEXT)
    assert len(counted) == reply.MAX_TEMPLATES + extra
    assert len(builder._templates) == reply.MAX_TEMPLATES
    # the newest shapes are still cached, the oldest were evicted and are rebuilt
    builder.build(plan(boot_file=f"file{reply.MAX_TEMPLATES + extra - 1}.efi"), request(),
                  SERVER, NEXT)
    assert len(counted) == reply.MAX_TEMPLATES + extra
    builder.build(plan(boot_file="file0.efi"), request(), SERVER, NEXT)
    assert len(counted) == reply.MAX_TEMPLATES + extra + 1
    assert len(builder._templates) == reply.MAX_TEMPLATES


def test_cache_bound_follows_the_module_constant(counted, monkeypatch):
    monkeypatch.setattr(reply, "MAX_TEMPLATES", 3)
    builder = ReplyBuilder()
    for n in range(8):
        builder.build(plan(boot_file=f"f{n}"), request(), SERVER, NEXT)
    assert len(builder._templates) == 3
