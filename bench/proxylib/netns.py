"""Two network namespaces joined by a veth pair: the server side and the client side.

    [ns pxb-srv-PID] veth pxsPID 10.77.0.1/24  <==veth==>  pxcPID 10.77.0.2/24 [ns pxb-cli-PID]

The bench creates both, runs each server in the first and the load generator in the second, and
deletes both at the end (also after a failure or Ctrl-C): deleting a namespace removes its veth
end, and with it the pair. Nothing is configured in the namespace the bench was started in.
Processes enter a namespace with setns(2) through ctypes (os.setns is Python 3.12+).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

SERVER_ADDR = "10.77.0.1"
CLIENT_ADDR = "10.77.0.2"
PREFIX = 24

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    pass


def enter(name: str) -> None:
    """Move the calling process (thread) into network namespace `name`."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


class Lab:
    """The two namespaces and the veth pair; `close()` deletes what this object created."""

    def __init__(self, tag: str | None = None):
        tag = tag or str(os.getpid())
        self.server_ns = f"pxb-srv-{tag}"
        self.client_ns = f"pxb-cli-{tag}"
        self.server_if = f"pxs{tag}"[:15]
        self.client_if = f"pxc{tag}"[:15]
        self.server_addr = SERVER_ADDR
        self.client_addr = CLIENT_ADDR
        self._made: list[str] = []

    def __enter__(self) -> "Lab":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        try:
            for ns in (self.server_ns, self.client_ns):
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.server_if, "netns", self.server_ns, "type", "veth",
                "peer", "name", self.client_if, "netns", self.client_ns)
            for ns, ifname, addr in ((self.server_ns, self.server_if, self.server_addr),
                                     (self.client_ns, self.client_if, self.client_addr)):
                _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "brd", "+", "dev", ifname)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", ifname, "up")
        except Exception:
            self.close()
            raise

    def close(self) -> list[str]:
        """Delete the namespaces this Lab made; returns error messages (empty when clean)."""
        errors = []
        for ns in reversed(self._made):
            res = _ip("netns", "delete", ns, check=False)
            if res.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"ip netns delete {ns}: {res.stderr.strip()}")
        self._made.clear()
        return errors

    def describe(self) -> dict:
        return {"server_ns": self.server_ns, "client_ns": self.client_ns,
                "server_if": self.server_if, "client_if": self.client_if,
                "server_addr": self.server_addr, "client_addr": self.client_addr}
