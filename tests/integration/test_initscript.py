"""The LSB init scripts (packaging/init.d/preboot-<name> + preboot-functions) against the real
daemons (tftpd, proxydhcpd, policyd, imgsrvd).

A script is pointed at `python -m <name>` with a throw-away config through its PREBOOT_*
overrides (PREBOOT_NO_SYSTEMCTL=1, so it manages the process itself even where systemd runs).
The systemctl delegation and `install` are checked against stub programs, never the real ones.
Every daemon a test starts runs with a config file in the test's own temp folder; teardown stops
exactly those processes (their command line names that config). proxydhcpd listens on free high
ports (its DHCP, boot server and client ports are all configurable), never on 67 or 4011.

What preboot-functions does is the same for every daemon, so the tests of its logic run against
tftpd's script; what differs per daemon (the script's names, the daemon's start, reload, stop,
its config errors, its pidfile lock) runs against each.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import query_status

REPO = Path(__file__).resolve().parents[2]
INITD = REPO / "packaging" / "init.d"
FUNCTIONS = INITD / "preboot-functions"
SHELLS = [sh for sh in ("dash", "bash", "busybox sh") if shutil.which(sh.split()[0])]


@dataclass(frozen=True)
class Daemon:
    name: str                    # package and short name: tftpd
    service: str                 # the name in the script's messages
    bad: tuple[str, str]         # a key and a value that --check rejects
    package: str = ""            # the Python package, where it differs from the name

    @property
    def module(self) -> str:
        return self.package or self.name

    @property
    def script(self) -> Path:
        return INITD / f"preboot-{self.name}"

    @property
    def program(self) -> str:
        return f"preboot-{self.name}"

    @property
    def unit(self) -> str:
        return f"preboot-{self.name}.service"


TFTPD = Daemon("tftpd", "Preboot TFTP Service", ("Port", "abc"))
PROXYDHCPD = Daemon("proxydhcpd", "Preboot Proxy DHCP Service", ("DHCPPort", "abc"))
POLICYD = Daemon("policyd", "Preboot Policy Service", ("Port", "abc"), package="prebootpolicyd")
IMGSRVD = Daemon("imgsrvd", "Preboot Imaging Service", ("Port", "abc"))
DAEMONS = [TFTPD, PROXYDHCPD, POLICYD, IMGSRVD]

needs_root = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="init scripts run as root")]


def needs_daemon(d: Daemon):
    return pytest.mark.skipif(not (REPO / d.module / "__main__.py").exists(),
                              reason=f"{d.module}/__main__.py not there yet")


# `ctx` parametrized over the daemons: ALL for the scripts alone, RUNNABLE to run the daemon
ALL = [pytest.param(d, id=d.name) for d in DAEMONS]
RUNNABLE = [pytest.param(d, id=d.name, marks=needs_daemon(d)) for d in DAEMONS]


def with_marks(*marks):
    def apply(func):
        for mark in reversed(marks):
            func = mark(func)
        return func
    return apply


# ------------------------------------------------------------------------------------ helpers

def pid_alive(pid: int | None) -> bool:
    """A live process, not a zombie (PID 1 here may never reap the detached daemon)."""
    if not pid:
        return False
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = data.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X", "x")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(predicate, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def status_query(sock_path: Path, timeout: float = 5.0) -> dict:
    """One `status` exchange on the daemon's Unix status socket."""
    return query_status(str(sock_path), timeout_s=timeout)


