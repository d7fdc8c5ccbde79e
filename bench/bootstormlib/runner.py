"""bench/run-bootstorm-bench: N machines network-booting at once, against our stack (proxydhcpd,
tftpd, prebootpolicyd) and a peer stack (dnsmasq proxyDHCP + TFTP, nginx HTTP), one stack at a
time in a lab of its own (stacks.py), the same simulated clients (client.py) for both.

Per client count (--clients, default 100,500) and repeat, each stack in turn (who goes first
alternates): wait for a quiet machine (--wait-quiet), make the lab, start the stack, run one
warm-up client through the whole boot (it must succeed: it checks the stack's configuration),
then start all N clients at the same moment (--spread spreads their first DISCOVERs over that
many seconds) and wait until every client has its files or has failed, stop the stack, delete
the lab.

Measured per run:
  time-to-all   first DISCOVER sent to the moment the last client holds every file, verified;
                only when every client was served (otherwise the failures are the result);
  phases        per phase (dhcp, bootfile, ipxe_dhcp, script, kernel, initrd; client.py)
                the median and the maximum over the served clients;
  server CPU-s  every process of the stack (all daemons, nginx's workers), user + system, from
                the stack's own cgroup (v2 cpu.stat or v1 cpuacct; psutil on the processes
                where no cgroup can be made), over the storm;
  client CPU-s  the client workers' getrusage (they share the machine's cores with the servers);
  other         the machine's busy CPU (/proc/stat: elapsed x CPUs - idle - iowait - steal)
                minus server, clients and the bench, as a share of all CPUs: work of other
                processes (and kernel softirq time not charged to any of them). A run above
                10 % is marked '!' and is not comparable.
Ratio: peer time-to-all / our time-to-all (>= 1.0 means ours is at least as fast; the goal).

Exit status: 0 measured (client failures are a measurement and are reported), 1 a stack did
not start or the bench failed, 2 not root or a tool missing, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from machineinfo import machine
from tftplib.cpu import CgroupParent

from . import client, proto, stacks

PHASES = ["dhcp", "bootfile", "ipxe_dhcp", "script", "kernel", "initrd"]
IMAGING_ENV = Path("/var/cache/preboot/imaging-env")
KERNEL_SIZE, INITRD_SIZE = 8_247_232, 21_938_898       # the imaging environment's, for scale
FOREIGN_LIMIT = 0.10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- machine load ------------------------------------------------------------------------------

def cpu_sample() -> tuple[float, float]:
    """(monotonic time, idle + iowait + steal CPU-s of the whole machine)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return time.monotonic(), (f[3] + f[4] + (f[7] if len(f) > 7 else 0)) / hz


def busy_share(seconds: float = 1.0) -> float:
    ncpu = os.cpu_count() or 1
    t0, i0 = cpu_sample()
    time.sleep(seconds)
    t1, i1 = cpu_sample()
    return max(0.0, 1.0 - (i1 - i0) / ((t1 - t0) * ncpu))


def wait_quiet(limit: float) -> tuple[bool, float]:
    """Wait up to `limit` s for 5 s in a row under 10 % busy; (quiet, seconds waited)."""
    start = time.monotonic()
    quiet = 0
    while quiet < 5 and time.monotonic() - start < limit:
        quiet = quiet + 1 if busy_share(1.0) < 0.10 else 0
    return quiet >= 5, time.monotonic() - start


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


# ---- the served files --------------------------------------------------------------------------

def make_root(work: Path, scale: float, log_fn) -> tuple[Path, dict[str, tuple[int, str]], dict]:
    """The root both stacks serve: undionly.kpxe, ipxe.efi (from /usr/lib/ipxe), preboot/linux,
    preboot/initrd (the imaging environment's when present and scale is 1, else random bytes of
    its size x scale). Returns (root, {name: (size, sha256)}, description)."""
    root = work / "root"
    (root / "preboot").mkdir(parents=True)
    desc = {}
    for name in ("undionly.kpxe", "ipxe.efi"):
        src = Path("/usr/lib/ipxe") / name
        if not src.exists():
            raise FileNotFoundError(f"{src} missing (apt-get install ipxe)")
        shutil.copyfile(os.path.realpath(src), root / name)
        desc[name] = f"{src} (package ipxe)"
    for name, size in (("linux", KERNEL_SIZE), ("initrd", INITRD_SIZE)):
        real = IMAGING_ENV / name
        dest = root / "preboot" / name
        if scale == 1.0 and real.exists():
            shutil.copyfile(real, dest)
            desc[name] = f"{real} (the imaging environment)"
        else:
            n = int((real.stat().st_size if real.exists() else size) * scale)
            with open(dest, "wb") as f:
                left = n
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    f.write(chunk)
                    left -= len(chunk)
            desc[name] = f"random bytes ({'scaled x%g of ' % scale if scale != 1 else ''}" \
                         f"{'the imaging environment' if real.exists() else 'its usual size'})"
    expected = {}
    for p in (root / "undionly.kpxe", root / "ipxe.efi", root / "preboot/linux",
              root / "preboot/initrd"):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        expected[p.name] = (p.stat().st_size, h.hexdigest())
        desc[p.name] = f"{p.stat().st_size:,} bytes, " + desc[p.name]
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    return root, expected, desc


