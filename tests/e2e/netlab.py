"""A small network lab for end-to-end tests: namespaces, links, site services, daemons, qemu.

Everything a test builds lives inside network namespaces that the test creates and deletes, so no
address used here (192.168.77.0/24 by default) ever exists on the host. A `Lab` owns what it makes:
`Lab.close()` stops every process it started (by PID, SIGTERM then SIGKILL) and deletes every
namespace it created, in reverse order, even after a failure half-way through a setup.

Typical use (see conftest.py and test_pxe_tftp.py)::

    with Lab(workdir) as lab:
        topo = build_pxe_topology(lab)                      # server + site-DHCP namespaces, bridge
        start_site_dhcp(lab, topo.dhcp_ns, topo.dhcp_iface, SiteDhcp(..., boot=BootRules(...)))
        start_radvd(lab, topo.srv_ns, topo.bridge)          # iPXE skips its 13 s IPv6 wait
        daemon = start_preboot_daemon(lab, topo.srv_ns, "tftpd", {...})
        result = boot_vm(lab, topo.srv_ns, VmSpec("bios"), marker=r"PREBOOT-E2E-OK \\w+")

Later tests reuse the pieces: a proxyDHCP test passes `boot=None` (pool only) and starts
proxydhcpd in the server namespace; a relay test makes a router namespace with two bridges;
several VMs each get their own tap from `add_tap` and their own `VmSpec(tap=..., mac=...)`.

ProxyDHCP labs (test_pxe_proxydhcp.py, capture_golden.py) use `build_proxy_lab`: the `flat`,
`colocated` (site DHCP beside our daemons, option 60 PXEClient) or `relay` (`build_relay_topology`
+ `start_dhcp_relay`) layout with our proxydhcpd and tftpd (`start_boot_services`) and tcpdump
captures of the DHCP traffic (`start_tcpdump`, decoded for failure messages by
`summarize_dhcp_pcap`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot on, with Microsoft's keys enrolled (Debian's ovmf): shim is signed by their CA
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_MS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")

Firmware = Literal["bios", "uefi", "uefi-secboot"]

_ANSI_RE = re.compile(rb"\x1b\[[0-9;?=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78cDEHM]|\x08 \x08|\x08")


# --------------------------------------------------------------------------------------------
# prerequisites


def missing_prerequisites(
    tools: Iterable[str] = ("ip", "qemu-system-x86_64", "dnsmasq"),
    files: Iterable[Path] = (),
) -> list[str]:
    """What this machine lacks to run a lab: root, /dev/net/tun, the tools and files named.

    Returns human-readable reasons (empty when everything is there), for `pytest.skip`.
    """
    reasons: list[str] = []
    if os.geteuid() != 0:
        reasons.append("needs root (network namespaces, tap devices, port 69)")
    if not Path("/dev/net/tun").exists():
        reasons.append("no /dev/net/tun (tap devices)")
    for tool in tools:
        if shutil.which(tool) is None:
            reasons.append(f"{tool} not installed")
    for path in files:
        if not Path(path).exists():
            reasons.append(f"{path} missing")
    return reasons


def firmware_files(firmware: Firmware) -> list[Path]:
    """Files a VM with this firmware needs on the host (besides qemu's own BIOS and NIC ROMs)."""
    if firmware == "uefi":
        return [OVMF_CODE, OVMF_VARS]
    if firmware == "uefi-secboot":
        return [OVMF_CODE_SECBOOT, OVMF_VARS_MS]
    return []


# --------------------------------------------------------------------------------------------
# small utilities


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (returns True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_text(path: Path, strip_ansi: bool = True) -> str:
    """A log file as text ('' if absent); console escape sequences and CRs removed by default."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    if strip_ansi:
        data = _ANSI_RE.sub(b"", data).replace(b"\r", b"")
    return data.decode("utf-8", errors="replace")


def tail(path: Path, lines: int = 40, strip_ansi: bool = True) -> str:
    """The last `lines` lines of a log file, or a note that it is missing or empty."""
    text = read_text(path, strip_ansi)
    if not text.strip():
        return f"<{path}: missing or empty>"
    return "\n".join(text.splitlines()[-lines:])


def run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing output; raise with its stderr when `check` and it fails."""
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr.strip()}"
        )
    return proc


def unique_prefix(tag: str = "pe2e") -> str:
    """A name prefix unique to this process and call, e.g. 'pe2e-4242-a1b2'."""
    return f"{tag}-{os.getpid()}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------------------------
# processes and namespaces


@dataclass
class Proc:
    """A process the lab started; `log` receives its stdout and stderr."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status (None if unknown)."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    return None
            except ProcessLookupError:
                pass
        return self.popen.returncode


@dataclass(frozen=True)
class Netns:
    """A network namespace by name; commands run in it through `ip netns exec`."""

    name: str

    def cmd(self, args: Sequence[str]) -> list[str]:
        """`args` prefixed so they run inside this namespace (ip netns exec keeps the PID)."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(args), check=check)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NAME ARGS...`"""
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])


