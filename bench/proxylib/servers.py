"""The two proxyDHCP servers under test, each run in the server namespace, one at a time.

- ours: `python3 -m proxydhcpd --foreground --config X` from the checkout (PYTHONPATH = the
  checkout), LogLevel WARNING, StatusPort 0, pidfile and status socket in the work folder.
- dnsmasq in proxy mode: `--dhcp-range=10.77.0.0,proxy` with one PXE service (x86PC,
  undionly.kpxe), DNS off (`--port=0`), no config file, no per-request logging (no
  --log-dhcp, and --quiet-dhcp unless the bench runs with --dnsmasq-log).

Both are children of the bench, started in their own session inside the namespace (setns in the
child before exec), and stopped by their own pid. CPU is read with psutil (user + system of the
server process; the kernel's receive work for a packet mostly runs in the sender's context on a
veth pair and is not in either figure).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from common.daemon.statussock import query_unix  # the project's own status client

from . import netns


class ServerError(Exception):
    """The server could not be started (the reason is the message)."""


def tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text[-n:].splitlines()[-4:])


def udp_counters(pid: int) -> dict[str, int]:
    """The Udp line of /proc/PID/net/snmp: the counters of the namespace `pid` lives in."""
    try:
        lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    except OSError:
        return {}
    rows = [line.split()[1:] for line in lines if line.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


def rx_queue(pid: int, port: int) -> int | None:
    """Bytes waiting in the receive queues of the UDP sockets on `port` in the namespace of
    `pid` (/proc/PID/net/udp), None when unreadable."""
    try:
        lines = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    total = 0
    want = f":{port:04X}"
    for line in lines:
        f = line.split()
        if len(f) > 4 and f[1].endswith(want):
            total += int(f[4].split(":")[1], 16)
    return total


def socket_rcvbuf(ns: str, port: int) -> int | None:
    """The receive buffer (bytes, skmem rb) of the UDP socket on `port` in namespace `ns`."""
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-uamnH", f"sport = :{port}"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\brb(\d+)", out)
    return int(m.group(1)) if m else None


class Server:
    name = "?"
    title = "?"

    def __init__(self, workdir: Path, lab: netns.Lab):
        self.lab = lab
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.version = "?"
        self.command: list[str] = []
        self.stderr_path = self.workdir / "stderr.log"
        self._ps: psutil.Process | None = None
        self.rcvbuf: int | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def cwd(self) -> str | None:
        return None

    def start(self, ready, ready_timeout: float = 20.0) -> None:
        """Start the server; `ready()` (the bench's probe DISCOVER) -> (ok, message)."""
        self.command = self.argv()
        ns = self.lab.server_ns

        def preexec() -> None:
            netns.enter(ns)

        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, env=self.env(), cwd=self.cwd(),
                                         start_new_session=True, preexec_fn=preexec)
        self.pid = self.proc.pid
        self._ps = psutil.Process(self.pid)
        deadline = time.monotonic() + ready_timeout
        last = "not ready"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"exited with status {rc} before it was ready: "
                                  f"{tail(self.stderr_path) or '(no output)'}")
            ok, last = self.started()
            if ok:
                ok, last = ready()
                if ok:
                    self.rcvbuf = socket_rcvbuf(ns, 67)
                    return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"not ready within {ready_timeout:g} s ({last}); "
                          f"stderr: {tail(self.stderr_path) or '(none)'}")

    def started(self) -> tuple[bool, str]:
        return True, "ok"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        if self._ps is None:
            return None
        try:
            t = self._ps.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return None

    def cpu_split(self) -> tuple[float, float] | None:
        if self._ps is None:
            return None
        try:
            t = self._ps.cpu_times()
            return t.user, t.system
        except psutil.Error:
            return None

    def udp_counters(self) -> dict[str, int]:
        return udp_counters(self.pid) if self.alive() else {}

    def backlog(self) -> int | None:
        """Bytes of requests waiting in the server's port 67 socket."""
        return rx_queue(self.pid, 67) if self.alive() else None

    def settle(self, timeout: float = 30.0) -> float:
        """Wait until the server has nothing queued and uses no CPU; returns seconds waited."""
        t0 = time.monotonic()
        last = self.cpu_seconds()
        while time.monotonic() - t0 < timeout and self.alive():
            time.sleep(0.1)
            now = self.cpu_seconds()
            if not self.backlog() and (now is None or last is None or now - last < 0.005):
                break
            last = now
        return time.monotonic() - t0

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 6 s) to the server's own pid; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=6)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "version": self.version,
                "pid": self.pid, "command": self.command, "rcvbuf_port67": self.rcvbuf}


