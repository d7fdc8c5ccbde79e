"""The daemon contract (docs/daemon-contract.md) on the real tftpd process.

Config errors are one line naming file, line and key with exit 78; --check; SIGHUP reloads (a bad
file keeps the old config); SIGTERM stops within 5 s, aborting transfers with an ERROR and removing
the status socket and pidfile; the pidfile lock; the status socket's control verbs (root only)
and the read-only TCP status port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402
from tftpclients import OP_DATA, OP_ERROR, OP_OACK, RawClient  # noqa: E402

from common.daemon.statussock import query_tcp  # noqa: E402

EX_CONFIG = 78
PROGRAM = "preboot-tftpd"


def run_tftpd(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tc.REPO))
    return subprocess.run([sys.executable, "-m", "tftpd", *args], cwd=str(tc.REPO), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout_s)


def base_lines(tmp_path: Path, root: Path) -> list[str]:
    return [f"IPAddress = 127.0.0.1", "Port = 0", f"Root = {root}",
            f"StatusSocket = {tmp_path / 'bad.sock'}", f"PidFile = {tmp_path / 'bad.pid'}",
            "StatusPort = 0"]


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((tc.HOST, 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """A live process, not a zombie (nobody may reap a detached daemon here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X", "x")


def first_reply(port: int, filename: str, options=None) -> tc.Packet:
    with RawClient(port) as client:
        client.rrq(filename, "octet", options)
        reply = client.recv(10)
        assert reply is not None
        if reply.opcode in (OP_DATA, OP_OACK):
            client.send_tid(tc.error(0, "enough"))
        return reply


# ---- config errors ---------------------------------------------------------------------------

BAD_CONFIGS = [
    # id, line to append (becomes line 7), key named, words the message must hold
    ("unknown-key", "Rooot = /srv/tftp", "Rooot", "unknown key (did you mean Root?)"),
    ("wrong-case-key", "allowwrite = YES", "allowwrite", "unknown key (did you mean AllowWrite?)"),
    ("misspelt-key", "MaxBlokSize = 1428", "MaxBlokSize", "did you mean MaxBlockSize?"),
    ("bad-integer", "Timeout = abc", "Timeout", "value 'abc' is not an integer"),
    ("integer-out-of-range", "MaxBlockSize = 70000", "MaxBlockSize", "out of range"),
    ("bad-boolean", "AllowWrite = maybe", "AllowWrite", "value 'maybe' is not YES or NO"),
    ("bad-loglevel", "LogLevel = LOUD", "LogLevel", "not one of DEBUG, INFO, WARNING, ERROR"),
    ("duplicate-key", "Port = 69", "Port", "key given twice"),
    ("upload-dir-outside-root", "UploadDir = ../elsewhere", "UploadDir", "is not inside Root"),
]


@pytest.mark.parametrize("case,extra,key,words", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
@pytest.mark.parametrize("check", [False, True], ids=["start", "check"])
def test_bad_config_is_one_line_and_exit_78(tmp_path, tftp_root, case, extra, key, words, check):
    config = tmp_path / "tftpd.conf"
    lines = base_lines(tmp_path, tftp_root) + [extra]
    config.write_text("\n".join(lines) + "\n")
    result = run_tftpd("--check" if check else "--foreground", "--config", str(config))
    assert result.returncode == EX_CONFIG, result
    assert "Traceback" not in result.stderr
    stderr = result.stderr.strip()
    assert "\n" not in stderr, f"more than one line: {stderr!r}"
    assert stderr.startswith(f"{PROGRAM}: {config}:7: {key}: "), stderr
    assert words in stderr, stderr
    assert result.stdout == ""
    assert not (tmp_path / "bad.sock").exists() and not (tmp_path / "bad.pid").exists()


def test_missing_root_folder_names_its_line(tmp_path):
    config = tmp_path / "tftpd.conf"
    lines = base_lines(tmp_path, tmp_path / "no-such-root")
    config.write_text("# a comment first\n" + "\n".join(lines) + "\n")
    result = run_tftpd("--foreground", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip() == (f"{PROGRAM}: {config}:4: Root: folder "
                                     f"{tmp_path / 'no-such-root'} does not exist")


def test_missing_config_file(tmp_path):
    config = tmp_path / "nowhere.conf"
    result = run_tftpd("--foreground", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip() == f"{PROGRAM}: {config}: file not found"


@pytest.mark.parametrize("text,words", [
    ("this line has no equals sign\n", "not a 'Key = Value' line"),
    ("[section]\nPort = 0\n", "sections are not supported"),
])
def test_syntax_errors(tmp_path, tftp_root, text, words):
    config = tmp_path / "tftpd.conf"
    config.write_text("\n".join(base_lines(tmp_path, tftp_root)) + "\n" + text)
    result = run_tftpd("--check", "--config", str(config))
    assert result.returncode == EX_CONFIG
    stderr = result.stderr.strip()
    assert "\n" not in stderr and "Traceback" not in stderr
    assert stderr.startswith(f"{PROGRAM}: {config}:7"), stderr
    assert words in stderr


def test_check_good_config(tmp_path, tftp_root):
    config = tmp_path / "tftpd.conf"
    # Empty values take their defaults; a relative Root is relative to the config's folder.
    lines = base_lines(tmp_path, Path("root")) + ["Timeout =", "LogLevel =", "AllowWrite = yes"]
    config.write_text("\n".join(lines) + "\n")
    result = run_tftpd("--check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK: {config}"
    assert result.stderr == ""
    assert not (tmp_path / "bad.sock").exists() and not (tmp_path / "bad.pid").exists()


def test_relative_root_is_relative_to_the_config_file(tftpd_factory, tftp_root):
    (tftp_root / "hello.txt").write_bytes(b"hello\n")
    daemon = tftpd_factory(Root="root")          # tftp_root is <config folder>/root
    with RawClient(daemon.port) as client:
        assert client.download("hello.txt") == b"hello\n"


# ---- SIGHUP and the reload verb ----------------------------------------------------------------

def test_sighup_reload_takes_effect_without_restart(tftpd_factory, tftp_root):
    (tftp_root / "BOOT.IPXE").write_bytes(b"#!ipxe\n")
    (tftp_root / "big.bin").write_bytes(os.urandom(10000))
    daemon = tftpd_factory(CaseInsensitive=False, MaxBlockSize=65464)
    pid = daemon.status()["pid"]
    port = daemon.port
    assert first_reply(port, "boot.ipxe").code == 1
    assert first_reply(port, "big.bin", {"blksize": 8192}).options == {"blksize": "8192"}
    tc.set_config_key(daemon.config, "CaseInsensitive", True)
    tc.set_config_key(daemon.config, "MaxBlockSize", 1024)
    daemon.signal(signal.SIGHUP)
    tc.wait_until(lambda: "configuration reloaded" in daemon.log(), 10, what="the reload")
    assert first_reply(port, "boot.ipxe").opcode == OP_DATA
    assert first_reply(port, "big.bin", {"blksize": 8192}).options == {"blksize": "1024"}
    status = daemon.status()
    assert status["pid"] == pid == daemon.pid
    assert daemon.proc.poll() is None
    assert status["listen"][0]["port"] == port


def test_sighup_with_bad_config_keeps_the_old_one(tftpd_factory, tftp_root):
    (tftp_root / "BOOT.IPXE").write_bytes(b"#!ipxe\n")
    daemon = tftpd_factory(CaseInsensitive=False)
    pid, port = daemon.pid, daemon.port
    tc.set_config_key(daemon.config, "CaseInsensitive", True)
    tc.set_config_key(daemon.config, "Timeout", "abc")
    daemon.signal(signal.SIGHUP)
    tc.wait_until(lambda: "reload failed" in daemon.log(), 10, what="the failed reload")
    failure = [line for line in daemon.log().splitlines() if "reload failed" in line]
    assert len(failure) == 1
    assert f"{daemon.config}:" in failure[0] and "Timeout: value 'abc' is not an integer" in \
        failure[0], failure[0]
    assert daemon.proc.poll() is None and daemon.status()["pid"] == pid
    assert first_reply(port, "boot.ipxe").code == 1        # still case-sensitive
    assert first_reply(port, "BOOT.IPXE").opcode == OP_DATA
    # Fixed, the next reload goes through.
    tc.set_config_key(daemon.config, "Timeout", 1)
    daemon.signal(signal.SIGHUP)
    tc.wait_until(lambda: "configuration reloaded" in daemon.log(), 10, what="the reload")
    assert first_reply(port, "boot.ipxe").opcode == OP_DATA


def test_reload_keeps_port_and_warns(tftpd_factory, tftp_root):
    daemon = tftpd_factory()
    port = daemon.port
    tc.set_config_key(daemon.config, "Port", free_tcp_port())
    reply = tc.query_status(daemon.status_socket, "reload")
    assert reply["ok"] is True and reply["message"] == "reloaded"
    assert any("restart" in w for w in reply["warnings"]), reply
    assert daemon.port == port


def test_reload_and_stop_verbs(tftpd_factory, tftp_root, tmp_path):
    (tftp_root / "BOOT.IPXE").write_bytes(b"#!ipxe\n")
    daemon = tftpd_factory(CaseInsensitive=False)
    port = daemon.port
    tc.set_config_key(daemon.config, "CaseInsensitive", True)
    reply = tc.query_status(daemon.status_socket, "reload")
    assert reply["ok"] is True, reply
    assert first_reply(port, "boot.ipxe").opcode == OP_DATA
    tc.set_config_key(daemon.config, "Bogus", 1)
    reply = tc.query_status(daemon.status_socket, "reload")
    assert reply["ok"] is False and "Bogus: unknown key" in reply["error"], reply
    reply = tc.query_status(daemon.status_socket, "frobnicate")
    assert reply == {"ok": False, "error": "unknown command 'frobnicate'"}
    reply = tc.query_status(daemon.status_socket, "stop")
    assert reply["ok"] is True, reply
    assert daemon.proc.wait(5) == 0
    assert not os.path.exists(daemon.status_socket)
    assert not (tmp_path / "tftpd0.pid").exists()


def test_bare_status_line_is_accepted(tftpd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(tftpd.status_socket)
        sock.sendall(b"status\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        reply = json.loads(data)
        sock.sendall(b"{not json\n")
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(65536)
    assert reply["ok"] is True and reply["daemon"] == "tftpd"
    assert reply["service"] == "Preboot TFTP Service" and reply["pid"] == tftpd.pid
    assert json.loads(data) == {"ok": False, "error": "request is not valid JSON"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_control_verbs_need_root(tftpd_factory):
    folder = Path(tempfile.mkdtemp(prefix="pbtest-status-"))
    try:
        folder.chmod(0o755)
        daemon = tftpd_factory(StatusSocket=str(folder / "tftpd.sock"))
        script = (
            "import json, socket, sys\n"
            "out = []\n"
            "for verb in ('status', 'stop', 'reload'):\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5)\n"
            "    s.connect(sys.argv[1]); s.sendall(json.dumps({'cmd': verb}).encode() + b'\\n')\n"
            "    data = b''\n"
            "    while not data.endswith(b'\\n'): data += s.recv(65536)\n"
            "    out.append(json.loads(data)); s.close()\n"
            "print(json.dumps(out))\n")
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        result = subprocess.run([python, "-c", script, str(folder / "tftpd.sock")],
                                user=65534, group=65534, capture_output=True, text=True,
                                timeout=30, cwd="/")
        assert result.returncode == 0, result.stderr
        status, stop, reload = json.loads(result.stdout)
        assert status["ok"] is True
        assert stop == {"ok": False, "error": "permission denied: control needs root"}
        assert reload == {"ok": False, "error": "permission denied: control needs root"}
        assert daemon.proc.poll() is None
        daemon.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the read-only TCP status port --------------------------------------------------------------

def test_tcp_status_port_is_read_only(tftpd_factory):
    status_port = free_tcp_port()
    daemon = tftpd_factory(StatusPort=status_port)
    reply = query_tcp(tc.HOST, status_port, "status")
    assert reply["ok"] is True and reply["daemon"] == "tftpd"
    # what only the local socket says: which process, which release, which config file
    assert not {"pid", "version", "config"} & set(reply), reply
    assert daemon.status()["pid"] == daemon.pid
    assert "transfers_completed" in reply["counters"]
    for verb in ("stop", "reload"):
        assert query_tcp(tc.HOST, status_port, verb) == {"ok": False,
                                                         "error": "read-only status port"}
    assert daemon.proc.poll() is None
    assert daemon.status()["ok"] is True


def test_listens_only_on_the_configured_address(tftpd_factory, tftp_root):
    """Nothing listens beyond what its config names: every inet socket is on 127.0.0.1."""
    psutil = pytest.importorskip("psutil")
    status_port = free_tcp_port()
    daemon = tftpd_factory(StatusPort=status_port)
    port = daemon.port
    sockets = psutil.Process(daemon.pid).net_connections(kind="inet")
    listening = {(s.type, s.laddr.ip, s.laddr.port) for s in sockets}
    assert listening == {(socket.SOCK_DGRAM, "127.0.0.1", port),
                         (socket.SOCK_STREAM, "127.0.0.1", status_port)}, listening


def test_status_socket_survives_abuse(tftpd):
    """A request line beyond every limit, and a client that never finishes its line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(tftpd.status_socket)
        sock.sendall(b"x" * 5000 + b"\n")
        assert json.loads(sock.recv(65536)) == {"ok": False, "error": "request too long"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(tftpd.status_socket)
        try:
            sock.sendall(b"y" * 200_000)            # no newline, beyond the stream limit
            while sock.recv(65536):                 # the daemon hangs up (no reply owed)
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(tftpd.status_socket)      # silent: must not block other clients
            assert tftpd.status()["ok"] is True
    assert tftpd.proc.poll() is None


def test_sighup_storm(tftpd_factory, tftp_root):
    (tftp_root / "f.bin").write_bytes(b"still here\n")
    daemon = tftpd_factory()
    for _ in range(25):                     # pending signals coalesce: at least one reload
        daemon.signal(signal.SIGHUP)
    tc.wait_until(lambda: daemon.log().count("configuration reloaded") >= 1, 20,
                  what="a reload")
    assert daemon.proc.poll() is None
    assert daemon.status()["ok"] is True
    done = daemon.log().count("configuration reloaded")
    time.sleep(0.5)
    daemon.signal(signal.SIGHUP)
    tc.wait_until(lambda: daemon.log().count("configuration reloaded") > done, 20,
                  what="a reload after the storm")
    with RawClient(daemon.port) as client:
        assert client.download("f.bin") == b"still here\n"


def test_config_with_byte_order_mark_and_crlf(tmp_path, tftp_root):
    config = tmp_path / "tftpd.conf"
    text = "\r\n".join(base_lines(tmp_path, tftp_root)) + "\r\n"
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = run_tftpd("--check", "--config", str(config))
    assert result.returncode == 0, result.stderr


# ---- SIGTERM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_and_cleans_up(tftpd_factory, tmp_path, signum):
    daemon = tftpd_factory()
    pidfile = tmp_path / "tftpd0.pid"
    assert pidfile.read_text().strip() == str(daemon.pid)
    daemon.signal(signum)
    assert daemon.proc.wait(5) == 0
    assert not os.path.exists(daemon.status_socket)
    assert not pidfile.exists()
    assert "stopped" in daemon.log()


def test_sigterm_aborts_transfers_with_an_error(tftpd_factory, tftp_root, tmp_path):
    (tftp_root / "big.bin").write_bytes(os.urandom(100_000))
    daemon = tftpd_factory(AllowWrite=True, Timeout=30)
    port = daemon.port
    with RawClient(port) as reader, RawClient(port) as writer:
        reader.rrq("big.bin")
        reader.expect(OP_DATA, block=1)
        writer.wrq("upload/partial.bin")
        writer.expect(tc.OP_ACK, block=0)
        writer.send_tid(tc.data(1, os.urandom(512)))
        writer.expect(tc.OP_ACK, block=1)
        assert daemon.counters()["active_transfers"] == 2
        assert len(os.listdir(tftp_root / "upload")) == 1          # the temporary file
        daemon.signal(signal.SIGTERM)
        for client in (reader, writer):
            packets = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                packet = client.recv(deadline - time.monotonic())
                if packet is None:
                    break
                packets.append(packet)
                if packet.opcode == OP_ERROR:
                    break
            errors = [p for p in packets if p.opcode == OP_ERROR]
            assert errors, f"no ERROR at shutdown: {packets}"
            assert errors[0].code == 0 and "shutting down" in errors[0].message, errors[0]
    assert daemon.proc.wait(5) == 0
    assert os.listdir(tftp_root / "upload") == [], "the interrupted upload left a file"
    assert not os.path.exists(daemon.status_socket)


@pytest.mark.slow
def test_sigterm_during_real_client_downloads(tftpd_factory, tftp_root, tmp_path):
    tc.make_file(tftp_root / "big.bin", 64 * 1024 * 1024)
    daemon = tftpd_factory()
    procs = [subprocess.Popen(tc.curl_get_cmd(daemon.port, "big.bin", tmp_path / f"{n}.out",
                                              no_options=True),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n in range(5)]
    try:
        tc.wait_counters(daemon, lambda c: c["active_transfers"] == 5, what="5 transfers")
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(5) == 0
        assert time.monotonic() - t0 < 5
        for proc in procs:
            _, stderr = proc.communicate(timeout=30)
            assert proc.returncode != 0, "a client thinks it got the whole file"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- the pidfile lock -------------------------------------------------------------------------

def test_second_instance_with_the_same_pidfile_exits_1(tftpd_factory, tmp_path, tftp_root):
    first = tftpd_factory()
    pidfile = tmp_path / "tftpd0.pid"
    config = tc.write_config(tmp_path / "second.conf", tc.daemon_config(
        tmp_path, tftp_root, "second", PidFile=str(pidfile)))
    result = run_tftpd("--foreground", "--config", str(config))
    assert result.returncode == 1, result
    assert "already running" in result.stderr and f"pid {first.pid}" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert not (tmp_path / "second.sock").exists()
    assert first.proc.poll() is None
    assert pidfile.read_text().strip() == str(first.pid)
    assert first.status()["ok"] is True


def test_second_instance_on_the_same_status_socket_exits_1(tftpd_factory, tmp_path, tftp_root):
    first = tftpd_factory()
    config = tc.write_config(tmp_path / "second.conf", tc.daemon_config(
        tmp_path, tftp_root, "second", StatusSocket=first.status_socket))
    result = run_tftpd("--foreground", "--config", str(config))
    assert result.returncode == 1, result
    assert "in use" in result.stderr and "Traceback" not in result.stderr
    assert first.status()["ok"] is True            # its socket was not unlinked
    assert not (tmp_path / "second.pid").exists()


def test_status_port_in_use_exits_1(tftpd_factory, tmp_path, tftp_root):
    with socket.socket() as holder:
        holder.bind((tc.HOST, 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        config = tc.write_config(tmp_path / "second.conf", tc.daemon_config(
            tmp_path, tftp_root, "second", StatusPort=taken))
        result = run_tftpd("--foreground", "--config", str(config))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"{PROGRAM}: cannot bind") and "Traceback" not in result.stderr
    assert not (tmp_path / "second.pid").exists() and not (tmp_path / "second.sock").exists()


def test_stale_pidfile_is_taken_over(tftpd_factory, tmp_path):
    (tmp_path / "tftpd0.pid").write_text("999999\n")
    daemon = tftpd_factory()
    assert (tmp_path / "tftpd0.pid").read_text().strip() == str(daemon.pid)


def test_port_in_use_exits_1(tftpd_factory, tmp_path, tftp_root):
    (tftp_root / "f.bin").write_bytes(b"served\n")
    first = tftpd_factory()
    config = tc.write_config(tmp_path / "second.conf", tc.daemon_config(
        tmp_path, tftp_root, "second", Port=first.port))
    env = dict(os.environ, PYTHONPATH=str(tc.REPO))
    second = subprocess.Popen([sys.executable, "-m", "tftpd", "--foreground", "--config",
                               str(config)], cwd=str(tc.REPO), env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        second_sock = str(tmp_path / "second.sock")
        tc.wait_until(lambda: second.poll() is not None or _status_or_none(second_sock), 15,
                      what="the second instance to exit or to serve")
        if second.poll() is None:
            with RawClient(first.port) as client:
                client.download("f.bin")
            stolen = first.counters()["requests_read"] == 0
            pytest.fail("a second instance is serving the same UDP port"
                        + (" and took the request away from the first" if stolen else ""))
        stderr = second.stderr.read()
        assert second.returncode == 1, stderr
        assert "cannot bind" in stderr and "Traceback" not in stderr
        assert not (tmp_path / "second.pid").exists() and not (tmp_path / "second.sock").exists()
        assert first.status()["ok"] is True
    finally:
        if second.poll() is None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(10)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()


# ---- detached (no --foreground) ----------------------------------------------------------------

def test_detached_daemon_writes_its_pidfile_and_stops_on_sigterm(tmp_path, tftp_root):
    (tftp_root / "hello.txt").write_bytes(b"hello\n")
    values = tc.daemon_config(tmp_path, tftp_root, "detached")
    config = tc.write_config(tmp_path / "detached.conf", values)
    result = run_tftpd("--config", str(config))
    assert result.returncode == 0, result.stderr
    pidfile = Path(values["PidFile"])
    pid = 0
    try:
        pid = int(tc.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                                what="the pidfile"))
        status = tc.wait_until(lambda: _status_or_none(values["StatusSocket"]), 10,
                               what="the detached daemon's status socket")
        assert status["pid"] == pid and pid_alive(pid)
        with RawClient(status["listen"][0]["port"]) as client:
            assert client.download("hello.txt") == b"hello\n"
        os.kill(pid, signal.SIGTERM)
        tc.wait_until(lambda: not pid_alive(pid), 5, what="the detached daemon to exit")
        assert not pidfile.exists()
        assert not os.path.exists(values["StatusSocket"])
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _status_or_none(path: str):
    try:
        return tc.query_status(path, timeout_s=1)
    except (OSError, ValueError):
        return None
