"""The lab (namespaces) and the two stacks under test.

Lab: per measured run, a server namespace and a client namespace joined by a veth pair, made
for the run and deleted after it (also after a failure or Ctrl-C):

    [bst-srv-TAG] bssTAG 10.78.0.1/16  <==veth==>  bscTAG 10.78.0.2/16 + one address per
                                                   client, 10.78.1.1 ... [bst-cli-TAG]

Broadcasts stay on that pair; nothing is configured in the bench's own namespace.

Stacks (every process started inside the server namespace, in the stack's own CPU cgroup, in
its own session, and stopped by its pid):

ours   python3 -m proxydhcpd / tftpd / prebootpolicyd --foreground from this checkout, LogLevel
       WARNING. proxydhcpd: BootFileBIOS undionly.kpxe, BootFileUEFI64 ipxe.efi (UEFI goes
       through port 4011, UEFIVia4011 default), IPXEScriptURL http://{server}:8090/boot.ipxe;
       tftpd: the served root on 10.78.0.1:69; policyd on 10.78.0.1:8090 with an SQLite
       directory holding one rule (every pcbios or efi machine: restore images/bench.img, no
       menu), so every answer names the imaging kernel and initrd; ImagingKernel/ImagingInitrd
       are policyd's defaults unless --ours-kernel-url/--ours-initrd-url are given.
peer   dnsmasq in proxy mode with its TFTP server (one process) and nginx (master + `auto`
       workers, sendfile on, no access log) serving the same root over HTTP, with a static
       boot.ipxe that names the kernel and initrd (over HTTP from nginx, or with
       --peer-files tftp from dnsmasq's TFTP).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from proxylib.netns import NETNS_DIR, NetnsError, enter
from tftplib.cpu import Meter, PsutilMeter

SERVER_ADDR = "10.78.0.1"
CLIENT_ADDR = "10.78.0.2"
NET = "10.78.0.0"
PREFIX = 16
HTTP_PORT_OURS = 8090
HTTP_PORT_PEER = 80


def _ip(*args: str, input_text: str | None = None, check: bool = True):
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60,
                         input=input_text)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def client_address(i: int) -> str:
    return f"10.78.{1 + i // 250}.{1 + i % 250}"


ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def allow_congestion_control(name: str, log: Callable[[str], None]) -> Callable[[], None]:
    """A namespace may only take as its default a congestion control the host allows
    (tcp_allowed_congestion_control, set in the host's namespace). Add NAME to that list for
    the bench's runs when it is missing; returns what puts the list back."""
    if name == "system":
        return lambda: None
    before = ALLOWED_CC.read_text().split()
    if name in before:
        return lambda: None
    ALLOWED_CC.write_text(" ".join(before + [name]))
    log(f"tcp_allowed_congestion_control: {' '.join(before)} -> + {name} for the runs")

    def restore() -> None:
        ALLOWED_CC.write_text(" ".join(before))
    return restore


def _sysctl(ns: str, key: str, value: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"sysctl {key}={value} in {ns}: {res.stderr.strip()}")


class Lab:
    def __init__(self, tag: str, clients: int, tcp_cc: str | None = None):
        self.tcp_cc = tcp_cc                # None: the namespaces keep the host's
        self.server_ns = f"bst-srv-{tag}"
        self.client_ns = f"bst-cli-{tag}"
        self.server_if = f"bss{tag}"[:15]
        self.client_if = f"bsc{tag}"[:15]
        self.server_addr = SERVER_ADDR
        self.clients = clients
        self._made: list[str] = []

    def create(self) -> None:
        try:
            for ns in (self.server_ns, self.client_ns):
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.server_if, "netns", self.server_ns, "type", "veth",
                "peer", "name", self.client_if, "netns", self.client_ns)
            for ns, ifname, addr in ((self.server_ns, self.server_if, SERVER_ADDR),
                                     (self.client_ns, self.client_if, CLIENT_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "brd", "+", "dev", ifname)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", ifname, "up")
                if self.tcp_cc:
                    _sysctl(ns, "net.ipv4.tcp_congestion_control", self.tcp_cc)
            # The clients' own addresses ("given by the site DHCP"); noprefixroute: the /16
            # route of the primary address covers them.
            batch = "".join(f"addr add {client_address(i)}/{PREFIX} dev {self.client_if} "
                            "noprefixroute\n" for i in range(self.clients))
            _ip("-n", self.client_ns, "-batch", "-", input_text=batch)
        except Exception:
            self.close()
            raise

    def close(self) -> list[str]:
        errors = []
        for ns in reversed(self._made):
            res = _ip("netns", "delete", ns, check=False)
            if res.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"ip netns delete {ns}: {res.stderr.strip()}")
        self._made.clear()
        return errors


