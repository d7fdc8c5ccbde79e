"""A multicast lab: one sender and N receivers on one switch, each in a network namespace.

For the multicast benchmark (`bench/run-multicast-bench`) and for the tests of our multicast
sender and receiver that will follow (issue 14); importable without pytest, like
`tests/ldapserver.py`. Built on `tests/e2e/netlab.py` (`Lab`, `Netns`, `add_bridge`,
`add_veth`), which owns every namespace and process made here and undoes them in `close()`::

    [<prefix>-snd] snd0 10.79.0.1 ── veth ── p-snd ┐
    [<prefix>-r1 ] rcv1 10.79.0.11 ── veth ── p-r1  ├── br0 [<prefix>-sw]  (a dumb switch:
    [<prefix>-r2 ] rcv2 10.79.0.12 ── veth ── p-r2  ┘        no STP, no IGMP snooping, so
    ...                                                       every port gets every group)

Nothing is configured in the namespace the caller runs in: every address, route, multicast
group and nft table lives in a namespace made here, and deleting the namespaces at the end
removes them all. Each host has a route for 224.0.0.0/4 on its one interface (so a multicast
socket needs no default route) and IPv6 off (no router solicitations or MLD on the wire).

Offloads, as on real hardware: each host's interface has GRO on (real NICs have it on by
default; a veth has it off because it has no NAPI until GRO is turned on), and the switch's port
towards each host has TSO off (the kernel's veth_skb_is_eligible_for_gro() refuses NAPI, and so
GRO, for skbs a veth with TSO on forwards). The host's own end keeps `gso_max_segs 1`, so the
wire carries single packets, as a NIC's segmentation sends them. A receiving socket that asks
for UDP_GRO then gets runs of same-size datagrams coalesced into one buffer (one recvmsg for up
to 64 KiB); a socket that does not ask gets single datagrams, as before (udpcast, UFTP).

Impairments, all nft rules in a table `mcastlab` in the switch namespace, per packet, where the
wire is (no tc/netem needed):

- `loss_in(host, percent)`: independent random loss of every UDP/IPv4 packet the switch sends
  to `host` (`numgen random mod 10000 < percent*100 drop` in the netdev egress hook of its bridge
  port). Before the host's GRO: each datagram is dropped on its own, whether the receiving
  socket coalesces or not (a rule in the host's own input hook would see one coalesced skb of
  dozens of datagrams and turn independent loss into bursts for a UDP_GRO socket only). UDP
  only: the other receivers' IGMP reports, which the switch floods to every port, pass (every
  peer speaks UDP, and the drop counter then counts exactly the peer's packets). The host's
  interface never sees the packet (its rx counters do not count it).
- `loss_out(host, percent)`: random loss of everything `host` sends, dropped where it enters the
  switch (netdev ingress of its bridge port in the switch namespace). On the sender this is
  correlated loss: every receiver misses the same packets. It is not done in the sender's own
  output hook because a packet dropped there fails sendmsg() with EPERM (the sender would see
  an error instead of a lost packet), nor in its egress hook, which runs before the veth
  counts the packet (the wire-byte figures would miss it).
- `rate_limit_in(host, bytes_per_s)`: a slow receiver: UDP/IPv4 traffic towards the host above
  the rate is dropped at the same egress hook, per packet (`limit rate over ... bytes/second
  drop`, a policer; a real slow link also queues, this one only drops; its bucket holds one
  second of the rate, see the method; it counts Ethernet frames, 14 bytes a packet more than
  the IP packet an input hook counted).

Processes: `spawn(host, name, args)` starts a program inside a host's namespace (output to
`<workdir>/<name>.out`); `reap(proc)` collects its exit status and CPU seconds (wait4) without
blocking; `KillAt` kills a process with SIGKILL once a receiver's output folder holds a given
number of bytes. Counters: `link_stats(host)` (the host's interface: bytes and packets each
way), `nft_drops(host)` (packets the impairments dropped).

    with MulticastLab(workdir, receivers=3) as lab:
        lab.loss_in(lab.receivers[0], 5)
        lab.loss_out(lab.sender, 1)
        proc = lab.spawn(lab.receivers[0], "r1", ["udp-receiver", "--interface", "rcv1", ...])
        ...
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tests.e2e import netlab

DEFAULT_NETWORK = "10.79.0.0/24"
SENDER_HOST = 1                 # 10.79.0.1
FIRST_RECEIVER_HOST = 11        # 10.79.0.11, .12, ...
MULTICAST_NET = "224.0.0.0/4"
NFT_TABLE = "mcastlab"


@dataclass(frozen=True)
class Host:
    """One machine of the lab: its namespace, its one interface and address, its switch port."""

    name: str            # "snd", "r1", "r2", ...
    ns: netlab.Netns
    iface: str           # interface inside ns: "snd0", "rcv1", ...
    addr: str            # IPv4 address on iface
    port: str            # its veth end on the bridge, in the switch namespace


@dataclass
class Exit:
    """How a process ended: exit status (negative: killed by that signal), CPU seconds, when."""

    code: int
    cpu_user: float
    cpu_sys: float
    at: float            # time.monotonic() when reaped

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys


def reap(proc: netlab.Proc) -> Exit | None:
    """The process's `Exit` if it has ended (collected with wait4: its own CPU and that of
    the children it waited for), else None. Never blocks. Call it, not popen.wait/poll, for
    processes whose CPU time matters: once reaped elsewhere the rusage is gone."""
    if proc.popen.returncode is not None:       # reaped before, by us or by netlab's stop
        return getattr(proc, "exit", None) or Exit(proc.popen.returncode, 0.0, 0.0,
                                                   time.monotonic())
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if pid == 0:
        return None
    code = os.waitstatus_to_exitcode(status)
    proc.popen.returncode = code
    result = Exit(code, usage.ru_utime, usage.ru_stime, time.monotonic())
    proc.exit = result  # type: ignore[attr-defined]
    return result


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user+sys) a running process has used so far (/proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def folder_bytes(path: Path) -> int:
    """Bytes of file data a receiver has written under `path` (allocated blocks, so a
    preallocated or sparse output file counts only what was really written)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class KillAt:
    """Kill `proc` with SIGKILL once `folder_bytes(folder)` reaches `threshold` bytes.

    A thread polls every `interval` s; `killed_at` (monotonic time) and `progress` (bytes seen
    at the kill) are set when it fires. `cancel()` stops the thread without killing. The
    process is killed by PID, and only while it has not been reaped (so never a reused PID).
    """

    def __init__(self, proc: netlab.Proc, folder: Path, threshold: int,
                 interval: float = 0.01) -> None:
        self.proc = proc
        self.folder = Path(folder)
        self.threshold = threshold
        self.interval = interval
        self.killed_at: float | None = None
        self.progress: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"killat-{proc.name}",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.proc.popen.returncode is not None:
                return
            seen = folder_bytes(self.folder)
            if seen >= self.threshold:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                self.killed_at, self.progress = time.monotonic(), seen
                return

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join(5)


