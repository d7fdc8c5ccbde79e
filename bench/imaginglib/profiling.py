"""--profile: py-spy (sampling, every thread, waiting included) on img and on imgsrvd, or
cProfile on img alone (main thread only) where py-spy is not installed."""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
from pathlib import Path

RATE = 100


def have_pyspy() -> bool:
    return shutil.which("py-spy") is not None


def client_prefix(out: Path) -> list[str]:
    """What goes before `-m img ...` (after the interpreter for cProfile)."""
    if have_pyspy():
        return ["py-spy", "record", "-r", str(RATE), "-f", "raw", "--threads", "--idle",
                "-o", str(out.with_suffix(".txt")), "--"]
    return []


class ServerSampler:
    def __init__(self, pid: int, out: Path):
        self.proc = None
        if have_pyspy():
            self.proc = subprocess.Popen(
                ["py-spy", "record", "-r", str(RATE), "-f", "raw", "--threads", "--idle",
                 "-o", str(out), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


IDLE = ("_worker (", "Condition.wait (", "Event.wait (", "DaemonThreadPool._work (",
        "Runner.run (", "select (", "_PollLikeSelector.select (")


def summary(path: Path, top: int = 12) -> list[str]:
    """From a py-spy raw file: per thread, seconds sampled and seconds not waiting (a thread
    parked in a queue, a condition or the event loop's select is waiting); then the functions
    the busy time went to (self time; a socket read or write counts as busy: it is I/O)."""
    if not path.exists():
        return [f"{path}: missing"]
    threads: collections.Counter = collections.Counter()
    busy: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"thread \(\d+\):? ?", "", frames[0]) or "main"
        n = int(count)
        threads[thread] += n
        if len(frames) < 2:
            continue
        leaf = re.sub(r" \((?:[^()]*/)?([^/()]+/[^/()]+:\d+)\)$", r" (\1)", frames[-1])
        if leaf.startswith(IDLE):
            continue
        busy[thread] += n
        leaves[(thread, leaf)] += n
    out = [f"{path.name}: busy/sampled s per thread: " + ", ".join(
        f"{t} {busy[t] / RATE:.1f}/{n / RATE:.1f}" for t, n in threads.most_common()
        if busy[t] >= 0.05 * RATE)]
    for (thread, leaf), n in leaves.most_common(top):
        out.append(f"  {n / RATE:6.2f} s  {thread[:18]:<18} {leaf[:90]}")
    return out
