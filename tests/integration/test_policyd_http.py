"""policyd end to end: the real daemon on 127.0.0.1 (free port), a real SQLite directory filled
through the Directory API, curl as the HTTP client, the status socket and zmgmcast.

Promptness checks use generous bounds (a hung directory must not hold an answer much past
DirectoryTimeout); they are there to catch a blocked event loop, not to measure speed.
"""

from __future__ import annotations

import asyncio
import re
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from common.policy.directory import open_directory
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation)
from common.policy.capability import decode
from common.policy.keyring import read_keys
from support import REPO, DaemonProcess, query_status, write_config

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")

MAC = "52:54:00:12:34:56"
MAC_NORM = "525400123456"
DELL = {"mac": MAC, "platform": "pcbios", "arch": "i386", "manufacturer": "Dell Inc.",
        "ram_mb": "8192"}
NEVER = MenuSettings(MenuDisplay.NEVER, 5)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Policyd(DaemonProcess):
    workdir: Path
    db: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def directory(self):
        return open_directory(f"sqlite://{self.db}")

    def curl(self, path: str, *args: str, params: dict[str, str] | None = None
             ) -> tuple[int, str, str]:
        """(status, content type, body) of one request made with curl."""
        command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", "--max-time",
                   "20", *args]
        if params is not None:
            command += ["-G"] + [x for k, v in params.items() for x in ("--data-urlencode",
                                                                          f"{k}={v}")]
        command.append(self.url + path)
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        body, _, tail = result.stdout.rpartition("\n")
        code, _, ctype = tail.partition(" ")
        return int(code), ctype, body

    def policy(self, **params: str) -> str:
        code, ctype, body = self.curl("/policy", params=params)
        assert code == 200, body
        assert ctype.startswith("text/plain")
        assert body.startswith("#!ipxe\n")
        return body


def marker(body: str) -> str:
    return next(line[len("echo "):] for line in body.splitlines()
                if line.startswith("echo preboot-answer:"))


