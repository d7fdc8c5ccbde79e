"""CPU time of a server and everything it forks.

tftpd-hpa forks one child per transfer and ignores SIGCHLD, so the kernel reaps those children
without adding their time to the parent's cutime/cstime: psutil on the parent alone would show
tftpd-hpa as free. So each server is started inside its own temporary cgroup (v2 `cpu.stat`, or
v1 `cpuacct.usage`), which counts every process in it, exited ones included. Where no cgroup can
be made, psutil on the process and its current children is the fallback, and the report says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1], parts[2], parts[3]))
    except OSError:
        pass
    return out


class Meter:
    method = "?"

    def preexec(self) -> None:          # runs in the child, before exec
        pass

    def attach(self, pid: int) -> None:  # runs in the bench, after start
        pass

    def seconds(self) -> float | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CgroupMeter(Meter):
    def __init__(self, path: Path, version: int):
        self.path = path
        self.version = version
        self.method = ("cgroup v2 cpu.stat usage_usec" if version == 2
                       else "cgroup v1 cpuacct.usage") + " (server and all its children)"
        path.mkdir()

    def preexec(self) -> None:
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def seconds(self) -> float | None:
        try:
            if self.version == 2:
                for line in (self.path / "cpu.stat").read_text().splitlines():
                    k, v = line.split()
                    if k == "usage_usec":
                        return int(v) / 1e6
                return None
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class PsutilMeter(Meter):
    method = ("psutil cpu_times of the server process, reaped and live children (children "
              "reaped by an ignored SIGCHLD are missed)")

    def __init__(self):
        self.proc: psutil.Process | None = None

    def attach(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def seconds(self) -> float | None:
        if self.proc is None:
            return None
        try:
            t = self.proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self.proc.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle, iowait, steal
    busy = sum(f[:3]) + sum(f[5:7])
    return busy / hz


class CgroupParent:
    """One temporary cgroup folder per bench run; one meter per server below it, and one the
    bench itself (and so every client it starts) moves into, so that CPU used by anything else
    on the machine can be told apart."""

    def __init__(self, tag: str):
        self.base: Path | None = None
        self.version = 0
        self.mount: Path | None = None
        self._home: Path | None = None
        mounts = _mounts()
        candidates = [(Path(m), 2) for m, fs, _ in mounts if fs == "cgroup2"]
        candidates += [(Path(m), 1) for m, fs, opts in mounts
                       if fs == "cgroup" and "cpuacct" in opts.split(",")]
        for mnt, ver in candidates:
            base = mnt / tag
            try:
                base.mkdir()
            except OSError:
                continue
            probe = base / "probe"
            try:
                m = CgroupMeter(probe, ver)
                ok = m.seconds() is not None and os.access(probe / "cgroup.procs", os.W_OK)
                m.close()
            except OSError:
                ok = False
            if ok:
                self.base, self.version, self.mount = base, ver, mnt
                break
            try:
                base.rmdir()
            except OSError:
                pass

    def meter(self, name: str) -> Meter:
        if self.base is not None:
            try:
                return CgroupMeter(self.base / name, self.version)
            except OSError:
                pass
        return PsutilMeter()

    def _own_cgroup(self) -> Path | None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            hid, ctrls, path = line.split(":", 2)
            if (self.version == 2 and hid == "0" and ctrls == "") or \
               (self.version == 1 and "cpuacct" in ctrls.split(",")):
                return self.mount / path.lstrip("/")
        return None

    def enter_self(self, name: str) -> Meter | None:
        """Move this process into its own cgroup; children started later inherit it."""
        if self.base is None:
            return None
        home = self._own_cgroup()
        if home is None or not (home / "cgroup.procs").exists():
            return None
        try:
            meter = CgroupMeter(self.base / name, self.version)
            meter.preexec()
        except OSError:
            return None
        self._home = home
        return meter

    def leave_self(self) -> None:
        if self._home is not None:
            try:
                with open(self._home / "cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            except OSError:
                pass
            self._home = None

    def close(self) -> None:
        self.leave_self()
        if self.base is None:
            return
        for child in self.base.iterdir() if self.base.exists() else []:
            if child.is_dir():
                try:
                    child.rmdir()
                except OSError:
                    pass
        try:
            self.base.rmdir()
        except OSError:
            pass