class MulticastLab:
    """The switch, the sender and `receivers` receivers (see the module docstring).

    `workdir` gets the process logs. `prefix` names the namespaces (default: unique per
    process and call, from `netlab.unique_prefix("mcl")`). Everything is made in the
    constructor; if that fails half-way, what was made is undone before the error propagates.
    """

    def __init__(self, workdir: Path, receivers: int = 3, prefix: str | None = None,
                 network: str = DEFAULT_NETWORK) -> None:
        if not 1 <= receivers <= 200:
            raise ValueError(f"receivers must be 1-200, not {receivers}")
        self.workdir = Path(workdir)
        self.network = network
        self.bridge = "br0"
        self.receivers = []
        self.lab = netlab.Lab(self.workdir, prefix or netlab.unique_prefix("mcl"))
        self.prefix = self.lab.prefix
        self._nft_ready: set[str] = set()
        try:
            self._build(receivers)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------
    # building and tearing down

    def _host_ns(self, role: str) -> netlab.Netns:
        ns = self.lab.netns(role)
        # before any interface exists, so every interface made later inherits it
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
        return ns

    def _build(self, receivers: int) -> None:
        net = ipaddress.ip_network(self.network)
        if net.num_addresses < FIRST_RECEIVER_HOST + receivers + 2:
            raise ValueError(f"{self.network} is too small for {receivers} receivers")
        self.switch = self._host_ns("sw")
        netlab.add_bridge(self.switch, self.bridge)
        # a dumb switch: flood multicast to every port, whoever joined (no IGMP snooping)
        self.switch.ip("link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
        self.sender = self._add_host("snd", "snd0", str(net[SENDER_HOST]), net.prefixlen)
        for i in range(1, receivers + 1):
            self.receivers.append(self._add_host(f"r{i}", f"rcv{i}",
                                                 str(net[FIRST_RECEIVER_HOST + i - 1]),
                                                 net.prefixlen))

    def _add_host(self, role: str, iface: str, addr: str, prefixlen: int) -> Host:
        ns = self._host_ns(role)
        port = f"p-{role}"
        netlab.add_veth(self.switch, port, ns, iface, bridge_a=self.bridge)
        # with its broadcast address (udpcast's receivers find the sender by broadcast)
        ns.ip("addr", "add", f"{addr}/{prefixlen}", "brd", "+", "dev", iface)
        ns.ip("route", "add", MULTICAST_NET, "dev", iface)
        # the wire carries packets: a UDP_SEGMENT send (our sender's runs of 46 DATA packets)
        # is cut where it leaves the host, as a NIC's segmentation offload does, instead of
        # crossing the veths whole, where one nft loss_in drop would take 46 packets at once
        ns.ip("link", "set", "dev", iface, "gso_max_segs", "1")
        self._offloads(ns, iface, port)
        return Host(role, ns, iface, addr, port)

    def _offloads(self, ns: netlab.Netns, iface: str, port: str) -> None:
        """GRO on the host's interface, TSO off on its switch port (the module's docstring):
        what a NIC does, and the same for every peer; a socket without UDP_GRO is unaffected."""
        if shutil.which("ethtool") is None:
            raise RuntimeError("the multicast lab needs ethtool (scripts/install-deps.sh)")
        ns.run(["ethtool", "-K", iface, "gro", "on"])
        self.switch.run(["ethtool", "-K", port, "tso", "off"])

    @property
    def hosts(self) -> list[Host]:
        return [self.sender, *self.receivers]

    def close(self) -> None:
        """Stop every process started here (by PID) and delete every namespace. Never raises."""
        self.lab.close()

    def __enter__(self) -> "MulticastLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        return {"prefix": self.prefix, "network": self.network, "switch": self.switch.name,
                "bridge": self.bridge,
                "hosts": [{"name": h.name, "ns": h.ns.name, "iface": h.iface, "addr": h.addr,
                           "port": h.port} for h in self.hosts]}

    # ----------------------------------------------------------------------------------------
    # impairments (nft)

    @staticmethod
    def _nft(ns: netlab.Netns, script: str) -> None:
        result = subprocess.run(ns.cmd(["nft", "-f", "-"]), input=script, text=True,
                                capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"nft in {ns.name}: {result.stderr.strip()}\n{script}")

    def _egress_chain(self, host: Host) -> str:
        """The switch's netdev egress chain of host's port (made once): where the impairments
        of what reaches host act, per packet, before the host's GRO."""
        chain = f"out-{host.port}"
        if chain not in self._nft_ready:
            self._nft(self.switch, f"table netdev {NFT_TABLE} {{\n"
                                   f"  chain {chain} {{ type filter hook egress device "
                                   f"\"{host.port}\" priority 0; }}\n}}\n")
            self._nft_ready.add(chain)
        return chain

    @staticmethod
    def _chance(percent: float) -> str:
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be 0-100, not {percent}")
        return f"numgen random mod 10000 < {round(percent * 100)}"

    def loss_in(self, host: Host, percent: float) -> None:
        """Drop `percent` % of the UDP/IPv4 packets the switch sends to `host`, each
        independently (before the host's GRO: see the module's docstring)."""
        if percent <= 0:
            return
        chain = self._egress_chain(host)
        self._nft(self.switch, f"add rule netdev {NFT_TABLE} {chain} meta protocol ip "
                               f"ip protocol udp {self._chance(percent)} counter drop "
                               f"comment \"loss-in\"\n")

    def loss_out(self, host: Host, percent: float) -> None:
        """Drop `percent` % of everything `host` sends, where it enters the switch (for the
        sender: the same packets are lost for every receiver)."""
        if percent <= 0:
            return
        chain = f"in-{host.port}"
        self._nft(self.switch,
                  f"table netdev {NFT_TABLE} {{\n"
                  f"  chain {chain} {{ type filter hook ingress device \"{host.port}\" "
                  f"priority 0; }}\n}}\n"
                  f"add rule netdev {NFT_TABLE} {chain} meta protocol ip "
                  f"{self._chance(percent)} counter drop comment \"loss-out\"\n")

    def rate_limit_in(self, host: Host, bytes_per_s: float, burst_bytes: int = 0) -> None:
        """Police what arrives at `host` to `bytes_per_s`: the excess is dropped.

        nft's byte policer is exact over time, but its bucket holds one second of the rate
        (plus `burst_bytes`): it starts full, and after an idle moment lets up to a second's
        worth through at once (measured here: a 2 s flood at 12.5 MB/s passes 1.51x the rate,
        a 3 s one 1.33x; a packet-rate policer has no such allowance, but would favour large
        packets)."""
        chain = self._egress_chain(host)
        burst = f" burst {int(burst_bytes)} bytes" if burst_bytes else ""
        self._nft(self.switch, f"add rule netdev {NFT_TABLE} {chain} meta protocol ip "
                               f"ip protocol udp limit rate over {round(bytes_per_s)} bytes/second"
                               f"{burst} counter drop comment \"rate\"\n")

    def nft_drops(self, host: Host) -> dict[str, int]:
        """Packets dropped so far by each impairment of `host` ({'loss-in': n, ...}): the rules
        of its two chains on the switch (in-PORT: what it sends, out-PORT: what it gets)."""
        out: dict[str, int] = {}
        chains = (f"in-{host.port}", f"out-{host.port}")
        result = self.switch.run(["nft", "-j", "list", "ruleset"], check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return out
        for item in json.loads(result.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule or rule.get("table") != NFT_TABLE or rule.get("chain") not in chains:
                continue
            comment = rule.get("comment", "")
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    out[comment] = out.get(comment, 0) + int(expr["counter"]["packets"])
        return out

    # ----------------------------------------------------------------------------------------
    # counters and processes

    def link_stats(self, host: Host) -> dict[str, int]:
        """The host interface's counters: rx/tx bytes and packets, rx/tx dropped."""
        data = json.loads(host.ns.run(["ip", "-s", "-j", "link", "show", "dev",
                                       host.iface]).stdout)[0]
        stats = data.get("stats64") or data.get("stats") or {}
        rx, tx = stats.get("rx", {}), stats.get("tx", {})
        return {"rx_bytes": int(rx.get("bytes", 0)), "rx_packets": int(rx.get("packets", 0)),
                "rx_dropped": int(rx.get("dropped", 0)), "tx_bytes": int(tx.get("bytes", 0)),
                "tx_packets": int(tx.get("packets", 0)), "tx_dropped": int(tx.get("dropped", 0))}

    def udp_counters(self, host: Host) -> dict[str, int]:
        """The kernel's UDP counters in `host`'s namespace (/proc/net/snmp): InDatagrams,
        RcvbufErrors (datagrams dropped because a socket's receive buffer was full), ..."""
        lines = [ln.split() for ln in host.ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
                 if ln.startswith("Udp:")]
        if len(lines) < 2:
            return {}
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}

    def spawn(self, host: Host, name: str, args: Sequence[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> netlab.Proc:
        """Start `args` inside `host`'s namespace; output to '<workdir>/<name>.out'. `ip netns
        exec` execs the program, so the PID is the program's own."""
        return self.lab.spawn(name, host.ns, args, cwd=cwd, env=env)

    def kill(self, proc: netlab.Proc, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one of our processes by PID, unless it has already been reaped."""
        if proc.popen.returncode is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def udp_bound(self, host: Host, port: int) -> bool:
        """Whether something in `host`'s namespace has a UDP socket on `port`."""
        return netlab.udp_listening(host.ns, port)