def kernel_line(body: str) -> str:
    return next(line for line in body.splitlines() if line.startswith("kernel "))


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: Unix socket paths stay far below their 108-byte limit
    path = Path(tempfile.mkdtemp(prefix="pbpol-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def policyd_factory(workdir: Path):
    started: list[Policyd] = []

    def start(**overrides: Any) -> Policyd:
        n = len(started)
        db = workdir / "directory.db"
        if not db.exists():                 # as preboot-dir init does
            open_directory(f"sqlite://{db}", create=True).close()
        values: dict[str, Any] = {
            "IPAddress": "127.0.0.1", "Port": 0, "Directory": f"sqlite://{db}",
            "DirectoryTimeout": 1, "StatusPort": 0,
            "StatusSocket": str(workdir / f"p{n}.sock"), "PidFile": str(workdir / f"p{n}.pid"),
            "LogLevel": "DEBUG", "LogFile": str(workdir / f"p{n}.log"),
            "TokenKeyFile": str(workdir / "imaging.key"),
        }
        values.update(overrides)
        config = write_config(workdir / f"policyd{n}.conf", values)
        daemon = Policyd("prebootpolicyd", config, values["StatusSocket"],
                         Path(values["LogFile"]))
        daemon.workdir, daemon.db = workdir, db
        started.append(daemon)
        return daemon.start(timeout_s=20)

    yield start
    for daemon in started:
        assert daemon.stop() in (0, None), daemon.log()


@pytest.fixture
def policyd(policyd_factory) -> Policyd:
    return policyd_factory()


def set_policy(daemon: Policyd, *rules: Rule, menu: MenuSettings = NEVER) -> None:
    with daemon.directory() as directory:
        directory.replace_policy(ImagingPolicy(tuple(rules), menu))


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---- boot.ipxe ------------------------------------------------------------------------------

def test_boot_script(policyd):
    code, ctype, body = policyd.curl("/boot.ipxe")
    assert code == 200 and ctype.startswith("text/plain")
    assert body.startswith("#!ipxe\n")
    assert f"chain --replace --autofree http://127.0.0.1:{policyd.port}/policy?" \
           "mac=${netX/mac:hexhyp}&" in body
    assert "&ram_mb=${memsize}&" in body and "&asset_tag=${asset:uristring}&" in body
    assert "iseq ${platform} pcbios && sanboot --no-describe --drive 0x80 || exit" in body
    # the Host header names the server, so the script works behind any address ...
    _, _, body = policyd.curl("/boot.ipxe", "-H", "Host: imaging.example.org:8090")
    assert "http://imaging.example.org:8090/policy?" in body
    # ... unless it is not a plain host: then the address the connection came in on
    _, _, body = policyd.curl("/boot.ipxe", "-H", "Host: x${net0/ip} || shell")
    assert f"http://127.0.0.1:{policyd.port}/policy?" in body and "shell" not in body
    assert policyd.counters()["script_requests"] == 3


# ---- answers from the directory ---------------------------------------------------------------

def test_answers_follow_the_directory(policyd):
    # an empty (new) directory: no rule, no work
    body = policyd.policy(**DELL)
    assert marker(body) == "preboot-answer: local no enabled rule matches this machine"
    assert body.rstrip().endswith("sanboot --no-describe --drive 0x80 || exit")

    set_policy(policyd,
               Rule.from_text("hp", "manufacturer startswith HP",
                              Action(ActionKind.RESTORE, "hp/base.zmg")),
               Rule.from_text("dell", "manufacturer = 'Dell Inc.' and ram_mb >= 4GB",
                              Action(ActionKind.RESTORE, "dell/base.zmg", ("dell/drv.zmg",))))
    body = policyd.policy(**DELL)             # the very next query sees the change
    assert marker(body) == "preboot-answer: imaging restore dell/base.zmg + add-ons dell/drv.zmg"
    line, _, work_token = kernel_line(body).rpartition(" preboot.token=")
    assert line == (
        f"kernel http://127.0.0.1:{policyd.port}/boot/preboot/linux initrd=initrd "
        "console=ttyS0 console=tty0 quiet "
        "preboot.server=127.0.0.1 preboot.work=restore preboot.image=dell/base.zmg "
        f"preboot.addons=dell/drv.zmg preboot.mac={MAC_NORM}")
    # the machine's capability to ask the imaging server for its work (docs/security.md)
    assert work_token.endswith(" || goto failed")
    keys = read_keys(str(policyd.workdir / "imaging.key")).accepted
    capability = decode(work_token.split()[0], keys, time.time())
    assert (capability.subject, capability.operations, capability.images) == (
        MAC_NORM, {"work"}, ("dell/base.zmg", "dell/drv.zmg"))
    assert (f"initrd --name initrd http://127.0.0.1:{policyd.port}/boot/preboot/initrd "
            "|| goto failed") in body

    # efi, and too little RAM for the rule: local, the UEFI way
    body = policyd.policy(**{**DELL, "platform": "efi", "arch": "x86_64", "ram_mb": "2048"})
    assert marker(body).startswith("preboot-answer: local ")
    assert body.rstrip().endswith("\nexit")

    # the rule changes: the next query sees the new image
    set_policy(policyd, Rule.from_text("dell", "manufacturer = 'Dell Inc.'",
                                       Action(ActionKind.MAKE, "uploads/dell new.zmg")))
    body = policyd.policy(**DELL)
    assert marker(body) == "preboot-answer: imaging make an image to uploads/dell new.zmg"
    assert "preboot.work=make preboot.image=uploads/dell%20new.zmg " in kernel_line(body)

    # a registered workstation flagged for an image gets it, whatever the rules say
    with policyd.directory() as directory:
        directory.put_workstation(Workstation(MAC_NORM, "lab-1", True, "lab/lab1.zmg"))
    body = policyd.policy(**DELL)
    assert marker(body) == "preboot-answer: imaging restore lab/lab1.zmg"

    # the menu, shown always
    set_policy(policyd, menu=MenuSettings(MenuDisplay.ALWAYS, 9))
    body = policyd.policy(**DELL)
    assert marker(body) == "preboot-answer: menu"
    assert "choose --timeout 9000 --default start preboot-item || goto local" in body

    counters = policyd.counters()
    assert counters["queries"] == 6
    assert (counters["work_assigned"], counters["no_work"], counters["menus_shown"]) == (4, 2, 1)
    assert counters["by_action"] == {"make": 1, "none": 2, "restore": 3}
    assert counters["by_platform"] == {"efi": 1, "pcbios": 5}
    assert counters["by_arch"] == {"i386": 5, "x86_64": 1}
    assert (counters["fallback_answers"], counters["directory_errors"],
            counters["bad_requests"]) == (0, 0, 0)


def test_a_machine_a_multicast_session_names_is_sent_into_it(policyd):
    """Sessions are read at most every few seconds; a session naming the machine wins over
    the rules (common/policy/sessions.py)."""
    set_policy(policyd, Rule.from_text("all", "", Action(ActionKind.RESTORE, "a.zmg")))
    with policyd.directory() as directory:
        directory.replace_sessions([MulticastSession("room 101", "lab/base.img",
                                                     participants=(MAC,))])
    assert wait_for(lambda: "preboot.work=multicast" in kernel_line(policyd.policy(**DELL)))
    body = policyd.policy(**DELL)
    assert marker(body) == "preboot-answer: imaging join multicast session room 101"
    assert "preboot.image=lab/base.img preboot.session=room%20101 " in kernel_line(body)
    with policyd.directory() as directory:
        directory.replace_sessions([MulticastSession("room 101", "lab/base.img",
                                                     enabled=False, participants=(MAC,))])
    assert wait_for(lambda: "preboot.work=restore" in kernel_line(policyd.policy(**DELL)))


def test_hotkey_prompt_is_the_default_menu_display(policyd):
    set_policy(policyd, menu=MenuSettings())
    body = policyd.policy(mac=MAC, platform="efi")
    assert body.splitlines()[1] == \
        "prompt --key 0x01 --timeout 5000 Press Ctrl-A for the Preboot menu... " \
        "&& goto menu || goto answer"


def test_head_requests(policyd):
    result = subprocess.run(["curl", "-sS", "-I", f"{policyd.url}/policy?mac={MAC}"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("HTTP/1.1 200")


# ---- bad requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("params, reason", [
    ({}, "mac: required (the client's MAC address)"),
    ({"platform": "efi"}, "mac: required (the client's MAC address)"),
    ({"mac": "zz:zz"}, "mac: 'zz:zz' is not a MAC address"),
    ({"mac": MAC, "ram_mb": "lots"}, "ram_mb: 'lots' is not a whole number of megabytes"),
    ({"mac": MAC, "ip": "10.0.0.300"}, "ip: '10.0.0.300' is not an IP address"),
    ({"mac": MAC, "hostname": "a\nb"}, "hostname: 'a\\nb' holds control characters"),
])
def test_bad_requests_get_400_with_the_reason(policyd, params, reason):
    code, ctype, body = policyd.curl("/policy", params=params)
    assert (code, body) == (400, f"bad request: {reason}\n")
    assert ctype.startswith("text/plain")
    assert "Traceback" not in policyd.log()
    assert policyd.counters()["bad_requests"] == 1


def test_unknown_parameters_are_ignored(policyd):
    body = policyd.policy(mac=MAC, colour="blue", platform="pcbios")
    assert marker(body).startswith("preboot-answer: local ")


def test_other_paths_and_methods(policyd):
    code, ctype, body = policyd.curl("/etc/passwd")
    assert code == 404 and ctype.startswith("text/plain") and "not found" in body
    code, _, _ = policyd.curl("/", )
    assert code == 404
    code, _, _ = policyd.curl("/policy", "-X", "POST", "-d", f"mac={MAC}")
    assert code == 405
    code, _, _ = policyd.curl("/boot.ipxe", "-X", "DELETE")
    assert code == 405
    counters = policyd.counters()
    assert counters["queries"] == 0 and counters["bad_requests"] == 0


def test_unreadable_requests_are_refused_without_a_traceback(policyd):
    code, _, _ = policyd.curl(f"/policy?mac={MAC}&x=" + "a" * 9000)
    assert code == 400
    with socket.create_connection(("127.0.0.1", policyd.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 400 ", sock.recv(1000))
    assert policyd.policy(mac=MAC)                 # still serving
    assert "unreadable HTTP request" in policyd.log()
    assert "Traceback" not in policyd.log()


# ---- the directory unreachable ----------------------------------------------------------------

def timed(daemon: Policyd, **params: str) -> tuple[str, float]:
    started = time.monotonic()
    body = daemon.policy(**params)
    return body, time.monotonic() - started


def test_ldap_directory_on_a_closed_port_gets_the_fallback(policyd_factory):
    port = free_tcp_port()                       # nothing listens there
    daemon = policyd_factory(Directory=f"ldap://127.0.0.1:{port}/dc=preboot,dc=test")
    for _ in range(3):
        body, took = timed(daemon, **DELL)
        assert marker(body) == "preboot-answer: local directory unavailable"
        assert body.rstrip().endswith("sanboot --no-describe --drive 0x80 || exit")
        assert took < 5.0
    counters = daemon.counters()
    assert counters["directory_errors"] == 3 and counters["fallback_answers"] == 3
    assert counters["work_assigned"] == counters["no_work"] == 0
    assert "WARNING" in daemon.log() and "FallbackAnswer" in daemon.log()


def test_sqlite_directory_that_cannot_be_created_gets_maintenance(policyd_factory, workdir):
    blocker = workdir / "not-a-folder"
    blocker.write_text("a file where the directory's folder should be\n")
    daemon = policyd_factory(Directory=f"sqlite://{blocker}/directory.db",
                             FallbackAnswer="maintenance")
    body, took = timed(daemon, **DELL)
    assert marker(body) == "preboot-answer: imaging maintenance shell"
    assert "preboot.work=maintenance" in kernel_line(body)
    assert "menu" not in body and "prompt" not in body
    assert took < 5.0
    assert daemon.counters()["fallback_answers"] == 1
    assert "cannot open" in daemon.log()


def test_locked_sqlite_directory_recovers_when_released(policyd_factory, workdir):
    db = workdir / "directory.db"
    with open_directory(f"sqlite://{db}", create=True) as directory:
        directory.replace_policy(ImagingPolicy(
            (Rule.from_text("all", "", Action(ActionKind.RESTORE, "all.zmg")),), NEVER))
    # another program holds the database exclusively while the daemon starts
    locker = sqlite3.connect(str(db), isolation_level=None)
    try:
        locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        daemon = policyd_factory(DirectoryTimeout=1)
        body, took = timed(daemon, **DELL)
        assert marker(body) == "preboot-answer: local directory unavailable"
        assert took < 5.0
    finally:
        locker.close()
    assert daemon.counters()["directory_errors"] >= 1
    # the lock gone, the directory is opened again on a later query (at most every 5 s)
    assert wait_for(lambda: marker(daemon.policy(**DELL)) ==
                    "preboot-answer: imaging restore all.zmg", timeout_s=20)
    assert "opened" in daemon.log()


class SilentServer:
    """Accepts TCP connections and never says a word: a hung LDAP server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.clients.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        for client in self.clients:
            client.close()
        self.sock.close()


def test_hung_directory_answers_promptly_and_stops_promptly(policyd_factory):
    pytest.importorskip("ldap")
    server = SilentServer()
    try:
        daemon = policyd_factory(Directory=f"ldap://127.0.0.1:{server.port}/dc=preboot,dc=test",
                                 DirectoryTimeout=1, Workers=2)
        results: list[tuple[str, float]] = []

        def ask() -> None:
            results.append(timed(daemon, **DELL))
        # more queries than workers, all at once: none waits behind the hung ones for long
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 6
        for body, took in results:
            assert marker(body) == "preboot-answer: local directory unavailable"
            assert took < 5.0
        assert daemon.counters()["fallback_answers"] == 6
        # SIGTERM while worker threads may still sit in the hung directory: out within 5 s
        started = time.monotonic()
        assert daemon.stop(timeout_s=10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        server.close()


# ---- reload, status, load ---------------------------------------------------------------------

def test_sighup_reload_applies_new_settings(policyd, workdir):
    set_policy(policyd, Rule.from_text("all", "", Action(ActionKind.RESTORE, "a.zmg")))
    assert "preboot.image=a.zmg" in kernel_line(policyd.policy(**DELL))
    other = workdir / "other.db"
    with open_directory(f"sqlite://{other}", create=True) as directory:
        directory.replace_policy(ImagingPolicy(
            (Rule.from_text("all", "", Action(ActionKind.RESTORE, "b.zmg")),), NEVER))
    text = policyd.config.read_text()
    text = text.replace(f"Directory = sqlite://{policyd.db}", f"Directory = sqlite://{other}")
    text += "KernelArgs = quiet\nImagingKernel = http://{server}/linux\nMenuHotKey = Esc\n"
    policyd.config.write_text(text)
    pid = policyd.pid
    policyd.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in policyd.log())
    line = kernel_line(policyd.policy(**DELL))
    assert line.startswith("kernel http://127.0.0.1/linux initrd=initrd quiet preboot.server=127.0.0.1 ")
    assert "preboot.image=b.zmg" in line
    assert policyd.status()["pid"] == pid
    # a bad config on reload keeps the running one
    policyd.config.write_text(text + "FallbackAnswer = explode\n")
    policyd.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in policyd.log())
    assert "preboot.image=b.zmg" in kernel_line(policyd.policy(**DELL))


def test_status_and_zmgmcast(policyd_factory):
    status_port = free_tcp_port()
    daemon = policyd_factory(StatusPort=status_port)
    daemon.curl("/boot.ipxe")
    daemon.policy(**DELL)
    daemon.curl("/policy", params={"mac": "bad"})
    status = daemon.status()
    assert (status["daemon"], status["service"]) == ("policyd", "Preboot Policy Service")
    assert status["listen"] == [{"proto": "tcp", "address": "127.0.0.1", "port": daemon.port}]
    assert status["counters"] == {
        "queries": 2, "script_requests": 1, "work_assigned": 0, "menus_shown": 0, "no_work": 1,
        "fallback_answers": 0, "directory_errors": 0, "bad_requests": 1,
        "by_platform": {"pcbios": 1}, "by_arch": {"i386": 1}, "by_action": {"none": 1},
        # /boot/ (prebootpolicyd.bootfiles), none asked for here
        "boot_files_sent": 0, "boot_bytes_sent": 0, "boot_files_refused": 0,
        "boot_files_not_found": 0, "boot_files_busy": 0, "boot_files_aborted": 0,
        "boot_transfers_active": 0}

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["--socket", daemon.status_socket], ["-i", "127.0.0.1", "-p", str(status_port)]):
        result = subprocess.run([sys.executable, "-m", "zmgmcast", "-status", *args], env=env,
                                capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert result.returncode == 0, result.stderr
        out = result.stdout
        local = args[0] == "--socket"             # the TCP port does not say the pid
        assert (f"Preboot Policy Service (pid {daemon.pid}" in out) is local
        assert f"Listening on tcp 127.0.0.1:{daemon.port}" in out
        for label, value in (("Queries", "2"), ("Script requests", "1"), ("No work", "1"),
                             ("Bad requests", "1"), ("Directory errors", "0")):
            assert any(line.split() == label.split() + [value] for line in out.splitlines()), \
                (label, out)
        assert "By platform: pcbios 1" in out and "By action: none 1" in out
        labels = [line.split()[0] for line in out.splitlines() if line.startswith("    ")
                  and not line.startswith("    Listening")]
        assert labels[:4] == ["Queries", "Script", "Work", "No"], out    # busiest first
    assert query_status(daemon.status_socket)["ok"]


def test_200_concurrent_queries_are_all_answered(policyd):
    set_policy(policyd, *[Rule.from_text(f"r{n}", f"serial = S{n}",
                                         Action(ActionKind.RESTORE, f"img{n}.zmg"))
                          for n in range(10)])

    async def main() -> list[tuple[int, str]]:
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one(n: int) -> tuple[int, str]:
                params = {"mac": f"02:00:00:00:{n // 256:02x}:{n % 256:02x}",
                          "serial": f"S{n % 12}", "platform": "efi"}
                async with session.get(f"{policyd.url}/policy", params=params,
                                       timeout=aiohttp.ClientTimeout(total=60)) as response:
                    return response.status, await response.text()
            return await asyncio.gather(*(one(n) for n in range(200)))

    results = asyncio.run(main())
    assert len(results) == 200
    for n, (status, body) in enumerate(results):
        assert status == 200
        expected = (f"preboot-answer: imaging restore img{n % 12}.zmg" if n % 12 < 10
                    else "preboot-answer: local no enabled rule matches this machine")
        assert marker(body) == expected
    counters = policyd.counters()
    assert counters["queries"] == 200
    assert counters["work_assigned"] + counters["no_work"] == 200
    assert counters["fallback_answers"] == 0