def free_udp_ports(count: int) -> list[int]:
    """Distinct UDP ports free on the wildcard address right now (the daemon binds 0.0.0.0)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Setup:
    """A temp folder with a config for the daemon (and a TFTP root for tftpd) and an
    environment for its init script."""

    def __init__(self, d: Daemon = TFTPD) -> None:
        self.d = d
        # short, so the Unix socket path stays far below its 108-byte limit
        self.dir = Path(tempfile.mkdtemp(prefix="pbinit-", dir="/tmp"))
        self.root = self.dir / "root"
        self.root.mkdir()
        (self.root / "hello.txt").write_text("hello\n")
        # proxydhcpd cannot bind port 0: its DHCP, boot server and client ports are free ones
        self.udp_ports = free_udp_ports(3)
        self.config = self.dir / f"{d.name}.conf"
        self.pidfile = self.dir / f"{d.name}.pid"
        self.sock = self.dir / f"{d.name}.sock"
        self.log = self.dir / f"{d.name}.log"
        self.write_config()
        pythonpath = os.environ.get("PYTHONPATH")
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONPATH": f"{REPO}:{pythonpath}" if pythonpath else str(REPO),
            "PREBOOT_DAEMON": f"{sys.executable} -m {d.module}",
            "PREBOOT_CONFIG": str(self.config),
            "PREBOOT_PIDFILE": str(self.pidfile),
            "PREBOOT_NO_SYSTEMCTL": "1",
        })
        self.helpers: list[subprocess.Popen] = []

    def write_config(self, **extra: str) -> None:
        values = {
            "StatusSocket": str(self.sock),
            "StatusPort": "0",
            "PidFile": str(self.pidfile),
            "LogFile": str(self.log),
            "LogLevel": "DEBUG",
        }
        if self.d is TFTPD:
            values.update({"IPAddress": "127.0.0.1", "Port": "0", "Root": str(self.root)})
        elif self.d is PROXYDHCPD:
            dhcp, boot_server, client = self.udp_ports
            values.update({"DHCPPort": str(dhcp), "BootServerPort": str(boot_server),
                           "ClientPort": str(client), "Interfaces": "lo"})
        elif self.d is POLICYD:
            values.update({"IPAddress": "127.0.0.1", "Port": "0",
                           "Directory": f"sqlite://{self.dir}/directory.db",
                           "TokenKeyFile": str(self.dir / "imaging.key")})
        elif self.d is IMGSRVD:
            values.update({"IPAddress": "127.0.0.1", "Port": "0", "ImageRoot": str(self.root),
                           "Directory": f"sqlite://{self.dir}/directory.db",
                           "ResultsLog": str(self.dir / "results.xml"),
                           "TokenKeyFile": str(self.dir / "imaging.key")})
        values.update(extra)
        text = "# written by test_initscript.py\n" + "".join(
            f"{key} = {value}\n" for key, value in values.items())
        self.config.write_text(text)

    def script(self, *args: str, shell: str | None = None, env: dict | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        command = (shell.split() if shell else []) + [str(self.d.script), *args]
        return subprocess.run(command, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def daemon(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", self.d.module, "--config", str(self.config),
                               *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def our_daemons(self) -> list[int]:
        """Live processes started with this setup's config (nothing else is ever signalled)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and str(self.config) in cmdline(int(entry.name)):
                if pid_alive(int(entry.name)):
                    pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        pids = self.our_daemons()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            if not wait_until(lambda: not pid_alive(pid), 6):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def ctx(request):
    """tftpd's setup, or the daemon's given with parametrize("ctx", ALL or RUNNABLE, indirect)."""
    s = Setup(getattr(request, "param", TFTPD))
    yield s
    s.cleanup()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def assert_serving(s: Setup, pid: int) -> None:
    assert pid_alive(pid), f"daemon {pid} is not running"
    reply = status_query(s.sock)
    assert reply.get("ok", True) is True
    assert reply["daemon"] == s.d.name
    assert reply["service"] == s.d.service
    assert reply["pid"] == pid


# ------------------------------------------------------------------- static and usage checks

@pytest.mark.parametrize("d", DAEMONS, ids=[d.name for d in DAEMONS])
def test_scripts_are_posix_sh_and_executable(d):
    script = d.script
    assert script.stat().st_mode & stat.S_IXUSR, "the per-daemon script must be executable"
    for shell in SHELLS:
        for path in (script, FUNCTIONS):
            result = subprocess.run([*shell.split(), "-n", str(path)], capture_output=True,
                                    text=True)
            assert result.returncode == 0, f"{shell} -n {path.name}: {result.stderr}"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-s", "sh", "-x", str(script), str(FUNCTIONS)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("d", DAEMONS, ids=[d.name for d in DAEMONS])
