"""Helpers for the TFTP integration tests: third-party clients, a raw-socket client, files.

Every client runs as a subprocess with a timeout and talks to 127.0.0.1 only. The raw client
speaks the wire format by hand (struct), not through the daemon's own codec, so a codec bug
cannot hide itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from support import DaemonProcess, query_status, write_config  # noqa: F401 (tests/support.py)

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
CLIENT_TIMEOUT_S = 120.0

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6


def daemon_config(folder: Path, root: Path, name: str = "tftpd", **overrides: Any) -> dict:
    """The same loopback, port-0 config the `tftpd_factory` fixture writes."""
    values: dict[str, Any] = {
        "IPAddress": HOST, "Port": 0, "Root": str(root),
        "StatusSocket": str(folder / f"{name}.sock"), "PidFile": str(folder / f"{name}.pid"),
        "StatusPort": 0, "LogLevel": "DEBUG", "LogFile": str(folder / f"{name}.log"),
    }
    values.update(overrides)
    return values


def start_daemon(folder: Path, root: Path, name: str = "tftpd", **overrides: Any) -> DaemonProcess:
    """Start tftpd outside the function-scoped fixture (module-scoped daemons); caller stops it."""
    values = daemon_config(folder, root, name, **overrides)
    config = write_config(folder / f"{name}.conf", values)
    return DaemonProcess("tftpd", config, values["StatusSocket"], Path(values["LogFile"])).start()


def set_config_key(config: Path, key: str, value: Any) -> None:
    """Rewrite (or add) one `Key = Value` line of a daemon's config file."""
    if isinstance(value, bool):
        value = "YES" if value else "NO"
    lines = config.read_text().splitlines()
    out, done = [], False
    for line in lines:
        if line.split("=", 1)[0].strip() == key:
            out.append(f"{key} = {value}")
            done = True
        else:
            out.append(line)
    if not done:
        out.append(f"{key} = {value}")
    config.write_text("\n".join(out) + "\n")


# ---- files ------------------------------------------------------------------------------------

