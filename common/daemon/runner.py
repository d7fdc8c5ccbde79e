"""The one lifecycle path every daemon runs through.

read config (exit 78 on error) -> lock the pidfile (exit 1 if held) -> bind every socket while
still attached to the terminal (so a bind error is seen, and port 69 is bound before any privilege
is dropped) -> detach with python-daemon unless --foreground, preserving those sockets -> serve on
one asyncio loop until SIGTERM/SIGINT or a `stop` control -> stop the service, close the status
socket, release the pidfile. SIGHUP re-reads the config; a bad one is logged and the old kept.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from common import __version__
from common.errors import (EX_CONFIG, EX_FAILURE, EX_OK, EX_SOFTWARE, AlreadyRunning, ConfigError,
                           SettingError)

from .config import Key, Schema, line_of_key, load_config
from .counters import status_line
from .logsetup import setup_logging
from .metrics import render_metrics
from .pidfile import LockedPidFile
from .sdnotify import notify
from . import services as registry
from .statussock import StatusServer, bind_tcp, bind_unix

log = logging.getLogger("preboot.runner")

STOP_GRACE_S = 4.0
STATUS_NOTIFY_S = 5.0      # STATUS= to systemd at most this often, and only when it changed


def common_keys(service: registry.Service) -> tuple[Key, ...]:
    """Keys every daemon has; defaults from the registry of services (common.daemon.services) and
    the daemon's name (docs/daemon-contract.md)."""
    return (
        Key("PidFile", "path", service.pid_file(), "Locked pidfile."),
        Key("StatusSocket", "path", service.status_socket(),
            "Local Unix socket for status (everyone) and control (root)."),
        Key("StatusPort", "integer(min=0, max=65535)", str(service.status_port),
            "Read-only TCP status port for 'zmgmcast -status -i HOST'; 0 disables."),
        Key("StatusAddress", "ip_addr", "127.0.0.1",
            "Address of the TCP status port: this host only unless set (0.0.0.0 or an "
            "address of this host for 'zmgmcast -status -i HOST' from elsewhere)."),
        Key("LogLevel", "loglevel", "INFO", "DEBUG, INFO, WARNING or ERROR."),
        Key("LogFile", "path", "",
            "Empty: stderr in the foreground (journald), syslog when detached."),
    )


@dataclass(frozen=True)
class CommonSettings:
    pid_file: str
    status_socket: str
    status_port: int
    log_level: str
    log_file: str
    status_address: str = "127.0.0.1"

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "CommonSettings":
        return cls(values["PidFile"], values["StatusSocket"], values["StatusPort"],
                   values["LogLevel"], values["LogFile"], values["StatusAddress"])


