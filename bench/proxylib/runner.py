"""bench/run-proxydhcp-bench: our proxyDHCP daemon against dnsmasq in proxy mode, side by side,
as ratios.

One run: make two network namespaces joined by a veth pair (netns.py), measure the load
generator alone (no server listening: the flat-out send rate of 1 and 2 sender processes), then
for each server in turn (servers.py): start it in the server namespace, probe it with one
DISCOVER (the offer must carry option 60 PXEClient), run the rate ladder, run the bursts, stop
it. With --profile, ours runs once more under cProfile. The namespaces are deleted at the end,
also after a failure or Ctrl-C/SIGTERM.

Rate ladder: each step sends `duration` x rate DISCOVERs from as many new clients (distinct xid
and MAC) at a fixed rate (1k, 2k, 5k, 10k, 20k, 40k, ... /s), then waits for late offers (at
least --drain s, on while the server still has requests queued, at most 4.2 s). The ladder
stops after a step with fewer than 90% answered, unless its offers/s were still 5% or more above
the step before (then up to --past-limit more steps, so a server's maximum is not cut off).
Per step:
  sent/s    achieved send rate (a step short of 90% of its target is marked * and ends the ladder)
  answered  clients that got a valid offer (packets.offer_xid) within 4 s of their DISCOVER,
            the PXE ROM's first retry; later offers are counted apart as late
  offers/s  answered / (last counted offer - first send): the rate the server sustained
  p50, p99  latency, offer arrival (kernel timestamp) - send (timestamp before sendto)
  drops     UDP RcvbufErrors in the server namespace: requests its socket had no room for
Before each step and burst the bench waits until the server has nothing queued and is idle.

Burst: `--burst` (1,000) new clients sent flat out by one sender, `--bursts` times; per burst the
fraction answered within 4 s and the time from the first send to the last offer when all were
answered.

CPU: psutil user + system of the server process over the steps, per 10,000 offers. The machine's
other load (busy CPU, elapsed x CPUs - idle - steal from /proc/stat, minus what the bench, its
workers and the server used) is reported per step; steps where it was above 10% of the CPUs are
marked !, and are measured again (--retry-busy).

Exit status: 0 measured, 1 a server did not start or nothing was measured, 2 missing tool or
not root, 130 interrupted. Goals not met do not change it (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import psutil

from machineinfo import machine  # bench/machineinfo.py, shared by the benches

from . import packets
from .loadgen import LoadGen
from .netns import Lab, NetnsError
from .servers import Dnsmasq, Ours, Server, ServerError, udp_counters

SERVER_ORDER = ["ours", "dnsmasq"]
REF = "dnsmasq"
RATES = [1000, 2000, 5000, 10000, 20000, 40000, 80000, 160000]
QUICK_RATES = [1000, 10000, 40000, 80000]
RETRY_WINDOW_S = 4.0          # a PXE ROM's first DHCPDISCOVER retry comes after 4 s
FOREIGN_LIMIT = 0.10


# ---- machine facts -----------------------------------------------------------------------------



def git_info(main_dir: str) -> str:
    """HEAD of the checkout ours runs from, and whether its daemon code has local changes
    (read-only git commands)."""
    try:
        head = subprocess.run(["git", "-C", main_dir, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", main_dir, "status", "--porcelain", "--",
                                "proxydhcpd", "common"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if not head:
        return "?"
    return f"git {head}" + (" + local changes in proxydhcpd/ or common/" if dirty else
                            ", no local changes in proxydhcpd/ or common/")


def cpu_sample() -> tuple[float, float, float]:
    """(monotonic time, idle + iowait CPU-s, steal CPU-s) of the whole machine (/proc/stat).
    Busy time is taken as elapsed x CPUs - idle - steal: the kernel measures idle time exactly
    (NO_HZ), while its user/system columns are sampled at ticks and miss short wakeups (a
    server answering 1,000 requests/s can look idle in them)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    t = time.monotonic()
    hz = os.sysconf("SC_CLK_TCK")
    return t, (f[3] + f[4]) / hz, (f[7] if len(f) > 7 else 0) / hz


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy (not idle or iowait) over `seconds`."""
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f[:8]), f[3] + f[4]
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


def softnet_drops() -> int:
    """Packets the kernel dropped from its per-CPU backlog (all namespaces; softnet_stat)."""
    try:
        return sum(int(line.split()[1], 16)
                   for line in Path("/proc/net/softnet_stat").read_text().splitlines())
    except (OSError, ValueError, IndexError):
        return 0


def proc_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def pctl(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))
    return s[k]


# ---- arguments ---------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run-proxydhcp-bench",
        description="Our proxyDHCP daemon against dnsmasq in proxy mode, side by side on a veth "
                    "pair between two network namespaces: PXE DHCPDISCOVERs from distinct "
                    "MACs at rising rates, and a burst of 1,000 clients at once. Needs root.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: steps 1k, 10k, 40k, 80k/s of 1 s, one burst each (~25 s)")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    p.add_argument("--servers", default=",".join(SERVER_ORDER),
                   help="comma-separated subset of: ours, dnsmasq (default: both, in that order)")
    p.add_argument("--rates", help="comma-separated rate steps in DISCOVERs/s (default "
                                   + ",".join(map(str, RATES)) + ")")
    p.add_argument("--duration", type=float, help="seconds per rate step (default 3; 1 quick)")
    p.add_argument("--drain", type=float, default=1.0,
                   help="least seconds to wait for late offers after a step's last send; the wait "
                        "goes on while the server has requests queued, up to 4.2 s (default 1)")
    p.add_argument("--stop-below", type=float, default=0.90,
                   help="stop raising the rate after a step with fewer answered (default 0.90)")
    p.add_argument("--past-limit", type=int, default=2,
                   help="after a step under --stop-below, run up to this many more steps while "
                        "the offers/s still rise by 5%% or more, so that a server's maximum is not "
                        "cut off (default 2)")
    p.add_argument("--burst", type=int, default=1000, help="clients in the burst (default 1000)")
    p.add_argument("--bursts", type=int, help="bursts per server (default 3; 1 with --quick)")
    p.add_argument("--senders", type=int, default=0,
                   help="sender processes (default 0: 1, or 2 for steps above 60%% of what one "
                        "sender does flat out)")
    p.add_argument("--dnsmasq-log", action="store_true",
                   help="let dnsmasq log its one line per proxy offer (its default; the bench "
                        "passes --quiet-dhcp unless this is given, as ours runs at WARNING)")
    p.add_argument("--unicast", action="store_true",
                   help="send to 10.77.0.1:67 instead of broadcasting to 255.255.255.255:67")
    p.add_argument("--calibrate-count", type=int,
                   help="packets per sender-alone calibration (default 60000; 20000 quick)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards run ours once more under cProfile at --profile-rate and "
                        "print where its time goes")
    p.add_argument("--profile-rate", type=int, default=0,
                   help="rate for --profile (default: the first rate ours did not answer fully, "
                        "else its highest step)")
    p.add_argument("--retry-busy", type=int, default=2, metavar="N",
                   help="redo a step or burst up to N times when other processes used more than "
                        "10%% of the CPUs meanwhile; the least disturbed attempt is kept "
                        "(default 2; 0 keeps the first)")
    p.add_argument("--budget", type=float, default=290.0,
                   help="no new step starts after this many seconds (default 290)")
    p.add_argument("--main-dir", default=str(Path(__file__).resolve().parents[2]),
                   help="repo folder that holds the proxydhcpd package (default: this checkout)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for `-m proxydhcpd` (default: the one running the bench)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the machine to be under 10%% CPU busy "
                        "for 5 s in a row (default 0: start at once)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    a = p.parse_args(argv)
    a.rates = ([int(float(x)) for x in a.rates.split(",") if x.strip()] if a.rates
               else (QUICK_RATES if a.quick else RATES))
    a.duration = a.duration or (1.0 if a.quick else 3.0)
    a.bursts = a.bursts or (1 if a.quick else 3)
    a.calibrate_count = a.calibrate_count or (20000 if a.quick else 60000)
    names = [s.strip() for s in a.servers.split(",") if s.strip()]
    bad = [n for n in names if n not in SERVER_ORDER]
    if bad or not names:
        p.error(f"--servers: unknown {bad or '(empty)'}; choose from {', '.join(SERVER_ORDER)}")
    a.server_names = names
    return a


# ---- the bench ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.t0 = time.monotonic()
        self.ncpu = len(os.sched_getaffinity(0))
        self.lab: Lab | None = None
        self.lg: LoadGen | None = None
        self.servers: dict[str, Server] = {}
        self.start_errors: dict[str, str] = {}
        self.calibration: dict[int, float] = {}
        self.steps: dict[str, list[dict]] = {n: [] for n in args.server_names}
        self.bursts: dict[str, list[dict]] = {n: [] for n in args.server_names}
        self.samples: dict[str, dict] = {}
        self.counters: dict[str, dict] = {}
        self.cpu_split: dict[str, tuple[float, float]] = {}
        self.profile: dict | None = None
        self.notes: list[str] = []
        self.redone = 0
        self.work = Path(tempfile.mkdtemp(prefix="proxydhcp-bench-"))
        os.chmod(self.work, 0o755)   # dnsmasq drops to nobody and still writes its log here

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 > self.a.budget

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        self.lab = Lab()
        self.lab.create()
        self.lg = LoadGen(self.lab, senders=1, broadcast=not self.a.unicast)
        self.log(f"namespaces {self.lab.server_ns} / {self.lab.client_ns} ready; receiver "
                 f"buffer {self.lg.receiver_rcvbuf >> 20} MiB")

    def close(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        if self.lg is not None:
            self.lg.close()
            self.lg = None
        if self.lab is not None:
            errors = self.lab.close()
            for e in errors:
                self.log(f"cleanup: {e}")
            self.lab = None

    # -- generator alone -----------------------------------------------------------------------
    def calibrate(self) -> None:
        """Flat-out send rate of 1 and 2 sender processes with no server listening."""
        for k in (1, 2) if not self.a.senders else (self.a.senders,):
            self.lg.set_senders(k)
            _, stamps, errors = self.lg.send(self.a.calibrate_count, 0)
            rate = len(stamps) / (max(stamps) - min(stamps))
            self.calibration[k] = rate
            self.log(f"generator alone, {k} sender(s) flat out: {rate:,.0f} DISCOVERs/s"
                     + (f" ({errors} send errors)" if errors else ""))
        self.lg.flush()

    def senders_for(self, rate: float) -> int:
        if self.a.senders:
            return self.a.senders
        one = self.calibration.get(1, 0)
        return 1 if rate <= 0.6 * one else 2

    # -- one server ----------------------------------------------------------------------------
    def make_server(self, name: str, profile_to: Path | None = None) -> Server:
        if name == "ours":
            return Ours(self.work, self.lab, Path(self.a.main_dir), self.a.python, profile_to)
        return Dnsmasq(self.work, self.lab, log_offers=self.a.dnsmasq_log)

    def probe(self, name: str):
        def ready() -> tuple[bool, str]:
            self.lg.set_senders(1)
            self.lg.flush()
            first, _stamps, _ = self.lg.send(1, 0, lead=0)
            deadline = time.time() + 0.5
            while time.time() < deadline:
                time.sleep(0.05)
                xids, _times, invalid, sample = self.lg.flush()
                if first in xids and sample is not None:
                    desc = packets.describe_offer(sample)
                    self.samples[name] = desc
                    if not desc["vendor_class"].startswith("PXEClient"):
                        return False, f"offer without option 60 PXEClient: {desc}"
                    return True, "ok"
            return False, "no offer to a probe DISCOVER"
        return ready

    def snapshot(self, srv: Server) -> dict:
        known = proc_cpu([os.getpid(), *self.lg.pids()]) + (srv.cpu_seconds() or 0.0)
        mono, idle, steal = cpu_sample()
        return {"wall": time.time(), "cpu": srv.cpu_seconds(), "split": srv.cpu_split(),
                "srv_udp": srv.udp_counters(), "cli_udp": udp_counters(self.lg.receiver_pid),
                "softnet": softnet_drops(), "mono": mono, "idle": idle, "steal": steal,
                "known": known}

    @staticmethod
    def delta(s0: dict, s1: dict) -> dict:
        d = {"wall_s": s1["wall"] - s0["wall"]}
        d["server_cpu_s"] = (s1["cpu"] - s0["cpu"]) if None not in (s0["cpu"], s1["cpu"]) else None
        if s0["split"] and s1["split"]:
            d["server_user_s"] = s1["split"][0] - s0["split"][0]
            d["server_sys_s"] = s1["split"][1] - s0["split"][1]
        d["server_rcvbuf_drops"] = (s1["srv_udp"].get("RcvbufErrors", 0)
                                    - s0["srv_udp"].get("RcvbufErrors", 0))
        d["server_udp_in"] = s1["srv_udp"].get("InDatagrams", 0) - s0["srv_udp"].get(
            "InDatagrams", 0)
        d["client_rcvbuf_drops"] = (s1["cli_udp"].get("RcvbufErrors", 0)
                                    - s0["cli_udp"].get("RcvbufErrors", 0))
        d["backlog_drops"] = s1["softnet"] - s0["softnet"]
        ncpu_s = (s1["mono"] - s0["mono"]) * (os.cpu_count() or 1)
        busy = ncpu_s - (s1["idle"] - s0["idle"]) - (s1["steal"] - s0["steal"])
        d["machine_busy_cpu_s"] = busy
        d["foreign_cpu_s"] = max(0.0, busy - (s1["known"] - s0["known"]))
        d["foreign_share"] = d["foreign_cpu_s"] / ncpu_s if ncpu_s > 0 else None
        d["steal_share"] = (s1["steal"] - s0["steal"]) / ncpu_s if ncpu_s > 0 else None
        return d

    def collect(self, srv: Server, first: int, count: int, stamps: array, t_last: float,
                stop_when_all: bool) -> dict:
        """Offers for xids first..first+count-1. Waits at least `drain` after the last send,
        then until the server has nothing queued and no offer came for 0.2 s (or, for a burst,
        until every client is answered), and never longer than the retry window + 0.2 s.
        An offer counts as answered only within RETRY_WINDOW_S of its DISCOVER."""
        arrival = array("d", bytes(8 * count))
        got = dups = stale = invalid = 0
        min_until = t_last + (0 if stop_when_all else self.a.drain)
        max_until = t_last + RETRY_WINDOW_S + 0.2
        last_new = time.time()
        while True:
            time.sleep(0.05)
            xids, times, inv, _ = self.lg.flush()
            invalid += inv
            now = time.time()
            for x, t in zip(xids, times):
                i = x - first
                if 0 <= i < count:
                    if arrival[i] == 0.0:
                        arrival[i] = t
                        got += 1
                        last_new = now
                    else:
                        dups += 1
                else:
                    stale += 1
            if now >= max_until or (stop_when_all and got == count):
                break
            if now >= min_until and now - last_new > 0.2 and not srv.backlog():
                break
        lat = []
        last = None
        for i in range(count):
            t = arrival[i]
            if t:
                d = t - stamps[i]
                if d <= RETRY_WINDOW_S:
                    lat.append(d)
                    if last is None or t > last:
                        last = t
        return {"answered": len(lat), "late": got - len(lat), "duplicates": dups,
                "stale": stale, "invalid": invalid, "latencies": lat, "last_arrival": last}

    def run_step(self, srv: Server, rate: int) -> dict:
        count = max(1, int(rate * self.a.duration))
        k = self.senders_for(rate)
        self.lg.set_senders(k)
        srv.settle()
        self.lg.flush()
        s0 = self.snapshot(srv)
        first, stamps, errors = self.lg.send(count, rate)
        t_first, t_last = min(stamps), max(stamps)
        got = self.collect(srv, first, count, stamps, t_last, stop_when_all=False)
        s1 = self.snapshot(srv)
        lat = got.pop("latencies")
        answered = got["answered"]
        span = (got["last_arrival"] - t_first) if answered else None
        res = {"target_rate": rate, "senders": k, "sent": count, "send_errors": errors,
               "send_s": t_last - t_first,
               "sent_rate": count / (t_last - t_first) if t_last > t_first else None,
               **got, "fraction": answered / count,
               "offers_per_s": answered / span if span else 0.0,
               "p50_ms": 1e3 * pctl(lat, 0.50) if lat else None,
               "p99_ms": 1e3 * pctl(lat, 0.99) if lat else None,
               "max_ms": 1e3 * max(lat) if lat else None,
               **self.delta(s0, s1)}
        res["generator_limited"] = bool(res["sent_rate"] and res["sent_rate"] < 0.9 * rate)
        return res

    def run_burst(self, srv: Server) -> dict:
        n = self.a.burst
        self.lg.set_senders(1)
        srv.settle()
        self.lg.flush()
        s0 = self.snapshot(srv)
        first, stamps, errors = self.lg.send(n, 0)
        t_first, t_last = min(stamps), max(stamps)
        got = self.collect(srv, first, n, stamps, t_last, stop_when_all=True)
        s1 = self.snapshot(srv)
        lat = got.pop("latencies")
        within = len(lat)
        all_s = (got["last_arrival"] - t_first) if got["answered"] == n else None
        return {"clients": n, "send_errors": errors, "send_s": t_last - t_first, **got,
                "within_4s": within, "fraction_within_4s": within / n,
                "all_answered_s": all_s,
                "p50_ms": 1e3 * pctl(lat, 0.50) if lat else None,
                "p99_ms": 1e3 * pctl(lat, 0.99) if lat else None,
                "max_ms": 1e3 * max(lat) if lat else None, **self.delta(s0, s1)}

    def retrying(self, measure, what: str) -> dict:
        """measure() again (up to --retry-busy times) while other processes used more than
        FOREIGN_LIMIT of the CPUs during it; returns the least disturbed attempt."""
        best = None
        for attempt in range(self.a.retry_busy + 1):
            r = measure()
            share = r.get("foreign_share")
            r["attempts"] = attempt + 1
            if best is None or (share or 0) < (best.get("foreign_share") or 0):
                best = r
            if share is None or share <= FOREIGN_LIMIT or self.over_budget():
                break
            self.redone += 1
            self.log(f"{what}: other processes used {100 * share:.0f}% of the CPUs; again")
            time.sleep(1.0)
        best["attempts"] = attempt + 1
        return best

    def measure_server(self, name: str) -> None:
        srv = self.make_server(name)
        try:
            srv.start(self.probe(name))
        except (ServerError, OSError) as exc:
            self.start_errors[name] = f"did not start: {exc}"
            self.log(f"{name}: FAIL {self.start_errors[name]}")
            srv.stop()
            return
        self.servers[name] = srv
        rb = f"{srv.rcvbuf / 1024:.0f} KiB" if srv.rcvbuf else "?"
        self.log(f"{name}: ready, pid {srv.pid}, {srv.version}; port 67 receive buffer {rb}")
        time.sleep(0.3)
        cpu0 = srv.cpu_split()
        below = 0
        for rate in self.a.rates:
            if self.over_budget():
                self.notes.append(f"{name}: steps from {rate}/s on skipped (time budget "
                                  f"{self.a.budget:g} s)")
                break
            if not srv.alive():
                self.notes.append(f"{name}: server exited during the ladder "
                                  f"(status {srv.proc.returncode})")
                break
            r = self.retrying(lambda: self.run_step(srv, rate), f"{name} {rate:,}/s")
            self.steps[name].append(r)
            self.log(f"{name} {rate:>7,}/s: sent {r['sent_rate'] or 0:9,.0f}/s, answered "
                     f"{100 * r['fraction']:6.2f}%, {r['offers_per_s']:9,.0f} offers/s, p50 "
                     f"{fmt_ms(r['p50_ms'])} p99 {fmt_ms(r['p99_ms'])} ms, server drops "
                     f"{r['server_rcvbuf_drops']}, cpu {r['server_cpu_s'] or 0:.2f} s"
                     + (f", other load {100 * r['foreign_share']:.0f}%"
                        if r['foreign_share'] and r['foreign_share'] > FOREIGN_LIMIT else ""))
            prev = self.steps[name][-2]["offers_per_s"] if len(self.steps[name]) > 1 else 0.0
            if r["fraction"] < self.a.stop_below:
                # Past the 90% point, go on only while the throughput still rises (by 5% or
                # more), so a server's maximum is not cut off; at most --past-limit steps.
                below += 1
                if below > self.a.past_limit or r["offers_per_s"] < 1.05 * prev:
                    break
            if r["generator_limited"]:
                self.notes.append(f"{name}: stopped at {rate}/s: the generator sent only "
                                  f"{r['sent_rate']:,.0f}/s")
                break
        cpu1 = srv.cpu_split()
        if cpu0 and cpu1:
            self.cpu_split[name] = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
        for i in range(self.a.bursts):
            if not srv.alive():
                break
            time.sleep(0.5)
            b = self.retrying(lambda: self.run_burst(srv), f"{name} burst {i + 1}")
            self.bursts[name].append(b)
            self.log(f"{name} burst {i + 1}: {b['answered']}/{b['clients']} answered, "
                     f"{b['within_4s']} within 4 s, all after "
                     f"{fmt_s(b['all_answered_s'])}, sent in {1e3 * b['send_s']:.1f} ms, "
                     f"p50 {fmt_ms(b['p50_ms'])} p99 {fmt_ms(b['p99_ms'])} ms, server drops "
                     f"{b['server_rcvbuf_drops']}")
        if isinstance(srv, Ours):
            self.counters[name] = srv.counters()
        rc = srv.stop()
        if rc not in (0, None) and not (name == "dnsmasq" and rc in (0, -15)):
            self.notes.append(f"{name}: exit status {rc} after SIGTERM: "
                              f"{srv.stderr_path.read_text(errors='replace')[-300:]}")
        self.log(f"{name}: stopped (exit status {rc})")

    def run_profile(self) -> None:
        """Ours again under cProfile, one step at a rate it cannot fully answer."""
        rate = self.a.profile_rate
        steps = self.steps.get("ours") or []
        if not rate:
            short = [s for s in steps if s["fraction"] < 0.999]
            rate = short[0]["target_rate"] if short else (steps[-1]["target_rate"] if steps
                                                           else 20000)
        out = self.work / "ours.cprofile"
        srv = self.make_server("ours", profile_to=out)
        try:
            srv.start(self.probe("ours"))
        except (ServerError, OSError) as exc:
            self.notes.append(f"profile: ours did not start under cProfile: {exc}")
            return
        try:
            time.sleep(0.3)
            r = self.run_step(srv, rate)
            self.counters["ours-profile"] = srv.counters()
        finally:
            srv.stop()
        self.log(f"profile run at {rate:,}/s: answered {100 * r['fraction']:.1f}%, "
                 f"{r['offers_per_s']:,.0f} offers/s under cProfile")
        try:
            st = pstats.Stats(str(out))
        except (OSError, TypeError, EOFError) as exc:
            self.notes.append(f"profile: no cProfile output ({exc})")
            return
        total = st.total_tt
        rows = []
        handler = None
        for (fn, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
            name = f"{shorten(fn)}:{line}({func})"
            rows.append({"function": name, "calls": nc, "tottime_s": tt, "cumtime_s": ct})
            if fn.endswith("server.py") and func == "_on_readable":
                handler = ct
        rows.sort(key=lambda x: -x["tottime_s"])
        micro = None
        try:
            env = dict(os.environ, PYTHONPATH=self.a.main_dir)
            res = subprocess.run([self.a.python, str(Path(__file__).with_name("microcost.py"))],
                                 capture_output=True, text=True, timeout=120, env=env,
                                 cwd=self.a.main_dir)
            micro = json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-300:]}
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            micro = {"error": str(exc)}
        self.profile = {"microcost": micro, "rate": rate, "step": r, "total_cpu_s": total,
                        "handler_cpu_s": handler,
                        "requests": (self.counters.get("ours-profile") or {}),
                        "top_tottime": rows[:20],
                        "request_path": sorted(
                            (x for x in rows
                             if any(k in x["function"] for k in ("proxydhcpd/", "sendmsg",
                                                                  "recvmsg"))
                             and "<module>" not in x["function"]
                             and "__main__" not in x["function"]),
                            key=lambda x: -x["cumtime_s"])[:14],
                        "file": str(out) if self.a.keep else None}

    # -- results ---------------------------------------------------------------------------------
    def best(self, name: str) -> dict | None:
        steps = self.steps.get(name) or []
        return max(steps, key=lambda s: s["offers_per_s"]) if steps else None

    def full_rate(self, name: str) -> int | None:
        """The highest step rate with every client answered, all lower steps too."""
        best = None
        for s in self.steps.get(name) or []:
            if s["answered"] != s["sent"]:
                break
            best = s["target_rate"]
        return best

    def step_at(self, name: str, rate: int) -> dict | None:
        return next((s for s in self.steps.get(name) or [] if s["target_rate"] == rate), None)

    def cpu_per_10k(self, name: str) -> float | None:
        steps = [s for s in self.steps.get(name) or [] if s["server_cpu_s"] is not None]
        offers = sum(s["answered"] for s in steps)
        return 1e4 * sum(s["server_cpu_s"] for s in steps) / offers if offers else None

    def burst_summary(self, name: str) -> dict | None:
        bs = self.bursts.get(name) or []
        if not bs:
            return None
        alls = [b["all_answered_s"] for b in bs]
        return {"bursts": len(bs),
                "min_fraction_within_4s": min(b["fraction_within_4s"] for b in bs),
                "all_answered_every_time": all(a is not None and a <= RETRY_WINDOW_S
                                               for a in alls),
                "median_all_answered_s": (statistics.median(alls) if all(a is not None
                                                                         for a in alls)
                                          else None),
                "worst_all_answered_s": max(alls) if all(a is not None for a in alls) else None,
                "median_p50_ms": statistics.median(b["p50_ms"] for b in bs if b["p50_ms"])
                if any(b["p50_ms"] for b in bs) else None,
                "median_p99_ms": statistics.median(b["p99_ms"] for b in bs if b["p99_ms"])
                if any(b["p99_ms"] for b in bs) else None,
                "median_send_ms": statistics.median(1e3 * b["send_s"] for b in bs),
                "server_drops": sum(b["server_rcvbuf_drops"] for b in bs)}

    def goals(self) -> list[dict]:
        out = []
        bs = self.burst_summary("ours")
        g = {"goal": f"all {self.a.burst:,} of a burst answered within the first retry window "
                     f"(4 s), every burst", "met": None}
        if bs is None:
            g["verdict"] = "not evaluated (no burst of ours)"
        else:
            g["met"] = bs["all_answered_every_time"]
            g["verdict"] = (f"{'met' if g['met'] else 'NOT met'}: worst "
                            + (f"all answered after {fmt_s(bs['worst_all_answered_s'])}"
                               if bs["worst_all_answered_s"] is not None else
                               f"{100 * bs['min_fraction_within_4s']:.1f}% within 4 s"))
        out.append(g)
        s = self.step_at("ours", 10000)
        g = {"goal": "100% answered at 10,000/s", "met": None}
        if s is None:
            g["verdict"] = "not evaluated (no 10,000/s step for ours)"
        else:
            g["met"] = s["answered"] == s["sent"]
            g["verdict"] = (f"{'met' if g['met'] else 'NOT met'}: {s['answered']:,} of "
                            f"{s['sent']:,} ({100 * s['fraction']:.2f}%)")
        out.append(g)
        ours, ref = self.best("ours"), self.best(REF)
        g = {"goal": "sustained maximum offers/s >= dnsmasq's in the same run", "met": None}
        if ours is None or ref is None:
            g["verdict"] = "not evaluated (needs ours and dnsmasq in this run)"
        else:
            r = ours["offers_per_s"] / ref["offers_per_s"] if ref["offers_per_s"] else None
            g["ratio"] = r
            g["met"] = r is not None and r >= 1.0
            g["verdict"] = (f"{'met' if g['met'] else 'NOT met'}: {ours['offers_per_s']:,.0f} "
                            f"vs {ref['offers_per_s']:,.0f} = {r:.2f}x")
        out.append(g)
        return out

    def report(self, meta: dict) -> str:
        names = self.a.server_names
        m = meta["machine"]
        L = [f"proxyDHCP bench  {meta['date']}  {m['nproc']} CPUs (nproc), {m['cpu_model']}, "
             f"{m['memory']} RAM, {m['kernel']}, Python {m['python']}",
             f"command: {meta['command']}",
             f"machine CPU busy (1 s sample) before: {pct(meta.get('busy_before'))}, after: "
             f"{pct(meta.get('busy_after'))}"]
        lab = meta.get("lab") or {}
        L.append(f"setup: netns {lab.get('server_ns')} ({lab.get('server_if')} "
                 f"{lab.get('server_addr')}/24) <-veth-> {lab.get('client_ns')} "
                 f"({lab.get('client_if')} {lab.get('client_addr')}/24); DISCOVERs "
                 f"({len(packets.discover_template()[0])} bytes, BIOS PXE ROM: option 60 "
                 f"PXEClient, arch 0, broadcast flag; new xid + MAC each) from :68 to "
                 + ("10.77.0.1:67 (unicast)" if self.a.unicast else "255.255.255.255:67")
                 + f"; {self.a.duration:g} s per step, then at least {self.a.drain:g} s "
                 f"for late offers (until the server's queue is empty, at most 4.2 s)")
        if self.calibration:
            L.append("load generator alone, no server (flat out): " + ", ".join(
                f"{k} sender{'s' if k > 1 else ''} {v:,.0f}/s" for k, v in
                sorted(self.calibration.items())) + f"; receiver buffer "
                f"{(self.lg.receiver_rcvbuf if self.lg else meta.get('receiver_rcvbuf', 0)) >> 20}"
                f" MiB")
        for n in names:
            srv = self.servers.get(n)
            if srv is None:
                L.append(f"  {n:8s} {self.start_errors.get(n, 'not started')}")
                continue
            s = self.samples.get(n, {})
            rb = f"{srv.rcvbuf / 1024:.0f} KiB" if srv.rcvbuf else "?"
            extra = {"ours": f"; LogLevel WARNING; {meta.get('ours_source')}",
                     "dnsmasq": ("; logs a line per offer" if self.a.dnsmasq_log
                                 else "; --quiet-dhcp (no line per offer)")}.get(n, "")
            L.append(f"  {n:8s} {srv.version}; port 67 socket receive buffer {rb}{extra}")
            if s:
                L.append(f"  {'':8s} offer: {s['bytes']} bytes, options "
                         f"{' '.join(map(str, s['options']))}, option 60 {s['vendor_class']!r}, "
                         f"file {s['file']!r}, siaddr {s['siaddr']}, broadcast flag "
                         f"{'set' if s['broadcast_flag'] else 'clear'}")
        L.append("")
        # ladder
        rates = []
        for n in names:
            for s in self.steps.get(n) or []:
                if s["target_rate"] not in rates:
                    rates.append(s["target_rate"])
        rates.sort()
        L.append("Rate steps: answered = clients that got a valid offer within 4 s of their "
                 "DISCOVER (the PXE ROM's first retry);")
        L.append("offers/s = answered / (last such offer - first send); latency = offer "
                 "arrival - send; drops = requests the server's socket")
        L.append("dropped (receive buffer full: UDP RcvbufErrors in the server namespace)")
        cols = f"{'sent/s':>8s} {'answered':>8s} {'offers/s':>8s} {'p50 ms':>7s} " \
               f"{'p99 ms':>7s} {'drops':>7s}"
        w = len(cols)
        head1 = f"{'':>8s} |" + "|".join(f" {n:^{w}s} " for n in names)
        head2 = f"{'rate/s':>8s} |" + "|".join(f" {cols} " for _ in names)
        show_ratio = "ours" in names and REF in names
        if show_ratio:
            head1 += f"| {'ours/dnsmasq':>12s}"
            head2 += f"| {'offers/s':>12s}"
        L += [head1, head2, "-" * len(head2)]
        for rate in rates:
            row = f"{rate:>8,} |"
            parts = []
            for n in names:
                s = self.step_at(n, rate)
                if s is None:
                    parts.append(f" {'-':>{w}s} ")
                    continue
                mark = ""
                if s["generator_limited"]:
                    mark += "*"
                if s["foreign_share"] is not None and s["foreign_share"] > FOREIGN_LIMIT:
                    mark += "!"
                parts.append(f" {fmt_k(s['sent_rate']):>8s} {fmt_frac(s['fraction']):>8s} "
                             f"{fmt_k(s['offers_per_s']) + mark:>8s} {fmt_ms(s['p50_ms']):>7s} "
                             f"{fmt_ms(s['p99_ms']):>7s} {s['server_rcvbuf_drops']:>7,} ")
            row += "|".join(parts)
            if show_ratio:
                a, b = self.step_at("ours", rate), self.step_at(REF, rate)
                r = (a["offers_per_s"] / b["offers_per_s"]
                     if a and b and b["offers_per_s"] else None)
                row += f"| {(f'{r:.2f}x' if r else '-'):>12s}"
            L.append(row)
        L.append("")
        # burst
        L.append(f"Burst: {self.a.burst:,} new clients at once (sent flat out by one sender), "
                 f"{self.a.bursts} time(s) per server")
        head = f"{'':34s}" + "".join(f"{n:>14s}" for n in names) + (
            f"{'ours/dnsmasq':>14s}" if show_ratio else "")
        L += [head, "-" * len(head)]
        bsum = {n: self.burst_summary(n) for n in names}

        def brow(label, key, fmt, ratio=False):
            row = f"{label:34s}"
            vals = {}
            for n in names:
                v = bsum[n][key] if bsum[n] else None
                vals[n] = v
                row += f"{fmt(v):>14s}"
            if show_ratio:
                a, b = vals.get("ours"), vals.get(REF)
                row += f"{(f'{a / b:.2f}x' if ratio and a and b else ''):>14s}"
            L.append(row)
        brow("sent in (median, ms)", "median_send_ms", lambda v: fmt_ms(v))
        brow("answered within 4 s (worst burst)", "min_fraction_within_4s", fmt_frac)
        brow("all answered after (median)", "median_all_answered_s", fmt_s, ratio=True)
        brow("all answered after (worst)", "worst_all_answered_s", fmt_s, ratio=True)
        brow("latency p50 (median, ms)", "median_p50_ms", fmt_ms, ratio=True)
        brow("latency p99 (median, ms)", "median_p99_ms", fmt_ms, ratio=True)
        brow("requests dropped by the server", "server_drops", lambda v: "-" if v is None
             else f"{v:,}")
        L.append("")
        # summary
        L.append("Summary")
        head = f"{'':44s}" + "".join(f"{n:>14s}" for n in names) + (
            f"{'ours/dnsmasq':>14s}" if show_ratio else "")
        L += [head, "-" * len(head)]

        def srow(label, vals, fmt, ratio=True):
            row = f"{label:44s}" + "".join(f"{fmt(vals.get(n)):>14s}" for n in names)
            if show_ratio:
                a, b = vals.get("ours"), vals.get(REF)
                row += f"{(f'{a / b:.2f}x' if ratio and a and b else ''):>14s}"
            L.append(row)
        srow("sustained max offers/s (best step)",
             {n: (self.best(n) or {}).get("offers_per_s") for n in names}, fmt_int)
        srow("  at step rate/s", {n: (self.best(n) or {}).get("target_rate") for n in names},
             fmt_int, ratio=False)
        srow("highest step rate with 100% answered", {n: self.full_rate(n) for n in names},
             fmt_int)
        srow("server CPU s per 10,000 offers (all steps)",
             {n: self.cpu_per_10k(n) for n in names}, lambda v: "-" if v is None else f"{v:.3f}")
        split = {}
        for n in names:
            u, s = self.cpu_split.get(n, (0, 0))
            split[n] = f"{100 * u / (u + s):.0f}/{100 * s / (u + s):.0f}" if u + s else "-"
        srow("  user/system split (%)", split, str, ratio=False)
        L.append("")
        L.append("Goals (ours, from the issue)")
        for g in self.goals():
            L.append(f"  {g['goal']:72s} {g['verdict']}")
        # notes
        notes = list(self.notes)
        for n in names:
            lim = [s["target_rate"] for s in self.steps.get(n) or [] if s["generator_limited"]]
            if lim:
                notes.append(f"* {n}: the generator fell short of the target rate at "
                             f"{', '.join(map(str, lim))}/s (CPU shared with the server)")
            cdrop = sum(s["client_rcvbuf_drops"] for s in self.steps.get(n) or []) + sum(
                b["client_rcvbuf_drops"] for b in self.bursts.get(n) or [])
            if cdrop:
                notes.append(f"{n}: the bench's receiver dropped {cdrop} replies (answered "
                             f"fractions are a lower bound)")
            bl = sum(s["backlog_drops"] for s in self.steps.get(n) or [])
            if bl:
                notes.append(f"{n}: the kernel dropped {bl} packets from its backlog queue "
                             f"(netdev_max_backlog) during the steps")
            late = sum(s["late"] for s in self.steps.get(n) or [])
            if late:
                notes.append(f"{n}: {late} offers came more than 4 s after their DISCOVER "
                             f"(not counted as answered)")
            dup = sum(s["duplicates"] for s in self.steps.get(n) or [])
            inv = sum(s["invalid"] for s in self.steps.get(n) or [])
            if dup or inv:
                notes.append(f"{n}: {dup} duplicate offers, {inv} invalid replies (not counted)")
        all_steps = [s for n in names for s in self.steps.get(n) or []]
        if all_steps and all(s["foreign_share"] is not None for s in all_steps):
            busy = [s for s in all_steps if s["foreign_share"] > FOREIGN_LIMIT]
            fs = sum(s["foreign_cpu_s"] for s in all_steps)
            ws = sum(s["wall_s"] for s in all_steps)
            notes.append(f"other processes used ~{fs:.1f} CPU-s during the steps "
                         f"({100 * fs / (ws * self.ncpu):.1f}% of {self.ncpu} cores)"
                         + (f"; ! marks steps where they used more than "
                            f"{100 * FOREIGN_LIMIT:.0f}%" if busy else ""))
            if self.redone:
                notes.append(f"{self.redone} step(s)/burst(s) were measured again because other "
                             f"processes used more than {100 * FOREIGN_LIMIT:.0f}% of the CPUs "
                             f"meanwhile (--retry-busy {self.a.retry_busy}; the least disturbed "
                             f"attempt is shown)")
            st = [s["steal_share"] for s in all_steps if s["steal_share"] is not None]
            if st and max(st) > 0.02:
                notes.append(f"hypervisor steal time up to {100 * max(st):.0f}% of the CPUs "
                             f"during a step")
        if notes:
            L += ["", "Notes"] + [f"  {x}" for x in notes]
        if self.profile:
            p = self.profile
            tot = p["total_cpu_s"] or 1.0
            L += ["", "Profile of ours: cProfile with a CPU-time clock "
                      f"(bench/proxylib/profiled.py), one {self.a.duration:g} s step at "
                      f"{p['rate']:,}/s: answered {100 * p['step']['fraction']:.1f}%, "
                      f"{p['step']['offers_per_s']:,.0f} offers/s with the profiler on;",
                  f"{tot:.2f} CPU-s profiled, of which the request handler (_on_readable and "
                  f"below) {fmt_share(p['handler_cpu_s'], tot)}. Own CPU time (share of all):"]
            for r in p["top_tottime"][:14]:
                L.append(f"  {r['tottime_s']:7.3f} s {100 * r['tottime_s'] / tot:5.1f}%"
                         f" {r['calls']:>9,}  {r['function']}")
            sat = self.best("ours")
            if sat and sat["answered"] and sat.get("server_user_s") is not None:
                L.append(f"  in the ladder, unprofiled, at its best step ({sat['target_rate']:,}/s,"
                         f" {sat['offers_per_s']:,.0f} offers/s): "
                         f"{1e6 * sat['server_cpu_s'] / sat['answered']:.0f} us CPU per offer "
                         f"(user {1e6 * sat['server_user_s'] / sat['answered']:.0f}, system "
                         f"{1e6 * sat['server_sys_s'] / sat['answered']:.0f})")
            mc = p.get("microcost") or {}
            if "parse_us" in mc:
                L.append(f"  in-process, unprofiled (bench/proxylib/microcost.py), CPU us per "
                         f"request: parse {mc['parse_us']:.1f}, decide {mc['decide_us']:.1f}, "
                         f"build {mc['build_us']:.1f}, request.mac_text {mc['mac_text_us']:.1f}; "
                         f"whole _on_request with a no-op socket {mc['on_request_us']:.1f}")
                if "fast_scan_us" in mc:
                    L.append(f"  fast path: packet.scan {mc['scan_us']:.1f}, with the layout "
                             f"memo {mc['fast_scan_us']:.1f}, FastPath.answer "
                             f"{mc['fast_answer_us']:.1f}; _on_request_full (full parse, as at "
                             f"DEBUG) {mc['on_request_full_us']:.1f}; receive handler with its "
                             f"system calls on loopback {mc['loopback_us']:.1f}")
            elif mc:
                L.append(f"  microcost failed: {mc.get('error')}")
            L.append("  cumulative (with callees), request path only:")
            for r in p["request_path"]:
                L.append(f"  {r['cumtime_s']:7.3f} s {100 * r['cumtime_s'] / tot:5.1f}%"
                         f" {r['calls']:>9,}  {r['function']}")
        L.append("")
        L.append(f"total bench time {time.monotonic() - self.t0:.0f} s")
        return "\n".join(L)

    def to_json(self, meta: dict) -> dict:
        out = dict(meta)
        out["settings"] = {k: getattr(self.a, k) for k in
                           ("quick", "rates", "duration", "drain", "stop_below", "past_limit",
                            "burst", "bursts", "senders", "unicast", "server_names", "budget",
                            "retry_busy", "dnsmasq_log")}
        out["generator_alone_rate"] = {str(k): v for k, v in self.calibration.items()}
        out["servers"] = {n: (self.servers[n].describe() if n in self.servers
                              else {"name": n, "error": self.start_errors.get(n)})
                          for n in self.a.server_names}
        for n in out["servers"]:
            out["servers"][n]["offer"] = self.samples.get(n)
            if n in self.counters:
                out["servers"][n]["counters"] = self.counters[n]
        out["steps"] = self.steps
        out["bursts"] = self.bursts
        out["summary"] = {n: {"best_offers_per_s": (self.best(n) or {}).get("offers_per_s"),
                              "best_at_rate": (self.best(n) or {}).get("target_rate"),
                              "full_answer_rate": self.full_rate(n),
                              "cpu_s_per_10k_offers": self.cpu_per_10k(n),
                              "cpu_user_sys_s": self.cpu_split.get(n),
                              "burst": self.burst_summary(n)} for n in self.a.server_names}
        out["goals"] = self.goals()
        out["notes"] = self.notes
        out["profile"] = self.profile
        return out


# ---- formatting --------------------------------------------------------------------------------

def shorten(path: str) -> str:
    for marker in ("/proxydhcpd/", "/common/", "/asyncio/", "/site-packages/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


def fmt_share(part: float | None, total: float) -> str:
    return "?" if part is None or not total else f"{part:.2f} s ({100 * part / total:.0f}%)"


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_s(v: float | None) -> str:
    if v is None:
        return "never"
    return f"{1e3 * v:.0f} ms" if v < 1 else f"{v:.2f} s"


def fmt_frac(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1.0:
        return "100%"
    return f"{100 * v:.2f}%" if v >= 0.99 else f"{100 * v:.1f}%"


def fmt_k(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_int(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


# ---- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/run-proxydhcp-bench: needs root (network namespaces, port 67)",
              file=sys.stderr)
        return 2
    for tool in ("ip", "ss") + (("dnsmasq",) if "dnsmasq" in args.server_names else ()):
        if not shutil.which(tool):
            print(f"bench/run-proxydhcp-bench: {tool} not found", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet
        quiet = 0
        while quiet < 5 and time.monotonic() < deadline:
            busy = cpu_busy(1.0)
            quiet = quiet + 1 if busy is not None and busy < 0.10 else 0
        print(f"bench/run-proxydhcp-bench: machine {'quiet' if quiet >= 5 else 'still busy'} after "
              f"waiting up to {args.wait_quiet:g} s", file=sys.stderr)
    bench = Bench(args)
    meta = {"bench": "proxydhcp", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(), "busy_before": cpu_busy(),
            "command": " ".join(shlex.quote(x)
                                for x in ["bench/run-proxydhcp-bench", *sys.argv[1:]]),
            "ours_source": git_info(args.main_dir)}
    status = 0
    try:
        bench.setup()
        meta["lab"] = bench.lab.describe()
        meta["receiver_rcvbuf"] = bench.lg.receiver_rcvbuf
        bench.calibrate()
        for name in args.server_names:
            bench.measure_server(name)
        if args.profile and "ours" in args.server_names:
            bench.run_profile()
    except KeyboardInterrupt:
        bench.log("interrupted; stopping servers, deleting namespaces")
        status = 130
    except (NetnsError, OSError, RuntimeError) as exc:
        bench.log(f"error: {exc}")
        status = 1
    finally:
        bench.close()
    if status == 130:
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
        return status
    try:
        meta["busy_after"] = cpu_busy()
        text = bench.report(meta)
        if args.json:
            data = bench.to_json(meta)
            data["report"] = text
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(text, flush=True)
    finally:
        if args.keep:
            print(f"(work folder kept: {bench.work})", file=sys.stderr)
        else:
            shutil.rmtree(bench.work, ignore_errors=True)
    if status == 0 and (bench.start_errors or not any(bench.steps.values())):
        status = 1
    return status
