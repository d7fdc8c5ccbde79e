"""The aiohttp plumbing that an HTTP daemon (prebootpolicyd, imgsrvd) runs its application on.

    http_log = quiet_bad_requests("preboot.<daemon>.http", log)
    listener = HttpListener(http_log, keepalive_s=..., shutdown_timeout_s=...,
                            send_timeout_s=...)   # a peer that takes none of our output
    listener.bind(address, port)     # in Service.bind, before the daemon detaches
    await listener.start(app, tls)   # in Service.start: an AppRunner and a SockSite on it
                                     # (tls: an ssl.SSLContext from common.daemon.tls, or None)
    listener.listen()                # for the status reply: [{"proto": "tcp", ...}]
    await listener.stop()            # in Service.stop: stop listening, let answers finish
    listener.close()                 # and, last, close the socket
    address_change_warnings(old, new)   # in Service.apply: the address needs a restart
    error_middleware(not_found, internal_error)   # 404 and 500 in the daemon's words
    body = await read_json_body(request, JsonLimits(...))   # BadJsonBody: answer 400
    app.router.add_get("/metrics", metrics_handler(service, counters))   # Prometheus text

The application itself (routes, middlewares, handlers) stays in the daemon. This module knows
aiohttp and common.daemon.tcplisten only; nothing in it is specific to one daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .metrics import CONTENT_TYPE, render_metrics
from .services import Service
from .tcplisten import LISTEN_BACKLOG, bind_listener
from .tls import HANDSHAKE_TIMEOUT_S

log = logging.getLogger("preboot.http")

RESTART_WARNING = "IPAddress and Port changes need a restart; kept the old address"


class _BadRequestsQuietly(logging.Filter):
    """aiohttp logs a request it cannot parse (a line over 8190 bytes, broken framing) with a
    traceback at ERROR. A client's garbage is not our error: one DEBUG line instead."""

    def __init__(self, log: logging.Logger):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("unreadable HTTP request: %s",
                               " ".join(str(exc.message).split())[:200])
            return False
        return True


def quiet_bad_requests(name: str, log: logging.Logger) -> logging.Logger:
    """The logger NAME for aiohttp, with unparsable requests logged as one DEBUG line on LOG."""
    http_log = logging.getLogger(name)
    http_log.addFilter(_BadRequestsQuietly(log))
    return http_log


def address_change_warnings(old: Any, new: Any) -> list[str]:
    """A reload cannot move the listening socket: the warning when ip_address or port changed."""
    if (new.ip_address, new.port) != (old.ip_address, old.port):
        return [RESTART_WARNING]
    return []


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = Callable[[web.Request], web.StreamResponse]


def error_middleware(not_found: Answer, internal_error: Answer,
                     passthrough: tuple[type[BaseException], ...] = ()) -> Any:
    """The middleware that answers an unknown path with not_found(request) and a handler's
    exception with internal_error(request), called while the exception is being handled (so it
    can log it with its traceback): never a traceback to the client. aiohttp's own HTTP errors
    (405 and the like) and the PASSTHROUGH exceptions go on unchanged."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return not_found(request)
        except web.HTTPException:
            raise
        except passthrough:
            raise
        except Exception:
            return internal_error(request)

    return errors


def metrics_handler(service: Service, counters: Callable[[], dict[str, Any]],
                    started_at: float | None = None) -> Handler:
    """GET /metrics: the daemon's counters (what its status reply carries) in the Prometheus
    text format (common.daemon.metrics); read-only, answered to whoever the application's
    middlewares let through (AllowedClients)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        text = render_metrics(service, counters(), started_at)
        return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})

    return handle


class BadJsonBody(ValueError):
    """A request body that is not a bounded JSON object; str() is the reason for the 400."""


@dataclass(frozen=True)
class JsonLimits:
    """What a JSON request body may be. Every bound keeps one request's cost (memory, time,
    recursion) small whatever the client sends."""

    max_bytes: int = 64 * 1024
    timeout_s: float = 30.0          # the whole body, not each read
    max_depth: int = 32              # nested arrays and objects
    max_number_chars: int = 64       # digits, sign, point and exponent of one number


async def read_json_body(request: web.Request, limits: JsonLimits) -> dict[str, Any]:
    """The request's body as a JSON object, or BadJsonBody with the reason: too large, too
    slow, not UTF-8, nested too deep, a number too long, not JSON, not an object."""
    raw = await _read_bounded(request, limits)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJsonBody(f"the body is not UTF-8 (byte {exc.start})") from None
    return parse_json_object(text, limits)