class Service(Protocol):
    """What a daemon implements; the runner owns its lifetime.

    A daemon may also have `status_fields() -> dict` (more fields of its status reply, e.g.
    imgsrvd's multicast sessions) and `control_verbs() -> dict[str, ArgumentVerb]` (control
    verbs of its own, root only on the Unix socket like reload and stop)."""

    def bind(self) -> list[socket.socket]: ...
    async def start(self) -> None: ...
    async def apply(self, settings: Any) -> list[str]: ...  # returns warnings
    async def stop(self) -> None: ...
    def listen(self) -> list[dict[str, Any]]: ...
    def counters(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DaemonSpec:
    service: registry.Service       # its entry in common.daemon.services: name, display name, ...
    schema: Schema
    make_settings: Callable[[dict[str, Any], CommonSettings], Any]
    make_service: Callable[[Any], Service]
    # "uvloop" where it is installed (cheap wakeups: packet daemons), or "asyncio": the
    # standard loop, whose loop.sendfile is zero-copy os.sendfile (uvloop has no sendfile, so
    # aiohttp would copy every byte of an image through Python).
    event_loop: str = "uvloop"

    @property
    def name(self) -> str:              # "tftpd"
        return self.service.name

    @property
    def program(self) -> str:           # "preboot-tftpd"
        return self.service.program

    @property
    def service_name(self) -> str:      # "Preboot TFTP Service"
        return self.service.display_name

    @property
    def default_config(self) -> str:
        return self.service.config_file()


def _load(spec: DaemonSpec, path: str) -> tuple[Any, CommonSettings]:
    values = load_config(path, spec.schema)
    common = CommonSettings.from_values(values)
    try:
        return spec.make_settings(values, common), common
    except SettingError as exc:
        raise ConfigError(path, exc.message, line_of_key(path, exc.key), exc.key) from None


def build_parser(service: registry.Service) -> argparse.ArgumentParser:
    """Every daemon's command line (docs/daemon-contract.md); packaging/man/genman.py writes
    the man pages from it."""
    parser = argparse.ArgumentParser(prog=service.program, description=service.display_name)
    parser.add_argument("--config", default=service.config_file(),
                        help=f"config file (default {service.config_file()})")
    parser.add_argument("--foreground", action="store_true",
                        help="stay attached (systemd Type=notify); default: detach")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _parse_args(spec: DaemonSpec, argv: list[str] | None) -> argparse.Namespace:
    return build_parser(spec.service).parse_args(argv)


def run(spec: DaemonSpec, argv: list[str] | None = None) -> int:
    args = _parse_args(spec, argv)
    config_path = os.path.abspath(args.config)
    try:
        settings, common = _load(spec, config_path)
    except ConfigError as exc:
        print(f"{spec.program}: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        print(f"OK: {config_path}")
        return EX_OK
    if args.foreground:
        setup_logging(spec.program, common.log_level, common.log_file, foreground=True)
    lifecycle = Lifecycle(spec, config_path, settings, common, args.foreground)
    try:
        lifecycle.prepare()
    except AlreadyRunning as exc:
        print(f"{spec.program}: {exc}", file=sys.stderr)
        return EX_FAILURE
    except OSError as exc:
        lifecycle.release()
        print(f"{spec.program}: cannot bind: {exc}", file=sys.stderr)
        return EX_FAILURE
    if not args.foreground:
        lifecycle.detach()
        setup_logging(spec.program, common.log_level, common.log_file, foreground=False)
    _freeze_startup_objects()
    try:
        run_event_loop(lifecycle.serve(), spec.event_loop)
        return EX_OK
    except Exception:  # the first fatal error stops the daemon; systemd restarts it
        log.exception("fatal error, stopping")
        return EX_SOFTWARE
    finally:
        lifecycle.release()


def _freeze_startup_objects() -> None:
    """Move what start-up made (modules, classes, settings: about 40,000 objects) out of the
    cyclic collector's sight, so that a full collection under load walks only what the
    requests made since: 8 ms per full collection on this machine before, near nothing after.
    The objects are not leaked: they lived as long as the process anyway."""
    gc.collect()
    gc.freeze()


def _raise_open_file_limit() -> None:
    """Lift the soft descriptor limit to the hard one: a socket per transfer means thousands
    of descriptors, and many systems start daemons with a soft limit of 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d: %s", soft, exc)


def run_event_loop(main: Any, preferred: str = "uvloop") -> None:
    """Run on uvloop when the daemon prefers it and it is installed (libuv's loop costs several
    times less per wakeup than asyncio's pure-Python one, which matters for lock-step TFTP; see
    bench/RESULTS.md), else (or with PREBOOT_EVENT_LOOP=asyncio) on the standard loop.
    PREBOOT_EVENT_LOOP=uvloop overrides a daemon's preference for the standard loop. The code
    uses only the asyncio API either way."""
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    choice = os.environ.get("PREBOOT_EVENT_LOOP") or preferred
    if uvloop is None or choice == "asyncio":
        asyncio.run(main)
    else:
        uvloop.run(main)


class Lifecycle:
    """Owns the pidfile, the bound sockets, the service and the status server."""

    def __init__(self, spec: DaemonSpec, config_path: str, settings: Any, common: CommonSettings,
                 foreground: bool):
        self.spec = spec
        self.foreground = foreground
        self.config_path = config_path
        self.settings = settings
        self.common = common
        self.pidfile = LockedPidFile(common.pid_file)
        self.service = spec.make_service(settings)
        self.sockets: list[socket.socket] = []
        self.unix_sock: socket.socket | None = None
        self.tcp_sock: socket.socket | None = None
        self.started_at = time.time()
        self._stop_requested: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    def prepare(self) -> None:
        _raise_open_file_limit()
        # Detaching forks: the pid is written by the detached process (DaemonContext enters
        # the pidfile), so the file never names the short-lived parent.
        self.pidfile.acquire(write=self.foreground)
        self.sockets = self.service.bind()
        self.unix_sock = bind_unix(self.common.status_socket)
        if self.common.status_port:
            self.tcp_sock = bind_tcp(self.common.status_address, self.common.status_port)

    def detach(self) -> None:
        import daemon  # python-daemon; imported here so foreground runs never need it loaded

        keep = [s.fileno() for s in self.sockets + [self.unix_sock, self.tcp_sock] if s]
        keep.append(self.pidfile.fileno)
        context = daemon.DaemonContext(
            files_preserve=keep, pidfile=self.pidfile, umask=0o022, working_directory="/",
            detach_process=True,
            signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None})
        context.open()  # forks; the pidfile's __enter__ rewrites our new pid under the lock

    def release(self) -> None:
        for sock in self.sockets + [self.unix_sock, self.tcp_sock]:
            if sock is not None:
                sock.close()
        if self.unix_sock is not None:
            try:
                os.unlink(self.common.status_socket)
            except FileNotFoundError:
                pass
            self.unix_sock = None
        self.pidfile.release()

    def status(self) -> dict[str, Any]:
        extra = getattr(self.service, "status_fields", None)
        return {
            **(extra() if extra is not None else {}),
            "daemon": self.spec.name,
            "service": self.spec.service_name,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "config": self.config_path,
            "listen": self.service.listen(),
            "counters": self.service.counters(),
        }

    def metrics(self) -> str:
        """The /metrics text of the TCP status port (common.daemon.metrics)."""
        return render_metrics(self.spec.service, self.service.counters(), self.started_at)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        await self.service.start()
        verbs = getattr(self.service, "control_verbs", None)
        status = StatusServer(self.status, {"reload": self.reload, "stop": self._stop_verb},
                              unix_path=self.common.status_socket,
                              argument_controls=verbs() if verbs is not None else None,
                              metrics=self.metrics)
        await status.start(self.unix_sock, self.tcp_sock)
        self.unix_sock = None  # the status server owns and removes it now
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        notify(f"READY=1\nMAINPID={os.getpid()}")
        status_task = loop.create_task(self._notify_status()) \
            if os.environ.get("NOTIFY_SOCKET") else None
        log.info("%s %s started (pid %d, config %s, event loop %s)", self.spec.service_name,
                 __version__, os.getpid(), self.config_path, type(loop).__module__)
        try:
            await self._stop_requested.wait()
        finally:
            if status_task is not None:
                status_task.cancel()
            notify("STOPPING=1")
            log.info("%s stopping", self.spec.service_name)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            try:
                await asyncio.wait_for(self.service.stop(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("service did not stop within %.0f s; closing anyway", STOP_GRACE_S)
            await status.stop()
            log.info("%s stopped", self.spec.service_name)

    async def _notify_status(self) -> None:
        """STATUS= to systemd: the main counters, every STATUS_NOTIFY_S when they changed."""
        service = self.spec.service
        last = ""
        while True:
            try:
                line = status_line(self.service.counters(), service.counter_order,
                                   service.label)
            except Exception:  # a counter snapshot must never stop the daemon
                log.debug("no STATUS= line", exc_info=True)
                line = last
            if line and line != last:
                notify(f"STATUS={line}")
                last = line
            await asyncio.sleep(STATUS_NOTIFY_S)

    def _reload_on_signal(self) -> None:
        # Keep a reference: the loop holds tasks only weakly.
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_verb(self) -> dict[str, Any]:
        assert self._stop_requested is not None
        asyncio.get_running_loop().call_soon(self._stop_requested.set)
        return {"ok": True, "message": "stopping"}

    async def reload(self) -> dict[str, Any]:
        # Type=notify-reload (systemd 253+) wants the reload's start time with RELOADING=1;
        # older systemd ignores the extra field. READY=1 ends the reload, failed or not.
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            settings, common = _load(self.spec, self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            notify("READY=1")
            return {"ok": False, "error": str(exc)}
        warnings = await self.service.apply(settings)
        if (common.status_socket, common.status_port, common.status_address,
                common.pid_file) != (self.common.status_socket, self.common.status_port,
                                     self.common.status_address, self.common.pid_file):
            warnings.append("StatusSocket, StatusPort, StatusAddress and PidFile changes need "
                            "a restart")
        if common.log_level != self.common.log_level or common.log_file != self.common.log_file:
            setup_logging(self.spec.program, common.log_level, common.log_file,
                          foreground=self.foreground)
        self.settings = settings
        self.common = dataclasses.replace(self.common, log_level=common.log_level,
                                          log_file=common.log_file)
        for warning in warnings:
            log.warning("reload: %s", warning)
        log.info("configuration reloaded from %s", self.config_path)
        notify("READY=1")
        return {"ok": True, "message": "reloaded", "warnings": warnings}