class Ours(Server):
    name = "ours"
    title = "preboot-proxydhcpd (ours)"

    def __init__(self, workdir: Path, lab: netns.Lab, main_dir: Path, python: str,
                 profile_to: Path | None = None):
        super().__init__(workdir, lab)
        self.main_dir = main_dir
        self.python = python
        self.profile_to = profile_to
        self.sock_path = self.workdir / "proxydhcpd.sock"
        self.conf_path = self.workdir / "proxydhcpd.conf"
        self.log_path = self.workdir / "proxydhcpd.log"
        self.event_loop = "?"

    def argv(self) -> list[str]:
        if not (self.main_dir / "proxydhcpd" / "__main__.py").exists():
            raise ServerError(f"{self.main_dir}/proxydhcpd/__main__.py does not exist")
        self.conf_path.write_text(
            "# written by bench/run-proxydhcp-bench\n"
            f"StatusSocket = {self.sock_path}\n"
            f"PidFile = {self.workdir / 'proxydhcpd.pid'}\n"
            "StatusPort = 0\n"
            "LogLevel = WARNING\n"
            f"LogFile = {self.log_path}\n"
            "BootFileBIOS = undionly.kpxe\n")
        if self.profile_to:
            run = [str(Path(__file__).with_name("profiled.py")), str(self.profile_to)]
        else:
            run = ["-m", "proxydhcpd"]
        return [self.python, *run, "--foreground", "--config", str(self.conf_path)]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = str(self.main_dir) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def cwd(self) -> str | None:
        return str(self.main_dir)

    def query_status(self, timeout: float = 2.0) -> dict:
        return query_unix(str(self.sock_path), timeout_s=timeout)

    def started(self) -> tuple[bool, str]:
        if not self.sock_path.exists():
            return False, "status socket not there yet"
        try:
            st = self.query_status()
        except (OSError, ValueError) as exc:
            return False, f"status socket: {exc}"
        self.version = f"preboot-proxydhcpd {st.get('version', '?')}"
        spid = st.get("pid")
        if isinstance(spid, int) and spid != self.pid:
            self.pid = spid
            self._ps = psutil.Process(spid)
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
            self.event_loop = "uvloop" if "uvloop" in maps else "asyncio"
        except OSError:
            pass
        out = subprocess.run([self.python, "--version"], capture_output=True, text=True)
        self.version += f", {out.stdout.strip()}, {self.event_loop}"
        return True, "ok"

    def counters(self) -> dict:
        try:
            return self.query_status().get("counters", {})
        except (OSError, ValueError):
            return {}


class Dnsmasq(Server):
    """dnsmasq logs a line per proxy offer ("PXE(if) MAC proxy") even without --log-dhcp;
    --quiet-dhcp turns that off, as LogLevel WARNING does for ours (log_offers=True keeps it)."""

    name = "dnsmasq"
    title = "dnsmasq (proxy mode)"

    def __init__(self, workdir: Path, lab: netns.Lab, log_offers: bool = False):
        super().__init__(workdir, lab)
        self.log_offers = log_offers

    def argv(self) -> list[str]:
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not os.access(binary, os.X_OK):
            raise ServerError("dnsmasq not installed (apt-get install dnsmasq-base)")
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
            self.version = out.stdout.splitlines()[0].split("  ")[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        return [binary, "--port=0", "--conf-file=/dev/null", "--keep-in-foreground",
                "--no-hosts", "--no-resolv", "--bind-interfaces",
                f"--interface={self.lab.server_if}",
                f"--dhcp-range={self.lab.server_addr.rsplit('.', 1)[0]}.0,proxy",
                '--pxe-service=x86PC,"x",undionly.kpxe',
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}",
                f"--log-facility={self.workdir / 'dnsmasq.log'}"] + (
                    [] if self.log_offers else ["--quiet-dhcp"])
