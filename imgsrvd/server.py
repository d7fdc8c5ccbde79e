"""The imaging server: an aiohttp HTTP/1.1 server on the socket bound before detaching.

PUT  /v1/images/<path>   store an image (streamed to a temporary file, checked, then renamed)
GET  /v1/images/<path>   retrieve an image (sendfile; Range for resume); HEAD: its size only
POST /v1/work            auto-imaging: what the directory says this machine should do
POST /v1/results         log an imaging result; a successful restore clears the next-boot flag

docs/imaging-protocol.md is the specification. File work (writes, fsync, the image check, the
rename) runs on asyncio's worker threads; directory calls run on a small pool of daemon threads
owned by the server, bounded by DirectoryTimeout, so a hung directory can neither block the
event loop nor hold up the 5 s SIGTERM contract.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from aiohttp import web

from common.imaging import protocol
from common.policy.directory.holder import DirectoryHolder, describe
from common.daemon.httpdaemon import (BadJsonBody, HttpListener, JsonLimits,
                                      address_change_warnings, error_middleware,
                                      quiet_bad_requests, read_json_body)
from common.imaging.protocol import BadPath, BadRequest, LocalPath, RemotePath
from common.policy.model import assign_work
from common.daemon.workerpool import DaemonThreadPool

from . import store
from .config import Settings
from .downloads import DownloadTracker
from .status import ImagingCounters

log = logging.getLogger("preboot.imgsrvd")

LISTEN_BACKLOG = 1024
KEEPALIVE_S = 75.0
SHUTDOWN_TIMEOUT_S = 2.0
READ_CHUNK = 1 << 20             # bytes handed to a worker thread per write
RETRY_AFTER_S = 5
JSON_MAX = 64 * 1024


http_log = quiet_bad_requests("preboot.imgsrvd.http", log)


class _ImageFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (to count what was sent) and then returns.

    aiohttp prepares a returned response again; StreamResponse.prepare is idempotent but
    FileResponse.prepare is not (it re-evaluates the Range and asserts on a 206), which made
    every 206 end in an 'Unhandled exception' and a closed connection, so the client had to
    reconnect for each batch of chunks.
    """

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:
            return None
        return await super().prepare(request)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    body = {"error": message, **extra}
    headers = {protocol.ERROR_HEADER: protocol.error_header_value(message)}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return web.json_response(body, status=status, headers=headers)


class ImagingServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = ImagingCounters()
        self._downloads = DownloadTracker()   # ranged downloads -> Images Sent
        self._http = HttpListener(http_log, keepalive_s=KEEPALIVE_S,
                                  shutdown_timeout_s=SHUTDOWN_TIMEOUT_S, backlog=LISTEN_BACKLOG)
        self._pool: DaemonThreadPool | None = None
        self._log_pool: DaemonThreadPool | None = None
        self._directory = DirectoryHolder(self._worker_pool, "work queries are answered 503")
        self._results = None          # resultslog.ResultsLog, when it opened
        self._uploads: set[store.Upload] = set()

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
        errors = error_middleware(self._not_found, self._internal_error,
                                  passthrough=(ConnectionError, asyncio.CancelledError))
        app = web.Application(middlewares=[errors], client_max_size=JSON_MAX)
        app.router.add_route("PUT", "/v1/images/{path:.+}", self._put,
                             expect_handler=self._expect)
        app.router.add_get("/v1/images/{path:.+}", self._get)   # and HEAD
        app.router.add_post("/v1/work", self._work)
        app.router.add_post("/v1/results", self._result)
        await self._http.start(app)
        where = self.listen()[0]
        log.info("imaging service answering on http://%s:%d/v1/ (images in %s, server name %s)",
                 where["address"], where["port"], root, self.settings.server_name)

    async def apply(self, settings: Settings) -> list[str]:
        warnings = address_change_warnings(self.settings, settings)
        old = self.settings
        self.settings = settings
        if settings.results_log != old.results_log:
            await self._open_results(settings)
        await self._directory.configure(settings.directory)
        return warnings

    async def stop(self) -> None:
        await self._http.stop()
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
        return self._http.listen()

    def counters(self) -> dict[str, Any]:
        return self.stats.snapshot()

    # ---- results log ----------------------------------------------------------------------

    async def _open_results(self, settings: Settings) -> None:
        try:
            from .resultslog import ResultsLog
        except ImportError:            # pragma: no cover - shipped together
            return
        old, self._results = self._results, None
        if old is not None:
            await asyncio.to_thread(old.close)
        results = ResultsLog(settings.results_log)
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
        """One results log entry (and one line in the daemon log) per imaging request."""
        who = workstation or request.remote or "unknown"
        line = f"{request.remote} {who}: {operation} {image_path or '-'}: {status}"
        if error:
            line += f" ({error})"
        if status in ("success", "referred", "assigned"):
            log.info("%s", line)
        else:
            log.warning("%s", line)
        results = self._results
        if results is None or self._log_pool is None:
            return
        from .resultslog import ResultEntry
        try:
            entry = ResultEntry(workstation=who, operation=operation, status=status,
                                image_type=image_type, image_path=image_path or None,
                                error_message=error or None,
                                requesting_address=request.remote, server=server, bytes=size)
            future = self._log_pool.submit(results.append, entry)
        except Exception as exc:  # a bad entry or a pool shut down: the daemon log has it
            log.error("results log: %s", exc)
            return
        future.add_done_callback(
            lambda f: f.cancelled() or f.exception() is None or
            log.error("results log %s: %s", results.path, f.exception()))

    # ---- the directory ----------------------------------------------------------------------

    def _worker_pool(self) -> DaemonThreadPool:
        assert self._pool is not None, "start() first"
        return self._pool

    # ---- HTTP ------------------------------------------------------------------------------

    def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"not found: {request.path[:200]} (this service answers "
                           "/v1/images/<path>, /v1/work and /v1/results)")

    def _internal_error(self, request: web.Request) -> web.Response:
        log.exception("internal error answering %s %s", request.method, request.path_qs[:300])
        self.stats.failures += 1
        return _error(500, "internal error (see the imaging server's log)")

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
        server = where.server if ":" in where.server.rsplit("]", 1)[-1] \
            else f"{where.server}:{protocol.DEFAULT_PORT}"
        location = f"http://{server}{protocol.IMAGES_PREFIX}{where.path}"
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
        if isinstance(where, RemotePath) or self._busy() or \
                not protocol.upload_allowed(where.path, settings.allowed_upload_dirs):
            return None
        if not settings.allow_overwrite:
            target = os.path.join(settings.image_root, where.path)
            if await asyncio.to_thread(os.path.lexists, target):
                return None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        return None

    def _busy(self) -> bool:
        return self.stats.active_transfers >= self.settings.max_clients

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
        if not protocol.upload_allowed(path, settings.allowed_upload_dirs):
            folder = os.path.dirname(path) or "/"
            return self._deny(request, 403, f"uploads to {folder} are not allowed "
                              f"(AllowedUploadDirs: {', '.join(settings.allowed_upload_dirs)})",
                              "upload", path)
        if self._busy():
            self.stats.busy_refusals += 1
            return self._deny(request, 503, f"busy: {settings.max_clients} transfers in "
                              "progress (MaxClients); try again later", "upload", path,
                              "failure")
        self.stats.active_transfers += 1
        started = time.monotonic()
        upload: store.Upload | None = None
        try:
            try:
                upload = await asyncio.to_thread(store.Upload.begin, settings.image_root, path,
                                                 settings.allow_overwrite,
                                                 request.content_length)
            except store.StoreError as exc:
                return self._deny(request, exc.status, str(exc), "upload", path, "failure"
                                  if exc.status >= 500 else "denied")
            self._uploads.add(upload)
            buffer = bytearray()
            while True:
                chunk = await asyncio.wait_for(request.content.readany(),
                                               settings.transfer_timeout_s)
                if not chunk:
                    break
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
        except asyncio.TimeoutError:
            assert upload is not None
            upload.abort()
            return self._deny(request, 408, f"no data for {settings.transfer_timeout_s:.0f} s "
                              "(TransferTimeout); the upload was discarded", "upload", path,
                              "failure")
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
            self.stats.active_transfers -= 1
            if upload is not None:
                self._uploads.discard(upload)
        self.stats.images_received += 1
        seconds = time.monotonic() - started
        self._record(request, self._workstation(request), "upload", "success", path,
                     image_type=upload.image_type, size=size)
        return web.json_response({"stored": path, "size": size,
                                  "seconds": round(seconds, 3)}, status=201)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"
        if not head:
            self.stats.update_requests += 1
        settings = self.settings
        try:
            where = self._image_path(request)
        except BadPath as exc:
            return self._deny(request, 403, str(exc), "download")
        if isinstance(where, RemotePath):
            return self._remote(request, where, "download")
        path = where.path
        try:
            file_path, size = await asyncio.to_thread(store.open_for_reading,
                                                      settings.image_root, path)
        except store.StoreError as exc:
            return self._deny(request, exc.status, str(exc), "download", path, "failure")
        if head:
            response = web.FileResponse(file_path)
            return response
        if self._busy():
            self.stats.busy_refusals += 1
            return self._deny(request, 503, f"busy: {settings.max_clients} transfers in "
                              "progress (MaxClients); try again later", "download", path,
                              "failure")
        self.stats.active_transfers += 1
        try:
            try:
                start = request.http_range.start
            except ValueError:                 # a bad Range: FileResponse answers 416
                start = None
            response = _ImageFileResponse(file_path, chunk_size=READ_CHUNK)
            try:
                await response.prepare(request)
                await response.write_eof()
            except BaseException as exc:
                self.stats.failures += 1
                self._record(request, self._workstation(request), "download", "failure", path,
                             f"transfer aborted: {type(exc).__name__}")
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
                if self._downloads.served(request.remote or "?", path, size, first, last):
                    self.stats.images_sent += 1
                    self._record(request, self._workstation(request), "download", "success",
                                 path, size=sent)
            elif response.status >= 400:
                self.stats.failures += 1
            return response
        finally:
            self.stats.active_transfers -= 1

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
            policy, station = await self._directory.lookup(facts.mac)
        except Exception as exc:  # DirectoryError, timeout, anything a backend lets through
            self.stats.directory_errors += 1
            problem = describe(exc)
            log.warning("directory %s: %s", self.settings.directory.text, problem)
            return self._deny(request, 503, f"the directory cannot be read ({problem}); "
                              "boot the local disk", "log", verdict="failure")
        assignment = assign_work(policy, station, facts)
        try:
            answer, remote = protocol.work_answer(assignment, query.mode, self._own_names())
        except BadPath as exc:
            return self._deny(request, 403, str(exc), "log", assignment.action.image)
        operation = {"restore": "download", "make": "upload"}.get(assignment.action.kind.value,
                                                                  "log")
        if remote is not None:
            self.stats.client_referrals += 1
            self._record(request, facts.mac, operation, "referred", str(remote),
                         server=remote.server)
        else:
            self._record(request, facts.mac, operation, "assigned", answer["image"])
        log.info("%s (%s mode): %s", facts.mac, query.mode, assignment.describe())
        return web.json_response(answer)

    async def _result(self, request: web.Request) -> web.Response:
        self.stats.update_requests += 1
        try:
            report = protocol.parse_result(await self._read_json(request))
        except BadRequest as exc:
            return self._deny(request, 400, str(exc), "log", verdict="failure")
        self.stats.results_logged += 1
        self._record(request, report.workstation, report.operation, report.status,
                     report.image_path, report.error_message, report.image_type)
        answer: dict[str, Any] = {"logged": True, "cleared": False}
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
