"""common.daemon.statussock: request parsing and the read-only rule, over a real Unix socket
pair."""

import asyncio
import json
import os
import socket

import pytest

from common.daemon.statussock import (StatusServer, bind_tcp, bind_unix, parse_request, query_tcp,
                                      query_unix)


@pytest.mark.parametrize("line,verb", [(b'{"cmd": "status"}\n', "status"), (b"status\n", "status"),
                                       (b"  reload  \n", "reload")])
def test_parse_request(line, verb):
    assert parse_request(line) == verb


@pytest.mark.parametrize("line", [b"\n", b"{bad json\n", b'{"cmd": 5}\n', b"[1]\n",
                                  b'{"verb": "status"}\n'])
def test_parse_request_rejects(line):
    with pytest.raises(ValueError):
        parse_request(line)


def test_status_and_control_over_unix_and_tcp(tmp_path):
    path = str(tmp_path / "s.sock")
    calls = []

    async def reload():
        calls.append("reload")
        return {"ok": True}

    async def scenario():
        unix_sock = bind_unix(path)
        tcp_sock = bind_tcp("127.0.0.1", 0)
        port = tcp_sock.getsockname()[1]
        server = StatusServer(lambda: {"counters": {"x": 1}}, {"reload": reload}, unix_path=path)
        await server.start(unix_sock, tcp_sock)
        loop = asyncio.get_running_loop()
        local = await loop.run_in_executor(None, query_unix, path)
        remote = await loop.run_in_executor(None, query_tcp, "127.0.0.1", port)
        remote_reload = await loop.run_in_executor(None, query_tcp, "127.0.0.1", port, "reload")
        local_reload = await loop.run_in_executor(None, query_unix, path, "reload")
        unknown = await loop.run_in_executor(None, query_unix, path, "explode")
        await server.stop()
        return local, remote, remote_reload, local_reload, unknown

    local, remote, remote_reload, local_reload, unknown = asyncio.run(scenario())
    assert local == {"ok": True, "counters": {"x": 1}} == remote
    assert remote_reload == {"ok": False, "error": "read-only status port"}
    if os.geteuid() == 0:
        assert local_reload == {"ok": True} and calls == ["reload"]
    else:
        assert local_reload["ok"] is False and "root" in local_reload["error"]
    assert unknown["ok"] is False and "unknown command" in unknown["error"]
    assert not os.path.exists(path)


def test_bind_unix_refuses_a_socket_in_use(tmp_path):
    path = str(tmp_path / "s.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    with pytest.raises(OSError, match="in use"):
        bind_unix(path)
    live.close()
    bind_unix(path).close()  # a stale file is replaced