# ---- peers' packages ---------------------------------------------------------------------------

def ensure_peer_tools() -> str | None:
    """Install nginx-light (and dnsmasq-base) with apt-get when missing, with
    /usr/sbin/policy-rc.d answering 101 so no service starts (removed again only when this made
    it). Returns a problem, or None."""
    missing = [pkg for b, pkg in (("dnsmasq", "dnsmasq-base"), ("nginx", "nginx-light"))
               if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"missing {', '.join(missing)} (no apt-get)"
    log(f"installing {' '.join(missing)} with apt-get (no service is started)")
    policy = Path("/usr/sbin/policy-rc.d")
    made = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made = True
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        args = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-300:]}"
    finally:
        if made:
            policy.unlink(missing_ok=True)
    return None


# ---- arguments -----------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run-bootstorm-bench",
        description="N simulated PXE ROM + iPXE clients booting at once against our stack "
                    "(proxydhcpd, tftpd, prebootpolicyd) and a peer stack (dnsmasq proxyDHCP + "
                    "TFTP, nginx), each in network namespaces of its own. Needs root.")
    p.add_argument("--clients", default="100,500", help="client counts (default 100,500)")
    p.add_argument("--stacks", default="ours,peer", help="subset of ours,peer")
    p.add_argument("--repeats", type=int, default=1, help="runs per stack and count (default 1)")
    p.add_argument("--uefi", type=float, default=0.5,
                   help="share of UEFI x64 clients (arch 7; the rest BIOS, arch 0; default 0.5)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="kernel and initrd size factor; 1 (default) serves the imaging "
                        "environment's real files when built, else random bytes of 8 and 21 MB")
    p.add_argument("--spread", type=float, default=0.0,
                   help="spread the clients' first DISCOVERs over this many seconds (default 0: "
                        "all at once)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="a client without all its files this many seconds after its first "
                        "DISCOVER fails (default 900)")
    p.add_argument("--workers", type=int, default=2,
                   help="client processes (default 2, one per core here)")
    p.add_argument("--blksize", type=int, default=1432,
                   help="TFTP blksize the clients ask for (default 1432, as iPXE)")
    p.add_argument("--http", choices=("keep-alive", "close"), default="keep-alive",
                   help="the clients' HTTP connections: keep-alive (default: as iPXE, whose "
                        "connection pool carries the script, the answer, kernel and initrd "
                        "over one connection per server) or close (a connection per GET, as "
                        "this bench did before 2026-12-07 evening)")
    p.add_argument("--uefi-tftp", choices=("edk2", "lockstep"), default="edk2",
                   help="how a UEFI client's firmware reads its boot program: edk2 (default: "
                        "as OVMF 2022.11 does, captured here: a size query, then blksize 1468 "
                        "windowsize 4, RFC 7440, granted by servers that support it) or "
                        "lockstep (blksize --blksize, one block per ACK, as this bench did "
                        "before 2026-12-08)")
    p.add_argument("--tcp-cc", default="cubic",
                   help="TCP congestion control in the bench's namespaces (default cubic, the "
                        "kernel's and SLES's default; 'system' keeps the host's). A host set "
                        "to bbr (this one) let a storm collapse some downloads' pacing rate to "
                        "2 KB/s for a minute, for either stack: clients starved of CPU close "
                        "their window, and BBR takes the trickle for the bandwidth")
    p.add_argument("--peer-files", choices=("http", "tftp"), default="http",
                   help="how the peer's static script fetches kernel and initrd (default http)")
    p.add_argument("--tftp-max", type=int, default=1000,
                   help="dnsmasq --tftp-max (its default, 50, would refuse a storm; default 1000)")
    p.add_argument("--ours-kernel-url", default="",
                   help="policyd ImagingKernel for the run (default: policyd's own default)")
    p.add_argument("--ours-initrd-url", default="",
                   help="policyd ImagingInitrd for the run (default: policyd's own default)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to this long for the machine to be under 10%% "
                        "busy for 5 s")
    p.add_argument("--json", metavar="OUT", help="also write everything as JSON to OUT")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    p.add_argument("--main-dir", default=str(Path(__file__).resolve().parents[2]))
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args(argv)
    a.client_counts = [int(x) for x in a.clients.split(",") if x.strip()]
    a.stack_names = [s.strip() for s in a.stacks.split(",") if s.strip()]
    bad = [s for s in a.stack_names if s not in ("ours", "peer")]
    if bad or not a.stack_names:
        p.error(f"--stacks: unknown {bad}")
    return a


