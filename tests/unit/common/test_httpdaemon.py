"""common.daemon.httpdaemon: the listener an HTTP daemon serves on, its error middleware, its quiet
logging of unparsable requests, and the address-change warning."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from common.daemon.httpdaemon import (RESTART_WARNING, HttpListener, address_change_warnings,
                                      error_middleware, quiet_bad_requests)


def test_listener_serves_an_app_and_reports_where():
    answered: list[str] = []

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text=f"no {request.path}")

    def internal_error(request: web.Request) -> web.Response:
        answered.append(request.path)
        return web.Response(status=500, text="sorry")

    async def scenario() -> None:
        listener = HttpListener(logging.getLogger("test.http"), keepalive_s=5,
                                shutdown_timeout_s=1)
        assert listener.listen() == []
        listener.bind("127.0.0.1", 0)
        (where,) = listener.listen()
        assert where["proto"] == "tcp" and where["address"] == "127.0.0.1" and where["port"]
        app = web.Application(middlewares=[error_middleware(not_found, internal_error)])
        app.router.add_get("/ok", ok)
        app.router.add_get("/boom", boom)
        await listener.start(app)
        base = f"http://127.0.0.1:{where['port']}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/ok") as response:
                assert (response.status, await response.text()) == (200, "ok")
            async with session.get(f"{base}/elsewhere") as response:
                assert (response.status, await response.text()) == (404, "no /elsewhere")
            async with session.post(f"{base}/ok") as response:
                assert response.status == 405          # aiohttp's own answer, unchanged
            async with session.get(f"{base}/boom") as response:
                assert (response.status, await response.text()) == (500, "sorry")
        assert answered == ["/boom"]
        await listener.stop()
        listener.close()
        assert listener.listen() == []

    asyncio.run(scenario())


def test_passthrough_exceptions_are_not_answered():
    async def scenario() -> None:
        async def gone(request: web.Request) -> web.Response:
            raise ConnectionResetError("the client went away")

        errors = error_middleware(lambda r: web.Response(status=404),
                                  lambda r: web.Response(status=500),
                                  passthrough=(ConnectionError,))
        try:
            await errors(SimpleNamespace(path="/x"), gone)
        except ConnectionResetError:
            return
        raise AssertionError("a passthrough exception was answered")

    asyncio.run(scenario())


def test_unparsable_requests_are_one_debug_line(caplog):
    daemon_log = logging.getLogger("test.daemon")
    http_log = quiet_bad_requests("test.daemon.http", daemon_log)
    caplog.set_level(logging.DEBUG)
    try:
        raise BadHttpMessage("Line too long: x" * 3)
    except BadHttpMessage:
        http_log.exception("Error handling request")
    try:
        raise ValueError("a real problem")
    except ValueError:
        http_log.exception("Error handling request")
    records = [(r.name, r.levelname) for r in caplog.records]
    assert records == [("test.daemon", "DEBUG"), ("test.daemon.http", "ERROR")]
    assert "unreadable HTTP request" in caplog.records[0].getMessage()


def test_address_change_warnings():
    old = SimpleNamespace(ip_address="0.0.0.0", port=998)
    assert address_change_warnings(old, SimpleNamespace(ip_address="0.0.0.0", port=998)) == []
    assert address_change_warnings(old, SimpleNamespace(ip_address="0.0.0.0", port=999)) == \
        [RESTART_WARNING]
    assert address_change_warnings(old, SimpleNamespace(ip_address="::1", port=998)) == \
        [RESTART_WARNING]
