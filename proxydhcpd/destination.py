"""Where a proxyDHCP reply goes: the RFC 2131 section 4.1 destination rule, with the PXE 2.1
boot server case (port 4011).

Pure: the request's bytes, the port it came in on and its source in; (address, port) out. Both
request paths of server.py (the fast path and the full one) ask this one function, so they
cannot disagree on where a reply goes.

The rule, first match wins:

1. giaddr set: the request came through a relay agent (RFC 2131 section 4.1: "the server sends
   any return messages to the 'DHCP server' port on the BOOTP relay agent whose address appears
   in 'giaddr'"). The relay forwards it onto the client's segment; the client itself may not be
   reachable from here.
2. A request to the boot server port (4011) from an address: back to that address and port.
   PXE 2.1 boot server discovery: the client already has its address and waits on the port it
   sent from (4011, or 68).
3. ciaddr set: the client has an address and listens on it (RFC 2131 section 4.1: unicast to
   ciaddr), on the client port.
4. Otherwise broadcast on the client port. RFC 2131 section 4.1 unicasts to yiaddr when the
   broadcast flag is clear, but a proxyDHCP never gives an address (yiaddr stays 0.0.0.0), so
   there is nothing to unicast to: the broadcast flag does not change where the reply goes (it
   is set in every offer anyway, reply.py).

The ports are the configured ones (DHCPPort for the relay's server port, ClientPort for the
client), not 67 and 68, so that tests and the bench can run the daemon on other ports.
"""

from __future__ import annotations

import socket

BROADCAST = "255.255.255.255"
NO_ADDRESS = bytes(4)
NO_SOURCE = "0.0.0.0"
BOOT_SERVER_ROLE = 4011           # the port role server.py passes for the boot server socket
_CIADDR = slice(12, 16)           # RFC 2131 figure 1 offsets
_GIADDR = slice(24, 28)


def reply_destination(request: bytes, port_role: int, source: tuple[str, int],
                      server_port: int, client_port: int) -> tuple[str, int]:
    """(address, port) to send the reply to `request` to. `port_role` is 67 or 4011 (the role
    of the socket it came in on, whatever port number it has), `source` the request's IP source
    address and UDP port, `server_port` and `client_port` the configured DHCP server and client
    ports."""
    giaddr = request[_GIADDR]
    if giaddr != NO_ADDRESS:
        return socket.inet_ntoa(giaddr), server_port
    if port_role == BOOT_SERVER_ROLE and source[0] != NO_SOURCE:
        return source
    ciaddr = request[_CIADDR]
    if ciaddr != NO_ADDRESS:
        return socket.inet_ntoa(ciaddr), client_port
    return BROADCAST, client_port