# ---- one run -------------------------------------------------------------------------------------

def summarize(recs: list[dict], t_go: float) -> dict:
    ok = [r for r in recs if r["ok"]]
    failed = [r for r in recs if not r["ok"]]
    starts = [r["t_start"] for r in recs if "t_start" in r]
    t_first = min(starts) if starts else t_go
    out = {"clients": len(recs), "served": len(ok), "failed": len(failed),
           "first_discover_delay_s": t_first - t_go,
           "time_to_all_s": (max(r["t_end"] for r in ok) - t_first) if ok and not failed
           else None,
           "time_to_served_s": (max(r["t_end"] for r in ok) - t_first) if ok else None,
           "bytes": sum(r["bytes"] for r in recs),
           "via_4011": sum(1 for r in recs if r.get("via_4011")),
           "ipxe_via_4011": sum(1 for r in recs if r.get("ipxe_via_4011")),
           # TFTP requests and ACKs a client re-sent after hearing nothing for its timeout
           "tftp_resent": sum(r.get("tftp_resent", 0) for r in recs),
           "tftp_clients_resent": sum(1 for r in recs if r.get("tftp_resent")),
           "tftp_rrq_resent": sum(r.get("tftp_rrq_resent", 0) for r in recs),
           "answers": sorted({r.get("answer", "") for r in ok}),
           "kernel_urls": sorted({r.get("kernel_url", "") for r in ok}),
           "initrd_urls": sorted({r.get("initrd_url", "") for r in ok}),
           "phases": {}}
    for ph in PHASES:
        vals = sorted(r["phases"][ph] for r in ok if ph in r["phases"])
        if vals:
            out["phases"][ph] = {"p50": statistics.median(vals), "max": vals[-1],
                                 "p95": vals[min(len(vals) - 1, int(0.95 * len(vals)))]}
    reasons: dict[str, int] = {}
    for r in failed:
        key = r.get("reason", "?")
        reasons[key] = reasons.get(key, 0) + 1
    out["failures"] = sorted(reasons.items(), key=lambda kv: -kv[1])[:10]
    # each client's times from the first DISCOVER, to see what made the tail
    out["records"] = [{"index": r["index"], "arch": r["arch"], "ok": r["ok"],
                       "start_s": round(r.get("t_start", t_first) - t_first, 4),
                       "end_s": round(r["t_end"] - t_first, 4),
                       "phases": {k: round(v, 4) for k, v in r["phases"].items()},
                       "tftp_resent": r.get("tftp_resent", 0),
                       "tftp_rrq_resent": r.get("tftp_rrq_resent", 0)} for r in recs]
    return out


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.uefi_tftp = client.UefiTftp() if a.uefi_tftp == "edk2" else None
        self.work = Path(tempfile.mkdtemp(prefix="bootstorm-bench-", dir="/dev/shm"))
        os.chmod(self.work, 0o755)
        self.cg = CgroupParent(f"bootstorm-bench-{os.getpid()}")
        self.self_meter = self.cg.enter_self("bench")
        self.runs: list[dict] = []
        self.versions: dict[str, dict] = {}
        self.configs: dict[str, list[str]] = {}
        self.cpu_method = ("cgroup v%d" % self.cg.version) if self.cg.base else "psutil"
        self.seq = 0
        self.stack_errors: list[str] = []

    def close(self) -> None:
        self.cg.close()
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def make_stack(self, name: str, lab: stacks.Lab, meter) -> stacks.Stack:
        if name == "ours":
            return stacks.Ours(self.work / f"run{self.seq}", self.root, lab, meter,
                               Path(self.a.main_dir), self.a.python, self.a.ours_kernel_url,
                               self.a.ours_initrd_url)
        return stacks.Peer(self.work / f"run{self.seq}", self.root, lab, meter,
                           self.a.peer_files, self.a.tftp_max)

    def specs(self, n: int, tag: int, first: int = 0) -> list[client.ClientSpec]:
        out = []
        for i in range(first, first + n):
            uefi = int((i + 1) * self.a.uefi) > int(i * self.a.uefi)   # evenly interleaved
            arch = proto.ARCH_EFI64 if uefi else proto.ARCH_BIOS
            out.append(client.ClientSpec(i, stacks.client_address(i), arch,
                                         proto.mac_of(i, tag), proto.guid_of(i)))
        return out

    def run_one(self, name: str, n: int, rep: int) -> dict:
        a = self.a
        self.seq += 1
        tag = 0x10 + self.seq
        run = {"stack": name, "clients": n, "repeat": rep}
        if a.wait_quiet > 0:
            quiet, waited = wait_quiet(a.wait_quiet)
            run["wait_quiet"] = {"quiet": quiet, "waited_s": round(waited, 1)}
            log(f"machine {'quiet' if quiet else 'still busy'} after {waited:.0f} s")
        lab = stacks.Lab(f"{os.getpid() % 100000}x{self.seq}", n + 1,
                         None if a.tcp_cc == "system" else a.tcp_cc)
        meter = self.cg.meter(f"{name}-{self.seq}")
        stack = None
        try:
            lab.create()
            stack = self.make_stack(name, lab, meter)
            stack.start()
            self.versions[name] = stack.versions
            self.configs[name] = stack.config_notes
            # warm-up: one client through the whole boot (index n: its own address)
            warm = client.ClientPool(lab.client_ns, lab.client_if, self.specs(1, tag, first=n),
                                     self.expected, 1, a.blksize, 120, tag,
                                     uefi=self.uefi_tftp)
            warm.go(time.monotonic() + 0.05, 0, [n])
            wrecs, _, _ = warm.results(150)
            warm.close()
            run["warmup"] = {k: wrecs[0].get(k) for k in ("ok", "reason", "phases", "answer",
                                                           "kernel_url", "initrd_url")}
            if not wrecs[0]["ok"]:
                log(f"{name}: warm-up client failed: {wrecs[0].get('reason')}")
            time.sleep(1.0)
            specs = self.specs(n, tag)
            pool = client.ClientPool(lab.client_ns, lab.client_if, specs, self.expected,
                                     a.workers, a.blksize, a.timeout, tag,
                                     keepalive=a.http == "keep-alive", uefi=self.uefi_tftp)
            run["client_loop"] = pool.loop_name
            srv0, bench0 = stack.cpu_seconds(), self_cpu()
            by0 = stack.cpu_by_process()
            t0, idle0 = cpu_sample()
            t_go = time.monotonic() + 0.2
            pool.go(t_go, a.spread, [s.index for s in specs])
            log(f"{name}: {n} clients started")
            recs, client_cpu, problems = pool.results(a.timeout + a.spread + 60)
            t1, idle1 = cpu_sample()
            srv1, bench1 = stack.cpu_seconds(), self_cpu()
            by1 = stack.cpu_by_process()
            pool.close()
            stack.check_alive()
            res = summarize(recs, t_go)
            wall = t1 - t0
            ncpu = os.cpu_count() or 1
            busy = wall * ncpu - (idle1 - idle0)
            server_cpu = (srv1 - srv0) if None not in (srv0, srv1) else None
            known = (server_cpu or 0) + client_cpu + (bench1 - bench0)
            res.update({"server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
                        "bench_cpu_s": bench1 - bench0, "window_s": wall,
                        "other_share": max(0.0, busy - known) / (wall * ncpu),
                        "server_cpu_by_process": {
                            k: {"user": round(by1[k][0] - by0[k][0], 3),
                                "system": round(by1[k][1] - by0[k][1], 3)}
                            for k in by1 if k in by0},
                        "problems": problems})
            run.update(res)
            tta = res["time_to_all_s"]
            log(f"{name}: {res['served']}/{n} served"
                + (f", time-to-all {tta:.2f} s" if tta is not None else "")
                + f", server CPU {server_cpu or 0:.1f} s, clients {client_cpu:.1f} s, other "
                  f"{100 * res['other_share']:.0f} %, TFTP re-sends {res['tftp_resent']} by "
                  f"{res['tftp_clients_resent']} clients ({res['tftp_rrq_resent']} requests)")
            for reason, count in res["failures"][:3]:
                log(f"  {count} x {reason}")
        except (stacks.StackError, stacks.NetnsError, OSError, RuntimeError) as exc:
            run["error"] = f"{type(exc).__name__}: {exc}"
            self.stack_errors.append(f"{name} ({n} clients): {exc}")
            log(f"{name}: {run['error']}")
        finally:
            if stack is not None:
                stack.stop()
            for e in lab.close():
                log(f"cleanup: {e}")
            meter.close()
        self.runs.append(run)
        return run

    def run(self) -> None:
        a = self.a
        self.root, self.expected, self.files = make_root(self.work, a.scale, log)
        k = 0
        for n in a.client_counts:
            for rep in range(a.repeats):
                order = list(a.stack_names)
                if k % 2:
                    order.reverse()
                k += 1
                for name in order:
                    self.run_one(name, n, rep)


