"""Test support importable from any test module: run a real daemon with a ready handshake.

A daemon is ready when its Unix status socket answers (docs/daemon-contract.md); tests bind
port 0 and read the real port from the status reply, so runs never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent


def query_status(path: str, verb: str = "status", timeout_s: float = 3.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps({"cmd": verb}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def write_config(path: Path, values: dict[str, Any]) -> Path:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = "YES" if value else "NO"
        lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonProcess:
    package: str
    config: Path
    status_socket: str
    log_file: Path
    proc: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)   # e.g. ["ip", "netns", "exec", "ns1"]

    def start(self, timeout_s: float = 10.0) -> "DaemonProcess":
        env = dict(os.environ, PYTHONPATH=str(REPO), **self.extra_env)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.package, "--foreground", "--config",
             str(self.config)],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise RuntimeError(f"{self.package} exited with {self.proc.returncode}: {output}")
            try:
                if query_status(self.status_socket, timeout_s=1.0).get("ok"):
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.package} did not become ready in {timeout_s} s")

    def status(self) -> dict[str, Any]:
        return query_status(self.status_socket)

    def counters(self) -> dict[str, Any]:
        return self.status()["counters"]

    @property
    def port(self) -> int:
        return self.status()["listen"][0]["port"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def tftpd_on_loopback(root: Path, work: Path, log_level: str = "INFO") -> DaemonProcess:
    """Our tftpd serving ROOT on 127.0.0.1 (a free port), its config, socket and log in WORK:
    started; the caller stops it."""
    values = {"IPAddress": "127.0.0.1", "Port": 0, "Root": str(root), "StatusPort": 0,
              "StatusSocket": str(work / "t.sock"), "PidFile": str(work / "t.pid"),
              "LogFile": str(work / "t.log"), "LogLevel": log_level}
    daemon = DaemonProcess("tftpd", write_config(work / "tftpd.conf", values),
                           values["StatusSocket"], work / "t.log")
    return daemon.start(timeout_s=20)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside_new_netns(tag: str = "pbt") -> Iterator[str]:
    """Run the calling thread (and what it starts: daemons, curl, img, threads) in a new
    network namespace with only its loopback, up; back in the old one afterwards, the
    namespace removed. For tests whose daemons send multicast: it never leaves the namespace.
    setns(2) on one thread is allowed for network namespaces in a threaded process."""
    libc = ctypes.CDLL(None, use_errno=True)
    name = f"{tag}-{os.getpid()}-{time.monotonic_ns() % 1000000}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
        finally:
            os.close(target)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
            yield name
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace")
    finally:
        os.close(original)
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def disk_tool_marks(tools: tuple[str, ...], fuse: bool = False) -> list:
    """The pytestmark of a test module that builds filesystems on loop devices: root, slow,
    skipped (with the reason) without root, one of `tools`, or /dev/fuse when `fuse`."""
    import shutil

    import pytest
    missing = [tool for tool in tools if shutil.which(tool) is None]
    marks = [pytest.mark.root, pytest.mark.slow,
             pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root"),
             pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing))]
    if fuse:
        marks.append(pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                                        reason="ntfs-3g needs /dev/fuse"))
    return marks
