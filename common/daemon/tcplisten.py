"""The listening TCP socket of an HTTP daemon (prebootpolicyd, imgsrvd), bound before the
daemon detaches, with a bind error worded for an administrator."""

from __future__ import annotations

import errno
import socket

LISTEN_BACKLOG = 1024      # a lab powering on connects all at once


def bind_listener(address: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EACCES:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = " (IPAddress is not an address of this host)"
        raise OSError(f"{address} port {port}/tcp: {exc.strerror}{hint}") from None
    sock.setblocking(False)
    return sock