def test_scripts_name_their_daemon(d):
    """Everything daemon-specific in a script: the rest is preboot-functions."""
    text = d.script.read_text()
    for line in (f"NAME={d.name}", f'SERVICE_NAME="{d.service}"', f"DAEMON=/usr/sbin/{d.program}",
                 f"CONFIG=/etc/preboot/{d.name}.conf", f"PIDFILE=/run/preboot/{d.name}.pid",
                 f"UNIT={d.unit}"):
        assert f"\n{line}\n" in text, line
    # the same shape as every other daemon's script, names aside
    def shape(path: Path) -> list[str]:
        lines = path.read_text().split("### END INIT INFO", 1)[1].splitlines()
        return [line for line in lines if not line.startswith("#")
                and not line.startswith(("NAME=", "SERVICE_NAME=", "DAEMON=", "CONFIG=",
                                         "PIDFILE=", "UNIT="))]
    assert shape(d.script) == shape(TFTPD.script)


@pytest.mark.parametrize("d", DAEMONS, ids=[d.name for d in DAEMONS])
def test_lsb_header(d):
    script = d.script
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = {}
    for line in header.splitlines():
        if line.startswith("# ") and ":" in line and not line.startswith("#  "):
            key, value = line[2:].split(":", 1)
            fields[key.strip()] = value.strip()
    assert fields["Provides"] == script.name
    for key in ("Required-Start", "Required-Stop", "Default-Start", "Default-Stop",
                "Short-Description", "Description"):
        assert fields.get(key), f"LSB header lacks {key}"
    assert "$network" in fields["Required-Start"]
    assert set(fields["Default-Stop"].split()) == {"0", "1", "6"}


