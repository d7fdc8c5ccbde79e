"""The multicast sender's sockets (docs/multicast-protocol.md, "Roles and ports"): the control
socket on 997/udp and one group socket per session, set up as the doc asks, and the send of a
run of DATA packets with UDP generic segmentation offload.

- The control socket binds the sender's unicast address with IP_MULTICAST_ALL off: Linux
  would otherwise hand it the group traffic of every group any socket of the host joined on
  that port (a host that is both sender and receiver).
- A group socket sends to one group from the interface named (IP_MULTICAST_IF: never the
  routing table's choice; only without one, the route to the group decides), with the TTL of
  the settings (1: this segment only), a large send buffer, and never receives (no port of
  interest, IP_MULTICAST_ALL off).
- A run goes out as one sendmsg with UDP_SEGMENT (Linux 4.18; the kernel cuts it into
  datagrams of the segment size, each a whole DATA packet); a kernel or device that refuses it
  gets the same packets one sendto each, from then on.

Sockets are non-blocking: the engine's one thread must never wait on a full send buffer; a
send that would block returns False and is tried again when the pacing allows.
"""

from __future__ import annotations

import errno
import select
import socket
import struct

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)          # linux/udp.h
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # linux/in.h
SEND_BUFFER_BYTES = 4 << 20
CONTROL_BUFFER_BYTES = 1 << 20
MAX_RUN_BYTES = 65_000          # one GSO send: under IPv4's 65,507-byte UDP payload
MAX_RUN_PACKETS = 64            # UDP_MAX_SEGMENTS
PLAIN_SEND_WAIT_S = 0.05        # the fallback may wait this long for room, per packet
_GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


def _big_buffer(sock: socket.socket, option: int, size: int) -> None:
    """SO_SNDBUFFORCE/SO_RCVBUFFORCE (root: past net.core.*mem_max), else the plain option."""
    force = {socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32),
             socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33)}[option]
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


def control_socket(address: str, port: int) -> socket.socket:
    """The control socket: bound to (address, port), IP_MULTICAST_ALL off, non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        _big_buffer(sock, socket.SO_RCVBUF, CONTROL_BUFFER_BYTES)
        sock.bind((address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class GroupSender:
    """One session's socket to its group: send(packet) for control messages, send_run() for a
    run of equal-size DATA packets. Counts what went out and what the kernel refused."""

    def __init__(self, group: str, port: int, interface_address: str, ttl: int,
                 loopback: bool = True):
        self.destination = (group, port)
        self.gso = True
        self.sends = 0               # system calls
        self.packets = 0
        self.would_block = 0
        self.errors = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            if interface_address:          # else the route to the group says (224.0.0.0/4)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(interface_address))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", ttl))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP,
                            struct.pack("B", 1 if loopback else 0))
            _big_buffer(sock, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            sock.bind((interface_address or "0.0.0.0", 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def send(self, packet: bytes) -> bool:
        """One datagram; False when it could not go (full buffer, an error: counted)."""
        try:
            self.sock.sendto(packet, self.destination)
        except BlockingIOError:
            self.would_block += 1
            return False
        except OSError:
            self.errors += 1
            return False
        self.sends += 1
        self.packets += 1
        return True

    def send_run(self, buffer: bytearray, count: int, segment: int) -> bool:
        """count packets of segment bytes (the last may be shorter) back to back in buffer.
        True when they went out; False when the send buffer is full (nothing went: try again
        later). Other errors are counted and the run dropped (the receivers NAK it)."""
        if count > 1 and self.gso:
            try:
                self.sock.sendmsg([buffer], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))],
                                  0, self.destination)
            except BlockingIOError:
                self.would_block += 1
                return False
            except OSError as exc:
                if exc.errno not in _GSO_REFUSED:
                    self.errors += 1
                    return True
                self.gso = False             # this kernel or device: one packet a call
            else:
                self.sends += 1
                self.packets += count
                return True
        view = memoryview(buffer)
        for n in range(count):
            packet = view[n * segment:(n + 1) * segment]
            while True:
                try:
                    self.sock.sendto(packet, self.destination)
                    break
                except BlockingIOError:
                    if n == 0:
                        self.would_block += 1
                        return False
                    # part of the run is out: wait briefly for room rather than split it
                    if not select.select([], [self.sock], [], PLAIN_SEND_WAIT_S)[1]:
                        self.errors += 1
                        return True
                except OSError:
                    self.errors += 1
                    return True
            self.sends += 1
            self.packets += 1
        return True
