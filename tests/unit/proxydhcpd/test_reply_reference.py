"""proxydhcpd's reply templates against scapy, the reference codec that built them before
(docs/packaging.md): byte for byte the same for every shape scapy can build."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxydhcpd import packet, reply
from proxydhcpd.reply import Shape

dhcp = pytest.importorskip("scapy.layers.dhcp")


def scapy_template(shape: Shape) -> bytes:
    """What reply.build_template was before: the same fields through scapy's BOOTP/DHCP."""
    options = [("message-type", shape.message_type), ("server_id", shape.server),
               ("vendor_class_id", shape.vendor_class)]
    if shape.pxe_options is not None:
        options.append(("vendor_specific", shape.pxe_options))
    layer = dhcp.BOOTP(op=packet.BOOTREPLY, htype=1, hlen=6, xid=0, flags=0, ciaddr="0.0.0.0",
                       yiaddr="0.0.0.0", siaddr=shape.next_server, giaddr="0.0.0.0",
                       chaddr=b"\0" * 16, sname=shape.next_server.encode("ascii"),
                       file=shape.boot_file.encode("ascii")) / dhcp.DHCP(options=options)
    return bytes(layer)


IPS = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([packet.OFFER, packet.ACK]), IPS, IPS,
       st.sampled_from([b"PXEClient", b"HTTPClient", b"PXEClient:Arch:00007", b""]),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz./_-0123456789", max_size=127),
       st.one_of(st.none(), st.binary(max_size=255)))
def test_template_equals_scapys(message_type, server, next_server, vendor, boot_file, pxe):
    shape = Shape(message_type, server, next_server, vendor, boot_file, pxe)
    assert reply.build_template(shape) == scapy_template(shape)


def test_long_option_43_is_split_where_scapy_fails():
    """RFC 3396: an option over 255 bytes is split; scapy cannot build one at all."""
    shape = Shape(packet.ACK, "10.0.0.1", "10.0.0.1", b"PXEClient", "f", b"\x01" * 300)
    template = reply.build_template(shape)
    assert packet.encode_option(43, b"\x01" * 300) in template
    with pytest.raises(Exception):
        scapy_template(shape)


@pytest.mark.parametrize("sname,file,reason", [
    (b"a" * 64, b"f", "server name of 64 bytes"),
    (b"s", b"f" * 128, "boot file name of 128 bytes"),
])
def test_header_fields_that_do_not_fit(sname, file, reason):
    with pytest.raises(ValueError, match=reason):
        packet.encode_reply_header("10.0.0.1", sname, file)
