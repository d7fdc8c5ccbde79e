"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (READY=1, RELOADING=1, ...)."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` to systemd if it is listening; return whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
