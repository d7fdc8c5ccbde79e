"""A pidfile held under an exclusive flock for the daemon's whole life.

The lock, not the file's existence, says "running": a stale file left by kill -9 is simply taken
over, and a second instance fails at once with the first one's pid. The object is a context
manager, so python-daemon's DaemonContext can own it (its `pidfile` argument).
"""

from __future__ import annotations

import fcntl
import os

from common.errors import AlreadyRunning


class LockedPidFile:
    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def acquire(self, write: bool = True) -> None:
        """Take the lock (AlreadyRunning if another process holds it) and, unless write is
        False, write our pid. A daemon about to detach passes False: its pid is about to
        change, and a reader must never see the pid of a process that is going away (the
        file stays empty until the detached process writes its own)."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"already running (pid {holder}, pidfile {self.path})") from None
        self._fd = fd
        if write:
            self.write_pid()
        else:
            os.ftruncate(fd, 0)            # a stale pid from a killed daemon must go too

    def write_pid(self) -> None:
        """(Re)write our pid: called again after python-daemon's fork changes it."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def fileno(self) -> int | None:
        return self._fd

    def __enter__(self) -> "LockedPidFile":
        if self._fd is None:
            self.acquire()
        else:
            self.write_pid()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None
