"""The three TFTP servers under test: ours (python -m tftpd), tftpd-hpa and dnsmasq.

Each is started in the foreground as a child of the bench, on loopback only (127.0.0.1; dnsmasq,
whose TFTP port is always 69, may take another 127.x address), serving the same root, and is
stopped by its own pid. Its CPU time is read from the meter it was started under (see cpu.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from common.daemon.statussock import query_unix  # the project's own status client

from .cpu import Meter, PsutilMeter
from .probe import probe_options

HOST = "127.0.0.1"


class ServerError(Exception):
    """The server could not be started (the reason is the message)."""


def free_udp_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def udp_port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text[-n:].splitlines()[-4:])


class Server:
    name = "?"
    title = "?"

    def __init__(self, workdir: Path, root: Path, probe_file: str, concurrent: int,
                 meter: Meter | None = None):
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.probe_file = probe_file
        self.concurrent = concurrent
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.port: int | None = None
        self.host = HOST
        self.version = "?"
        self.command: list[str] = []
        self.stderr_path = self.workdir / "stderr.log"
        self.meter = meter or PsutilMeter()
        self.cpus: set[int] | None = None   # run on these CPUs only (--pin); None: anywhere

    # -- lifecycle -------------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    def preexec(self) -> None:           # runs in the child, before exec
        self.meter.preexec()
        if self.cpus is not None:        # inherited by every thread and child it makes
            os.sched_setaffinity(0, self.cpus)

    def start(self, ready_timeout: float = 20.0) -> None:
        self.command = self.argv()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, env=env,
                                         start_new_session=True, preexec_fn=self.preexec,
                                         **self.popen_kwargs())
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        last = "not ready"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"exited with status {rc} before it was ready: "
                                  f"{tail(self.stderr_path) or '(no output)'}")
            ok, last = self.ready()
            if ok:
                self.meter.attach(self.pid)
                self.settle()
                return
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"not ready within {ready_timeout:g} s ({last}); "
                          f"stderr: {tail(self.stderr_path) or '(none)'}")

    def ready(self) -> tuple[bool, str]:
        res = probe_options(self.host, self.port, self.probe_file, {"blksize": "1468"},
                            timeout=0.5)
        return res["ok"], res["error"] or "ok"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 6 s) to the server's pid, then to any child it left, by pid."""
        if self.proc is None:
            return
        kids: list[psutil.Process] = []
        if self.proc.poll() is None:
            try:
                kids = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                pass
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=6)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        for child in kids:
            try:
                child.kill()
            except psutil.Error:
                pass
        if kids:
            psutil.wait_procs(kids, timeout=2)
        self.meter.close()

    # -- accounting ------------------------------------------------------------------------
    def settle(self, timeout: float = 3.0) -> None:
        """Wait until the server has no live child processes (transfer children reaped)."""
        if not self.alive():
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kids = [c for c in psutil.Process(self.pid).children()
                        if c.status() != psutil.STATUS_ZOMBIE]
            except psutil.Error:
                return
            if not kids:
                return
            time.sleep(0.02)

    def cpu_seconds(self) -> float | None:
        return self.meter.seconds()

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "version": self.version,
                "pid": self.pid, "host": self.host, "port": self.port, "command": self.command,
                "cpu_method": self.meter.method}


