"""A daemon's open directory, kept for the event loop of prebootpolicyd and imgsrvd alike.

`DirectoryHolder` owns one open `Directory` and everything around it that both daemons need:
- opening it on a worker thread, bounded by DirectoryTimeout (it may be a remote LDAP server,
  or a SQLite file not created yet), never at bind time;
- after a failure, answering DirectoryError with the reason at once and trying again on a
  later request, at most every REOPEN_S seconds; requests that arrive while an open is under
  way wait for that one open instead of starting their own;
- on reload, opening the newly named directory in place of the old one, and closing the old
  one only once no query can still be reading it (DirectoryTimeout later);
- reading a machine's policy and workstation on the loop when the backend can answer without
  blocking (lookup_nowait, lookup_async), on a worker thread otherwise;
- the multicast sessions, read on a worker thread at most every SESSIONS_MAX_AGE_S and
  handed out from memory meanwhile (recent_sessions: policyd's answers; imgsrvd, which runs
  them, reads them afresh);
- closing it at stop within CLOSE_WAIT_S, whatever state a remote server is in.
Worker threads come from the daemon's pool (a callable, since a reload may replace the pool).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Any, Callable

from common.policy.model import ImagingPolicy, MulticastSession, Workstation

from .base import Directory, DirectoryError, WouldBlock
from .settings import DirectorySettings

REOPEN_S = 5.0                   # retry opening a directory that failed at most this often
CLOSE_WAIT_S = 1.0               # closing the directory at stop
SESSIONS_MAX_AGE_S = 5.0         # recent_sessions: read again when older than this

log = logging.getLogger("preboot.directory")


def describe(exc: BaseException) -> str:
    """Why the directory could not answer, in words for the log and the client."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within DirectoryTimeout"
    if isinstance(exc, DirectoryError):
        return str(exc) or "directory error"
    return f"{type(exc).__name__}: {exc}"


def close_quietly(directory: Directory) -> None:
    try:
        directory.close()
    except Exception as exc:  # closing a broken connection may fail; nothing to do about it
        log.debug("closing directory %s: %s", directory.url.redacted(), exc)


def _read_directory(directory: Directory, mac: str) -> tuple[ImagingPolicy, Workstation | None]:
    return directory.policy(), directory.workstation(mac)


