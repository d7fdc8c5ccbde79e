"""The policy service: an aiohttp HTTP/1.1 server on the socket bound before detaching.

GET /boot.ipxe   the static first script (script.boot_script), pointing back at this host
GET /boot/<path> a boot file under BootFilesRoot (bootfiles.BootFiles: the imaging kernel and
                 initrd over HTTP with sendfile; HEAD and Range too)
GET /policy      the answer for one machine: query.parse_query -> the directory (policy and the
                 workstation record, on the loop when the backend can answer there without
                 blocking, else on worker threads; bounded by DirectoryTimeout) and its
                 multicast sessions (read at most every few seconds) ->
                 common.policy.sessions.work_for -> script.answer_script
GET /grub.cfg    the first script of Secure Boot clients' GRUB (grubscript.bootstrap), which
                 tftpd serves as grub/grub.cfg (tftpd/gateway.py)
GET /policy.grub the same answer as /policy, for GRUB (grubscript.answer_script), asked by tftpd
                 for GRUB's /preboot/policy.grub/mac=.../... file
anything else    404 (405 for another method on a known path)

The directory is held by common.policy.directory.holder.DirectoryHolder (opened in start() on a
worker thread, reopened after a failure at most every REOPEN_S seconds, swapped on reload).
When it cannot be opened or read, the query is answered with FallbackAnswer at once, counted,
and logged (rate-limited). Directory calls run on a small pool of daemon threads owned by the
server: a hung directory can neither block the event loop nor keep the process from exiting
within the 5 s SIGTERM contract.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any, Callable, NamedTuple

from aiohttp import web

from common.policy.directory.holder import DirectoryHolder, describe
from common.daemon import services
from common.daemon.httpdaemon import (HttpListener, address_change_warnings, error_middleware,
                                      metrics_handler, quiet_bad_requests)
from common.machine import MachineFacts
from common.policy.model import WorkAssignment, menu_for
from common.policy.sessions import work_for
from common.policy.trust import Gate, Refused
from common.daemon.tls import reload_tls, server_context
from common.daemon.workerpool import DaemonThreadPool

from . import grubscript, script
from .bootfiles import BootFiles
from .config import Settings
from .query import BadQuery, authority, host_of, parse_query, port_of
from .status import ARCHES, PLATFORMS, PolicyCounters, bounded

log = logging.getLogger("preboot.policyd")

WARN_EVERY_S = 10.0              # directory warnings: one line per this many seconds
SHUTDOWN_TIMEOUT_S = 2.0         # in-flight HTTP requests at stop
LISTEN_BACKLOG = 1024
KEEPALIVE_S = 15.0               # an idle client connection is closed after this long
SEND_TIMEOUT_S = 10.0            # ... and one that takes none of our answers after this long


http_log = quiet_bad_requests("preboot.policyd.http", log)


class Dialect(NamedTuple):
    """How an answer is written: iPXE's script (script.py) or GRUB's (grubscript.py)."""

    note: str                                       # in the log line: "" or ", GRUB"
    answer: Callable[..., script.Answer]            # (settings, assignment, menu, facts,
    fallback: Callable[..., script.Answer]          #  server, token, port) / (settings, reason,
                                                    #  facts, server, token, port)


IPXE = Dialect(
    "",
    lambda settings, assignment, menu, facts, server, token, port: script.answer_script(
        settings, assignment, menu, facts.platform, server, facts.mac, token, port),
    lambda settings, reason, facts, server, token, port: script.fallback_script(
        settings, reason, facts.platform, server, facts.mac, token, port))
# GRUB fetches the environment over TFTP (GrubKernel, GrubInitrd): no HTTP port in it
GRUB = Dialect(
    ", GRUB",
    lambda settings, assignment, menu, facts, server, token, port: grubscript.answer_script(
        settings, assignment, menu, server, facts.mac, token),
    lambda settings, reason, facts, server, token, port: grubscript.fallback_script(
        settings, reason, server, facts.mac, token))


class RateLimitedWarning:
    """At most one WARNING line per interval; the lines held back are counted in the next."""

    def __init__(self, logger: logging.Logger, interval_s: float = WARN_EVERY_S):
        self.logger = logger
        self.interval_s = interval_s
        self._next_at = 0.0
        self._held = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} more like it not shown)"
        self._held = 0
        self._next_at = now + self.interval_s
        self.logger.warning(message, *args)


def _script_response(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


class PolicyServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = PolicyCounters()
        self._http = HttpListener(http_log, keepalive_s=KEEPALIVE_S,
                                  shutdown_timeout_s=SHUTDOWN_TIMEOUT_S, backlog=LISTEN_BACKLOG,
                                  send_timeout_s=SEND_TIMEOUT_S)
        self._pool: DaemonThreadPool | None = None
        self._directory = DirectoryHolder(self._worker_pool, "answering FallbackAnswer")
        self._warn = RateLimitedWarning(log)
        self._gate = Gate(settings.trust)
        self._tls_context: ssl.SSLContext | None = None
        self._boot_files = BootFiles(settings.boot_files)

    # ---- lifecycle (common.daemon.runner.Service) ---------------------------------------

    def bind(self) -> list[socket.socket]:
        return [self._http.bind(self.settings.ip_address, self.settings.port)]

    async def start(self) -> None:
        self._pool = DaemonThreadPool(self.settings.workers, "policyd-dir")
        await self._directory.configure(self.settings.directory)
        for warning in self._gate.prepare() + self._boot_files.prepare():
            log.warning("%s", warning)
        errors = error_middleware(self._not_found, self._internal_error)
        app = web.Application(middlewares=[errors, self._allowed_clients],
                              client_max_size=64 * 1024)
        app.router.add_get("/boot.ipxe", self._boot_ipxe)
        app.router.add_get("/policy", self._policy)
        app.router.add_get("/grub.cfg", self._grub_cfg)
        app.router.add_get("/policy.grub", self._policy_grub)
        app.router.add_get("/metrics", metrics_handler(services.POLICYD, self.counters,
                                                        time.time()))
        self._boot_files.add_routes(app)
        tls = self.settings.tls
        self._tls_context = server_context(tls) if tls else None
        await self._http.start(app, self._tls_context)
        where = self.listen()[0]
        log.info("policy service answering on %s://%s:%d (boot script /boot.ipxe)%s",
                 self._http.scheme, where["address"], where["port"],
                 f"; certificate sha256:{tls.pin}" if tls else "")

    async def apply(self, settings: Settings) -> list[str]:
        warnings = address_change_warnings(self.settings, settings)
        old = self.settings
        self.settings = settings
        if settings.workers != old.workers and self._pool is not None:
            retired, self._pool = self._pool, DaemonThreadPool(settings.workers, "policyd-dir")
            retired.shutdown(wait=False)       # queued calls still run; then its threads end
        await self._directory.configure(settings.directory)
        self._gate.configure(settings.trust)
        warnings += reload_tls(self._tls_context, old.tls, settings.tls)
        return warnings + self._gate.prepare() + self._boot_files.configure(settings.boot_files)

    async def stop(self) -> None:
        await self._http.stop()                # stops listening, lets in-flight answers finish
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._directory.close()
        self._boot_files.close()
        self._http.close()

    def listen(self) -> list[dict[str, Any]]:
        return self._http.listen()

    def counters(self) -> dict[str, Any]:
        return {**self.stats.snapshot(), **self._boot_files.counters()}

    def _worker_pool(self) -> DaemonThreadPool:
        assert self._pool is not None, "start() first"
        return self._pool

    # ---- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _allowed_clients(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            self._gate.check_client(request.remote)
        except Refused as exc:
            self.stats.bad_requests += 1
            log.warning("refused %s: %s", request.remote, exc.reason)
            return web.Response(status=exc.status, text=f"refused: {exc.reason}\n")
        return await handler(request)

    @staticmethod
    def _not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text=f"not found: {request.path[:200]}\n"
                            "(this service answers /boot.ipxe, /policy and /boot/<file>)\n")

    @staticmethod
    def _internal_error(request: web.Request) -> web.Response:
        log.exception("internal error answering %s", request.path_qs[:300])
        return web.Response(status=500, text="internal error (see the service's log)\n")

    def _where(self, request: web.Request) -> str:
        """host[:port] the client reached us by."""
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname:
            address, port = sockname[0], sockname[1]
        else:
            address, port = self.settings.ip_address, self.settings.port
        return authority(request.headers.get("Host"), address, port)

    async def _boot_ipxe(self, request: web.Request) -> web.Response:
        self.stats.script_requests += 1
        return _script_response(script.boot_script(self._where(request), self._http.scheme))

    async def _grub_cfg(self, request: web.Request) -> web.Response:
        self.stats.script_requests += 1
        return _script_response(grubscript.bootstrap())

    async def _policy(self, request: web.Request) -> web.Response:
        return await self._answer(request, IPXE)

    async def _policy_grub(self, request: web.Request) -> web.Response:
        return await self._answer(request, GRUB)

    async def _answer(self, request: web.Request, dialect: "Dialect") -> web.Response:
        """One machine's answer, written in `dialect` (iPXE's or GRUB's script)."""
        self.stats.queries += 1
        parsed = parse_query(request.query.items())
        if isinstance(parsed, BadQuery):
            self.stats.bad_requests += 1
            log.info("bad query from %s: %s", request.remote, parsed.reason)
            return web.Response(status=400, text=f"bad request: {parsed.reason}\n")
        facts: MachineFacts = parsed
        assert facts.mac is not None
        self.stats.by_platform[bounded(facts.platform, PLATFORMS)] += 1
        self.stats.by_arch[bounded(facts.arch, ARCHES)] += 1
        settings = self.settings
        where = self._where(request)
        server, port = host_of(where), port_of(where, 443 if self._http.scheme == "https" else 80)
        try:
            policy, station = await self._directory.lookup(facts.mac)
        except Exception as exc:  # DirectoryError, timeout, anything a backend lets through
            self.stats.directory_errors += 1
            return self._fallback(settings, facts, server, describe(exc), dialect, port)
        # a machine a multicast session takes goes into it (imgsrvd, which runs the sessions,
        # decides again when the imaging environment asks: a session may have begun meanwhile)
        sessions = await self._directory.recent_sessions()
        try:
            assignment = work_for(policy, station, facts, sessions)
            answer = dialect.answer(settings, assignment, menu_for(policy, station), facts,
                                    server, self._work_token(facts.mac, assignment), port)
        except Exception as exc:  # a bug or bad data must still boot the machine somehow
            log.exception("cannot decide for %s", facts.mac)
            return self._fallback(settings, facts, server, f"cannot decide: {exc}", dialect,
                                  port)
        if assignment.has_work:
            self.stats.work_assigned += 1
        else:
            self.stats.no_work += 1
        if answer.kind == "menu":
            self.stats.menus_shown += 1
        self.stats.by_action[assignment.action.kind.value] += 1
        what = "imaging" if assignment.has_work else "local"
        if answer.kind == "menu":
            what = f"menu, default {what}"
        elif answer.kind == "hotkey":
            what = f"hot-key prompt, then {what}"
        log.info("%s (%s%s): %s; %s", facts.mac, facts.platform or "platform unknown",
                 dialect.note, what, assignment.reason)
        return _script_response(answer.script)

    def _work_token(self, mac: str, assignment: WorkAssignment) -> str | None:
        """The machine's capability to ask the imaging server for its work (the imaging server
        then issues one for exactly that work); it names the images only for the record."""
        action = assignment.action
        images = (action.image, *action.addons) if assignment.has_work and action.image else ()
        return self._gate.issue(mac, ("work",), images, time.time())

    def _fallback(self, settings: Settings, facts: MachineFacts, server: str,
                  problem: str, dialect: "Dialect", port: int) -> web.Response:
        self.stats.fallback_answers += 1
        self._warn.warning("directory %s: %s; answered %s with FallbackAnswer (%s)",
                           settings.directory.text, problem, facts.mac, settings.fallback)
        # The client sees only that; the details (hosts, paths) stay in the log.
        reason = "directory unavailable"
        token = self._gate.issue(facts.mac, ("work",), (), time.time()) if facts.mac else None
        answer = dialect.fallback(settings, reason, facts, server, token, port)
        return _script_response(answer.script)