def parse_json_object(text: str, limits: JsonLimits) -> dict[str, Any]:
    """TEXT as a JSON object within LIMITS (depth, number length); BadJsonBody otherwise."""
    _check_depth(text, limits.max_depth)
    try:
        value = json.loads(text, parse_int=_number(int, limits), parse_float=_number(
            float, limits), parse_constant=_no_constant)
    except BadJsonBody:
        raise
    except (ValueError, RecursionError) as exc:
        raise BadJsonBody(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadJsonBody(f"the body must be a JSON object, not {type(value).__name__}")
    return value


async def _read_bounded(request: web.Request, limits: JsonLimits) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise BadJsonBody(f"the body is larger than {limits.max_bytes} bytes")
    try:
        return await asyncio.wait_for(_read_at_most(request, limits.max_bytes),
                                      limits.timeout_s)
    except asyncio.TimeoutError:
        raise BadJsonBody(f"the body did not arrive within {limits.timeout_s:g} s") from None


async def _read_at_most(request: web.Request, max_bytes: int) -> bytes:
    # Read ourselves rather than request.read(): its bound is the application's
    # client_max_size (an upload's is unbounded) and its error is a 413 with aiohttp's text.
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise BadJsonBody(f"the body is larger than {max_bytes} bytes")


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than MAX_DEPTH before json.loads recurses into it (100,000 '['
    would end in RecursionError, deep enough ones in a crash)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise BadJsonBody(f"the body is nested deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1


def _number(kind: Callable[[str], Any], limits: JsonLimits) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        # A 5,000-digit integer costs quadratic time to convert, and str() of one over 4,300
        # digits raises ValueError wherever it is later formatted.
        if len(text) > limits.max_number_chars:
            raise BadJsonBody(f"a number in the body is longer than "
                              f"{limits.max_number_chars} characters")
        return kind(text)
    return parse


def _no_constant(name: str) -> Any:
    raise BadJsonBody(f"the body is not JSON: {name} is not a JSON value")


class _SendDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a send deadline: when the peer has taken
    none of our output for send_timeout_s (the transport's buffer stays above its high-water
    mark), the connection is aborted. aiohttp has no such timeout, and its keep-alive timer
    does not run while an answer waits to drain, so a client that pipelines requests and never
    reads would hold its connection (and the answers queued for it) for ever."""

    def __init__(self, inner: asyncio.Protocol, send_timeout_s: float):
        self._inner = inner
        self._send_timeout_s = send_timeout_s
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._send_timeout_s,
                                                                 self._expired)

    def resume_writing(self) -> None:
        self._disarm()
        self._inner.resume_writing()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.info("closed the connection of %s: it took none of our output for %g s",
                     peer[0] if peer else "a client", self._send_timeout_s)
            transport.abort()


class _Site(web.SockSite):
    """aiohttp's SockSite, with each connection's protocol under a send deadline."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *, backlog: int,
                 send_timeout_s: float | None, ssl_context: ssl.SSLContext | None):
        super().__init__(runner, sock, backlog=backlog, ssl_context=ssl_context)
        self._send_timeout_s = send_timeout_s

    async def start(self) -> None:
        if self._send_timeout_s is None:
            return await super().start()
        await web.BaseSite.start(self)        # SockSite.start, with the factory wrapped
        factory = self._runner.server
        assert factory is not None
        timeout_s = self._send_timeout_s
        # With TLS, the deadline sees the application's writes: asyncio's SSL protocol passes
        # its own pause_writing and resume_writing on to the protocol it wraps.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _SendDeadline(factory(), timeout_s), sock=self._sock,
            backlog=self._backlog, ssl=self._ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self._ssl_context else None)


class HttpListener:
    """The listening TCP socket of an HTTP daemon and the aiohttp runner serving on it."""

    def __init__(self, logger: logging.Logger, *, keepalive_s: float, shutdown_timeout_s: float,
                 backlog: int = LISTEN_BACKLOG, send_timeout_s: float | None = None):
        self.logger = logger
        self.keepalive_s = keepalive_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.backlog = backlog
        self.send_timeout_s = send_timeout_s
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._tls = False

    def bind(self, address: str, port: int) -> socket.socket:
        self._sock = bind_listener(address, port, self.backlog)
        return self._sock

    async def start(self, app: web.Application, ssl_context: ssl.SSLContext | None = None
                    ) -> None:
        """Serve app on the bound socket; with ssl_context, TLS only (common.daemon.tls)."""
        assert self._sock is not None, "bind() first"
        self._tls = ssl_context is not None
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self.shutdown_timeout_s,
                                     logger=self.logger, keepalive_timeout=self.keepalive_s)
        await self._runner.setup()
        site = _Site(self._runner, self._sock, backlog=self.backlog,
                     send_timeout_s=self.send_timeout_s, ssl_context=ssl_context)
        await site.start()

    async def stop(self) -> None:
        """Stop listening; in-flight answers finish (up to shutdown_timeout_s)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def listen(self) -> list[dict[str, Any]]:
        if self._sock is None or self._sock.fileno() < 0:
            return []
        address, port = self._sock.getsockname()[:2]
        endpoint: dict[str, Any] = {"proto": "tcp", "address": address, "port": port}
        if self._tls:
            endpoint["tls"] = True
        return [endpoint]

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"