class StackError(Exception):
    pass


def _tail(path: Path, n: int = 400) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip()[-n:].splitlines()[-4:])
    except OSError:
        return ""


def _listening(pid: int, proto: str, port: int) -> bool:
    """A socket on `port` in the namespace of `pid` (/proc/PID/net/udp or tcp, LISTEN for
    TCP)."""
    try:
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return False
    want = f":{port:04X}"
    for line in lines:
        f = line.split()
        if len(f) > 3 and f[1].endswith(want) and (proto == "udp" or f[3] == "0A"):
            return True
    return False


class Stack:
    name = "?"

    def __init__(self, workdir: Path, root: Path, lab: Lab, meter: Meter | None):
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.root = root
        self.lab = lab
        self.meter = meter or PsutilMeter()
        self.procs: dict[str, subprocess.Popen] = {}
        self.versions: dict[str, str] = {}
        self.commands: dict[str, list[str]] = {}
        self.config_notes: list[str] = []

    # -- processes --------------------------------------------------------------------------
    def spawn(self, key: str, argv: list[str], env: dict | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        ns, meter = self.lab.server_ns, self.meter

        def preexec() -> None:
            enter(ns)
            meter.preexec()

        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        err = open(self.workdir / f"{key}.stderr", "wb")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 env=full_env, cwd=cwd, start_new_session=True,
                                 preexec_fn=preexec)
        finally:
            err.close()
        self.procs[key] = p
        self.commands[key] = argv
        if isinstance(self.meter, PsutilMeter) and self.meter.proc is None:
            self.meter.attach(p.pid)
        return p

    def check_alive(self) -> None:
        for key, p in self.procs.items():
            if p.poll() is not None:
                raise StackError(f"{key} exited with status {p.returncode}: "
                                 f"{_tail(self.workdir / f'{key}.stderr') or '(no output)'}")

    def wait_ports(self, want: list[tuple[str, str, int]], timeout: float = 30.0) -> None:
        """Wait until each (process key, udp|tcp, port) is bound in the server namespace."""
        deadline = time.monotonic() + timeout
        missing = want
        while time.monotonic() < deadline:
            self.check_alive()
            missing = [(k, pr, port) for k, pr, port in want
                       if not _listening(self.procs[k].pid, pr, port)]
            if not missing:
                return
            time.sleep(0.2)
        raise StackError(f"not listening within {timeout:g} s: "
                         + ", ".join(f"{k} {pr}/{port}" for k, pr, port in missing))

    def pids(self) -> list[int]:
        out = []
        for p in self.procs.values():
            if p.poll() is None:
                out.append(p.pid)
                try:
                    out += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
                except psutil.Error:
                    pass
        return out

    def cpu_seconds(self) -> float | None:
        if not isinstance(self.meter, PsutilMeter):
            return self.meter.seconds()
        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def cpu_by_process(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds each started process and its children used so far, by
        key: where a stack's server CPU goes (psutil; a process already gone counts nothing)."""
        out = {}
        for key, p in self.procs.items():
            try:
                proc = psutil.Process(p.pid)
                times = [proc.cpu_times()] + [c.cpu_times()
                                              for c in proc.children(recursive=True)]
            except psutil.Error:
                continue
            out[key] = (sum(t.user for t in times), sum(t.system for t in times))
        return out

    def stop(self) -> None:
        for key, p in list(self.procs.items()):
            kids: list[psutil.Process] = []
            if p.poll() is None:
                try:
                    kids = psutil.Process(p.pid).children(recursive=True)
                except psutil.Error:
                    pass
                try:
                    os.kill(p.pid, signal.SIGTERM)
                    p.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
                except ProcessLookupError:
                    pass
            for k in kids:
                try:
                    if k.is_running():
                        k.kill()
                except psutil.Error:
                    pass

    def describe(self) -> dict:
        return {"name": self.name, "versions": self.versions, "commands": self.commands,
                "config": self.config_notes}


def write_conf(path: Path, values: dict) -> Path:
    path.write_text("# written by bench/run-bootstorm-bench\n"
                    + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


class Ours(Stack):
    name = "ours"

    def __init__(self, workdir, root, lab, meter, main_dir: Path, python: str,
                 kernel_url: str = "", initrd_url: str = "", policyd_workers: int = 0):
        super().__init__(workdir, root, lab, meter)
        self.main_dir = main_dir
        self.python = python
        self.kernel_url = kernel_url
        self.initrd_url = initrd_url
        self.policyd_workers = policyd_workers

    def _fill_directory(self, url: str) -> None:
        sys.path.insert(0, str(self.main_dir))
        from common.policy.directory import open_directory
        from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay,
                                         MenuSettings, Rule)
        rule = Rule.from_text("bench: every machine", "platform = pcbios or platform = efi",
                              Action(ActionKind.RESTORE, "images/bench.img"))
        with open_directory(url, "", timeout_s=30, create=True) as directory:
            directory.replace_policy(ImagingPolicy((rule,), MenuSettings(MenuDisplay.NEVER, 3)))

    def start(self) -> None:
        w = self.workdir
        env = {"PYTHONPATH": str(self.main_dir)}
        common = {"StatusPort": 0, "LogLevel": "WARNING"}
        directory = f"sqlite:///{w}/directory.db"
        self._fill_directory(directory)
        confs = {
            "proxydhcpd": {"Interfaces": self.lab.server_if, "BootFileBIOS": "undionly.kpxe",
                           "BootFileUEFI64": "ipxe.efi",
                           "IPXEScriptURL": f"http://{{server}}:{HTTP_PORT_OURS}/boot.ipxe"},
            "tftpd": {"IPAddress": SERVER_ADDR, "Port": 69, "Root": self.root},
            "prebootpolicyd": {"IPAddress": SERVER_ADDR, "Port": HTTP_PORT_OURS,
                               "Directory": directory, "DirectoryTimeout": 10,
                               "TokenKeyFile": w / "imaging.key",
                               # the big files over HTTP from the same folder tftpd serves
                               "BootFilesRoot": self.root},
        }
        if self.kernel_url:
            confs["prebootpolicyd"]["ImagingKernel"] = self.kernel_url
        if self.initrd_url:
            confs["prebootpolicyd"]["ImagingInitrd"] = self.initrd_url
        if self.policyd_workers:
            confs["prebootpolicyd"]["Workers"] = self.policyd_workers
        for mod, values in confs.items():
            values.update(common)
            values.update({"StatusSocket": w / f"{mod}.sock", "PidFile": w / f"{mod}.pid",
                           "LogFile": w / f"{mod}.log"})
            conf = write_conf(w / f"{mod}.conf", values)
            self.config_notes.append(f"{mod}: " + ", ".join(
                f"{k}={v}" for k, v in values.items()
                if k not in ("StatusSocket", "PidFile", "LogFile", "StatusPort")))
            self.spawn(mod, [self.python, "-m", mod, "--foreground", "--config", str(conf)],
                       env=env, cwd=str(self.main_dir))
        self.wait_ports([("proxydhcpd", "udp", 67), ("proxydhcpd", "udp", 4011),
                         ("tftpd", "udp", 69), ("prebootpolicyd", "tcp", HTTP_PORT_OURS)])
        self._versions()

    def _versions(self) -> None:
        from common.daemon.statussock import query_unix
        py = subprocess.run([self.python, "--version"], capture_output=True, text=True
                            ).stdout.strip()
        for mod in self.procs:
            try:
                st = query_unix(str(self.workdir / f"{mod}.sock"), timeout_s=3)
                self.versions[mod] = f"{mod} {st.get('version', '?')}"
            except (OSError, ValueError) as exc:
                self.versions[mod] = f"{mod} ? ({exc})"
        self.versions["python"] = py
        head = subprocess.run(["git", "-C", str(self.main_dir), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(self.main_dir), "status", "--porcelain", "--",
                                "proxydhcpd", "tftpd", "prebootpolicyd", "common"],
                               capture_output=True, text=True).stdout.strip()
        self.versions["source"] = f"git {head}" + (" + local changes" if dirty else "")


class Peer(Stack):
    name = "peer"

    def __init__(self, workdir, root, lab, meter, files_via: str, tftp_max: int):
        super().__init__(workdir, root, lab, meter)
        self.files_via = files_via
        self.tftp_max = tftp_max

    def script(self) -> str:
        if self.files_via == "tftp":
            base = f"tftp://{SERVER_ADDR}"
        else:
            base = f"http://{SERVER_ADDR}"
        return ("#!ipxe\n"
                "echo preboot-answer: imaging (peer stack: a static script)\n"
                f"kernel {base}/preboot/linux initrd=initrd console=ttyS0 quiet || goto failed\n"
                f"initrd --name initrd {base}/preboot/initrd || goto failed\n"
                "boot || goto failed\n"
                ":failed\n"
                "exit\n")

    def start(self) -> None:
        w = self.workdir
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        for b in (dnsmasq, nginx):
            if not os.access(b, os.X_OK):
                raise StackError(f"{b} not installed")
        (self.root / "boot.ipxe").write_text(self.script())
        os.chmod(self.root / "boot.ipxe", 0o644)
        script_url = f"http://{SERVER_ADDR}/boot.ipxe"
        argv = [dnsmasq, "--port=0", "--conf-file=/dev/null", "--keep-in-foreground",
                "--no-hosts", "--no-resolv", "--bind-interfaces",
                f"--interface={self.lab.server_if}",
                f"--dhcp-range={NET},proxy,255.255.0.0",
                "--dhcp-userclass=set:ipxe,iPXE",
                '--pxe-service=tag:!ipxe,x86PC,"Network boot",undionly.kpxe',
                '--pxe-service=tag:!ipxe,X86-64_EFI,"Network boot",ipxe.efi',
                f'--pxe-service=tag:ipxe,x86PC,"iPXE",{script_url}',
                f'--pxe-service=tag:ipxe,X86-64_EFI,"iPXE",{script_url}',
                "--enable-tftp", f"--tftp-root={self.root}", f"--tftp-max={self.tftp_max}",
                f"--pid-file={w / 'dnsmasq.pid'}", f"--dhcp-leasefile={w / 'dnsmasq.leases'}",
                f"--log-facility={w / 'dnsmasq.log'}", "--quiet-dhcp", "--quiet-tftp"]
        self.spawn("dnsmasq", argv)
        conf = w / "nginx.conf"
        for d in ("tmp",):
            (w / d).mkdir(exist_ok=True)
        conf.write_text(f"""# written by bench/run-bootstorm-bench
worker_processes auto;
pid {w / 'nginx.pid'};
error_log {w / 'nginx-error.log'} warn;
daemon off;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {w / 'tmp'};
    proxy_temp_path {w / 'tmp'};
    fastcgi_temp_path {w / 'tmp'};
    uwsgi_temp_path {w / 'tmp'};
    scgi_temp_path {w / 'tmp'};
    server {{
        listen {SERVER_ADDR}:{HTTP_PORT_PEER} backlog=4096;
        root {self.root};
    }}
}}
""")
        self.spawn("nginx", [nginx, "-e", str(w / "nginx-error.log"), "-c", str(conf)])
        self.config_notes.append("dnsmasq: " + " ".join(argv[1:]))
        self.config_notes.append("nginx: worker_processes auto, sendfile on, tcp_nopush on, "
                                 "access_log off, backlog 4096; static boot.ipxe: "
                                 + self.script().replace("\n", " / "))
        self.wait_ports([("dnsmasq", "udp", 67), ("dnsmasq", "udp", 4011),
                         ("dnsmasq", "udp", 69), ("nginx", "tcp", HTTP_PORT_PEER)])
        out = subprocess.run([dnsmasq, "--version"], capture_output=True, text=True).stdout
        self.versions["dnsmasq"] = out.splitlines()[0].split("  ")[0].strip() if out else "?"
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        self.versions["nginx"] = out.replace("nginx version: ", "")
