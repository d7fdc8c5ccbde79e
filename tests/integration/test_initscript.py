"""The LSB init script (packaging/init.d/preboot-tftpd + preboot-functions) against the real daemon.

The script is pointed at `python -m tftpd` with a throw-away config through its PREBOOT_*
overrides (PREBOOT_NO_SYSTEMCTL=1, so it manages the process itself even where systemd runs).
The systemctl delegation and `install` are checked against stub programs, never the real ones.
Every daemon a test starts runs with a config file in the test's own temp folder; teardown stops
exactly those processes (their command line names that config).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INITD = REPO / "packaging" / "init.d"
SCRIPT = INITD / "preboot-tftpd"
FUNCTIONS = INITD / "preboot-functions"
SERVICE = "Preboot TFTP Service"
SHELLS = [sh for sh in ("dash", "bash", "busybox sh") if shutil.which(sh.split()[0])]

needs_root = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="init scripts run as root")]
needs_daemon = pytest.mark.skipif(not (REPO / "tftpd" / "__main__.py").exists(),
                                  reason="tftpd/__main__.py not there yet")


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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(b'{"cmd": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.decode())


class Setup:
    """A temp folder with a TFTP root, a config for the daemon and an environment for the script."""

    def __init__(self) -> None:
        # short, so the Unix socket path stays far below its 108-byte limit
        self.dir = Path(tempfile.mkdtemp(prefix="pbinit-", dir="/tmp"))
        self.root = self.dir / "root"
        self.root.mkdir()
        (self.root / "hello.txt").write_text("hello\n")
        self.config = self.dir / "tftpd.conf"
        self.pidfile = self.dir / "tftpd.pid"
        self.sock = self.dir / "tftpd.sock"
        self.log = self.dir / "tftpd.log"
        self.write_config()
        pythonpath = os.environ.get("PYTHONPATH")
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONPATH": f"{REPO}:{pythonpath}" if pythonpath else str(REPO),
            "PREBOOT_DAEMON": f"{sys.executable} -m tftpd",
            "PREBOOT_CONFIG": str(self.config),
            "PREBOOT_PIDFILE": str(self.pidfile),
            "PREBOOT_NO_SYSTEMCTL": "1",
        })
        self.helpers: list[subprocess.Popen] = []

    def write_config(self, **extra: str) -> None:
        values = {
            "IPAddress": "127.0.0.1",
            "Port": "0",
            "Root": str(self.root),
            "StatusSocket": str(self.sock),
            "StatusPort": "0",
            "PidFile": str(self.pidfile),
            "LogFile": str(self.log),
            "LogLevel": "DEBUG",
        }
        values.update(extra)
        text = "# written by test_initscript.py\n" + "".join(
            f"{key} = {value}\n" for key, value in values.items())
        self.config.write_text(text)

    def script(self, *args: str, shell: str | None = None, env: dict | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        command = (shell.split() if shell else []) + [str(SCRIPT), *args]
        return subprocess.run(command, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def daemon(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tftpd", "--config", str(self.config), *args],
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
def ctx():
    s = Setup()
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
    assert reply["daemon"] == "tftpd"
    assert reply["pid"] == pid


# ------------------------------------------------------------------- static and usage checks

def test_scripts_are_posix_sh_and_executable():
    assert SCRIPT.stat().st_mode & stat.S_IXUSR, "the per-daemon script must be executable"
    for shell in SHELLS:
        for path in (SCRIPT, FUNCTIONS):
            result = subprocess.run([*shell.split(), "-n", str(path)], capture_output=True,
                                    text=True)
            assert result.returncode == 0, f"{shell} -n {path.name}: {result.stderr}"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-s", "sh", "-x", str(SCRIPT), str(FUNCTIONS)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr


def test_lsb_header():
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = {}
    for line in header.splitlines():
        if line.startswith("# ") and ":" in line and not line.startswith("#  "):
            key, value = line[2:].split(":", 1)
            fields[key.strip()] = value.strip()
    assert fields["Provides"] == SCRIPT.name
    for key in ("Required-Start", "Required-Stop", "Default-Start", "Default-Stop",
                "Short-Description", "Description"):
        assert fields.get(key), f"LSB header lacks {key}"
    assert "$network" in fields["Required-Start"]
    assert set(fields["Default-Stop"].split()) == {"0", "1", "6"}


@pytest.mark.parametrize("args", [["frobnicate"], [], ["START"]])
def test_unknown_argument_is_usage_error(ctx, args):
    result = ctx.script(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stderr
    for action in ("start", "stop", "restart", "force-reload", "status", "showpid", "install"):
        assert action in result.stderr


def test_status_and_stop_when_never_started(ctx):
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (3, f"{SERVICE} not running\n")
    result = ctx.script("showpid")
    assert (result.returncode, result.stdout) == (3, f"{SERVICE} not running\n")
    result = ctx.script("stop")
    assert result.returncode == 0
    assert result.stdout == f"{SERVICE} not running\n"
    result = ctx.script("force-reload")
    assert result.returncode == 7  # LSB: program is not running


def test_stale_pidfile_with_dead_pid(ctx):
    ctx.pidfile.write_text(f"{dead_pid()}\n")
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (1, f"{SERVICE} dead, but pidfile exists\n")
    result = ctx.script("showpid")
    assert result.returncode == 1
    # stop on a dead daemon succeeds and clears the stale pidfile
    result = ctx.script("stop")
    assert result.returncode == 0, result.stderr
    assert not ctx.pidfile.exists()
    assert ctx.script("status").returncode == 3


def test_stale_pidfile_naming_a_foreign_process_is_not_signalled(ctx):
    """A reused pid: the process lives but is not ours, so it is neither reported nor killed."""
    sleeper = subprocess.Popen(["sleep", "60"])
    ctx.helpers.append(sleeper)
    ctx.pidfile.write_text(f"{sleeper.pid}\n")
    result = ctx.script("status")
    assert (result.returncode, result.stdout) == (1, f"{SERVICE} dead, but pidfile exists\n")
    assert ctx.script("stop").returncode == 0
    time.sleep(0.2)
    assert sleeper.poll() is None, "stop signalled a process that is not the daemon"
    assert not ctx.pidfile.exists()


# ---------------------------------------------------------------- against the real daemon

@with_marks(*needs_root, needs_daemon)
@pytest.mark.parametrize("shell", SHELLS)
def test_full_cycle(ctx, shell):
    s = ctx

    result = s.script("start", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(s.pidfile)
    assert pid and pid_alive(pid)
    assert result.stdout == f"{SERVICE} started {pid}\n"
    assert_serving(s, pid)

    result = s.script("status", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{SERVICE} running\n")
    result = s.script("showpid", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{SERVICE} running {pid}\n")

    # start while running: success, nothing new started
    result = s.script("start", shell=shell)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{SERVICE} already running {pid}\n"
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
    assert result.stdout.endswith(f"{SERVICE} started {new_pid}\n")

    # stop: process, pidfile and status socket gone
    result = s.script("stop", shell=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{SERVICE} stopped\n"
    assert not pid_alive(new_pid)
    assert not s.pidfile.exists()
    assert not s.sock.exists(), "the daemon left its status socket behind"
    assert s.our_daemons() == []

    result = s.script("status", shell=shell)
    assert (result.returncode, result.stdout) == (3, f"{SERVICE} not running\n")
    result = s.script("stop", shell=shell)
    assert (result.returncode, result.stdout) == (0, f"{SERVICE} not running\n")


@with_marks(*needs_root, needs_daemon)
def test_start_with_bad_config_shows_the_daemons_error(ctx):
    ctx.write_config(Port="abc")
    result = ctx.script("start")
    assert result.returncode == 78, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("preboot-tftpd:")]
    assert len(error_lines) == 1, result.stderr
    assert str(ctx.config) in error_lines[0] and "Port" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert f"{SERVICE} failed to start" in result.stderr
    assert not ctx.pidfile.exists()
    assert ctx.our_daemons() == []
    assert ctx.script("status").returncode == 3


@with_marks(*needs_root, needs_daemon)
def test_start_with_missing_config_fails(ctx):
    ctx.config.unlink()
    result = ctx.script("start")
    assert result.returncode == 78, result.stdout + result.stderr
    assert str(ctx.config) in result.stderr
    assert ctx.our_daemons() == []


@with_marks(*needs_root, needs_daemon)
def test_bad_config_keeps_the_running_daemon(ctx):
    """force-reload and restart check the config first: a broken file stops nothing."""
    assert ctx.script("start").returncode == 0
    pid = read_pid(ctx.pidfile)
    ctx.write_config(MaxBlockSize="huge")

    result = ctx.script("force-reload")
    assert result.returncode == 78
    assert "MaxBlockSize" in result.stderr
    result = ctx.script("restart")
    assert result.returncode == 78
    assert "MaxBlockSize" in result.stderr
    assert read_pid(ctx.pidfile) == pid
    assert_serving(ctx, pid)

    ctx.write_config()
    assert ctx.script("stop").returncode == 0
    assert not pid_alive(pid)


@with_marks(*needs_root, needs_daemon)
def test_start_over_stale_pidfile(ctx):
    ctx.pidfile.write_text(f"{dead_pid()}\n")
    result = ctx.script("start")
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(ctx.pidfile)
    assert_serving(ctx, pid)
    assert ctx.script("stop").returncode == 0
    assert not pid_alive(pid)


@with_marks(*needs_root, needs_daemon)
def test_pidfile_from_config_when_not_overridden(ctx):
    """Without PREBOOT_PIDFILE the script looks where the config's PidFile puts it."""
    env = dict(ctx.env)
    del env["PREBOOT_PIDFILE"]
    ctx.pidfile = ctx.dir / "run" / "other.pid"
    ctx.write_config(PidFile="run/other.pid")  # relative to the config's folder
    result = ctx.script("start", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(ctx.pidfile)
    assert pid and pid_alive(pid)
    result = ctx.script("showpid", env=env)
    assert (result.returncode, result.stdout) == (0, f"{SERVICE} running {pid}\n")
    assert ctx.script("stop", env=env).returncode == 0
    assert not pid_alive(pid)
    assert not ctx.pidfile.exists()


@with_marks(*needs_root, needs_daemon)
@pytest.mark.parametrize("mode", [["--foreground"], []], ids=["foreground", "detaching"])
def test_second_instance_is_refused_by_the_pidfile_lock(ctx, mode):
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
    for name, text in (("systemctl", SYSTEMCTL_STUB), ("fake-tftpd", DAEMON_STUB),
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
        "PREBOOT_DAEMON": str(bin_dir / "fake-tftpd"),
        "STUB_LOG": str(log),
        "STUB_PID": "4242",
    })

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return env, calls