class DirectoryHolder:
    def __init__(self, pool: Callable[[], Executor], meanwhile: str):
        self._pool = pool
        self._meanwhile = meanwhile      # what the daemon does while it has none: for the log
        self._wanted: DirectorySettings | None = None
        self._directory: Directory | None = None
        self._opened_for: DirectorySettings | None = None
        self._problem = "not opened yet"
        self._reopen_at = 0.0
        self._opening: asyncio.Task | None = None
        self._sessions: tuple[MulticastSession, ...] | None = None
        self._sessions_at = 0.0
        self._sessions_task: asyncio.Task | None = None

    async def configure(self, settings: DirectorySettings) -> None:
        """At start and on every reload: open the directory `settings` names unless it is the
        one open now; a reload also retries a directory that failed, at once."""
        self._wanted = settings
        if settings != self._opened_for:
            await self._open(settings)
        elif self._directory is None:
            self._reopen_at = 0.0

    async def current(self) -> Directory:
        """The open directory; DirectoryError (with the reason) when it is not open."""
        if self._directory is not None:
            return self._directory
        assert self._wanted is not None, "configure() first"
        if self._opening is None and time.monotonic() >= self._reopen_at:
            self._opening = asyncio.get_running_loop().create_task(self._open(self._wanted))
            self._opening.add_done_callback(self._opened)
        if self._opening is not None:
            await asyncio.shield(self._opening)
        if self._directory is None:
            raise DirectoryError(f"directory {self._wanted.text} is not open: {self._problem}")
        return self._directory

    async def lookup(self, mac: str) -> tuple[ImagingPolicy, Workstation | None]:
        """The policy and the workstation record of `mac`."""
        directory = await self.current()
        assert self._wanted is not None
        timeout_s = self._wanted.timeout_s
        try:
            # The common case, answered here: a handoff to a worker thread costs more than
            # the whole decision (bench/RESULTS.md, prebootpolicyd).
            return directory.lookup_nowait(mac)
        except WouldBlock:
            pass
        try:
            # A network store: waited for on this loop, still without a thread.
            return await directory.lookup_async(mac, timeout_s)
        except WouldBlock:
            pass
        return await self.in_pool(_read_directory, directory, mac, timeout_s=timeout_s)

    async def recent_sessions(self, max_age_s: float = SESSIONS_MAX_AGE_S
                              ) -> tuple[MulticastSession, ...]:
        """The directory's multicast sessions as read at most max_age_s ago (plus the time a
        read takes): a read is started on a worker thread when they are older, and waited for
        only when there are none yet. A failed read keeps the last ones (none at first) and is
        logged; the next call tries again."""
        if self._sessions_task is None and (
                self._sessions is None or time.monotonic() - self._sessions_at >= max_age_s):
            self._sessions_task = asyncio.get_running_loop().create_task(self._read_sessions())
        if self._sessions is None and self._sessions_task is not None:
            await asyncio.shield(self._sessions_task)
        return self._sessions or ()

    async def _read_sessions(self) -> None:
        try:
            directory = await self.current()
            assert self._wanted is not None
            sessions = await self.in_pool(directory.sessions, timeout_s=self._wanted.timeout_s)
            self._sessions = tuple(sessions)
        except Exception as exc:  # the sessions are extra: the answers go on without them
            log.warning("directory %s: cannot read the multicast sessions: %s",
                        self._wanted.text if self._wanted else "?", describe(exc))
            if self._sessions is None:
                self._sessions = ()
        finally:
            self._sessions_at = time.monotonic()
            self._sessions_task = None

    async def in_pool(self, fn: Callable[..., Any], *args: Any, timeout_s: float,
                      on_late_result: Callable[[Any], None] | None = None) -> Any:
        """fn(*args) on a worker thread, waited for at most timeout_s."""
        future = self._pool().submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            if on_late_result is not None:     # it may still finish: clean up after it
                future.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or on_late_result(f.result()))
            raise

    def close(self) -> None:
        """At stop: no more opening; the open directory closed within CLOSE_WAIT_S."""
        if self._opening is not None:
            self._opening.cancel()
        if self._directory is not None:
            closer = threading.Thread(target=close_quietly, args=(self._directory,),
                                      name="directory-close", daemon=True)
            closer.start()
            closer.join(CLOSE_WAIT_S)
            self._directory = None

    async def _open(self, settings: DirectorySettings) -> None:
        """Open the directory `settings` names and put it in place of the current one."""
        try:
            directory = await self.in_pool(settings.open, timeout_s=settings.timeout_s,
                                           on_late_result=close_quietly)
        except Exception as exc:  # DirectoryError, timeout, a backend that cannot load
            if self._wanted != settings:
                return                         # a reload named another directory meanwhile
            self._problem = describe(exc)
            self._reopen_at = time.monotonic() + REOPEN_S
            directory = None
            log.warning("directory %s: cannot open (%s); %s until it opens", settings.text,
                        self._problem, self._meanwhile)
        else:
            if self._wanted != settings:       # a reload named another one meanwhile
                self._close_in_pool(directory)
                return
            log.info("directory %s opened", settings.text)
        old, self._directory, self._opened_for = self._directory, directory, settings
        self._sessions_at = 0.0                # another directory: read its sessions again
        if old is not None and old is not directory:
            # Queries may still be reading the old one; none waits longer than the timeout.
            asyncio.get_running_loop().call_later(settings.timeout_s + 1, self._close_in_pool,
                                                  old)

    def _close_in_pool(self, directory: Directory) -> None:
        try:
            self._pool().submit(close_quietly, directory)
        except RuntimeError:                   # shutting down: close() closes what is current
            pass

    def _opened(self, task: asyncio.Task) -> None:
        self._opening = None
