"""Processes, loop devices, the page cache and machine quietness for bench/run-imaging-bench."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

HERE = Path(__file__).resolve().parent.parent          # bench/
sys.path.insert(0, str(HERE))
from tftplib.cpu import machine_busy_seconds  # noqa: E402

REPO = HERE.parent
MiB = 1 << 20


def log(message: str) -> None:
    print(f"bench/run-imaging-bench: {message}", file=sys.stderr, flush=True)


def run(*args: str, input: str | None = None, timeout: float = 600) -> str:
    """Run a helper tool; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)}: exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-600:]}")
    return result.stdout


@dataclass
class Usage:
    """CPU seconds (user+sys) of a process and every descendant it waited for."""

    user: float = 0.0
    sys: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.sys


@dataclass
class Proc:
    """A child whose exit status and rusage are collected with wait4."""

    args: Sequence[str]
    popen: subprocess.Popen
    name: str = ""
    usage: Usage = field(default_factory=Usage)
    status: int | None = None
    errfile: Any = None

    @classmethod
    def start(cls, args: Sequence[str], name: str = "", **kwargs) -> "Proc":
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        errfile = None
        if "stderr" not in kwargs:       # a file, not a pipe: nothing blocks on a full pipe
            errfile = kwargs["stderr"] = tempfile.TemporaryFile()
        return cls(args, subprocess.Popen(list(args), **kwargs), name or args[0],
                   errfile=errfile)

    def wait(self, timeout: float = 900) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.popen.kill()
                pid, status, ru = os.wait4(self.popen.pid, 0)
                break
            time.sleep(0.005)
        self.status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.status
        self.usage = Usage(ru.ru_utime, ru.ru_stime)
        return self.status

    def error(self) -> str:
        text = ""
        err = self.errfile
        if err is not None and not err.closed:
            err.seek(0)
            text = err.read().decode(errors="replace")
        return f"{self.name} exited with {self.status}: {text.strip()[-800:]}"

    def check(self, timeout: float = 900) -> "Proc":
        if self.wait(timeout) != 0:
            raise RuntimeError(self.error())
        if self.errfile is not None:
            self.errfile.close()
        return self

    def stop(self) -> None:
        if self.popen.poll() is None and self.status is None:
            self.popen.kill()
            with contextlib.suppress(ChildProcessError):
                self.wait(10)


def shell(command: str, name: str = "") -> Proc:
    """A pipeline in bash with pipefail (its rusage covers every stage)."""
    return Proc.start(["bash", "-c", "set -o pipefail; " + command], name or command[:40])


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _disk_counters(path: Path) -> tuple[int, int] | None:
    """(sectors written, I/Os in flight) of the block device holding path, or None."""
    device = os.stat(path).st_dev
    stat_file = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat")
    try:
        fields = stat_file.read_text().split()
        return int(fields[6]), int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def wait_disk_idle(path: Path, limit: float = 30.0, needed: int = 4,
                   interval: float = 0.5, below_sectors: int = 2048) -> float:
    """Wait up to `limit` s until the disk under path has written less than `below_sectors`
    (1 MiB; the system's own small writes go on) per reading and has no I/O in flight, for
    `needed` readings in a row: the writeback of the step before is done, so every step starts
    on an idle disk. The seconds waited."""
    started = time.monotonic()
    last = _disk_counters(path)
    if last is None:
        return 0.0
    quiet = 0
    while quiet < needed and time.monotonic() - started < limit:
        time.sleep(interval)
        now = _disk_counters(path)
        idle = now is not None and last is not None and now[0] - last[0] < below_sectors \
            and now[1] == 0
        quiet = quiet + 1 if idle else 0
        last = now
    return time.monotonic() - started


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def loop_device(path: Path, offset: int, size: int, readonly: bool) -> Iterator[str]:
    """A loop device over [offset, offset+size) of `path`, detached again on the way out."""
    args = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
    if readonly:
        args.append("--read-only")
    device = run(*args, str(path)).strip()
    try:
        yield device
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", device], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of the machine's CPUs busy over the next `seconds`."""
    first = machine_busy_seconds()
    time.sleep(seconds)
    second = machine_busy_seconds()
    if first is None or second is None:
        return None
    return (second - first) / (seconds * len(os.sched_getaffinity(0)))


def wait_quiet(limit: float, below: float = 0.10, needed: int = 3) -> float | None:
    """Wait up to `limit` s for `needed` consecutive seconds under `below` CPU busy; the last
    reading."""
    deadline = time.monotonic() + limit
    quiet, busy = 0, None
    while quiet < needed and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
        quiet = quiet + 1 if busy is not None and busy < below else 0
    return busy


def tool_version(*args: str) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0].strip() if text else "?"
