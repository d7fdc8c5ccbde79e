"""The status socket every daemon answers on, and the client `zmgmcast` uses to ask it.

Protocol (docs/daemon-contract.md): one JSON object per line each way. `status` is open to
everyone on the local Unix socket and on the optional TCP port (without the pid, version and
config path there); control verbs (`reload`, `stop`, and a daemon's own, which read the
request's other fields, e.g. imgsrvd's `mcast-start` {"name": ..., "image": ...})
are accepted only on the Unix socket from a peer whose uid is 0, checked with SO_PEERCRED,
because the TCP port must stay read-only.

The TCP port also answers one HTTP request per connection when its first line is an HTTP
request line: `GET /metrics` (or HEAD) gets the daemon's counters in the Prometheus text format
(common.daemon.metrics), any other path 404, any other method 405; then the connection is
closed. A JSON request never starts with a method and a path followed by "HTTP/1.x", so the
two cannot be confused (docs/monitoring.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

log = logging.getLogger("preboot.status")

MAX_REQUEST_BYTES = 4096
IDLE_TIMEOUT_S = 10.0
# Said only on the local socket: on the TCP port they would tell anyone on the network which
# process to aim at, which release to look up exploits for and where the config lives.
LOCAL_ONLY_FIELDS = ("pid", "version", "config")

StatusProvider = Callable[[], dict[str, Any]]
ControlVerb = Callable[[], Awaitable[dict[str, Any]]]
# A daemon's own control verb: called with the request's fields other than "cmd".
ArgumentVerb = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# The daemon's /metrics text (common.daemon.metrics.render_metrics of its counters).
MetricsProvider = Callable[[], str]

HTTP_REQUEST_LINE = re.compile(rb"^([A-Z]{1,16}) (\S{1,2048}) HTTP/1\.[01]\r?\n$")
MAX_HTTP_HEADER_LINES = 64
METRICS_PATH = "/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bind_unix(path: str) -> socket.socket:
    """Bind the status socket file (mode 0666: status is for everyone; control checks the uid)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    if os.path.exists(path) and _unix_socket_answers(path):
        raise OSError(f"status socket {path} is in use by a running daemon")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def bind_tcp(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _unix_socket_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def parse_request(line: bytes) -> str:
    """The verb of one request line: a JSON object with "cmd", or a bare word."""
    return parse_request_fields(line)[0]


def parse_request_fields(line: bytes) -> tuple[str, dict[str, Any]]:
    """The verb of one request line and its other fields (none for a bare word)."""
    text = line.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            request = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("request is not valid JSON") from None
        verb = request.get("cmd") if isinstance(request, dict) else None
        if not isinstance(verb, str):
            raise ValueError('request has no "cmd" string')
        return verb, {k: v for k, v in request.items() if k != "cmd"}
    if not text:
        raise ValueError("empty request")
    verb = text.split()[0]
    if not verb.replace("-", "").replace("_", "").isalnum():
        raise ValueError("request is neither JSON nor a command word")
    return verb, {}


@dataclass
class StatusServer:
    """Serves status and control on already-bound sockets; owned and stopped by the runner."""

    provider: StatusProvider
    controls: dict[str, ControlVerb]
    unix_path: str | None = None
    argument_controls: dict[str, ArgumentVerb] | None = None
    metrics: MetricsProvider | None = None

    def __post_init__(self) -> None:
        self._servers: list[asyncio.base_events.Server] = []

    async def start(self, unix_sock: socket.socket | None, tcp_sock: socket.socket | None) -> None:
        if unix_sock is not None:
            self._servers.append(await asyncio.start_unix_server(
                lambda r, w: self._serve(r, w, local=True), sock=unix_sock))
        if tcp_sock is not None:
            self._servers.append(await asyncio.start_server(
                lambda r, w: self._serve(r, w, local=False), sock=tcp_sock))

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        self._servers.clear()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except FileNotFoundError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     local: bool) -> None:
        try:
            first = True
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except (asyncio.TimeoutError, ValueError):
                    break  # idle, or a line longer than the stream limit
                if not line:
                    break
                if first and not local:
                    request = HTTP_REQUEST_LINE.match(line)
                    if request is not None:
                        await self._serve_http(reader, writer, request)
                        break
                first = False
                if len(line) > MAX_REQUEST_BYTES:
                    reply = {"ok": False, "error": "request too long"}
                else:
                    reply = await self._answer(line, writer, local)
                writer.write(json.dumps(reply, sort_keys=True).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          request: re.Match[bytes]) -> None:
        """One HTTP/1.x request on the TCP port: its headers read and ignored (at most
        MAX_HTTP_HEADER_LINES, within IDLE_TIMEOUT_S in all), one answer, then close."""
        method, target = request.group(1).decode(), request.group(2).decode("latin-1")
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                for _ in range(MAX_HTTP_HEADER_LINES):
                    header = await reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                else:
                    return
        except (asyncio.TimeoutError, ValueError):
            return
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"read-only: GET /metrics\n", \
                "text/plain; charset=utf-8"
        elif path != METRICS_PATH or self.metrics is None:
            status, body, kind = "404 Not Found", b"this port answers GET /metrics\n", \
                "text/plain; charset=utf-8"
        else:
            status, body, kind = "200 OK", self.metrics().encode("utf-8"), METRICS_CONTENT_TYPE
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + ("Allow: GET, HEAD\r\n" if status.startswith("405") else "") + "\r\n")
        writer.write(head.encode("ascii") + (b"" if method == "HEAD" else body))
        await writer.drain()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter,
                      local: bool) -> dict[str, Any]:
        try:
            verb, fields = parse_request_fields(line)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        if verb == "status":
            status = self.provider()
            if not local:
                status = {k: v for k, v in status.items() if k not in LOCAL_ONLY_FIELDS}
            return {"ok": True, **status}
        with_fields = self.argument_controls or {}
        if verb not in self.controls and verb not in with_fields:
            return {"ok": False, "error": f"unknown command {verb!r}"}
        if not local:
            return {"ok": False, "error": "read-only status port"}
        if _peer_uid(writer) != 0:
            return {"ok": False, "error": "permission denied: control needs root"}
        log.info("control command %r from the status socket", verb)
        if verb in self.controls:
            return await self.controls[verb]()
        return await with_fields[verb](fields)


