"""A real status server for zmgmcast's unit tests: common.daemon.statussock.StatusServer on a Unix
socket and/or a TCP port (port 0), on its own event loop in a thread, answering with a status
reply shaped like the runner's (common.daemon.runner.Lifecycle.status)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from common.daemon.statussock import StatusServer, bind_tcp, bind_unix


class FakeDaemon:
    def __init__(self, name: str, counters: dict[str, Any], unix_path: str | None,
                 tcp: bool, pid: int = 4242):
        self.reply = {"daemon": name, "service": f"the {name} service", "pid": pid,
                      "version": "9.9.9", "started_at": 0.0, "uptime_s": 3723.5,
                      "config": f"/etc/preboot/{name}.conf",
                      "listen": [{"proto": "tcp", "address": "127.0.0.1", "port": 998}],
                      "counters": counters}
        self.unix_path = unix_path
        self._unix = bind_unix(unix_path) if unix_path else None
        self._tcp = bind_tcp("127.0.0.1", 0) if tcp else None
        self.port = self._tcp.getsockname()[1] if self._tcp else None
        self._loop = asyncio.new_event_loop()
        self.controls: list[tuple[str, dict[str, Any]]] = []   # control verbs received
        self._server = StatusServer(lambda: self.reply, {}, unix_path=unix_path,
                                    argument_controls={
                                        verb: self._control(verb)
                                        for verb in ("mcast-start", "mcast-stop",
                                                     "mcast-delete")})
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(
            self._server.start(self._unix, self._tcp), self._loop).result(10)

    def _control(self, verb: str) -> Callable[[dict[str, Any]], Any]:
        async def answer(fields: dict[str, Any]) -> dict[str, Any]:
            self.controls.append((verb, fields))
            if fields.get("name") == "nope":
                return {"ok": False, "error": "no multicast session 'nope'\x1b[2J"}
            return {"ok": True, "message": f"{verb} {fields.get('name')}: done"}
        return answer

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        for sock in (self._unix, self._tcp):
            if sock is not None:
                sock.close()
        self._loop.close()


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Callable[..., FakeDaemon]:
    started: list[FakeDaemon] = []

    def start(name: str, counters: dict[str, Any], *, unix_path: str | None = None,
              tcp: bool = True) -> FakeDaemon:
        daemon = FakeDaemon(name, counters, unix_path, tcp)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