@pytest.mark.parametrize("ctx", ALL, indirect=True)
@pytest.mark.parametrize("args", [["frobnicate"], [], ["START"]])
def test_unknown_argument_is_usage_error(ctx, args):
    result = ctx.script(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stderr
    for action in ("start", "stop", "restart", "force-reload", "status", "showpid", "install"):
        assert action in result.stderr


@pytest.mark.parametrize("ctx", ALL, indirect=True)
def test_status_and_stop_when_never_started(ctx):
    service = ctx.d.service
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (3, f"{service} not running\n")
    result = ctx.script("showpid")
    assert (result.returncode, result.stdout) == (3, f"{service} not running\n")
    result = ctx.script("stop")
    assert result.returncode == 0
    assert result.stdout == f"{service} not running\n"
    result = ctx.script("force-reload")
    assert result.returncode == 7  # LSB: program is not running


def test_stale_pidfile_with_dead_pid(ctx):
    service = ctx.d.service
    ctx.pidfile.write_text(f"{dead_pid()}\n")
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (1, f"{service} dead, but pidfile exists\n")
    result = ctx.script("showpid")
    assert result.returncode == 1
    # stop on a dead daemon succeeds and clears the stale pidfile
    result = ctx.script("stop")
    assert result.returncode == 0, result.stderr
    assert not ctx.pidfile.exists()
    assert ctx.script("status").returncode == 3


def test_stale_pidfile_naming_a_foreign_process_is_not_signalled(ctx):
    """A reused pid: the process lives but is not ours, so it is neither reported nor killed."""
    service = ctx.d.service
    sleeper = subprocess.Popen(["sleep", "60"])
    ctx.helpers.append(sleeper)
    ctx.pidfile.write_text(f"{sleeper.pid}\n")
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (1, f"{service} dead, but pidfile exists\n")
    assert ctx.script("stop").returncode == 0
    time.sleep(0.2)
    assert sleeper.poll() is None, "stop signalled a process that is not the daemon"
    assert not ctx.pidfile.exists()


def test_stop_waits_until_the_process_is_gone(ctx):
    """Once signalled, the daemon's command line stops counting: an exiting process's reads
    empty from the moment its memory is released until it is a zombie, and `stop` (so also
    `restart`) must not report it gone while it still runs. The stand-in names the daemon until
    SIGTERM, then becomes `sleep 1`."""
    helper = subprocess.Popen(["sh", "-c", "trap 'exec sleep 1' TERM; while :; do sleep 0.05; done",
                               ctx.d.name])
    ctx.helpers.append(helper)
    assert wait_until(lambda: ctx.d.name in cmdline(helper.pid))
    ctx.pidfile.write_text(f"{helper.pid}\n")
    assert ctx.script("status").returncode == 0
    result = ctx.script("stop")
    assert (result.returncode, result.stdout) == (0, f"{ctx.d.service} stopped\n")
    assert not pid_alive(helper.pid), "stop returned while the process still ran"


# ---------------------------------------------------------------- against the real daemon

@with_marks(*needs_root)
@pytest.mark.parametrize("ctx", RUNNABLE, indirect=True)
@pytest.mark.parametrize("shell", SHELLS)
def test_full_cycle(ctx, shell):
    s = ctx
    service = s.d.service

    result = s.script("start", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(s.pidfile)
    assert pid and pid_alive(pid)
    assert result.stdout == f"{service} started {pid}\n"
    assert_serving(s, pid)

    result = s.script("status", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{service} running\n")
    result = s.script("showpid", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{service} running {pid}\n")

    # start while running: success, nothing new started
    result = s.script("start", shell=shell)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{service} already running {pid}\n"
    assert read_pid(s.pidfile) == pid
    assert s.our_daemons() == [pid]

    # force-reload: SIGHUP, same process, still answering
    result = s.script("force-reload", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until(lambda: "reload" in s.log.read_text().lower() if s.log.exists() else False), \
        "the daemon did not log a reload after SIGHUP"
    assert read_pid(s.pidfile) == pid
    assert_serving(s, pid)

    # restart: a new process
    result = s.script("restart", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    new_pid = read_pid(s.pidfile)
    assert new_pid and new_pid != pid
    assert not pid_alive(pid)
    assert_serving(s, new_pid)
    assert result.stdout.endswith(f"{service} started {new_pid}\n")

    # stop: process, pidfile and status socket gone
    result = s.script("stop", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{service} stopped\n"
    assert not pid_alive(new_pid)
    assert not s.pidfile.exists()
    assert not s.sock.exists(), "the daemon left its status socket behind"
    assert s.our_daemons() == []

    result = s.script("status", shell=shell)
    assert (result.returncode, result.stdout) == (3, f"{service} not running\n")
    result = s.script("stop", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{service} not running\n")


@with_marks(*needs_root)
@pytest.mark.parametrize("ctx", RUNNABLE, indirect=True)
def test_start_with_bad_config_shows_the_daemons_error(ctx):
    key, value = ctx.d.bad
    ctx.write_config(**{key: value})
    result = ctx.script("start")
    assert result.returncode == 78, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines()
                   if line.startswith(f"{ctx.d.program}:")]
    assert len(error_lines) == 1, result.stderr
    assert str(ctx.config) in error_lines[0] and key in error_lines[0]
    assert "Traceback" not in result.stderr
    assert f"{ctx.d.service} failed to start" in result.stderr
    assert not ctx.pidfile.exists()
    assert ctx.our_daemons() == []
    assert ctx.script("status").returncode == 3


@with_marks(*needs_root)
@pytest.mark.parametrize("ctx", RUNNABLE, indirect=True)
def test_start_with_missing_config_fails(ctx):
    ctx.config.unlink()
    result = ctx.script("start")
    assert result.returncode == 78, result.stdout + result.stderr
    assert str(ctx.config) in result.stderr
    assert ctx.our_daemons() == []


@with_marks(*needs_root)
@pytest.mark.parametrize("ctx", RUNNABLE, indirect=True)
def test_bad_config_keeps_the_running_daemon(ctx):
    """force-reload and restart check the config first: a broken file stops nothing."""
    assert ctx.script("start").returncode == 0
    pid = read_pid(ctx.pidfile)
    key, value = ctx.d.bad
    ctx.write_config(**{key: value})

    result = ctx.script("force-reload")
    assert result.returncode == 78
    assert key in result.stderr
    result = ctx.script("restart")
    assert result.returncode == 78
    assert key in result.stderr
    assert read_pid(ctx.pidfile) == pid
    assert_serving(ctx, pid)

    ctx.write_config()
    assert ctx.script("stop").returncode == 0
    assert not pid_alive(pid)


@with_marks(*needs_root, needs_daemon(TFTPD))
def test_start_over_stale_pidfile(ctx):
    ctx.pidfile.write_text(f"{dead_pid()}\n")
    result = ctx.script("start")
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(ctx.pidfile)
    assert_serving(ctx, pid)
    assert ctx.script("stop").returncode == 0
    assert not pid_alive(pid)


@with_marks(*needs_root, needs_daemon(TFTPD))
def test_pidfile_from_config_when_not_overridden(ctx):
    """Without PREBOOT_PIDFILE the script looks where the config's PidFile puts it."""
    service = ctx.d.service
    env = dict(ctx.env)
    del env["PREBOOT_PIDFILE"]
    ctx.pidfile = ctx.dir / "run" / "other.pid"
    ctx.write_config(PidFile="run/other.pid")  # relative to the config's folder
    result = ctx.script("start", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(ctx.pidfile)
    assert pid and pid_alive(pid)
    result = ctx.script("showpid", env=env)
    assert (result.returncode, result.stdout) == (0, f"{service} running {pid}\n")
    assert ctx.script("stop", env=env).returncode == 0
    assert not pid_alive(pid)
    assert not ctx.pidfile.exists()


@with_marks(*needs_root)
@pytest.mark.parametrize("ctx", RUNNABLE, indirect=True)
@pytest.mark.parametrize("mode", [["--foreground"], []], ids=["foreground", "detaching"])
def test_second_instance_is_refused_by_the_pidfile_lock(ctx, mode):
    """The lock is taken before any socket is bound, so the refusal names the running pid
    rather than a port in use."""
    assert ctx.script("start").returncode == 0
    pid = read_pid(ctx.pidfile)
    assert_serving(ctx, pid)

    result = ctx.daemon(*mode)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "already running" in result.stderr
    assert str(pid) in result.stderr

    # the first instance is undisturbed: same pidfile, same status socket, alone
    assert read_pid(ctx.pidfile) == pid
    assert_serving(ctx, pid)
    assert ctx.our_daemons() == [pid]
    assert ctx.script("stop").returncode == 0


# --------------------------------------------------- systemctl delegation and install (stubs)

SYSTEMCTL_STUB = """\
#!/bin/sh
echo "systemctl $*" >>"$STUB_LOG"
case $1 in
    is-active) echo "${STUB_STATE:-inactive}"
               [ "${STUB_STATE:-inactive}" = active ] && exit 0; exit 3 ;;
    show) echo "MainPID=${STUB_PID:-0}" ;;
    *) exit "${STUB_RC:-0}" ;;
esac
"""

DAEMON_STUB = """\
#!/bin/sh
echo "daemon $*" >>"$STUB_LOG"
if [ -n "${STUB_CHECK_FAIL:-}" ]; then
    echo "preboot-tftpd: $2:3: Port: value 'abc' is not an integer" >&2
    exit 78
fi
echo "OK: $2"
"""

BOOT_TOOL_STUB = """\
#!/bin/sh
echo "${0##*/} $*" >>"$STUB_LOG"
"""


@pytest.fixture
def stubs(ctx):
    """Stub systemctl, daemon and boot tools first in PATH; a fake systemd run dir."""
    bin_dir = ctx.dir / "bin"
    bin_dir.mkdir()
    for name, text in (("systemctl", SYSTEMCTL_STUB), (f"fake-{ctx.d.name}", DAEMON_STUB),
                       ("insserv", BOOT_TOOL_STUB), ("update-rc.d", BOOT_TOOL_STUB),
                       ("chkconfig", BOOT_TOOL_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    rundir = ctx.dir / "systemd-system"
    rundir.mkdir()
    log = ctx.dir / "stub.log"
    env = dict(ctx.env)
    env.pop("PREBOOT_NO_SYSTEMCTL")
    env.update({
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PREBOOT_SYSTEMD_RUNDIR": str(rundir),
        "PREBOOT_DAEMON": str(bin_dir / f"fake-{ctx.d.name}"),
        "STUB_LOG": str(log),
        "STUB_PID": "4242",
    })

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return env, calls


@pytest.mark.parametrize("state, code, message", [
    ("active", 0, f"{TFTPD.service} running"),
    ("reloading", 0, f"{TFTPD.service} running"),
    ("inactive", 3, f"{TFTPD.service} not running"),
    ("failed", 1, f"{TFTPD.service} dead"),
    ("maintenance", 4, f"{TFTPD.service} status unknown"),
])
def test_systemd_status_maps_is_active_to_lsb_codes(ctx, stubs, state, code, message):
    service = ctx.d.service
    env, calls = stubs
    env["STUB_STATE"] = state
    result = ctx.script("status", env=env)
    assert result.returncode == code
    assert result.stdout.startswith(message)
    assert "systemctl is-active preboot-tftpd.service" in calls()
    result = ctx.script("showpid", env=env)
    assert result.returncode == code
    if code == 0:
        assert result.stdout == f"{service} running 4242\n"


@pytest.mark.parametrize("ctx", ALL, indirect=True)
def test_systemd_actions_delegate_to_systemctl(ctx, stubs):
    env, calls = stubs
    unit = ctx.d.unit
    assert ctx.script("start", env=env).returncode == 0
    assert f"systemctl start {unit}" in calls()
    assert ctx.script("stop", env=env).returncode == 0  # inactive: nothing to stop
    assert f"systemctl stop {unit}" not in calls()
    assert ctx.script("force-reload", env=env).returncode == 7
    assert ctx.script("install", env=env).returncode == 0
    assert f"systemctl enable {unit}" in calls()

    env["STUB_STATE"] = "active"
    result = ctx.script("start", env=env)
    assert (result.returncode, result.stdout) == (0, f"{ctx.d.service} already running 4242\n")
    assert calls().count(f"systemctl start {unit}") == 1
    assert ctx.script("force-reload", env=env).returncode == 0
    assert f"systemctl reload {unit}" in calls()
    assert ctx.script("restart", env=env).returncode == 0
    assert f"systemctl restart {unit}" in calls()
    assert ctx.script("stop", env=env).returncode == 0
    assert f"systemctl stop {unit}" in calls()
    assert not any(call.startswith(("insserv", "update-rc.d", "chkconfig")) for call in calls())

    env["PREBOOT_UNIT"] = "other.service"
    ctx.script("stop", env=env)
    assert calls()[-1] == "systemctl stop other.service"


def test_systemd_restart_and_reload_refuse_a_bad_config(ctx, stubs):
    env, calls = stubs
    env.update(STUB_STATE="active", STUB_CHECK_FAIL="1")
    for action in ("restart", "force-reload"):
        result = ctx.script(action, env=env)
        assert result.returncode == 78
        assert "Port: value 'abc' is not an integer" in result.stderr
    assert not any(call.startswith(("systemctl restart", "systemctl reload")) for call in calls())


def test_no_systemctl_override_manages_the_process_itself(ctx, stubs):
    env, calls = stubs
    env.update(PREBOOT_NO_SYSTEMCTL="1", STUB_STATE="active")
    result = ctx.script("status", env=env)
    assert result.returncode == 3
    assert not any(call.startswith("systemctl") for call in calls())


@pytest.mark.parametrize("ctx", ALL, indirect=True)
def test_install_without_systemd_uses_the_boot_tool(ctx, stubs):
    env, calls = stubs
    env["PREBOOT_NO_SYSTEMCTL"] = "1"
    result = ctx.script("install", env=env)
    assert result.returncode == 0, result.stderr
    assert calls() == [f"insserv {ctx.d.program}"]
    assert "start at boot" in result.stdout
