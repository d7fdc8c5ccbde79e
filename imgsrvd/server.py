"""The imaging server: an aiohttp HTTP/1.1 server on the socket bound before detaching.

PUT  /v1/images/<path>   store an image (streamed to a temporary file, checked, then renamed)
GET  /v1/images/<path>   retrieve an image (sendfile; Range for resume); HEAD: its size only
GET  /v1/images          list the image root (path, size, type, date) for an operator
                         (listing.py: only what the capability's patterns name)
POST /v1/work            auto-imaging: what the directory says this machine should do
POST /v1/results         log an imaging result; a successful restore clears the next-boot flag
GET  /status             a read-only HTML status page of the four daemons, the latest
                         results and the multicast sessions (statuspage.py,
                         docs/monitoring.md); GET /metrics: the counters, Prometheus text
POST /v1/sessions        open a multicast session a workstation master (or an operator) asks
                         for; GET, POST .../start and DELETE /v1/sessions/<name> (docs/multicast.md)

docs/imaging-protocol.md is the specification. File work (writes, fsync, the image check, the
rename) runs on asyncio's worker threads; directory calls run on a small pool of daemon threads
owned by the server, bounded by DirectoryTimeout, so a hung directory can neither block the
event loop nor hold up the 5 s SIGTERM contract. Multicast sessions (997/udp) are the
multicast package's: the control plane (multicast/catalog.py) on this loop, the engine on a
thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import os
import socket
import ssl
import time
from typing import Any

from aiohttp import web

from common import __version__
from common.imaging import protocol
from common.policy.directory.holder import DirectoryHolder, describe
from common.daemon import services
from common.daemon.httpdaemon import (BadJsonBody, HttpListener, JsonLimits,
                                      address_change_warnings, error_middleware,
                                      metrics_handler, quiet_bad_requests, read_json_body)
from common.imaging.imagelist import list_images
from common.imaging.protocol import BadPath, BadRequest, LocalPath, RemotePath
from common.identity import MachineIdentity
from common.policy.identityassign import (SOURCE_DISK, SOURCE_POLICY, IdentityOutcome,
                                          identity_for)
from common.policy.identitypolicy import KIND_ADDRESS
from common.policy.model import NO_WORK, ActionKind, MulticastSession, WorkAssignment
from common.policy.sessions import work_for
from common.policy.trust import Gate, Refused
from common.daemon.tls import reload_tls, server_context
from common.daemon.workerpool import DaemonThreadPool

from . import listing, store
from .access import work_grant
from .config import Settings
from .multicast.catalog import Catalog, CatalogSettings, Engine, NoEngine, ParticipantEntry
from .multicast.decisions import ReceiverReport, Registration, registration_problem
from .multicast.images import ImageFactsError, read_image_facts
from .multicast.model import EngineSettings, SessionOrigin
from .operations import Operation, OperationTable
from .resultsadmission import HostRateLimit, LogQueue
from .status import ImagingCounters, multicast_status
from .statuspage import HEADERS as STATUS_PAGE_HEADERS, DaemonView, StatusPage
from .transfers import AckedBytes, ProgressWatch, Slot, SlotTable, TransferStalled

log = logging.getLogger("preboot.imgsrvd")

LISTEN_BACKLOG = 1024
KEEPALIVE_S = 75.0
SHUTDOWN_TIMEOUT_S = 2.0
READ_CHUNK = 1 << 20             # bytes handed to a worker thread per write
RETRY_AFTER_S = 5
JSON_MAX = 64 * 1024
SWEEP_S = 30.0                   # how often unfinished and unreported operations are settled
STOP_FLUSH_S = 1.5               # what stop() waits for their entries to be written


http_log = quiet_bad_requests("preboot.imgsrvd.http", log)


class _ImageFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (to count what was sent) and then returns.

    aiohttp prepares a returned response again; StreamResponse.prepare is idempotent but
    FileResponse.prepare is not (it re-evaluates the Range and asserts on a 206), which made
    every 206 end in an 'Unhandled exception' and a closed connection, so the client had to
    reconnect for each batch of chunks.
    """

    def __init__(self, path: str, watch: ProgressWatch, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._watch = watch

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:
            return None
        return await super().prepare(request)

    async def _sendfile(self, request: web.BaseRequest, fobj: Any, offset: int,
                        count: int) -> Any:
        """sendfile in pieces, each watched: a client that stops taking the image (or takes
        it too slowly) is cut off and its slot freed; aiohttp's own sendfile waits forever."""
        writer = await web.StreamResponse.prepare(self, request)
        loop, transport = asyncio.get_running_loop(), request.transport
        if transport is None:
            raise ConnectionResetError("Connection lost")
        size = self._watch.piece_bytes
        while count > 0:
            piece = min(count, size)
            started = loop.time()
            credited = await _watched(loop.sendfile(transport, fobj, offset, piece),
                                      self._watch, transport, piece)
            self._watch.add(piece - credited)
            offset, count = offset + piece, count - piece
            size = self._watch.next_piece_bytes(piece, loop.time() - started)
        await web.StreamResponse.write_eof(self)
        return writer


def _zero_suffix_range(value: str) -> bool:
    """Whether a Range header asks for the last 0 bytes (`bytes=-0`), which is unsatisfiable."""
    unit, _, ranges = value.partition("=")
    spec = ranges.strip()
    return unit.strip().lower() == "bytes" and spec.startswith("-") and \
        spec[1:].strip().isdigit() and int(spec[1:]) == 0


async def _watched(work: Any, watch: ProgressWatch, transport: Any, piece: int) -> int:
    """Await `work`, a sendfile of `piece` bytes, while `watch` allows; when it does not, cut
    the connection (a sendfile cannot be left half done on a connection that stays open).
    While it runs, what the client acknowledged is credited to the watch as it goes; returns
    the bytes so credited (the caller adds the rest of the piece)."""
    task = asyncio.ensure_future(work)
    acked = AckedBytes(transport.get_extra_info("socket"))
    credited = 0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=watch.wait_s())
            if done:
                task.result()
                return credited
            progress = min(piece, acked.since_start())
            if progress > credited:
                watch.add(progress - credited)
                credited = progress
            watch.tick()
    except BaseException:
        task.cancel()
        transport.abort()
        raise


def _error(status: int, message: str, retry_after_s: float = RETRY_AFTER_S,
           **extra: Any) -> web.Response:
    body = {"error": message, **extra}
    headers = {protocol.ERROR_HEADER: protocol.error_header_value(message)}
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return web.json_response(body, status=status, headers=headers)


class ImagingServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = ImagingCounters()
        self._operations = OperationTable()   # stores and retrieves, as the log counts them
        self._sweeper: asyncio.Task | None = None
        self._http = HttpListener(http_log, keepalive_s=KEEPALIVE_S,
                                  shutdown_timeout_s=SHUTDOWN_TIMEOUT_S, backlog=LISTEN_BACKLOG)
        self._pool: DaemonThreadPool | None = None
        self._log_pool: DaemonThreadPool | None = None
        self._directory = DirectoryHolder(self._worker_pool, "work queries are answered 503")
        self._results = None          # resultslog.ResultsLog, when it opened
        self._report_limit = HostRateLimit(settings.results_per_minute)
        self._log_queue = LogQueue(settings.results_queue_entries)
        self._uploads: set[store.Upload] = set()
        self._gate = Gate(settings.trust)
        self._slots = SlotTable()
        self._tls_context: ssl.SSLContext | None = None
        self._catalog_directory = _DirectorySessions(self)
        self._catalog = Catalog(CatalogSettings(settings.image_root, settings.data_port,
                                                settings.multicast.control_port
                                                if settings.multicast else 0,
                                                min(settings.max_transfer_time_s, 3600.0)),
                                self._gate, self._catalog_directory, self._record_receiver)
        self._started_at = time.time()
        self._status_page = StatusPage(
            self._own_view, lambda: self._results.path if self._results is not None else None,
            lambda: self.status_fields()["multicast"])

    # ---- lifecycle (common.daemon.runner.Service) ---------------------------------------

    def bind(self) -> list[socket.socket]:
        return [self._http.bind(self.settings.ip_address, self.settings.port)]

    async def start(self) -> None:
        self._pool = DaemonThreadPool(4, "imgsrvd-dir")
        self._log_pool = DaemonThreadPool(1, "imgsrvd-log")
        root = self.settings.image_root
        try:
            await asyncio.to_thread(os.makedirs, root, 0o755, True)
        except OSError as exc:
            log.warning("image root %s: cannot create it: %s", root, exc.strerror)
        removed = await asyncio.to_thread(store.clean_partials, root)
        for path in removed:
            log.warning("removed %s, left by an upload that did not finish", path)
        await self._open_results(self.settings)
        await self._directory.configure(self.settings.directory)
        for warning in await asyncio.to_thread(self._gate.prepare):
            log.warning("%s", warning)
        errors = error_middleware(self._not_found, self._internal_error,
                                  passthrough=(ConnectionError, asyncio.CancelledError))
        app = web.Application(middlewares=[errors, self._allowed_clients],
                              client_max_size=JSON_MAX)
        app.router.add_route("PUT", "/v1/images/{path:.+}", self._put,
                             expect_handler=self._expect)
        app.router.add_get("/v1/images/{path:.+}", self._get)   # and HEAD
        app.router.add_get("/v1/images", self._list_images)
        app.router.add_post("/v1/work", self._work)
        app.router.add_post("/v1/results", self._result)
        app.router.add_post("/v1/sessions", self._register_session)
        app.router.add_get("/v1/sessions/{name}", self._session_info)
        app.router.add_post("/v1/sessions/{name}/start", self._start_session)
        app.router.add_delete("/v1/sessions/{name}", self._stop_session)
        app.router.add_get("/metrics", metrics_handler(services.IMGSRVD, self.counters,
                                                        time.time()))
        app.router.add_route("*", "/status", self._status)
        tls = self.settings.tls
        self._tls_context = server_context(tls) if tls else None
        await self._http.start(app, self._tls_context)
        await self._start_multicast()
        self._sweeper = asyncio.create_task(self._sweep_operations())
        where = self.listen()[0]
        log.info("imaging service answering on %s://%s:%d/v1/ (images in %s, server name %s)%s",
                 self._http.scheme, where["address"], where["port"], root,
                 self.settings.server_name, f"; certificate sha256:{tls.pin}" if tls else "")

    async def apply(self, settings: Settings) -> list[str]:
        warnings = address_change_warnings(self.settings, settings)
        old = self.settings
        self.settings = settings
        self._report_limit.per_minute = settings.results_per_minute
        self._log_queue.max_pending = settings.results_queue_entries
        if settings.results_log != old.results_log:
            await self._open_results(settings)
        elif self._results is not None:   # read by the writer under its lock, per append
            self._results.max_bytes = settings.results_log_max_bytes
            self._results.keep = settings.results_log_keep
        await self._directory.configure(settings.directory)
        self._gate.configure(settings.trust)
        warnings += reload_tls(self._tls_context, old.tls, settings.tls)
        if (settings.multicast, settings.data_port, settings.image_root) != \
                (old.multicast, old.data_port, old.image_root):
            warnings.append("the multicast keys and ImageRoot take effect for multicast "
                            "sessions at the next start")
        return warnings + await asyncio.to_thread(self._gate.prepare)

    async def stop(self) -> None:
        await self._http.stop()
        await self._catalog.stop()
        await self._flush_operations()
        for upload in list(self._uploads):
            upload.abort()
        for pool in (self._pool, self._log_pool):
            if pool is not None:
                pool.shutdown(wait=False)
        self._directory.close()
        if self._results is not None:
            try:
                self._results.close()
            except Exception:  # closing a log on the way out: nothing more to do
                pass
        self._http.close()

    def listen(self) -> list[dict[str, Any]]:
        listening = self._http.listen()
        engine = self.settings.multicast
        if self._catalog.enabled and engine is not None:
            listening.append({"proto": "udp", "address": engine.control_address,
                              "port": self._catalog.control_port()})
        return listening

    def counters(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def status_fields(self) -> dict[str, Any]:
        """The status reply's multicast sessions and receivers (zmgmcast -status)."""
        catalog = self._catalog
        return {"multicast": multicast_status(catalog.enabled, catalog.control_port(),
                                              catalog.statuses())}

    def _own_view(self) -> DaemonView:
        """imgsrvd as the status page shows it: from this process (it is the one answering)."""
        return DaemonView(services.IMGSRVD, True, version=__version__,
                          uptime_s=time.time() - self._started_at, listen=tuple(self.listen()),
                          counters=self.counters())

    async def _status(self, request: web.Request) -> web.Response:
        """GET /status: the status page (statuspage.py), behind AllowedClients like every
        route; no capability (docs/security.md). Read-only: any other method is 405."""
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="read-only: GET /status\n",
                                headers={"Allow": "GET, HEAD"})
        return web.Response(body=await self._status_page.page(), headers=STATUS_PAGE_HEADERS)

    def control_verbs(self) -> dict[str, Any]:
        """zmgmcast's multicast commands (root, on the Unix status socket)."""
        return {"mcast-start": self._control_start, "mcast-stop": self._control_stop,
                "mcast-delete": self._control_delete}

    # ---- multicast ---------------------------------------------------------------------------

    async def _start_multicast(self) -> None:
        engine_settings = self.settings.multicast
        if engine_settings is None:
            log.info("multicast: off (MaxSessions = 0)")
            await self._catalog.start(None, 0)
            return
        engine = _make_engine(engine_settings, self._catalog.admit)
        try:
            await self._catalog.start(engine, engine_settings.max_sessions)
        except OSError as exc:
            log.error("multicast: cannot open %s:%d/udp (MulticastPort): %s; multicast "
                      "sessions are off, the rest of the imaging service runs on",
                      engine_settings.control_address, engine_settings.control_port,
                      exc.strerror or exc)
            await self._catalog.start(None, 0)
            return
        except Exception:  # the engine's own failure must not take the imaging service down
            log.exception("multicast: the engine did not start; multicast sessions are off")
            await self._catalog.start(None, 0)
            return
        log.info("multicast: sessions on %s:%d/udp, at most %d at once",
                 engine_settings.control_address, self._catalog.control_port(),
                 engine_settings.max_sessions)
        await self._catalog.sync()

    def _record_receiver(self, entry: ParticipantEntry) -> None:
        """A multicast receiver's entry from the sender's view (no report of its own came):
        one Update Request, one entry; never an Image Sent."""
        self.stats.update_requests += 1
        self.stats.multicast_receivers += 1
        participant = entry.participant
        who = entry.mac or (participant.address if participant else "") or "unknown"
        log.warning("multicast session '%s': %s: %s", entry.session, who, entry.verdict.error)
        self._count_dropped(self._submit_entry(
            workstation=who, operation="download", status=entry.verdict.status,
            image_type="base", image_path=entry.image or None,
            error_message=entry.verdict.error or None,
            requesting_address=entry.address or None, session=entry.session,
            transfer="failed" if entry.verdict.status != "success" else None,
            chunks_verified=participant.chunks_verified if participant else None,
            bytes_written=participant.bytes_written if participant else None,
            bytes=participant.bytes_received if participant else None))

    def _operator(self, request: web.Request, image: str) -> Any:
        """The operator capability that allows retrieving `image` (None in the open mode);
        Refused otherwise: a session sends an image to every machine that joins it, which only
        an operator may ask for."""
        capability = self._authorize(request, "retrieve", image)
        if capability is not None and not capability.is_operator:
            raise Refused(403, "a multicast session is opened with an operator's capability "
                               "(preboot-dir token --operator NAME --allow retrieve)")
        return capability

    async def _register_session(self, request: web.Request) -> web.Response:
        """POST /v1/sessions {name, image, clients, t}: `img session NAME master` (or an
        operator) opens a session of its own; again with the same image: its join fields."""
        try:
            body = await self._read_json(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object {name, image, clients, t}")
        unknown = sorted(set(body) - {"name", "image", "clients", "t"})
        name, image = body.get("name"), body.get("image")
        clients, wait_min = body.get("clients", 0), body.get("t", 0)
        problem = (f"{unknown[0]}: not a session field" if unknown else
                   registration_problem(name, image, clients, wait_min))
        if problem:
            return _error(400, problem)
        try:
            image = protocol.clean_relative(image)
        except BadPath as exc:
            return _error(403, str(exc))
        try:
            self._operator(request, image)
        except Refused as exc:
            log.warning("%s: multicast session '%s' refused: %s", request.remote,
                        str(name)[:100], exc.reason)
            return _error(exc.status, exc.reason)
        status, answer = await self._catalog.register(
            Registration(name, image, clients, wait_min, SessionOrigin.CLIENT))
        if status >= 400:
            log.warning("%s: multicast session '%s' refused: %s", request.remote, name,
                        answer.get("error"))
            return _error(status, answer["error"])
        return web.json_response(answer, status=status)

    async def _list_images(self, request: web.Request) -> web.Response:
        """GET /v1/images: path, size, type and date of what the image root holds (headers
        and trailers read, never the chunks), as far as the operator's capability names it
        (imgsrvd/listing.py). Read-only; partial uploads are left out."""
        try:
            capability = self._authorize(request, "retrieve")
        except Refused as exc:
            log.warning("image listing for %s refused: %s", request.remote, exc.reason)
            return _error(exc.status, exc.reason)
        why = listing.refusal(capability)
        if why:
            log.warning("image listing for %s refused: %s", request.remote, why)
            return _error(403, why)
        entries = await asyncio.to_thread(list_images, self.settings.image_root)
        shown = listing.visible(entries, capability)
        return web.json_response({"server": self.settings.server_name,
                                  "images": [dataclasses.asdict(entry) for entry in shown]})

    async def _session_info(self, request: web.Request) -> web.Response:
        """GET /v1/sessions/<name>: where to join it, its state (the master shows it)."""
        name = request.match_info["name"]
        info = self._catalog.join_info(name)
        if info is None:
            return _error(404, f"no multicast session '{name[:100]}' on this server")
        try:
            self._authorize(request, "retrieve", info.image)
        except Refused as exc:
            return _error(exc.status, exc.reason)
        receivers = next((len(s.participants) for s in self._catalog.statuses()
                          if s.name == info.session), 0)
        return web.json_response({**info.answer(), "receivers": receivers})

    async def _start_session(self, request: web.Request) -> web.Response:
        """POST /v1/sessions/<name>/start: the master's g (a session of a workstation only)."""
        return await self._session_verb(request, start=True)

    async def _stop_session(self, request: web.Request) -> web.Response:
        """DELETE /v1/sessions/<name>: the master gives up (a session of a workstation only)."""
        return await self._session_verb(request, start=False)

    async def _session_verb(self, request: web.Request, start: bool) -> web.Response:
        name = request.match_info["name"]
        view = self._catalog.view(name)
        if view is None:
            return _error(404, f"no multicast session '{name[:100]}' on this server")
        try:
            self._operator(request, view.image)
        except Refused as exc:
            return _error(exc.status, exc.reason)
        if start:
            ok, message = self._catalog.start_now(name, (SessionOrigin.CLIENT,))
        else:
            ok, message = await self._catalog.stop_session(name, False, (SessionOrigin.CLIENT,))
        if not ok:
            return _error(409, message)
        return web.json_response({"session": view.name, "message": message})

    async def _control_start(self, fields: dict[str, Any]) -> dict[str, Any]:
        """mcast-start {name[, image, clients, t]}: with an image, open a manual session; without,
        start the waiting session NAME now."""
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            return {"ok": False, "error": "mcast-start needs a session name"}
        if "image" not in fields:
            ok, message = self._catalog.start_now(name)
            return {"ok": ok, ("message" if ok else "error"): message}
        image, clients, wait_min = fields.get("image"), fields.get("clients", 0), \
            fields.get("t", 0)
        problem = registration_problem(name, image, clients, wait_min)
        if problem:
            return {"ok": False, "error": problem}
        try:
            image = protocol.clean_relative(image)
        except BadPath as exc:
            return {"ok": False, "error": str(exc)}
        status, answer = await self._catalog.register(
            Registration(name, image, clients, wait_min, SessionOrigin.MANUAL))
        if status >= 400:
            return {"ok": False, "error": answer["error"]}
        what = "opened" if answer.get("created") else "already open"
        return {"ok": True, "message": f"session '{answer['session']}' {what}: {image} to "
                                       f"{answer['group']}:{answer['data_port']}",
                "session": answer}

    async def _control_stop(self, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._control_end(fields, delete=False)

    async def _control_delete(self, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._control_end(fields, delete=True)

    async def _control_end(self, fields: dict[str, Any], delete: bool) -> dict[str, Any]:
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            return {"ok": False, "error": "a session name is needed"}
        ok, message = await self._catalog.stop_session(name, delete)
        return {"ok": ok, ("message" if ok else "error"): message}

    # ---- results log ----------------------------------------------------------------------

    async def _open_results(self, settings: Settings) -> None:
        try:
            from .resultslog import ResultsLog
        except ImportError:            # pragma: no cover - shipped together
            return
        old, self._results = self._results, None
        if old is not None:
            await asyncio.to_thread(old.close)
        results = ResultsLog(settings.results_log, settings.results_log_max_bytes,
                             settings.results_log_keep)
        try:
            await asyncio.to_thread(os.makedirs, os.path.dirname(settings.results_log) or ".",
                                    0o755, True)
            report = await asyncio.to_thread(results.open, "quarantine")
        except Exception as exc:  # the log is not worth refusing images for
            log.error("results log %s: cannot open: %s; results go to this log only",
                      settings.results_log, exc)
            return
        if report.quarantined_to:
            log.warning("results log %s was corrupt; moved to %s", settings.results_log,
                        report.quarantined_to)
        self._results = results

    def _record(self, request: web.Request, workstation: str, operation: str, status: str,
                image_path: str = "", error: str = "", image_type: str | None = None,
                size: int | None = None, server: str | None = None) -> None:
        """One results log entry (and one line in the daemon log) per imaging request; dropped
        (counted) when ResultsQueue entries are already waiting."""
        if request.method in ("PUT", "GET", "HEAD") and operation in ("upload", "download") \
                and status in ("success", "failure", "denied"):
            self._log_line(request, workstation, operation, status, image_path, error)
            self._end_operation(request, workstation, operation, status, image_path, error,
                                image_type, size)
            return
        future = self._log_entry(request, workstation, operation, status, image_path, error,
                                 image_type, size, server)
        self._count_dropped(future)

    def _count_dropped(self, future: concurrent.futures.Future | None) -> None:
        if future is None and self._results is not None:
            self.stats.results_dropped += 1
            log.warning("results log: %d entries waiting (ResultsQueue); this one was dropped",
                        self._log_queue.max_pending)

    def _log_line(self, request: web.Request, workstation: str, operation: str, status: str,
                  image_path: str, error: str) -> None:
        who = workstation or request.remote or "unknown"
        line = f"{request.remote} {who}: {operation} {image_path or '-'}: {status}"
        if error:
            line += f" ({error})"
        if status in ("success", "referred", "assigned"):
            log.info("%s", line)
        else:
            log.warning("%s", line)

    def _log_entry(self, request: web.Request, workstation: str, operation: str, status: str,
                   image_path: str = "", error: str = "", image_type: str | None = None,
                   size: int | None = None, server: str | None = None,
                   extra: dict[str, Any] | None = None) -> concurrent.futures.Future | None:
        """Queue one entry; the future completes when it is durable. None: not queued (no log,
        or the queue is full)."""
        self._log_line(request, workstation, operation, status, image_path, error)
        return self._submit_entry(
            workstation=workstation or request.remote or "unknown", operation=operation,
            status=status, image_type=image_type, image_path=image_path or None,
            error_message=error or None, requesting_address=request.remote, server=server,
            bytes=size, **(extra or {}))

    def _submit_entry(self, **fields: Any) -> concurrent.futures.Future | None:
        results = self._results
        if results is None or self._log_pool is None:
            return None
        from .resultslog import ResultEntry
        try:
            entry = ResultEntry(**fields)
            future = self._log_queue.submit(self._log_pool, results.append, entry)
        except Exception as exc:  # a bad entry or a pool shut down: the daemon log has it
            log.error("results log: %s", exc)
            return None
        if future is not None:
            future.add_done_callback(
                lambda f: f.cancelled() or f.exception() is None or
                log.error("results log %s: %s", results.path, f.exception()))
        return future

    # ---- operations: one entry and one Update Request per store or retrieve ----------------

    def _client(self, request: web.Request) -> tuple[str, bool]:
        """(who the operation's requests come from, whether that engine reports it itself):
        the run's X-Preboot-Session, else the requesting address (imgsrvd/operations.py)."""
        session = protocol.clean_session(request.headers.get(protocol.SESSION_HEADER, ""))
        if not session:
            return f"address {request.remote}", False
        reports = request.headers.get(protocol.REPORTS_HEADER, "").strip().lower() == "yes"
        return f"session {session}", reports

    def _retrieve(self, request: web.Request, path: str, size: int) -> Operation:
        """The retrieve this GET belongs to; its first GET counts an Update Request."""
        client, reports = self._client(request)
        op = self._operations.live_retrieve(client, path)
        if op is not None and op.size == size:
            self._operations.touch(op)
            return op
        self.stats.update_requests += 1
        op = self._operations.begin(client, "download", path, self._workstation(request),
                                    request.remote or "", reports, size)
        self._write_due()
        return op

    def _retrieve_sent(self, op: Operation, first: int, last: int, sent: int) -> None:
        op.sent_bytes += sent
        if op.cover(first, last):            # sent whole: an Image Sent, the retrieve is over
            self.stats.images_sent += 1
            self._operations.finish(op, "success")
            self._write_due()

    def _end_operation(self, request: web.Request, workstation: str, kind: str, status: str,
                       path: str, error: str, image_type: str | None, size: int | None) -> None:
        """A store or retrieve ends (stored, refused, failed): its entry now, or with the
        engine's report when it sends one. A refused GET or HEAD outside a retrieve is an
        operation of its own (a PUT counted itself)."""
        client, reports = self._client(request)
        op = self._operations.live_retrieve(client, path) if kind == "download" else None
        if op is None:
            if kind == "download":
                self.stats.update_requests += 1
            op = self._operations.begin(client, kind, path, workstation, request.remote or "",
                                        reports)
        self._operations.finish(op, status, error, image_type, size)
        self._write_due()

    def _reported_operation(self, report: protocol.ResultReport) -> Operation | None:
        """The store or retrieve (of this server) the engine's report is about, if any."""
        if not report.session:
            return None
        try:
            where = protocol.parse_image_path(report.image_path, self._own_names())
        except BadPath:
            return None
        path = str(where) if isinstance(where, RemotePath) else where.path   # as recorded
        return self._operations.report(f"session {report.session}", report.operation, path)

    def _write_due(self) -> None:
        for op in self._operations.take_due():
            self._count_dropped(self._write_operation(op))

    def _write_operation(self, op: Operation, report: protocol.ResultReport | None = None,
                         extra: dict[str, Any] | None = None
                         ) -> concurrent.futures.Future | None:
        """The operation's one entry: the server's record, with the engine's report if any.
        A refusal keeps the server's verdict and reason (the engine only saw it fail); a
        transfer the server completed takes the engine's status (it also saw the disk)."""
        size = op.stored_bytes if op.kind == "upload" else op.sent_bytes
        status, error, image_type, who = op.status, op.error, op.image_type, op.workstation
        if report is not None:
            if op.status in ("success", "reported"):
                status, error = report.status, report.error_message
            image_type = report.image_type
            who = report.workstation or op.workstation
        return self._submit_entry(
            workstation=who or op.address or "unknown", operation=op.kind, status=status,
            image_type=image_type, image_path=op.path or None, error_message=error or None,
            requesting_address=op.address or None, bytes=size or None, **(extra or {}))

    async def _sweep_operations(self) -> None:
        """Settle retrieves that stopped and records whose report never came."""
        while True:
            await asyncio.sleep(SWEEP_S)
            self._operations.expire()
            self._write_due()

    async def _flush_operations(self) -> None:
        """Stopping: write what is still waiting (briefly: the stop has a deadline)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._operations.settle_all()
        futures = [f for op in self._operations.take_due()
                   if (f := self._write_operation(op)) is not None]
        if futures:
            await asyncio.wait([asyncio.wrap_future(f) for f in futures], timeout=STOP_FLUSH_S)

    # ---- the directory ----------------------------------------------------------------------

    def _worker_pool(self) -> DaemonThreadPool:
        assert self._pool is not None, "start() first"
        return self._pool

    # ---- HTTP ------------------------------------------------------------------------------

    def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"not found: {request.path[:200]} (this service answers "
                           "/v1/images/<path>, /v1/work, /v1/results, /metrics and /status)")

    def _internal_error(self, request: web.Request) -> web.Response:
        log.exception("internal error answering %s %s", request.method, request.path_qs[:300])
        self.stats.failures += 1
        return _error(500, "internal error (see the imaging server's log)")

    @web.middleware
    async def _allowed_clients(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            self._gate.check_client(request.remote)
        except Refused as exc:
            return self._deny(request, exc.status, exc.reason, "log")
        return await handler(request)

    def _authorize(self, request: web.Request, operation: str, image: str | None = None,
                   mac: str | None = None) -> Any:
        """The request's capability for operation (None in the open mode); Refused if none."""
        return self._gate.authorize(request.headers.get("Authorization"), operation,
                                    time.time(), image, mac)

    def _own_names(self) -> tuple[str, ...]:
        names = [self.settings.server_name, socket.gethostname()]
        where = self.listen()
        if where:
            names.append(f"{self.settings.server_name}:{where[0]['port']}")
        return tuple(names)

    def _image_path(self, request: web.Request) -> LocalPath | RemotePath:
        return protocol.path_from_url(request.raw_path, self._own_names())

    def _workstation(self, request: web.Request) -> str:
        value = request.headers.get(protocol.WORKSTATION_HEADER, "")
        return value.strip()[:256]

    def _deny(self, request: web.Request, status: int, message: str, operation: str,
              image_path: str = "", verdict: str = "denied") -> web.Response:
        self.stats.failures += 1
        self._record(request, self._workstation(request), operation,
                     "failure" if verdict == "failure" else verdict, image_path, message)
        return _error(status, message)

    def _remote(self, request: web.Request, where: RemotePath, operation: str
                ) -> web.Response:
        """A store or retrieve naming another server: referred in auto mode, else denied."""
        mode = request.headers.get(protocol.MODE_HEADER, "manual").strip().lower()
        if mode != "auto":
            return self._deny(request, 403,
                              protocol.MANUAL_REFERRAL_ERROR.format(server=where.server),
                              operation, str(where))
        self.stats.client_referrals += 1
        if request.method != "PUT":          # a store counted itself
            self.stats.update_requests += 1
        server = where.server if ":" in where.server.rsplit("]", 1)[-1] \
            else f"{where.server}:{protocol.DEFAULT_PORT}"
        # encoded again: the path arrived decoded, and a name with '%', '?' or '#' must reach
        # the other server as the same name
        location = f"http://{server}{protocol.image_url(where.path)}"
        self._record(request, self._workstation(request), operation, "referred", str(where),
                     server=where.server)
        return web.json_response(
            {"work": "referral", "server": where.server, "path": where.path,
             "location": location}, status=307, headers={"Location": location})

    async def _expect(self, request: web.Request) -> None:
        """`Expect: 100-continue`: invite the image only when the store would take it, so a
        refused upload (bad path, not allowed, exists, busy) is answered before the client
        sends gigabytes. The handler then answers (and counts) the refusal itself."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return None
        settings = self.settings
        try:
            where = self._image_path(request)
        except BadPath:
            return None
        if isinstance(where, RemotePath) or self._slot_refusal(request) or \
                not protocol.upload_allowed(where.path, settings.allowed_upload_dirs):
            return None
        try:
            self._authorize(request, "store", where.path)
        except Refused:
            return None
        if not settings.allow_overwrite:
            target = os.path.join(settings.image_root, where.path)
            if await asyncio.to_thread(os.path.lexists, target):
                return None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        return None

    def _slot_refusal(self, request: web.Request) -> str | None:
        settings = self.settings
        return self._slots.refusal(request.remote or "?", settings.max_clients,
                                   settings.max_transfers_per_client)

    def _take_slot(self, request: web.Request) -> Slot:
        slot = self._slots.take(request.remote or "?")
        self.stats.active_transfers = self._slots.total
        return slot

    def _give_back_slot(self, slot: Slot) -> None:
        slot.give_back()
        self.stats.active_transfers = self._slots.total

    def _watch(self) -> ProgressWatch:
        settings = self.settings
        return ProgressWatch(settings.transfer_timeout_s, settings.min_transfer_rate_bps,
                             settings.max_transfer_time_s)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        self.stats.update_requests += 1
        settings = self.settings
        try:
            where = self._image_path(request)
        except BadPath as exc:
            return self._deny(request, 403, str(exc), "upload")
        if isinstance(where, RemotePath):
            return self._remote(request, where, "upload")
        path = where.path
        try:
            self._authorize(request, "store", path)
        except Refused as exc:
            return self._deny(request, exc.status, exc.reason, "upload", path)
        if not protocol.upload_allowed(path, settings.allowed_upload_dirs):
            folder = os.path.dirname(path) or "/"
            return self._deny(request, 403, f"uploads to {folder} are not allowed "
                              f"(AllowedUploadDirs: {', '.join(settings.allowed_upload_dirs)})",
                              "upload", path)
        busy = self._slot_refusal(request)
        if busy:
            self.stats.busy_refusals += 1
            return self._deny(request, 503, f"{busy}; try again later", "upload", path,
                              "failure")
        slot = self._take_slot(request)
        started = time.monotonic()
        upload: store.Upload | None = None
        try:
            try:
                upload = await asyncio.to_thread(store.Upload.begin, settings.image_root, path,
                                                 settings.allow_overwrite,
                                                 request.content_length,
                                                 settings.allowed_upload_dirs)
            except store.StoreError as exc:
                return self._deny(request, exc.status, str(exc), "upload", path, "failure"
                                  if exc.status >= 500 else "denied")
            self._uploads.add(upload)
            buffer = bytearray()
            watch = self._watch()
            while True:
                try:
                    chunk = await asyncio.wait_for(request.content.readany(), watch.wait_s())
                except asyncio.TimeoutError:
                    watch.tick()               # TransferStalled when too slow or too long
                    continue
                if not chunk:
                    break
                watch.add(len(chunk))
                self.stats.bytes_received += len(chunk)
                buffer += chunk
                if len(buffer) >= READ_CHUNK:
                    data, buffer = bytes(buffer), bytearray()
                    await asyncio.to_thread(upload.write, data)
            if request.content_length is not None and \
                    upload.written + len(buffer) < request.content_length:
                raise ConnectionResetError("the client sent less than its Content-Length")
            if buffer:
                await asyncio.to_thread(upload.write, bytes(buffer))
            size = await asyncio.to_thread(upload.finish)
        except store.StoreError as exc:
            if upload is not None:
                upload.abort()
            return self._deny(request, exc.status, str(exc), "upload", path,
                              "failure")
        except TransferStalled as exc:
            assert upload is not None
            upload.abort()
            return self._deny(request, 408, f"too slow: {exc}; the upload was discarded",
                              "upload", path, "failure")
        except BaseException as exc:  # client gone, cancelled, I/O error: nothing is kept
            if upload is not None:
                upload.abort()
            self.stats.failures += 1
            what = "the client went away" if isinstance(
                exc, (ConnectionError, asyncio.CancelledError)) or "Connection" in type(
                exc).__name__ else f"{type(exc).__name__}: {exc}"
            self._record(request, self._workstation(request), "upload", "failure", path,
                         f"upload aborted ({what}); nothing was stored")
            if isinstance(exc, OSError) and exc.errno is not None and not isinstance(
                    exc, ConnectionError):
                log.error("storing %s: %s", path, exc)
                return _error(500, f"cannot store the image: {exc.strerror}")
            if not isinstance(exc, Exception):
                raise                          # cancelled (the server is stopping)
            # The client is most likely gone; if not, it learns why.
            return _error(400, f"upload aborted ({what}); nothing was stored")
        finally:
            self._give_back_slot(slot)
            if upload is not None:
                self._uploads.discard(upload)
        self.stats.images_received += 1
        seconds = time.monotonic() - started
        self._record(request, self._workstation(request), "upload", "success", path,
                     image_type=upload.image_type, size=size)
        return web.json_response({"stored": path, "size": size,
                                  "seconds": round(seconds, 3)}, status=201)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"      # counted with the retrieve (operations.py)
        settings = self.settings
        try:
            where = self._image_path(request)
        except BadPath as exc:
            return self._deny(request, 403, str(exc), "download")
        if isinstance(where, RemotePath):
            return self._remote(request, where, "download")
        path = where.path
        try:
            self._authorize(request, "retrieve", path)
        except Refused as exc:
            return self._deny(request, exc.status, exc.reason, "download", path)
        try:
            file_path, size = await asyncio.to_thread(store.open_for_reading,
                                                      settings.image_root, path)
        except store.StoreError as exc:
            return self._deny(request, exc.status, str(exc), "download", path, "failure")
        if head:
            response = web.FileResponse(file_path)
            return response
        if _zero_suffix_range(request.headers.get("Range", "")):
            # aiohttp reads "-0" as "from byte 0" and answers 206 with the whole file; RFC 9110
            # 14.1.1: a suffix of length 0 is unsatisfiable
            self.stats.failures += 1
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        busy = self._slot_refusal(request)
        if busy:
            self.stats.busy_refusals += 1
            return self._deny(request, 503, f"{busy}; try again later", "download", path,
                              "failure")
        op = self._retrieve(request, path, size)
        slot = self._take_slot(request)
        try:
            try:
                start = request.http_range.start
            except ValueError:                 # a bad Range: FileResponse answers 416
                start = None
            response = _ImageFileResponse(file_path, self._watch(), chunk_size=READ_CHUNK)
            try:
                await response.prepare(request)
                await response.write_eof()
            except TransferStalled as exc:
                # _watched cut the connection: say why once, as a client's doing (no
                # traceback); the retrieve may resume
                self.stats.failures += 1
                op.error = f"last transfer cut off: {exc}"
                log.info("cut off the retrieve of %s by %s: %s", path, request.remote, exc)
                raise ConnectionResetError(f"cut off: {exc}") from None
            except BaseException as exc:
                self.stats.failures += 1   # the retrieve may resume; it ends when it stops
                op.error = f"last transfer aborted: {type(exc).__name__}"
                raise
            sent = response.content_length or 0
            if response.status in (200, 206):
                self.stats.bytes_sent += sent
                if response.status == 200:
                    first, last = 0, size
                else:                          # suffix ranges (-N) count from the end
                    first = start if start is None or start >= 0 else size + start
                    first = first or 0
                    last = first + sent
                self._retrieve_sent(op, first, last, sent)
            elif response.status >= 400:
                self.stats.failures += 1
            return response
        finally:
            self._give_back_slot(slot)

    async def _read_json(self, request: web.Request) -> Any:
        try:
            return await read_json_body(request, JsonLimits(
                max_bytes=JSON_MAX, timeout_s=self.settings.transfer_timeout_s))
        except BadJsonBody as exc:
            raise BadRequest(str(exc)) from None

    async def _work(self, request: web.Request) -> web.Response:
        self.stats.update_requests += 1
        try:
            query = protocol.parse_work_request(await self._read_json(request))
        except BadRequest as exc:
            return self._deny(request, 400, str(exc), "log", verdict="failure")
        facts = query.facts
        assert facts.mac is not None
        try:
            self._authorize(request, "work", mac=facts.mac)
        except Refused as exc:
            return self._deny(request, exc.status, exc.reason, "log")
        try:
            policy, station = await self._directory.lookup(facts.mac)
            sessions = await self._catalog_directory.sessions()
        except Exception as exc:  # DirectoryError, timeout, anything a backend lets through
            self.stats.directory_errors += 1
            problem = describe(exc)
            log.warning("directory %s: %s", self.settings.directory.text, problem)
            return self._deny(request, 503, f"the directory cannot be read ({problem}); "
                              "boot the local disk", "log", verdict="failure")
        assignment = await self._decide(policy, station, facts, sessions)
        outcome = await self._identity(request, policy, assignment, facts, query.identity)
        if isinstance(outcome, web.Response):
            return outcome
        if outcome.refused:
            # No identity, no imaging: a restored machine without one would be a duplicate.
            assignment = WorkAssignment(NO_WORK, assignment.source,
                                        f"{assignment.reason}, but {outcome.reason}",
                                        assignment.rule)
        try:
            answer, remote = protocol.work_answer(assignment, query.mode, self._own_names())
        except BadPath as exc:
            return self._deny(request, 403, str(exc), "log", assignment.action.image)
        if assignment.action.kind is ActionKind.MULTICAST:
            info = self._catalog.join_info(assignment.action.session)
            assert info is not None               # _decide made sure
            answer.update(info.answer())
            answer["image"] = info.image
        operation = {"restore": "download", "make": "upload",
                     "multicast": "download"}.get(assignment.action.kind.value, "log")
        if remote is not None:
            self.stats.client_referrals += 1
            self._record(request, facts.mac, operation, "referred", str(remote),
                         server=remote.server)
        else:
            self._record(request, facts.mac, operation, "assigned", answer["image"])
        answer.update(protocol.identity_fields(outcome.identity, outcome.source))
        log.info("%s (%s mode): %s", facts.mac, query.mode, assignment.describe())
        grant = work_grant(answer)
        if grant is not None:
            token = await asyncio.to_thread(self._gate.issue, facts.mac, *grant, time.time())
            if token:
                answer["token"] = token
        return web.json_response(answer)

    async def _identity(self, request: web.Request, policy: Any, assignment: WorkAssignment,
                        facts: Any, disk: MachineIdentity | None
                        ) -> IdentityOutcome | web.Response:
        """The identity the answer carries (docs/identity.md): the disk's, else one from the
        identity policy, handed out by the directory's assignment log (on a worker thread:
        it writes). A 503 when the directory cannot do it."""
        try:
            if not policy.identities:
                # nothing to hand out: no thread hop, no directory call
                outcome = identity_for(None, policy, assignment, facts, disk, time.time())
            else:
                directory = await self._directory.current()
                outcome = await self._directory.in_pool(
                    identity_for, directory, policy, assignment, facts, disk, time.time(),
                    timeout_s=self.settings.directory.timeout_s)
        except Exception as exc:  # DirectoryError, timeout
            self.stats.directory_errors += 1
            problem = describe(exc)
            log.warning("identity for %s: directory %s: %s", facts.mac,
                        self.settings.directory.text, problem)
            return self._deny(request, 503, f"the directory cannot hand out an identity "
                              f"({problem}); boot the local disk", "log", verdict="failure")
        if outcome.source == SOURCE_DISK:
            self.stats.identities_from_disk += 1
        elif outcome.exhausted:
            self.stats.pools_exhausted += 1
            log.warning("%s: %s", facts.mac, outcome.reason)
        elif outcome.refused:
            self.stats.identities_refused += 1
            log.warning("%s: no identity: %s", facts.mac, outcome.reason)
        for item in outcome.assigned:
            self.stats.identities_assigned += item.kind == KIND_ADDRESS
            log.info("%s: pool '%s' hands out %s %s", facts.mac, item.pool, item.kind,
                     item.value)
        if outcome.source == SOURCE_POLICY:
            log.info("%s: identity from the policy: %s", facts.mac, outcome.reason)
        return outcome

    async def _decide(self, policy: Any, station: Any, facts: Any,
                      sessions: list[MulticastSession]) -> WorkAssignment:
        """work_for, with the sessions that began passed over; multicast work only for a
        session that is open on the engine now (else no work, and why)."""
        catalog = self._catalog
        assignment = work_for(policy, station, facts, sessions, catalog.started_keys())
        if assignment.action.kind is not ActionKind.MULTICAST:
            return assignment
        await catalog.sync(sessions)
        # it may have begun, or ended, meanwhile: decide again on what the catalog knows now
        assignment = work_for(policy, station, facts, sessions, catalog.started_keys())
        name = assignment.action.session
        if assignment.action.kind is not ActionKind.MULTICAST or catalog.join_info(name):
            return assignment
        if not catalog.enabled:
            why = "multicast is off on this server"
        else:
            why = catalog.unavailable(name) or "MaxSessions sessions are running"
        return WorkAssignment(NO_WORK, assignment.source,
                              f"{assignment.reason}, but session '{name}' cannot run: {why}",
                              assignment.rule)

    async def _result(self, request: web.Request) -> web.Response:
        limited = self._rate_limited(request)
        if limited is not None:
            self.stats.update_requests += 1
            return limited
        try:
            report = protocol.parse_result(await self._read_json(request))
        except BadRequest as exc:
            self.stats.update_requests += 1
            return self._deny(request, 400, str(exc), "log", verdict="failure")
        try:
            self._authorize(request, "result", mac=report.mac or "")
        except Refused as exc:
            self.stats.update_requests += 1
            return self._deny(request, exc.status, exc.reason, report.operation,
                              report.image_path)
        op = self._reported_operation(report)
        if op is None:                   # an operation served elsewhere: a request of its own
            self.stats.update_requests += 1
        extra: dict[str, Any] = {}
        verified = False
        if report.multicast is not None:
            report, extra, verified = await self._multicast_report(report)
        if report.identity:
            extra["identity"] = report.identity     # sanitised for XML by ResultEntry
            log.info("%s: identity applied: %s", report.workstation,
                     report.identity.encode("unicode_escape").decode("ascii"))
        refusal = await self._log_report(request, report, op, extra)
        if refusal is not None:
            return refusal
        if report.multicast is not None:
            self.stats.multicast_receivers += 1
            if verified:
                self.stats.multicast_verified += 1
                if op is None or op.status != "success":   # a whole retrieve counted itself
                    self.stats.images_sent += 1
        answer: dict[str, Any] = {"logged": self._results is not None, "cleared": False}
        if report.multicast is not None:
            answer["verified"] = verified
        if report.operation == "download" and report.status == "success" and report.mac:
            mac = report.mac
            try:
                directory = await self._directory.current()
                answer["cleared"] = await self._directory.in_pool(
                    directory.clear_next_boot, mac, timeout_s=self.settings.directory.timeout_s)
            except Exception as exc:  # the log has the result; the flag stays set
                self.stats.directory_errors += 1
                problem = describe(exc)
                log.warning("cannot clear the next-boot flag of %s: %s", mac, problem)
                return _error(503, f"result logged, but the next-boot flag could not be "
                                   f"cleared ({problem})", logged=True)
            if answer["cleared"]:
                log.info("%s: image-on-next-boot flag cleared", mac)
        return web.json_response(answer)

    async def _multicast_report(self, report: protocol.ResultReport
                                ) -> tuple[protocol.ResultReport, dict[str, Any], bool]:
        """A multicast receiver's report, judged (catalog.report): the report as it is logged
        (a success the report does not show on the disk is a failure, with the reason), the
        entry's multicast fields, and whether it counts as an Image Sent."""
        result = report.multicast
        assert result is not None and report.mac is not None
        image = None
        if not self._catalog.knows(result.session) and report.status == "success":
            try:                   # a session from before a restart: judge by the image named
                image = await asyncio.to_thread(read_image_facts, self.settings.image_root,
                                                protocol.clean_relative(report.image_path))
            except (ImageFactsError, BadPath):
                image = None
        verdict = self._catalog.report(ReceiverReport(
            result.session, report.mac, report.status, result.digest, result.chunks_verified,
            result.bytes_written, result.path, report.error_message), image)
        judged = dataclasses.replace(report, status=verdict.status,
                                     error_message=verdict.error or report.error_message)
        extra = {"session": result.session, "transfer": result.path,
                 "image_digest": result.digest or None,
                 "chunks_verified": result.chunks_verified,
                 "bytes_written": result.bytes_written}
        return judged, extra, verdict.verified

    def _rate_limited(self, request: web.Request) -> web.Response | None:
        """429 when this host has sent more than ResultsPerMinute reports (checked before the
        body is read: a flood costs no parsing and leaves no entries)."""
        host = request.remote or "?"
        wait_s = self._report_limit.wait_s(host)
        if not wait_s:
            return None
        self.stats.results_rate_limited += 1
        log.debug("%s: result refused: more than %d per minute (ResultsPerMinute)", host,
                  self._report_limit.per_minute)
        return _error(429, f"too many results from {host}: at most "
                           f"{self._report_limit.per_minute} per minute (ResultsPerMinute); "
                           "try again later", retry_after_s=wait_s)

    async def _log_report(self, request: web.Request, report: protocol.ResultReport,
                          op: Operation | None = None, extra: dict[str, Any] | None = None
                          ) -> web.Response | None:
        """Write the engine's report and wait until it is durable (the log's contract: an
        entry is on disk when append returns), so "logged" is never said of a lost entry.
        None when written (or there is no log: the daemon log has it); else the 503. With the
        server's record of the operation (op), the two are one entry."""
        if op is not None:
            self._log_line(request, report.workstation, report.operation, report.status,
                           report.image_path, report.error_message)
            future = self._write_operation(op, report, extra)
        else:
            future = self._log_entry(request, report.workstation, report.operation,
                                     report.status, report.image_path, report.error_message,
                                     report.image_type, extra=extra)
        if future is None:
            if self._results is None:
                return None
            self.stats.results_queue_full += 1
            return _error(503, f"the results log is busy ({self._log_queue.max_pending} "
                               "entries waiting to be written, ResultsQueue); report again later")
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:  # disk full, I/O error: not logged, the engine may retry
            self.stats.failures += 1
            return _error(503, f"the result could not be written to the results log ({exc})")
        self.stats.results_logged += 1
        return None


def _make_engine(settings: EngineSettings, admit: Any) -> Engine:
    """The data plane (multicast/engine.py), or NoEngine where it cannot be imported (an
    installation without it)."""
    try:
        from .multicast.engine import MulticastEngine
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.multicast.engine":
            raise
        log.warning("multicast: the engine (imgsrvd/multicast/engine.py) is not installed: "
                    "sessions are listed, nothing is sent")
        return NoEngine()
    return MulticastEngine(settings, admit)


class _DirectorySessions:
    """The directory's multicast sessions as the catalog reaches them: on the server's worker
    pool, bounded by DirectoryTimeout."""

    def __init__(self, server: ImagingServer):
        self._server = server

    async def sessions(self) -> list[MulticastSession]:
        holder = self._server._directory
        directory = await holder.current()
        return await holder.in_pool(directory.sessions,
                                    timeout_s=self._server.settings.directory.timeout_s)

    async def change_sessions(self, change: Any) -> None:
        def run(directory: Any) -> None:
            sessions = directory.sessions()
            changed = change(sessions)
            if changed is not None:
                directory.replace_sessions(changed)
        holder = self._server._directory
        directory = await holder.current()
        await holder.in_pool(run, directory, timeout_s=self._server.settings.directory.timeout_s)