@pytest.mark.parametrize("state, code, message", [
    ("active", 0, f"{SERVICE} running"),
    ("reloading", 0, f"{SERVICE} running"),
    ("inactive", 3, f"{SERVICE} not running"),
    ("failed", 1, f"{SERVICE} dead"),
    ("maintenance", 4, f"{SERVICE} status unknown"),
])
def test_systemd_status_maps_is_active_to_lsb_codes(ctx, stubs, state, code, message):
    env, calls = stubs
    env["STUB_STATE"] = state
    result = ctx.script("status", env=env)
    assert result.returncode == code
    assert result.stdout.startswith(message)
    assert "systemctl is-active preboot-tftpd.service" in calls()
    result = ctx.script("showpid", env=env)
    assert result.returncode == code
    if code == 0:
        assert result.stdout == f"{SERVICE} running 4242\n"


def test_systemd_actions_delegate_to_systemctl(ctx, stubs):
    env, calls = stubs
    assert ctx.script("start", env=env).returncode == 0
    assert "systemctl start preboot-tftpd.service" in calls()
    assert ctx.script("stop", env=env).returncode == 0  # inactive: nothing to stop
    assert "systemctl stop preboot-tftpd.service" not in calls()
    assert ctx.script("force-reload", env=env).returncode == 7
    assert ctx.script("install", env=env).returncode == 0
    assert "systemctl enable preboot-tftpd.service" in calls()

    env["STUB_STATE"] = "active"
    result = ctx.script("start", env=env)
    assert (result.returncode, result.stdout) == (0, f"{SERVICE} already running 4242\n")
    assert calls().count("systemctl start preboot-tftpd.service") == 1
    assert ctx.script("force-reload", env=env).returncode == 0
    assert "systemctl reload preboot-tftpd.service" in calls()
    assert ctx.script("restart", env=env).returncode == 0
    assert "systemctl restart preboot-tftpd.service" in calls()
    assert ctx.script("stop", env=env).returncode == 0
    assert "systemctl stop preboot-tftpd.service" in calls()
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


def test_install_without_systemd_uses_the_boot_tool(ctx, stubs):
    env, calls = stubs
    env["PREBOOT_NO_SYSTEMCTL"] = "1"
    result = ctx.script("install", env=env)
    assert result.returncode == 0, result.stderr
    assert calls() == ["insserv preboot-tftpd"]
    assert "start at boot" in result.stdout