# ---- client side (zmgmcast, tests, init scripts) ----------------------------------------------

# A status reply is a few KiB; a peer sending more (or trickling it) is not a daemon of ours.
MAX_REPLY_BYTES = 1 << 20


def _exchange(sock: socket.socket, verb: str, timeout_s: float,
              fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send VERB (and fields), read one reply line: at most MAX_REPLY_BYTES, within timeout_s
    in all (socket.timeout), else ValueError / ConnectionError."""
    deadline = time.monotonic() + timeout_s
    sock.sendall(json.dumps({**(fields or {}), "cmd": verb}).encode() + b"\n")
    buffer = bytearray()
    while not buffer.endswith(b"\n"):
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise socket.timeout(f"no full reply within {timeout_s:g} s")
        sock.settimeout(left_s)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a full reply")
        buffer += chunk
        if len(buffer) > MAX_REPLY_BYTES:
            raise ValueError(f"reply longer than {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(bytes(buffer))
    except (ValueError, RecursionError):
        raise ValueError("reply is not JSON") from None
    if not isinstance(reply, dict):
        raise ValueError("reply is not a JSON object")
    return reply


def query_unix(path: str, verb: str = "status", timeout_s: float = 3.0,
               fields: dict[str, Any] | None = None) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        return _exchange(sock, verb, timeout_s, fields)


def query_tcp(host: str, port: int, verb: str = "status", timeout_s: float = 3.0) -> dict[str, Any]:
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        return _exchange(sock, verb, timeout_s)


def configured_value(config_file: str, key: str) -> str | None:
    """KEY from a daemon's config file, read leniently (`Key = value`, `#` comments; the daemon
    itself validates it): how zmgmcast and imgsrvd's status page find another daemon's
    StatusSocket. None when the file or the key is missing."""
    try:
        with open(config_file, encoding="utf-8") as handle:
            for line in handle:
                name, sep, value = line.partition("=")
                if sep and name.strip() == key:
                    value = value.split("#", 1)[0].strip().strip('"')
                    return value or None
    except (OSError, UnicodeDecodeError):
        return None
    return None


def local_status_socket(service: Any, config_dir: str, run_dir: str) -> str:
    """The Unix status socket of SERVICE (a common.daemon.services.Service) on this host: the
    StatusSocket of CONFIG_DIR/<name>.conf, else its default in RUN_DIR."""
    return configured_value(service.config_file(config_dir), "StatusSocket") or \
        service.status_socket(run_dir)