def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_file(path: Path, size: int) -> str:
    """A file of `size` random bytes; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---- waiting ----------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def wait_counters(daemon: DaemonProcess, predicate: Callable[[dict], bool],
                  timeout_s: float = 15.0, what: str = "counters") -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = daemon.counters()
        return predicate(last)

    try:
        wait_until(check, timeout_s, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last counters {last}") from None
    return last


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- third-party clients ----------------------------------------------------------------------

def run(cmd: list[str], timeout_s: float = CLIENT_TIMEOUT_S,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", timeout=timeout_s, **kwargs)


def output_of(result: subprocess.CompletedProcess) -> str:
    return (result.stdout or "") + (result.stderr or "")


def tftp_hpa(port: int, command: list[str], mode: str = "binary",
             timeout_s: float = CLIENT_TIMEOUT_S, cwd: Path | None = None,
             rexmt: int | None = None) -> subprocess.CompletedProcess:
    """tftp-hpa in one-shot mode. It exits 0 even on a TFTP error: check its output."""
    args = ["tftp", HOST, str(port), "-m", mode, "-v"]
    if rexmt is None:
        return run(args + ["-c", *command], timeout_s, cwd=cwd)
    script = f"rexmt {rexmt}\ntimeout 60\n{' '.join(command)}\nquit\n"
    return run(args, timeout_s, cwd=cwd, input=script)


def tftp_hpa_get(port: int, remote: str, local: Path, mode: str = "binary",
                 **kwargs) -> subprocess.CompletedProcess:
    return tftp_hpa(port, ["get", remote, str(local)], mode, **kwargs)


def tftp_hpa_put(port: int, local: Path, remote: str, mode: str = "binary",
                 **kwargs) -> subprocess.CompletedProcess:
    return tftp_hpa(port, ["put", str(local), remote], mode, **kwargs)


def atftp_args(options: dict[str, Any] | None) -> list[str]:
    args = []
    for name, value in (options or {}).items():
        args += ["--option", f"{name} {value}"]
    return args


def atftp_cmd(port: int, direction: str, remote: str, local: Path,
              options: dict[str, Any] | None = None, extra: list[str] | None = None) -> list[str]:
    return (["atftp", *atftp_args(options), *(extra or []), direction, "-r", remote,
             "-l", str(local), HOST, str(port)])


def atftp_get(port: int, remote: str, local: Path, options: dict[str, Any] | None = None,
              extra: list[str] | None = None, timeout_s: float = CLIENT_TIMEOUT_S):
    return run(atftp_cmd(port, "-g", remote, local, options, extra), timeout_s)


def atftp_put(port: int, local: Path, remote: str, options: dict[str, Any] | None = None,
              extra: list[str] | None = None, timeout_s: float = CLIENT_TIMEOUT_S):
    return run(atftp_cmd(port, "-p", remote, local, options, extra), timeout_s)


def curl_url(port: int, remote: str) -> str:
    return f"tftp://{HOST}:{port}/{remote}"


def curl_get_cmd(port: int, remote: str, local: Path, blksize: int | None = None,
                 no_options: bool = False, extra: list[str] | None = None) -> list[str]:
    cmd = ["curl", "-sS", "--noproxy", "*", "-o", str(local)]
    if blksize is not None:
        cmd += ["--tftp-blksize", str(blksize)]
    if no_options:
        cmd.append("--tftp-no-options")
    return cmd + list(extra or []) + [curl_url(port, remote)]


def curl_get(port: int, remote: str, local: Path, blksize: int | None = None,
             no_options: bool = False, extra: list[str] | None = None,
             timeout_s: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run(curl_get_cmd(port, remote, local, blksize, no_options, extra), timeout_s)


def curl_put_cmd(port: int, local: Path, remote: str, blksize: int | None = None,
                 no_options: bool = False) -> list[str]:
    cmd = ["curl", "-sS", "--noproxy", "*", "-T", str(local)]
    if blksize is not None:
        cmd += ["--tftp-blksize", str(blksize)]
    if no_options:
        cmd.append("--tftp-no-options")
    return cmd + [curl_url(port, remote)]


def curl_put(port: int, local: Path, remote: str, blksize: int | None = None,
             no_options: bool = False, timeout_s: float = CLIENT_TIMEOUT_S):
    return run(curl_put_cmd(port, local, remote, blksize, no_options), timeout_s)


# curl's exit codes for TFTP errors (libcurl CURLcode)
CURL_TFTP_NOTFOUND = 68
CURL_TFTP_PERM = 69
CURL_REMOTE_DISK_FULL = 70
CURL_TFTP_ILLEGAL = 71
CURL_REMOTE_FILE_EXISTS = 73


def have(program: str) -> bool:
    return shutil.which(program) is not None


# ---- a raw-socket client ----------------------------------------------------------------------

@dataclass
class Packet:
    opcode: int
    raw: bytes
    source: tuple[str, int]

    @property
    def block(self) -> int:          # DATA and ACK
        return struct.unpack("!H", self.raw[2:4])[0]

    @property
    def code(self) -> int:           # ERROR
        return struct.unpack("!H", self.raw[2:4])[0]

    @property
    def payload(self) -> bytes:      # DATA
        return self.raw[4:]

    @property
    def message(self) -> str:        # ERROR
        return self.raw[4:].split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def options(self) -> dict[str, str]:   # OACK
        parts = self.raw[2:].split(b"\0")
        if parts and parts[-1] == b"":
            parts = parts[:-1]
        return {parts[i].decode().lower(): parts[i + 1].decode()
                for i in range(0, len(parts) - 1, 2)}

    def __repr__(self) -> str:
        names = {1: "RRQ", 2: "WRQ", 3: "DATA", 4: "ACK", 5: "ERROR", 6: "OACK"}
        name = names.get(self.opcode, f"op{self.opcode}")
        if self.opcode in (OP_DATA, OP_ACK):
            return f"<{name} {self.block} {len(self.raw) - 4}B from {self.source[1]}>"
        if self.opcode == OP_ERROR:
            return f"<ERROR {self.code} {self.message!r} from {self.source[1]}>"
        return f"<{name} {self.raw[2:60]!r} from {self.source[1]}>"


def request(opcode: int, filename: str | bytes, mode: str | bytes = "octet",
            options: dict[str, Any] | None = None) -> bytes:
    def b(text):
        return text if isinstance(text, bytes) else str(text).encode("ascii")
    parts = [b(filename), b(mode)]
    for name, value in (options or {}).items():
        parts += [b(name), b(value)]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)


def ack(block: int) -> bytes:
    return struct.pack("!HH", OP_ACK, block & 0xFFFF)


def data(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", OP_DATA, block & 0xFFFF) + payload


def error(code: int, message: str) -> bytes:
    return struct.pack("!HH", OP_ERROR, code) + message.encode() + b"\0"


class RawClient:
    """One UDP socket (one client TID) talking to the daemon's request port by hand."""

    def __init__(self, port: int):
        self.server = (HOST, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.tid: tuple[str, int] | None = None   # the transfer's address, once it answers

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def send(self, datagram: bytes, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(datagram, to or self.server)

    def send_tid(self, datagram: bytes) -> None:
        assert self.tid is not None, "no transfer yet"
        self.sock.sendto(datagram, self.tid)

    def rrq(self, filename, mode="octet", options=None) -> None:
        self.send(request(OP_RRQ, filename, mode, options))

    def wrq(self, filename, mode="octet", options=None) -> None:
        self.send(request(OP_WRQ, filename, mode, options))

    def recv(self, timeout_s: float = 5.0) -> Packet | None:
        """The next datagram, or None after `timeout_s` of silence (ICMP errors are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                raw, source = self.sock.recvfrom(70000)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                continue
            opcode = struct.unpack("!H", raw[:2])[0] if len(raw) >= 2 else -1
            if self.tid is None and source != self.server:
                self.tid = source
            return Packet(opcode, raw, source)

    def expect(self, opcode: int, timeout_s: float = 5.0, block: int | None = None) -> Packet:
        packet = self.recv(timeout_s)
        assert packet is not None, f"no answer within {timeout_s} s (expected opcode {opcode})"
        assert packet.opcode == opcode, f"expected opcode {opcode}, got {packet!r}"
        if block is not None:
            assert packet.block == block, f"expected block {block}, got {packet!r}"
        return packet

    def expect_error(self, timeout_s: float = 5.0) -> Packet:
        return self.expect(OP_ERROR, timeout_s)

    def drain(self, wait_s: float) -> list[Packet]:
        """Everything that arrives within `wait_s`."""
        got = []
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            packet = self.recv(left)
            if packet is None:
                return got
            got.append(packet)

    def download(self, filename: str, options: dict[str, Any] | None = None,
                 timeout_s: float = 5.0) -> bytes:
        """A whole RRQ in lock-step (windowsize honoured by ACKing each window's end)."""
        self.rrq(filename, "octet", options)
        first = self.recv(timeout_s)
        assert first is not None, "no answer to the RRQ"
        blksize, window = 512, 1
        if first.opcode == OP_ERROR:
            raise FileNotFoundError(f"{first.code}: {first.message}")
        content = bytearray()
        expected = 1
        if first.opcode == OP_OACK:
            opts = first.options
            blksize = int(opts.get("blksize", 512))
            window = int(opts.get("windowsize", 1))
            self.send_tid(ack(0))
            packet = self.expect(OP_DATA, timeout_s)
        else:
            assert first.opcode == OP_DATA, first
            packet = first
        in_window = 0
        while True:
            if packet.opcode != OP_DATA:
                raise AssertionError(f"unexpected {packet!r}")
            if packet.block == expected & 0xFFFF:
                content += packet.payload
                in_window += 1
                last = len(packet.payload) < blksize
                if last or in_window == window:
                    self.send_tid(ack(expected))
                    in_window = 0
                if last:
                    return bytes(content)
                expected += 1
            packet = self.expect(OP_DATA, timeout_s)
