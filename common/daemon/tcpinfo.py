"""What the kernel says of a TCP connection's progress (struct tcp_info), for the HTTP daemons'
stall watches: imgsrvd's transfer watch and policyd's boot file sender."""

from __future__ import annotations

import socket
import struct

# struct tcp_info's tcpi_bytes_acked (include/uapi/linux/tcp.h, Linux 4.2 and later; RFC 4898's
# tcpEStatsAppHCThruOctetsAcked): what the peer has acknowledged, so far, on this connection.
TCP_INFO_BYTES_ACKED = struct.Struct("=Q")
TCP_INFO_BYTES_ACKED_OFFSET = 120


def acked_bytes(sock: socket.socket | None) -> int | None:
    """The bytes the peer acknowledged on SOCK so far, or None where the kernel does not say
    (not TCP, not Linux, an older kernel)."""
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    end = TCP_INFO_BYTES_ACKED_OFFSET + TCP_INFO_BYTES_ACKED.size
    if len(info) < end:
        return None
    return TCP_INFO_BYTES_ACKED.unpack_from(info, TCP_INFO_BYTES_ACKED_OFFSET)[0]
