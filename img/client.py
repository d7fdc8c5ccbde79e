"""The engine's HTTP client of the imaging protocol (docs/imaging-protocol.md), on http.client.
The protocol itself (paths, URLs, headers, referrals, refusals) is common.imaging.protocol.

Every socket has a timeout; every failure is a ServerError whose message names the server and
what failed. One ImagingClient holds one keep-alive connection per thread.
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import secrets
import select
import ssl
import threading
from typing import Any

from common.tlspin import fingerprint

from common.imaging.protocol import (ERROR_HEADER, MODE_HEADER, REPORTS_HEADER,
                                     SESSION_HEADER, WORKSTATION_HEADER, error_reason as _reason, image_url,
                                     referral_target, split_server)

from .credentials import ServerAccess, TlsTrust

TIMEOUT = 30.0
# This run's X-Preboot-Session (docs/imaging-protocol.md, "Operations"): the server counts the
# many Range requests of a restore as one retrieve and joins its record with our report.
SESSION = secrets.token_hex(8)
_report_server = ""         # where this run reports its results (reports_to)


def reports_to(server: str) -> None:
    """This run reports its results to `server`: requests to it say so (X-Preboot-Reports),
    so that server joins its record of each operation with the report."""
    global _report_server
    _report_server = server
UPLOAD_BUFFER = 1 << 20
MAX_HEAD = 64 * 1024       # an answer's status line and headers, read before its body


class _HeadThenSocket:
    """What http.client.HTTPResponse reads a response from: the head already taken off the
    socket, then the socket."""

    def __init__(self, head: bytes, sock: Any):
        self._raw = _HeadThenRaw(head, sock)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


class _HeadThenRaw(io.RawIOBase):
    def __init__(self, head: bytes, sock: Any):
        self._head = memoryview(head)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return self._sock.recv_into(buffer)


class ServerError(Exception):
    """A request that failed; str() names the server and what failed."""

    def __init__(self, message: str, status: int | None = None, answer: Any = None):
        super().__init__(message)
        self.status = status
        self.answer = answer


class ConnectionLost(ServerError):
    """The connection broke (refused, reset, timed out, closed early): worth a retry."""


class Referral(ServerError):
    """A 307: the image is on another imaging server (auto mode)."""

    def __init__(self, message: str, server: str, path: str):
        super().__init__(message, 307)
        self.server = server
        self.path = path


def _referral(client_server: str, what: str, location: str | None) -> Referral | None:
    target = referral_target(location)
    if target is None:
        return None
    server, path = target
    return Referral(f"{client_server}: {what}: referred to //{server}/{path}", server, path)


class _TrustedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS whose every connect (http.client reconnects by itself) checks the server before a
    byte of a request, and so the capability, is sent: the certificate's SHA-256 against the
    pin, or the CA's verdict. A server that fails is a ServerError, never retried."""

    def __init__(self, host: str, port: int, timeout: float, tls: TlsTrust):
        super().__init__(host, port, timeout=timeout, context=tls.context())
        self._tls = tls

    def connect(self) -> None:
        try:
            super().connect()
        except ssl.SSLCertVerificationError as exc:
            raise ServerError(f"{self.host}:{self.port}: the server's certificate is not "
                              f"trusted ({exc.verify_message}; {self._tls.describe()}); "
                              "nothing was sent") from None
        if self._tls.pin:
            der = self.sock.getpeercert(binary_form=True) or b""
            got = fingerprint(der)
            if not hmac.compare_digest(got, self._tls.pin):
                self.close()
                raise ServerError(f"{self.host}:{self.port}: the server's certificate "
                                  f"(sha256:{got}) is not the pinned one (sha256:"
                                  f"{self._tls.pin}); nothing was sent")


def open_connection(host: str, port: int, timeout: float,
                    tls: TlsTrust | None) -> http.client.HTTPConnection:
    if tls is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return _TrustedHTTPSConnection(host, port, timeout, tls)