# ---- report ------------------------------------------------------------------------------------

def _fmt(v, spec=".2f", none="-") -> str:
    return none if v is None else format(v, spec)


def report(bench: Bench, meta: dict) -> str:
    a = bench.a
    lines = [f"# bench/run-bootstorm-bench, {meta['date']}, {meta['machine']['nproc']} CPUs "
             f"({meta['machine']['cpu_model']}), Python {meta['machine']['python']}",
             f"# command: {meta['command']}"]
    for name, v in bench.versions.items():
        lines.append(f"# {name}: " + ", ".join(f"{k} {val}" if k == "source" else val
                                                 for k, val in v.items()))
    for name, f in bench.files.items():
        lines.append(f"# file {name}: {f}")
    lines.append(f"# CPU measured by {bench.cpu_method}; clients: {a.workers} worker "
                 f"processes, {bench.runs[0].get('client_loop', '?') if bench.runs else '?'}; "
                 f"UEFI share {a.uefi:g}; TFTP: BIOS ROMs and iPXE blksize {a.blksize}, lock-step, "
                 f"UEFI ROMs {'as EDK2 (size query, blksize 1468, windowsize 4)' if a.uefi_tftp == 'edk2' else 'lock-step'}; HTTP "
                 f"{'kept alive (iPXE pools connections)' if a.http == 'keep-alive' else 'a connection per GET'}"
                 f"; TCP congestion control {a.tcp_cc}")
    lines.append("")
    head = (f"{'clients':>7} {'stack':<5} {'served':>8} {'time-to-all':>11} {'dhcp':>11} "
            f"{'bootfile':>11} {'ipxe_dhcp':>11} {'script':>11} {'kernel':>11} {'initrd':>11} "
            f"{'srv CPU-s':>9} {'cli CPU-s':>9} {'other':>6}")
    lines += ["Times in seconds; phases: median / max over the served clients",
              head, "-" * len(head)]
    for r in bench.runs:
        if "error" in r:
            lines.append(f"{r['clients']:>7} {r['stack']:<5} ERROR {r['error']}")
            continue
        ph = r["phases"]
        cells = [f"{_fmt(ph[p]['p50'], '.2f')}/{_fmt(ph[p]['max'], '.1f')}" if p in ph else "-"
                 for p in PHASES]
        other = r["other_share"]
        lines.append(f"{r['clients']:>7} {r['stack']:<5} {r['served']:>4}/{r['clients']:<3} "
                     f"{_fmt(r['time_to_all_s']):>11} "
                     + " ".join(f"{c:>11}" for c in cells)
                     + f" {_fmt(r['server_cpu_s'], '.1f'):>9} {r['client_cpu_s']:>9.1f} "
                       f"{100 * other:>5.0f}%{'!' if other > FOREIGN_LIMIT else ''}")
    lines.append("")
    lines.append("Ratio (peer time-to-all / ours; goal >= 1.0x, and every client served)")
    for n in a.client_counts:
        for rep in range(a.repeats):
            rs = {r["stack"]: r for r in bench.runs
                  if r["clients"] == n and r["repeat"] == rep and "error" not in r}
            o, p = rs.get("ours"), rs.get("peer")
            if not o or not p:
                lines.append(f"  {n} clients: n/a (a stack did not run)")
                continue
            all_served = o["failed"] == 0
            if o["time_to_all_s"] and p["time_to_all_s"]:
                ratio = p["time_to_all_s"] / o["time_to_all_s"]
                verdict = "met" if ratio >= 1.0 and all_served else "NOT met"
                lines.append(f"  {n} clients{' (repeat %d)' % (rep + 1) if a.repeats > 1 else ''}"
                             f": {_ratio(ratio)}x -> {verdict}; ours served {o['served']}/{n}, "
                             f"peer {p['served']}/{n}")
            else:
                lines.append(f"  {n} clients: n/a; ours served {o['served']}/{n}, peer "
                             f"{p['served']}/{n} (a time-to-all needs every client served)")
        if a.repeats > 1:
            lines.append(_median_verdict(bench.runs, n))
    lines.append("")
    lines.append("Notes")
    for r in bench.runs:
        if "error" in r:
            continue
        lines.append(f"* {r['clients']} {r['stack']}: answer {','.join(r['answers']) or '-'}; "
                     f"kernel {','.join(r['kernel_urls']) or '-'}; initrd "
                     f"{','.join(r['initrd_urls']) or '-'}; {r['via_4011']} ROM + "
                     f"{r['ipxe_via_4011']} iPXE boot server (4011) exchanges; "
                     f"{r['bytes'] / 1e9:.2f} GB received; client CPU "
                     f"{100 * r['client_cpu_s'] / (r['window_s'] * (os.cpu_count() or 1)):.0f} % "
                     f"of the machine; warm-up {'ok' if r['warmup']['ok'] else 'FAILED: ' + str(r['warmup'].get('reason'))}")
        by = r.get("server_cpu_by_process") or {}
        if by:
            lines.append("    server CPU-s by process (user + system): " + ", ".join(
                f"{k} {v['user']:.2f} + {v['system']:.2f}" for k, v in
                sorted(by.items(), key=lambda kv: -(kv[1]["user"] + kv[1]["system"]))))
        for reason, count in r["failures"]:
            lines.append(f"    {count} x {reason}")
        for prob in r.get("problems", []):
            lines.append(f"    {prob}")
    for name, notes in bench.configs.items():
        for note in notes:
            lines.append(f"* config {name}: {note}")
    return "\n".join(lines) + "\n"


