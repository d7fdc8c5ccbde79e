"""The aiohttp plumbing that an HTTP daemon (prebootpolicyd, imgsrvd) runs its application on.

    http_log = quiet_bad_requests("preboot.<daemon>.http", log)
    listener = HttpListener(http_log, keepalive_s=..., shutdown_timeout_s=...)
    listener.bind(address, port)     # in Service.bind, before the daemon detaches
    await listener.start(app)        # in Service.start: an AppRunner and a SockSite on it
    listener.listen()                # for the status reply: [{"proto": "tcp", ...}]
    await listener.stop()            # in Service.stop: stop listening, let answers finish
    listener.close()                 # and, last, close the socket
    address_change_warnings(old, new)   # in Service.apply: the address needs a restart
    error_middleware(not_found, internal_error)   # 404 and 500 in the daemon's words

The application itself (routes, middlewares, handlers) stays in the daemon. This module knows
aiohttp and common.daemon.tcplisten only; nothing in it is specific to one daemon.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .tcplisten import LISTEN_BACKLOG, bind_listener

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


class HttpListener:
    """The listening TCP socket of an HTTP daemon and the aiohttp runner serving on it."""

    def __init__(self, logger: logging.Logger, *, keepalive_s: float, shutdown_timeout_s: float,
                 backlog: int = LISTEN_BACKLOG):
        self.logger = logger
        self.keepalive_s = keepalive_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.backlog = backlog
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None

    def bind(self, address: str, port: int) -> socket.socket:
        self._sock = bind_listener(address, port, self.backlog)
        return self._sock

    async def start(self, app: web.Application) -> None:
        assert self._sock is not None, "bind() first"
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self.shutdown_timeout_s,
                                     logger=self.logger, keepalive_timeout=self.keepalive_s)
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock, backlog=self.backlog)
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
        return [{"proto": "tcp", "address": address, "port": port}]
