"""Reply bytes: a template per reply shape, built once by our codec (packet.py), filled per client.

A shape is everything a reply shares with other clients of the same kind (message type, server
and boot server address, boot file, option 43). The template is built once per shape (a few
microseconds; scapy, which built it before, took hundreds and is now only the tests' reference
codec: docs/packaging.md); each client's reply is then the template with the per-client fields written at their RFC 2131
offsets: xid (4), flags (10: broadcast for every offer), ciaddr (12), giaddr (24), chaddr (28), htype/hlen (1, 2), plus
option 97 echoed when the client sent one (PXE 2.1 requires the echo).
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass

from . import packet
from .decide import ProxyReply
from .packet import DhcpPacket

MIN_REPLY_LEN = 300          # RFC 1542 section 2.1: relays and old clients expect >= 300 bytes
MAX_TEMPLATES = 256          # shapes are few (architectures x servers); bound the cache anyway


@dataclass(frozen=True)
class Shape:
    message_type: int
    server: str
    next_server: str
    vendor_class: bytes
    boot_file: str
    pxe_options: bytes | None


def build_template(shape: Shape) -> bytes:
    """The reply without per-client fields and without the END option (added on fill)."""
    file = shape.boot_file.encode("ascii")
    if len(file) > 127:
        raise ValueError(f"boot file name of {len(file)} bytes does not fit the 128-byte field")
    options = [(packet.OPT_MESSAGE_TYPE, bytes((shape.message_type,))),
               (packet.OPT_SERVER_ID, socket.inet_aton(shape.server)),
               (packet.OPT_VENDOR_CLASS, shape.vendor_class)]
    if shape.pxe_options is not None:
        options.append((packet.OPT_VENDOR_SPECIFIC, shape.pxe_options))
    return packet.encode_reply_header(siaddr=shape.next_server,
                                      sname=shape.next_server.encode("ascii"),
                                      file=file) + packet.encode_options(options)


class ReplyBuilder:
    def __init__(self) -> None:
        self._templates: OrderedDict[Shape, bytes] = OrderedDict()
        # Fast path: the plan itself (a hashable NamedTuple) -> template, skipping Shape.
        self._by_plan: dict[tuple, bytes] = {}

    def template(self, shape: Shape) -> bytes:
        template = self._templates.get(shape)
        if template is None:
            template = build_template(shape)
            self._templates[shape] = template
            if len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        return template

    def template_for(self, plan: ProxyReply, server: str, next_server: str) -> bytes:
        """The template of `plan`'s shape (fastpath.py cuts it around the per-client fields)."""
        key = (plan, server, next_server)
        template = self._by_plan.get(key)
        if template is None:
            template = self.template(Shape(plan.message_type, server, next_server,
                                           plan.vendor_class, plan.boot_file, plan.pxe_options))
            if len(self._by_plan) >= MAX_TEMPLATES:
                self._by_plan.clear()
            self._by_plan[key] = template
        return template

    def build(self, plan: ProxyReply, request: DhcpPacket, server: str,
              next_server: str) -> bytes:
        out = bytearray(self.template_for(plan, server, next_server))
        out[1] = request.htype
        out[2] = request.hlen
        out[4:8] = request.xid.to_bytes(4, "big")
        # An offer has yiaddr 0, so nobody can unicast it: ask the relay (RFC 1542 section
        # 4.1.2) and the client's stack to broadcast it, as dnsmasq's proxy mode does.
        flags = 0x8000 if plan.message_type == packet.OFFER else request.flags & 0x8000
        out[10:12] = flags.to_bytes(2, "big")
        out[12:16] = socket.inet_aton(request.ciaddr)
        out[24:28] = socket.inet_aton(request.giaddr)
        out[28:44] = request.chaddr
        guid = request.client_guid
        if guid is not None:
            out += packet.encode_option(packet.OPT_CLIENT_GUID, guid)
        out.append(packet.OPT_END)
        if len(out) < MIN_REPLY_LEN:
            out += bytes(MIN_REPLY_LEN - len(out))
        return bytes(out)