def _ratio(x: float) -> str:
    """Two decimals, three near the goal (0.996 is not "1.00x -> NOT met")."""
    return f"{x:.3f}" if abs(x - 1.0) < 0.005 else f"{x:.2f}"


def _median_verdict(runs: list[dict], n: int) -> str:
    """The verdict over repeats: one run's time-to-all swings by about 10 % with where the
    scheduler puts clients and servers, so the goal is judged on the medians (and every client
    of every run served)."""
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    served = True
    for r in runs:
        if r["clients"] != n or "error" in r:
            continue
        if r["stack"] == "ours" and r["failed"]:
            served = False
        if r.get("time_to_all_s"):
            times[r["stack"]].append(r["time_to_all_s"])
    if not times["ours"] or not times["peer"]:
        return f"  {n} clients, over the repeats: n/a"
    ours, peer = statistics.median(times["ours"]), statistics.median(times["peer"])
    ratio = peer / ours
    verdict = "met" if ratio >= 1.0 and served else "NOT met"
    return (f"  {n} clients, medians of {len(times['ours'])} and {len(times['peer'])} runs: "
            f"peer {peer:.2f} s / ours {ours:.2f} s = {_ratio(ratio)}x -> {verdict}"
            f"{'' if served else ' (ours did not serve every client in every run)'}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/run-bootstorm-bench: needs root (network namespaces, ports 67/69)",
              file=sys.stderr)
        return 2
    for tool in ("ip",):
        if shutil.which(tool) is None:
            print(f"bench/run-bootstorm-bench: {tool} missing", file=sys.stderr)
            return 2
    if "peer" in a.stack_names:
        problem = ensure_peer_tools()
        if problem:
            print(f"bench/run-bootstorm-bench: {problem}", file=sys.stderr)
            return 2
    bench = Bench(a)
    meta = {"bench": "bootstorm", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "command": " ".join(shlex.quote(x) for x in ["bench/run-bootstorm-bench",
                                                          *sys.argv[1:]])}
    status = 0
    restore_allowed = stacks.allow_congestion_control(a.tcp_cc, log)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except (OSError, RuntimeError) as exc:
        log(f"error: {exc}")
        status = 1
    finally:
        try:
            if bench.runs:
                text = report(bench, meta)
                print(text)
            if a.json:
                Path(a.json).write_text(json.dumps(
                    {"meta": meta, "args": vars(a), "files": getattr(bench, "files", {}),
                     "versions": bench.versions, "configs": bench.configs, "runs": bench.runs},
                    indent=2, default=str))
        finally:
            bench.close()
            restore_allowed()
    if status == 0 and bench.stack_errors:
        status = 1
    return status