class Lab:
    """Owner of namespaces and processes made for one test; `close()` (or `with`) undoes all.

    `workdir` receives logs and generated configs. Namespace names get a per-run unique prefix so
    parallel or crashed runs never collide.
    """

    def __init__(self, workdir: Path, prefix: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or unique_prefix()
        self.namespaces: list[Netns] = []
        self.procs: list[Proc] = []
        self.exit_codes: dict[str, int | None] = {}
        self._cleanups: list[Callable[[], None]] = []

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        """Create namespace '<prefix>-<role>' with loopback up."""
        ns = Netns(f"{self.prefix}-{role}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def spawn(
        self,
        name: str,
        ns: Netns | None,
        args: Sequence[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start `args` (inside `ns` if given) with output to '<workdir>/<name>.out'."""
        log = self.workdir / f"{name}.out"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ns.cmd(args) if ns else list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> int | None:
        """Stop one of our processes now (and remember its exit status)."""
        code = proc.stop(timeout)
        self.exit_codes[proc.name] = code
        return code

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` at close, before namespaces are deleted (after processes are stopped)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Stop processes (newest first), run cleanups, delete namespaces. Never raises."""
        for proc in reversed(self.procs):
            try:
                self.exit_codes.setdefault(proc.name, proc.stop())
            except Exception as exc:  # keep cleaning up
                print(f"netlab: stopping {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)
        self.procs.clear()
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:
                print(f"netlab: cleanup: {exc}", file=sys.stderr)
        self._cleanups.clear()
        for ns in reversed(self.namespaces):
            proc = run(["ip", "netns", "del", ns.name], check=False)
            if proc.returncode != 0:
                print(f"netlab: ip netns del {ns.name}: {proc.stderr.strip()}", file=sys.stderr)
        self.namespaces.clear()


# --------------------------------------------------------------------------------------------
# links


def add_bridge(ns: Netns, name: str, cidr: str | None = None) -> None:
    """A bridge without STP or forwarding delay (ports forward at once), optionally addressed."""
    ns.ip("link", "add", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    if cidr:
        ns.ip("addr", "add", cidr, "dev", name)
    ns.ip("link", "set", name, "up")


def add_tap(ns: Netns, name: str, bridge: str | None = None) -> None:
    """A tap device for qemu (`-netdev tap,ifname=NAME`), enslaved to `bridge` if given."""
    ns.ip("tuntap", "add", "dev", name, "mode", "tap")
    if bridge:
        ns.ip("link", "set", name, "master", bridge)
    ns.ip("link", "set", name, "up")


def add_veth(
    ns_a: Netns,
    name_a: str,
    ns_b: Netns,
    name_b: str,
    bridge_a: str | None = None,
    cidr_a: str | None = None,
    cidr_b: str | None = None,
) -> None:
    """A veth pair between two namespaces; end A optionally joins `bridge_a`, ends get addresses."""
    ns_a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b)
    ns_a.ip("link", "set", name_b, "netns", ns_b.name)
    if bridge_a:
        ns_a.ip("link", "set", name_a, "master", bridge_a)
    if cidr_a:
        ns_a.ip("addr", "add", cidr_a, "dev", name_a)
    if cidr_b:
        ns_b.ip("addr", "add", cidr_b, "dev", name_b)
    ns_a.ip("link", "set", name_a, "up")
    ns_b.ip("link", "set", name_b, "up")


@dataclass(frozen=True)
class PxeTopology:
    """Server namespace (bridge with the boot servers and the VM taps) + site-DHCP namespace.

    ::

        [dhcp_ns] dhcp_iface dhcp_ip ── veth ──┐
        [srv_ns ] bridge srv_ip  ──────────────┴── tap0 ── qemu
    """

    srv_ns: Netns
    dhcp_ns: Netns
    bridge: str
    dhcp_iface: str
    tap: str
    network: ipaddress.IPv4Network
    srv_ip: str
    dhcp_ip: str


def build_pxe_topology(
    lab: Lab,
    network: str = "192.168.77.0/24",
    srv_host: int = 2,
    dhcp_host: int = 1,
    tap: str = "tap0",
) -> PxeTopology:
    """Make the two namespaces, the bridge and one tap; addresses are hosts of `network`."""
    net = ipaddress.ip_network(network)
    srv_ip, dhcp_ip = str(net[srv_host]), str(net[dhcp_host])
    srv = lab.netns("srv")
    dhcp = lab.netns("dhcp")
    # No duplicate address detection: link-local addresses usable at once (radvd needs one).
    for ns in (srv, dhcp):
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
    add_bridge(srv, "br0", f"{srv_ip}/{net.prefixlen}")
    add_tap(srv, tap, "br0")
    add_veth(srv, "vsite-br", dhcp, "vsite", bridge_a="br0", cidr_b=f"{dhcp_ip}/{net.prefixlen}")
    return PxeTopology(srv, dhcp, "br0", "vsite", tap, net, srv_ip, dhcp_ip)


def udp_listening(ns: Netns, port: int) -> bool:
    """Whether something in `ns` has a UDP socket bound to `port`."""
    return bool(ns.run(["ss", "-Hnlu", f"sport = :{port}"], check=False).stdout.strip())


# --------------------------------------------------------------------------------------------
# site services: DHCP (dnsmasq, DHCP only) and IPv6 router advertisements (radvd)


@dataclass(frozen=True)
class BootRules:
    """What a plain DHCP server says about booting: next-server (siaddr) and a file per client.

    iPXE announces itself with user class "iPXE" (option 77) and gets `ipxe_file`; other clients
    get a first stage by architecture (option 93): x86-64/EFI-BC UEFI `efi_file`, BIOS `bios_file`.
    """

    next_server: str
    ipxe_file: str = "boot.ipxe"
    bios_file: str = "undionly.kpxe"
    efi_file: str = "ipxe.efi"


@dataclass(frozen=True)
class SiteDhcp:
    """A plain DHCP server's pool; `boot=None` gives addresses only (for a proxyDHCP to add PXE)."""

    range_start: str
    range_end: str
    netmask: str = "255.255.255.0"
    lease: str = "1h"
    boot: BootRules | None = None
    extra: tuple[str, ...] = ()


def dnsmasq_dhcp_conf(iface: str, site: SiteDhcp, workdir: Path, name: str) -> str:
    """dnsmasq config text: DHCP only (port=0: no DNS; no enable-tftp: no TFTP), verbose log."""
    lines = [
        "port=0",
        "user=root",
        "group=root",
        f"interface={iface}",
        "bind-interfaces",
        "dhcp-authoritative",
        "log-dhcp",
        f"log-facility={workdir / (name + '.log')}",
        f"dhcp-leasefile={workdir / (name + '.leases')}",
        f"pid-file={workdir / (name + '.pid')}",
        f"dhcp-range={site.range_start},{site.range_end},{site.netmask},{site.lease}",
    ]
    if site.boot:
        b = site.boot
        lines += [
            "dhcp-userclass=set:ipxe,iPXE",
            "dhcp-match=set:efi64,option:client-arch,7",
            "dhcp-match=set:efi64,option:client-arch,9",
            # mutually exclusive tags: the order of dhcp-boot lines does not matter
            f"dhcp-boot=tag:ipxe,{b.ipxe_file},,{b.next_server}",
            f"dhcp-boot=tag:!ipxe,tag:efi64,{b.efi_file},,{b.next_server}",
            f"dhcp-boot=tag:!ipxe,tag:!efi64,{b.bios_file},,{b.next_server}",
        ]
    lines += list(site.extra)
    return "\n".join(lines) + "\n"


def start_site_dhcp(lab: Lab, ns: Netns, iface: str, site: SiteDhcp, name: str = "dnsmasq") -> Proc:
    """Start dnsmasq as the site DHCP server on `iface`; log in '<workdir>/<name>.log'.

    Returns once dnsmasq holds UDP port 67 (or raises with its output).
    """
    conf = lab.workdir / f"{name}.conf"
    conf.write_text(dnsmasq_dhcp_conf(iface, site, lab.workdir, name))
    proc = lab.spawn(name, ns, ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"])
    if not wait_for(lambda: not proc.alive() or udp_listening(ns, 67), 10):
        raise RuntimeError(f"dnsmasq did not bind port 67:\n{tail(proc.log)}")
    if not proc.alive():
        raise RuntimeError(f"dnsmasq exited ({proc.popen.returncode}):\n{tail(proc.log)}")
    return proc


def start_radvd(lab: Lab, ns: Netns, iface: str, name: str = "radvd") -> Proc | None:
    """Router advertisements on `iface` (no prefix, no default route) so iPXE's IPv6
    autoconfiguration ends at once instead of after ~13 s. Returns None if radvd is missing."""
    if shutil.which("radvd") is None:
        return None
    ns.sysctl("net.ipv6.conf.all.forwarding", 1)  # radvd refuses to advertise otherwise
    conf = lab.workdir / f"{name}.conf"
    conf.write_text(
        f"interface {iface} {{\n AdvSendAdvert on;\n MinRtrAdvInterval 3;\n"
        f" MaxRtrAdvInterval 10;\n AdvDefaultLifetime 0;\n}};\n"
    )
    return lab.spawn(
        name,
        ns,
        ["radvd", "-n", "-C", str(conf), "-p", str(lab.workdir / f"{name}.pid"),
         "-m", "logfile", "-l", str(lab.workdir / f"{name}.log")],
    )


# --------------------------------------------------------------------------------------------
# our daemons


def status_query(sock_path: Path, request: Mapping[str, object] | None = None,
                 timeout: float = 5.0) -> dict:
    """One request/response on a daemon's Unix status socket (contract: one JSON line each way)."""
    payload = (json.dumps(request or {"cmd": "status"}) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(payload)
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


@dataclass
class Daemon:
    """One of our daemons running in the lab: its process, config, status socket and log."""

    package: str
    proc: Proc
    config: Path
    status_socket: Path
    pid_file: Path
    log: Path

    def status(self) -> dict:
        return status_query(self.status_socket)

    def counters(self) -> dict:
        return dict(self.status().get("counters", {}))

    def wait_counters(self, predicate: Callable[[dict], bool], timeout: float = 5.0) -> dict:
        """Poll the counters until `predicate(counters)` holds or `timeout` s pass; returns the
        last counters read (a client may finish before the server has counted its last ACK)."""
        last: dict = {}

        def check() -> bool:
            nonlocal last
            last = self.counters()
            return predicate(last)

        wait_for(check, timeout, 0.1)
        return last


TFTP_SETTLE_S = 20.0     # tftpd's Timeout x Retries (1 s x 6, with back-off) and some slack


def tftp_delivered(counters: Mapping[str, object]) -> int:
    """Transfers tftpd sent whole: completed, or every block sent and only the final ACK
    missing (transfers_unconfirmed). A client that has its file may exit without repeating a
    lost final ACK (RFC 1350 section 6); iPXE sometimes does, and the console shows the file
    arrived, so both count as delivered."""
    return int(counters.get("transfers_completed", 0)) + \
        int(counters.get("transfers_unconfirmed", 0))


def write_config(path: Path, settings: Mapping[str, object]) -> Path:
    """A `Key = Value` config file from a mapping (bools as YES/NO)."""
    def fmt(v: object) -> str:
        return ("YES" if v else "NO") if isinstance(v, bool) else str(v)

    path.write_text("".join(f"{k} = {fmt(v)}\n" for k, v in settings.items()))
    return path


def start_preboot_daemon(
    lab: Lab,
    ns: Netns,
    package: str,
    settings: Mapping[str, object],
    ready_timeout: float = 20.0,
) -> Daemon:
    """Run `python -m <package> --config F --foreground` from the repo root inside `ns`.

    StatusSocket, PidFile and LogFile default to files in the lab's workdir; StatusPort to 0.
    Ready when the status socket answers {"ok": true} (the contract's ready handshake); raises
    with the daemon's output and log if it exits or does not get ready in `ready_timeout` s.
    """
    wd = lab.workdir
    conf_settings: dict[str, object] = {
        "StatusSocket": wd / f"{package}.sock",
        "PidFile": wd / f"{package}.pid",
        "StatusPort": 0,
        "LogLevel": "DEBUG",
        "LogFile": wd / f"{package}.log",
    }
    if package in ("prebootpolicyd", "imgsrvd"):
        # one capability key per lab: policyd issues, imgsrvd checks (docs/security.md)
        conf_settings["TokenKeyFile"] = wd / "imaging.key"
    conf_settings.update(settings)
    config = write_config(wd / f"{package}.conf", conf_settings)
    sock = Path(str(conf_settings["StatusSocket"]))
    log = Path(str(conf_settings["LogFile"]))
    pid_file = Path(str(conf_settings["PidFile"]))
    proc = lab.spawn(package, ns, [sys.executable, "-m", package, "--config", str(config),
                                   "--foreground"], cwd=REPO_ROOT)
    daemon = Daemon(package, proc, config, sock, pid_file, log)

    def ready() -> bool:
        if not proc.alive():
            return True
        try:
            return bool(daemon.status().get("ok"))
        except (OSError, ValueError):
            return False

    ok = wait_for(ready, ready_timeout, 0.1)
    if not proc.alive():
        raise RuntimeError(
            f"{package} exited with status {proc.popen.returncode} before it was ready\n"
            f"--- output ---\n{tail(proc.log)}\n--- log ---\n{tail(log)}"
        )
    if not ok:
        raise RuntimeError(
            f"{package} not ready after {ready_timeout} s (status socket {sock})\n"
            f"--- output ---\n{tail(proc.log)}\n--- log ---\n{tail(log)}"
        )
    return daemon


# --------------------------------------------------------------------------------------------
# qemu


@dataclass(frozen=True)
class VmSpec:
    """A diskless VM that network-boots from one NIC on `tap` (TCG: KVM does not work here).

    `nic_rom=False` gives the NIC an empty option ROM (`romfile=`), so UEFI firmware uses its own
    PXE client (OVMF: architecture 7) instead of qemu's built-in iPXE ROM.
    """

    firmware: Firmware = "bios"
    nic: str = "e1000"
    nic_rom: bool = True
    tap: str = "tap0"
    mac: str = "52:54:00:12:34:56"
    memory_mb: int = 256
    name: str = "vm"
    extra: tuple[str, ...] = ()
    console: bool = False        # a serial console the test can type on (Vm.console)
    network: bool = True         # False: no NIC at all (the VM boots its disk)


def qemu_command(spec: VmSpec, workdir: Path) -> list[str]:
    """The qemu-system-x86_64 command line; writes the files it refers to into `workdir`.

    Serial console goes to '<workdir>/<name>.serial.log'; with `spec.console` it goes to a unix
    socket (console_socket(); qemu waits for start_vm to connect), which start_vm
    copies into that log and types on. For BIOS, SeaBIOS is told to mirror its
    text console (including iPXE's output) to the serial port (fw_cfg etc/sercon-port = 0x3f8).
    Paths must not contain commas (qemu option syntax).
    """
    if "," in str(workdir):
        raise ValueError(f"qemu cannot take paths with commas: {workdir}")
    serial = workdir / f"{spec.name}.serial.log"
    args = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(spec.memory_mb), "-smp", "1",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-pidfile", str(workdir / f"{spec.name}.qemu.pid")]
    if spec.console:
        args += ["-chardev", f"socket,id=con0,path={console_socket(spec, workdir)},"
                             "server=on,wait=on", "-serial", "chardev:con0"]
    else:
        args += ["-serial", f"file:{serial}"]
    if spec.firmware == "uefi":
        vars_copy = workdir / f"{spec.name}.OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        args += ["-machine", "q35",
                 "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    elif spec.firmware == "uefi-secboot":
        # Secure Boot needs SMM (the variable store is writable only from it) and a flash
        # qemu marks secure; S3 off, as OVMF's secure build asks
        vars_copy = workdir / f"{spec.name}.OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS_MS, vars_copy)
        args += ["-machine", "q35,smm=on",
                 "-global", "driver=cfi.pflash01,property=secure,value=on",
                 "-global", "ICH9-LPC.disable_s3=1",
                 "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECBOOT}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    else:
        sercon = workdir / "sercon-port.bin"
        sercon.write_bytes(b"\xf8\x03")
        args += ["-machine", "pc", "-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
    if not spec.network:
        return args + ["-net", "none", *spec.extra]
    device = f"{spec.nic},netdev=n0,mac={spec.mac},bootindex=1"
    if not spec.nic_rom:
        device += ",romfile="
    args += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
             "-device", device, *spec.extra]
    return args


def console_socket(spec: VmSpec, workdir: Path) -> Path:
    """A short path (a unix socket's is at most 107 bytes; test folders are longer)."""
    digest = hashlib.sha256(f"{workdir}/{spec.name}".encode()).hexdigest()[:16]
    return Path("/tmp") / f"preboot-console-{digest}.sock"


class Console:
    """A VM's serial console as a person at its keyboard has it: everything the VM writes is
    appended to its serial log (by a thread that ends when qemu closes the socket), and
    `type()` sends keys. qemu reads the socket only as fast as the emulated UART takes bytes,
    so nothing typed is lost."""

    def __init__(self, sock: socket.socket, log: Path):
        self._sock = sock
        self._log = log
        self._thread = threading.Thread(target=self._copy, name=f"console {log.name}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: Path, log: Path, proc: Proc, timeout: float = 20.0) -> "Console":
        """Connect to qemu's console socket (qemu waits for it before the VM starts)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock, log)
            except OSError:
                sock.close()
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"no console socket {path} from qemu:\n{tail(proc.log)}")
                time.sleep(0.05)

    def _copy(self) -> None:
        with open(self._log, "ab", buffering=0) as out:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                out.write(data)

    def type(self, text: str) -> None:
        """Send `text` as keys (a line needs its "\\r", as Enter sends)."""
        self._sock.sendall(text.encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


@dataclass
class Vm:
    """A running VM: its qemu process, serial log and start time (time.monotonic()); its
    console when the spec asked for one."""

    spec: VmSpec
    proc: Proc
    serial_log: Path
    started: float
    console: Console | None = None


@dataclass
class BootResult:
    """What became of a VM boot: the marker's match (None if not seen), timing and the logs."""

    match: re.Match[str] | None
    elapsed: float
    serial_log: Path
    qemu_out: Path
    reason: str

    @property
    def ok(self) -> bool:
        return self.match is not None

    def serial_text(self) -> str:
        return read_text(self.serial_log)


def start_vm(lab: Lab, ns: Netns, spec: VmSpec) -> Vm:
    """Start qemu for `spec` inside `ns` (its tap must exist there); the lab stops it at close."""
    args = qemu_command(spec, lab.workdir)
    started = time.monotonic()
    serial = lab.workdir / f"{spec.name}.serial.log"
    proc = lab.spawn(f"{spec.name}.qemu", ns, args)
    console = None
    if spec.console:
        path = console_socket(spec, lab.workdir)
        console = Console.connect(path, serial, proc)
        lab.on_close(console.close)
        lab.on_close(lambda: path.unlink(missing_ok=True))
    return Vm(spec, proc, serial, started, console)


def wait_for_marker(vm: Vm, marker: str | re.Pattern[str], timeout: float = 120.0,
                    interval: float = 0.1) -> BootResult:
    """Wait until the VM's serial console (escapes removed) matches `marker`, the VM exits, or
    `timeout` seconds since its start pass. The VM keeps running; elapsed counts from its start."""
    pattern = re.compile(marker) if isinstance(marker, str) else marker
    match: re.Match[str] | None = None
    reason = f"timed out after {timeout:.0f} s"
    while True:
        match = pattern.search(read_text(vm.serial_log))
        if match:
            reason = "marker seen"
            break
        if not vm.proc.alive():
            reason = f"qemu exited with status {vm.proc.popen.returncode} before the marker"
            break
        if time.monotonic() - vm.started > timeout:
            break
        time.sleep(interval)
    return BootResult(match, time.monotonic() - vm.started, vm.serial_log, vm.proc.log, reason)


def boot_vm(
    lab: Lab,
    ns: Netns,
    spec: VmSpec,
    marker: str | re.Pattern[str],
    timeout: float = 120.0,
) -> BootResult:
    """Boot a VM in `ns`, wait for `marker` on its serial console (see `wait_for_marker`), then
    stop the VM (each TCG VM keeps a core busy) and return the result."""
    vm = start_vm(lab, ns, spec)
    result = wait_for_marker(vm, marker, timeout)
    lab.stop(vm.proc)
    return result


def stage_ipxe_binaries(dest: Path, names: Iterable[str] = IPXE_BINARIES) -> list[Path]:
    """Copy Debian's iPXE builds (package `ipxe`) into a TFTP root; returns the copies."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = dest / name
        shutil.copyfile(IPXE_DIR / name, target)
        out.append(target)
    return out


# --------------------------------------------------------------------------------------------
# packet captures


DHCP_BPF = "udp and (port 67 or port 68 or port 4011)"


def start_tcpdump(lab: Lab, ns: Netns, iface: str, path: Path, bpf: str = DHCP_BPF,
                  name: str = "tcpdump", ready_timeout: float = 10.0) -> Proc:
    """Capture `bpf` on `iface` in `ns` into the pcap `path` (written packet by packet, -U).

    Capture on a bridge PORT (the VM's tap, a veth), not on the bridge itself: the bridge device
    sees only frames for its own address and broadcasts, never the unicast frames it forwards
    between ports (e.g. a site DHCP server's unicast OFFER to the VM).

    Returns once tcpdump says it is listening. Stop it with `lab.stop(proc)` (SIGTERM flushes
    the file) before reading the capture; the lab stops it at close anyway.
    """
    # --immediate-mode: without it packets wait in the kernel ring for up to a second and
    # the last ones are lost when tcpdump is stopped
    proc = lab.spawn(name, ns, ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode",
                                "-s", "0", "-Z", "root", "-w", str(path), bpf])
    if not wait_for(lambda: not proc.alive() or "listening on" in read_text(proc.log),
                    ready_timeout):
        raise RuntimeError(f"tcpdump not listening after {ready_timeout} s:\n{tail(proc.log)}")
    if not proc.alive():
        raise RuntimeError(f"tcpdump exited ({proc.popen.returncode}):\n{tail(proc.log)}")
    return proc


def summarize_dhcp_pcap(path: Path, limit: int = 60) -> str:
    """One line per DHCP/BOOTP packet of a capture (needs scapy), for failure messages:
    time, addresses and ports, message type, xid, yiaddr/siaddr/giaddr, file, options 60/77/93/43."""
    try:
        from scapy.all import BOOTP, DHCP, IP, UDP, rdpcap  # noqa: F401  (heavy import)
    except ImportError as exc:  # pragma: no cover
        return f"<scapy unavailable: {exc}>"
    try:
        packets = rdpcap(str(path))
    except Exception as exc:  # missing, empty or truncated: diagnostics must not raise
        return f"<{path}: {exc}>"
    lines: list[str] = []
    start = float(packets[0].time) if packets else 0.0
    names = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
             7: "RELEASE", 8: "INFORM"}
    for pkt in packets[:limit]:
        if IP not in pkt or UDP not in pkt:
            continue
        # scapy decodes BOOTP on ports 67/68 only; port 4011 (PXE boot server) by hand
        bootp = pkt[BOOTP] if BOOTP in pkt else BOOTP(bytes(pkt[UDP].payload))
        opts = {}
        if DHCP in bootp:
            for opt in bootp[DHCP].options:
                if isinstance(opt, tuple) and len(opt) >= 2:
                    opts[opt[0]] = opt[1] if len(opt) == 2 else opt[1:]
        kind = names.get(opts.get("message-type"), str(opts.get("message-type", "BOOTP")))
        detail = [f"xid={bootp.xid:08x}", f"flags={int(bootp.flags):#06x}", f"ci={bootp.ciaddr}",
                  f"yi={bootp.yiaddr}", f"si={bootp.siaddr}"]
        if bootp.giaddr != "0.0.0.0":
            detail.append(f"gi={bootp.giaddr}")
        file = bytes(bootp.file).rstrip(b"\0").decode("ascii", "replace")
        if file:
            detail.append(f"file={file!r}")
        for key, label in (("vendor_class_id", "60"), ("user_class", "77"),
                           ("pxe_client_architecture", "93"), ("server_id", "54")):
            if key in opts:
                detail.append(f"{label}={opts[key]!r}")
        if "vendor_specific" in opts:
            detail.append(f"43={bytes(opts['vendor_specific']).hex()}")
        lines.append(f"{float(pkt.time) - start:6.2f}s {pkt[IP].src}:{pkt[UDP].sport} -> "
                     f"{pkt[IP].dst}:{pkt[UDP].dport} {'req' if bootp.op == 1 else 'rep'} "
                     f"{kind} " + " ".join(detail))
    return "\n".join(lines) or f"<{path}: no DHCP packets>"


# --------------------------------------------------------------------------------------------
# a routed client segment behind a DHCP relay


@dataclass(frozen=True)
class RelayTopology:
    """The server segment of `build_pxe_topology` (without a tap) plus a router namespace that
    holds the client segment and relays DHCP to the servers (RFC 1542, giaddr)::

        [dhcp_ns] dhcp_ip  ── veth ──┐
        [srv_ns ] bridge srv_ip ─────┴── veth ── [rtr_ns] rtr_server_ip  (forwarding)
                                                          client_bridge rtr_client_ip ── tap ── qemu
    """

    srv_ns: Netns
    dhcp_ns: Netns
    rtr_ns: Netns
    bridge: str
    dhcp_iface: str
    client_bridge: str
    tap: str
    network: ipaddress.IPv4Network
    client_network: ipaddress.IPv4Network
    srv_ip: str
    dhcp_ip: str
    rtr_server_ip: str
    rtr_client_ip: str


def build_relay_topology(
    lab: Lab,
    network: str = "192.168.77.0/24",
    client_network: str = "192.168.78.0/24",
    tap: str = "tap0",
) -> RelayTopology:
    """Server and site-DHCP namespaces as in `build_pxe_topology`, a router namespace between
    them and the client segment (its bridge holds the VM's tap), and routes both ways."""
    net = ipaddress.ip_network(network)
    cnet = ipaddress.ip_network(client_network)
    srv_ip, dhcp_ip, rtr_server_ip = str(net[2]), str(net[1]), str(net[254])
    rtr_client_ip = str(cnet[1])
    srv = lab.netns("srv")
    dhcp = lab.netns("dhcp")
    rtr = lab.netns("rtr")
    for ns in (srv, dhcp, rtr):
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
    add_bridge(srv, "br0", f"{srv_ip}/{net.prefixlen}")
    add_veth(srv, "vsite-br", dhcp, "vsite", bridge_a="br0", cidr_b=f"{dhcp_ip}/{net.prefixlen}")
    add_veth(srv, "vrtr-br", rtr, "vup", bridge_a="br0",
             cidr_b=f"{rtr_server_ip}/{net.prefixlen}")
    add_bridge(rtr, "br1", f"{rtr_client_ip}/{cnet.prefixlen}")
    add_tap(rtr, tap, "br1")
    rtr.sysctl("net.ipv4.ip_forward", 1)
    for ns in (srv, dhcp):
        ns.ip("route", "add", str(cnet), "via", rtr_server_ip)
    return RelayTopology(srv, dhcp, rtr, "br0", "vsite", "br1", tap, net, cnet, srv_ip, dhcp_ip,
                         rtr_server_ip, rtr_client_ip)


def start_dhcp_relay(lab: Lab, ns: Netns, iface: str, local_ip: str, servers: Sequence[str],
                     name: str = "relay") -> Proc:
    """dnsmasq as a DHCP relay only (no DNS, no DHCP service of its own): requests arriving on
    `iface` are relayed with giaddr `local_ip` to every address in `servers`, replies sent to
    giaddr are passed back to the client. Log in '<workdir>/<name>.log'."""
    wd = lab.workdir
    lines = ["port=0", "user=root", "group=root", f"interface={iface}", "log-dhcp",
             f"log-facility={wd / (name + '.log')}", f"pid-file={wd / (name + '.pid')}",
             f"dhcp-leasefile={wd / (name + '.leases')}"]
    lines += [f"dhcp-relay={local_ip},{server}" for server in servers]
    conf = wd / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = lab.spawn(name, ns, ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"])
    if not wait_for(lambda: not proc.alive() or udp_listening(ns, 67), 10):
        raise RuntimeError(f"dnsmasq relay did not bind port 67:\n{tail(proc.log)}")
    if not proc.alive():
        raise RuntimeError(f"dnsmasq relay exited ({proc.popen.returncode}):\n{tail(proc.log)}")
    return proc


# --------------------------------------------------------------------------------------------
# our boot services together: proxydhcpd + tftpd in one namespace


def start_boot_services(lab: Lab, ns: Netns, server_ip: str, tftp_root: Path,
                        proxy: Mapping[str, object] | None = None) -> tuple[Daemon, Daemon]:
    """Our tftpd (`server_ip`:69, `tftp_root`) and our proxydhcpd (config `proxy`) in `ns`;
    returns (proxydhcpd, tftpd), both ready (status sockets answer)."""
    # Retries: a TCG VM starved of CPU (a busy 2-core CI machine) can leave a transfer
    # unacknowledged for many seconds; the default 6 x 1 s gave up on GRUB's initrd once
    tftpd = start_preboot_daemon(lab, ns, "tftpd", {"IPAddress": server_ip, "Port": 69,
                                                    "Root": tftp_root, "Retries": 30})
    proxy_daemon = start_preboot_daemon(lab, ns, "proxydhcpd", dict(proxy or {}))
    return proxy_daemon, tftpd


DATA_DIR = Path(__file__).resolve().parent / "data"
ProxyLayout = Literal["flat", "colocated", "relay"]


def make_proxy_root(root: Path, token: str) -> dict[str, Path]:
    """A TFTP root for proxyDHCP boots: Debian's iPXE builds and boot.ipxe (the default
    IPXEScriptURL: data/proxy-boot.ipxe with `token`, which prints the marker)."""
    stage_ipxe_binaries(root)
    script = (DATA_DIR / "proxy-boot.ipxe").read_text().replace("@TOKEN@", token)
    (root / "boot.ipxe").write_text(script)
    return {p.name: p for p in root.iterdir()}


@dataclass
class ProxyLab:
    """What `build_proxy_lab` started: our daemons, where the VM's tap lives, captures, logs."""

    proxy: Daemon
    tftpd: Daemon
    vm_ns: Netns
    server_ip: str
    captures: dict[str, Path]      # "client" (the VM's segment), "server" (relay layout only)
    logs: list[Path]
    topology: PxeTopology | RelayTopology


def build_proxy_lab(lab: Lab, layout: ProxyLayout, tftp_root: Path,
                    proxy: Mapping[str, object] | None = None,
                    http_port: int | None = None, site_next_server: str | None = None
                    ) -> ProxyLab:
    """Site DHCP (dnsmasq, pool only), our proxydhcpd + tftpd, radvd and DHCP captures.

    flat       site DHCP in its own namespace on the server segment (192.168.77.1), our daemons
               on br0 192.168.77.2 with the VM's tap
    colocated  site DHCP beside our daemons (same namespace, br0) sending option 60 PXEClient
               itself; pass proxy={"ListenPort67": False}
    relay      `build_relay_topology`: the VM on 192.168.78.0/24 behind a dnsmasq relay that
               forwards to the site DHCP server and to our proxy; the site DHCP has a pool and a
               router for that segment
    `http_port`: also serve `tftp_root` over HTTP (python -m http.server) on the server address.
    `site_next_server`: the site DHCP also gives this next-server (siaddr), no boot file (what
    Secure Boot's signed GRUB needs, docs/secure-boot.md).
    """
    wd = lab.workdir
    # no-ping: dnsmasq would otherwise ping a new address for 3 s before offering it
    pool = SiteDhcp(range_start="192.168.77.100", range_end="192.168.77.150", extra=("no-ping",))
    if site_next_server:
        pool = SiteDhcp(range_start=pool.range_start, range_end=pool.range_end,
                        extra=(*pool.extra, f"dhcp-boot=,,{site_next_server}"))
    captures = {"client": wd / "dhcp.pcap"}
    logs = [wd / "dnsmasq.log"]
    topo: PxeTopology | RelayTopology
    if layout == "relay":
        topo = build_relay_topology(lab)
        client = topo.client_network
        site = SiteDhcp(
            range_start=pool.range_start, range_end=pool.range_end,
            extra=(*pool.extra,
                   f"dhcp-range=set:relayed,{client[100]},{client[150]},255.255.255.0,1h",
                   # the relayed segment's router, so the client reaches our servers
                   f"dhcp-option=tag:relayed,option:router,{topo.rtr_client_ip}"))
        start_site_dhcp(lab, topo.dhcp_ns, topo.dhcp_iface, site)
        start_dhcp_relay(lab, topo.rtr_ns, topo.client_bridge, topo.rtr_client_ip,
                         [topo.dhcp_ip, topo.srv_ip])
        logs.append(wd / "relay.log")
        start_radvd(lab, topo.rtr_ns, topo.client_bridge)
        start_tcpdump(lab, topo.rtr_ns, topo.tap, captures["client"])
        captures["server"] = wd / "dhcp-server-side.pcap"  # the router's port on the servers' bridge
        start_tcpdump(lab, topo.srv_ns, "vrtr-br", captures["server"], name="tcpdump-srv")
        srv_ns, vm_ns = topo.srv_ns, topo.rtr_ns
    else:
        topo = build_pxe_topology(lab)
        if layout == "colocated":
            # the site DHCP server runs beside our daemons and says "PXEClient" itself
            site = SiteDhcp(range_start=pool.range_start, range_end=pool.range_end,
                            extra=(*pool.extra,
                                   "dhcp-option-force=option:vendor-class,PXEClient"))
            start_site_dhcp(lab, topo.srv_ns, topo.bridge, site)
        else:
            start_site_dhcp(lab, topo.dhcp_ns, topo.dhcp_iface, pool)
        start_radvd(lab, topo.srv_ns, topo.bridge)
        start_tcpdump(lab, topo.srv_ns, topo.tap, captures["client"])
        srv_ns, vm_ns = topo.srv_ns, topo.srv_ns
    proxy_daemon, tftpd = start_boot_services(lab, srv_ns, topo.srv_ip, tftp_root, proxy)
    if http_port:
        http = lab.spawn("http", srv_ns, [sys.executable, "-m", "http.server", str(http_port),
                                          "--bind", topo.srv_ip, "--directory", str(tftp_root)])
        listening = wait_for(lambda: not http.alive() or bool(srv_ns.run(
            ["ss", "-Hntl", f"sport = :{http_port}"], check=False).stdout.strip()), 10)
        if not (listening and http.alive()):
            raise RuntimeError(f"http.server did not start:\n{tail(http.log)}")
        logs.append(http.log)
    return ProxyLab(proxy_daemon, tftpd, vm_ns, topo.srv_ip, captures, logs, topo)


def stop_captures(lab: Lab) -> None:
    """Stop the lab's tcpdumps now (SIGTERM flushes their files) so the captures can be read."""
    for proc in [p for p in lab.procs if p.name.startswith("tcpdump")]:
        lab.stop(proc)