class Ours(Server):
    name = "ours"
    title = "preboot-tftpd (ours)"

    def __init__(self, *a, main_dir: Path, python: str, max_blksize: int, max_window: int, **kw):
        super().__init__(*a, **kw)
        self.main_dir = main_dir
        self.python = python
        self.max_blksize = max_blksize
        self.max_window = max_window
        self.sock_path = self.workdir / "tftpd.sock"
        self.conf_path = self.workdir / "tftpd.conf"
        self.status: dict = {}

    def argv(self) -> list[str]:
        if not (self.main_dir / "tftpd" / "__main__.py").exists():
            raise ServerError(f"{self.main_dir}/tftpd/__main__.py does not exist yet")
        self.port = free_udp_port()
        self.conf_path.write_text(
            "# written by bench/run-tftp-bench\n"
            f"IPAddress = {HOST}\n"
            f"Port = {self.port}\n"
            f"Root = {self.root}\n"
            f"MaxBlockSize = {self.max_blksize}\n"
            f"MaxWindowSize = {self.max_window}\n"
            f"StatusSocket = {self.sock_path}\n"
            f"PidFile = {self.workdir / 'tftpd.pid'}\n"
            "StatusPort = 0\n"
            "LogLevel = WARNING\n"
            f"LogFile = {self.workdir / 'tftpd.log'}\n")
        return [self.python, "-m", "tftpd", "--config", str(self.conf_path), "--foreground"]

    def popen_kwargs(self) -> dict:
        return {"cwd": str(self.main_dir)}

    def query_status(self, timeout: float = 2.0) -> dict:
        return query_unix(str(self.sock_path), timeout_s=timeout)

    def ready(self) -> tuple[bool, str]:
        if not self.sock_path.exists():
            return False, "status socket not there yet"
        try:
            st = self.query_status()
        except (OSError, ValueError) as exc:
            return False, f"status socket: {exc}"
        self.status = st
        self.version = str(st.get("version", "?"))
        spid = st.get("pid")
        if isinstance(spid, int) and spid != self.pid:
            # the status socket names the serving process; account CPU to it
            self.pid = spid
        for item in st.get("listen") or []:
            if item.get("proto") == "udp" and item.get("port"):
                self.port = int(item["port"])
        return True, "ok"

    def counters(self) -> dict:
        try:
            return self.query_status().get("counters", {})
        except (OSError, ValueError):
            return {}


class TftpdHpa(Server):
    name = "tftpd-hpa"
    title = "tftpd-hpa (in.tftpd)"
    binary = "/usr/sbin/in.tftpd"

    def argv(self) -> list[str]:
        if not os.access(self.binary, os.X_OK):
            raise ServerError(f"{self.binary} not installed (apt-get install tftpd-hpa)")
        try:
            out = subprocess.run([self.binary, "-V"], capture_output=True, text=True, timeout=5)
            self.version = (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        self.port = free_udp_port()
        # -L: standalone, foreground; -s: chroot to the root (drops to user nobody)
        return [self.binary, "-L", "-a", f"{HOST}:{self.port}", "-s", str(self.root)]


class Dnsmasq(Server):
    name = "dnsmasq"
    title = "dnsmasq TFTP"

    def __init__(self, *a, address: str | None = None, **kw):
        super().__init__(*a, **kw)
        self.address = address

    def argv(self) -> list[str]:
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not os.access(exe, os.X_OK):
            raise ServerError("dnsmasq not installed (apt-get install dnsmasq-base)")
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5)
            self.version = out.stdout.strip().splitlines()[0].split("  ")[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        # dnsmasq's TFTP listening port is fixed at 69 (no option moves it). If 127.0.0.1:69 is
        # taken (say by a dev instance of our daemon), use another loopback address.
        self.port = 69
        candidates = [self.address] if self.address else [f"127.0.0.{i}" for i in range(1, 10)]
        free = [a for a in candidates if not udp_port_busy(a, 69)]
        if not free:
            raise ServerError(f"port 69/udp is in use on {', '.join(candidates)}; dnsmasq can "
                              f"only serve TFTP on port 69")
        self.host = free[0]
        return [exe, "--port=0", "--enable-tftp", f"--tftp-root={self.root}",
                "--conf-file=/dev/null", "--keep-in-foreground", "--pid-file=",
                f"--listen-address={self.host}", "--bind-interfaces",
                f"--tftp-max={max(50, self.concurrent + 10)}", "--quiet-tftp",
                f"--log-facility={self.workdir / 'dnsmasq.log'}"]


ALL = {"ours": Ours, "tftpd-hpa": TftpdHpa, "dnsmasq": Dnsmasq}