class ImagingClient:
    def __init__(self, server: str, workstation: str = "", mode: str = "manual",
                 timeout: float = TIMEOUT, access: ServerAccess = ServerAccess()):
        """access: the capability presented on every request (Authorization: Bearer, RFC 6750
        section 2.1) and the TLS trust demanded of the server (docs/security.md)."""
        self.server = server
        self.host, self.port = split_server(server)
        self.workstation = workstation
        self.mode = mode
        self.access = access
        self.token = access.token
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ connections
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_connection(self.host, self.port, self.timeout, self.access.tls)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> "ImagingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {MODE_HEADER: self.mode, SESSION_HEADER: SESSION}
        if self.server == _report_server:
            headers[REPORTS_HEADER] = "yes"
        if self.workstation:
            headers[WORKSTATION_HEADER] = self.workstation
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _request(self, method: str, url: str, what: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None
                 ) -> tuple[http.client.HTTPResponse, bytes | None]:
        """One request on this thread's connection; the response with its body read (None
        for a GET answered 200/206: the caller reads it)."""
        conn = self._connection()
        try:
            reused = conn.sock is not None
            try:
                conn.request(method, url, body=body, headers=self._headers(headers))
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # A kept-alive connection the server closed while idle: once more on a new one
                # (every request here is idempotent or not yet seen by the server).
                self._drop()
                conn = self._connection()
                conn.request(method, url, body=body, headers=self._headers(headers))
                response = conn.getresponse()
            if method == "GET" and response.status in (200, 206):
                return response, None
            data = response.read()
            return response, data
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise ConnectionLost(f"{self.server}: {what}: connection failed: "
                                 f"{exc or type(exc).__name__}") from None

    # ------------------------------------------------------------------ requests
    def size(self, path: str) -> int:
        response, _ = self._request("HEAD", image_url(path), f"HEAD {path}")
        if response.status == 307:
            referral = _referral(self.server, f"image {path}", response.getheader("Location"))
            if referral:
                raise referral
        if response.status != 200:
            # A HEAD answer has no body: the server puts its reason in a header instead.
            reason = response.getheader(ERROR_HEADER) or (
                "no such image" if response.status == 404 else response.reason)
            raise ServerError(f"{self.server}: image {path}: HTTP {response.status}: {reason}",
                              response.status)
        length = response.getheader("Content-Length")
        if length is None or not length.isdigit():
            raise ServerError(f"{self.server}: image {path}: no size in the HEAD answer")
        return int(length)

    def read_range(self, path: str, offset: int, length: int) -> bytearray:
        """Bytes [offset, offset + length) of the image; ConnectionLost carries what arrived
        in `.answer` (bytes) so the caller may continue from there."""
        what = f"GET {path} bytes {offset}-{offset + length - 1}"
        response, body = self._request("GET", image_url(path), what, headers={
            "Range": f"bytes={offset}-{offset + length - 1}"})
        if body is not None:
            raise ServerError(f"{self.server}: {what}: HTTP {response.status}: {_reason(body)}",
                              response.status)
        if response.status != 206:
            self._drop()
            raise ServerError(f"{self.server}: {what}: HTTP {response.status}, not a range")
        data = bytearray(length)             # read straight into it: no pieces to join
        view = memoryview(data)
        got = 0
        try:
            while got < length:
                count = response.readinto(view[got:])
                if not count:
                    break
                got += count
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise ConnectionLost(f"{self.server}: {what}: connection lost after {got} bytes: "
                                 f"{exc or type(exc).__name__}", answer=bytes(data[:got])) from None
        if got != length:
            self._drop()
            raise ConnectionLost(f"{self.server}: {what}: connection closed after "
                                 f"{got} bytes", answer=bytes(data[:got]))
        return data

    def post_json(self, url: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        return self.call_json("POST", url, body, what, ok=(200,))

    def call_json(self, method: str, url: str, body: dict[str, Any] | None, what: str,
                  ok: tuple[int, ...] = (200, 201)) -> dict[str, Any]:
        """A JSON request answered with a JSON object and one of the `ok` statuses; else
        ServerError with the server's reason and the status."""
        payload = None if body is None else json.dumps(body).encode()
        response, data = self._request(method, url, what, payload,
                                       {"Content-Type": "application/json"} if body is not None
                                       else None)
        if data is None:                       # a GET answered 200: its body is still unread
            data = response.read()
        if response.status not in ok:
            raise ServerError(f"{self.server}: {what}: HTTP {response.status}: {_reason(data)}",
                              response.status)
        try:
            answer = json.loads(data)
        except ValueError:
            raise ServerError(f"{self.server}: {what}: the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ServerError(f"{self.server}: {what}: the answer is not a JSON object")
        return answer

    def work(self, facts: dict[str, Any], mode: str = "auto",
             identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """identity: the one on the disk (common.identity's wire form), sent only when there
        is one (docs/identity.md)."""
        body = {**facts, "mode": mode}
        if identity is not None:
            body["identity"] = identity
        return self.post_json("/v1/work", body, "work request")

    def result(self, report: dict[str, Any]) -> dict[str, Any]:
        return self.post_json("/v1/results", report, "result report")

    def upload(self, path: str) -> "Upload":
        return Upload(self, path)


class Upload:
    """A PUT of an image in chunked transfer encoding: a write-only file object for
    ImageWriter. finish() ends the body and returns the server's JSON answer, or raises
    ServerError with the server's reason (409, 403, 422, 507, ...)."""

    def __init__(self, client: ImagingClient, path: str):
        self.client = client
        self.path = path
        self._buffer = bytearray()
        self._refused: tuple[http.client.HTTPResponse, bytes] | None = None
        self.sent = 0
        conn = open_connection(client.host, client.port, client.timeout, client.access.tls)
        self._conn = conn
        what = f"PUT {path}"
        try:
            conn.putrequest("PUT", image_url(path), skip_accept_encoding=True)
            for key, value in client._headers({"Transfer-Encoding": "chunked",
                                               "Content-Type": "application/octet-stream",
                                               "Expect": "100-continue"}).items():
                conn.putheader(key, value)
            conn.endheaders()
            self._await_continue(conn)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionLost(f"{client.server}: {what}: connection failed: {exc}") from None
        if self._refused is not None:
            self._raise_refusal()

    def _await_continue(self, conn: http.client.HTTPConnection, wait: float = 5.0) -> None:
        """Read the 100 Continue (or an early refusal) the server answers to Expect. The head
        is read a byte at a time (a TLS socket cannot peek), so nothing after it is taken."""
        sock = conn.sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not select.select([sock], [], [], wait)[0]:
            return                        # a server that ignores Expect: send anyway
        head = bytearray()
        while not head.endswith(b"\r\n\r\n") and len(head) < MAX_HEAD:
            byte = sock.recv(1)
            if not byte:
                break
            head += byte
        if head.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100")):
            return
        response = http.client.HTTPResponse(_HeadThenSocket(bytes(head), sock),  # type: ignore
                                            method="PUT")
        response.begin()
        self._refused = (response, response.read())

    def _raise_refusal(self) -> None:
        assert self._refused is not None
        response, body = self._refused
        self._conn.close()
        if response.status == 307:
            referral = _referral(self.client.server, f"store of {self.path}",
                                 response.getheader("Location"))
            if referral:
                raise referral
        raise ServerError(f"{self.client.server}: store of {self.path} refused: HTTP "
                          f"{response.status}: {_reason(body)}", response.status,
                          _answer(body))

    def write(self, data: bytes | memoryview) -> int:
        """Small pieces (chunk headers) are gathered; a large one (a chunk's payload) goes out
        as it is, without being copied into the buffer first."""
        if len(data) >= UPLOAD_BUFFER:
            self._flush()
            self._send_chunk(data)
        else:
            self._buffer += data
            if len(self._buffer) >= UPLOAD_BUFFER:
                self._flush()
        return len(data)

    def _flush(self) -> None:
        if self._buffer:
            self._send_chunk(self._buffer)
            self._buffer.clear()

    def _send_chunk(self, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        try:
            self._conn.send(b"%x\r\n" % length)
            self._conn.send(data)
            self._conn.send(b"\r\n")
            self.sent += length
        except OSError as exc:
            # The server may have answered and closed (a refused image): read its reason.
            self._read_early_answer(exc)

    def _read_early_answer(self, exc: BaseException) -> None:
        try:
            response = self._conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            raise ConnectionLost(f"{self.client.server}: PUT {self.path}: connection lost "
                                 f"after {self.sent} bytes: {exc}") from None
        self._refused = (response, body)
        self._raise_refusal()

    def finish(self) -> dict[str, Any]:
        self._flush()
        try:
            self._conn.send(b"0\r\n\r\n")
        except OSError as exc:
            self._read_early_answer(exc)
        try:
            response = self._conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise ConnectionLost(f"{self.client.server}: PUT {self.path}: no answer after "
                                 f"sending the image: {exc}") from None
        self._conn.close()
        if response.status in (200, 201):
            return _answer(body) or {}
        self._refused = (response, body)
        self._raise_refusal()
        return {}

    def abort(self) -> None:
        self._conn.close()


def _answer(body: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
