"""bench/run-tftp-bench: our tftpd against tftpd-hpa and dnsmasq, side by side in one run, as
ratios."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from machineinfo import machine  # bench/machineinfo.py, shared by the benches

from . import clients
from .clients import Spec
from .probe import probe_options

MiB = 1 << 20
GiB = 1 << 30
SERVER_ORDER = ["ours", "tftpd-hpa", "dnsmasq"]
REF = "tftpd-hpa"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    spec: Spec
    concurrent: int = 0   # 0: one client at a time, repeated; N: N clients at once, once

    @property
    def lockstep_single(self) -> bool:
        return not self.concurrent and self.spec.windowsize == 1


def make_cases(concurrent: int) -> list[Case]:
    return [
        Case("curl-512", "curl   blksize 512   lock-step", Spec("curl", 512)),
        Case("curl-1468", "curl   blksize 1468  lock-step", Spec("curl", 1468)),
        Case("atftp-512", "atftp  blksize 512   lock-step", Spec("atftp", 512)),
        Case("atftp-1468", "atftp  blksize 1468  lock-step", Spec("atftp", 1468)),
        Case("atftp-1468-w8", "atftp  blksize 1468  windowsize 8", Spec("atftp", 1468, 8)),
        Case("atftp-1468-w16", "atftp  blksize 1468  windowsize 16", Spec("atftp", 1468, 16)),
        Case(f"curl-1468-x{concurrent}", f"curl   blksize 1468  {concurrent} concurrent (total)",
             Spec("curl", 1468), concurrent=concurrent),
    ]


@dataclass
class Cell:
    status: str = "ok"            # ok | FAIL | SKIP
    runs_mbps: list[float] = field(default_factory=list)
    runs_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    cpu_known: bool = True
    nbytes: int = 0
    error: str | None = None
    probe: dict | None = None        # option probe result (windowsize cases): ok, oack, error
    sampled_s: float = 0.0           # wall time over which foreign_s was sampled
    retries_left: int = 0            # measurements that may still be redone (machine busy)
    discarded: int = 0               # measurements discarded because the machine was busy
    foreign_s: float | None = 0.0    # CPU used by other processes meanwhile (None: unknown)

    @property
    def mbps(self) -> float | None:
        if self.status != "ok" or not self.runs_mbps:
            return None
        return statistics.median(self.runs_mbps)

    def foreign_share(self, ncpu: int) -> float | None:
        """Share of the machine's CPU that other processes used while this cell was measured."""
        if self.foreign_s is None or not self.sampled_s:
            return None
        return self.foreign_s / (self.sampled_s * ncpu)

    @property
    def cpu_per_gib(self) -> float | None:
        if self.status != "ok" or not self.nbytes or not self.cpu_known:
            return None
        return self.cpu_s / (self.nbytes / GiB)




PIN_CHOICES = ("none", "one", "split")


def pinned_cpus(pin: str) -> tuple[set[int] | None, set[int] | None]:
    """(servers' CPUs, the bench's and its clients' CPUs) for --pin."""
    if pin == "one":
        return {0}, {0}
    if pin == "split":
        return {0}, {1}
    return None, None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run-tftp-bench",
        description="Download throughput of our tftpd, tftpd-hpa and dnsmasq, side by side on "
                    "loopback, as MB/s and ratios to tftpd-hpa. Every download is verified "
                    "byte for byte (size + sha256).")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 MiB file, 1 repeat, 10 concurrent clients")
    p.add_argument("--servers", default=",".join(SERVER_ORDER),
                   help="comma-separated subset of: ours, tftpd-hpa, dnsmasq (default: all)")
    p.add_argument("--peer-only", action="store_true",
                   help="only the peers (tftpd-hpa, dnsmasq); same as --servers tftpd-hpa,dnsmasq")
    p.add_argument("--cases", default="",
                   help="comma-separated subset of case keys (see --list-cases)")
    p.add_argument("--list-cases", action="store_true", help="print the case keys and exit")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    p.add_argument("--size-mib", type=int, help="file size in MiB (default 32; 8 with --quick)")
    p.add_argument("--repeats", type=int, help="repeats per single-client case, median taken "
                                               "(default 7; 1 with --quick)")
    p.add_argument("--pin", choices=PIN_CHOICES, default="none",
                   help="CPU placement, the same for every server: none (the scheduler's "
                        "choice; lock-step ratios then swing by 10-30 %% run to run with where "
                        "client and server land), one (servers and clients on CPU 0: a "
                        "lock-step round trip costs CPU time only, no cross-CPU wakeup), split "
                        "(servers on CPU 0, clients on CPU 1: every wakeup crosses CPUs)")
    p.add_argument("--concurrent", type=int,
                   help="clients in the concurrent case (default 50; 10 with --quick)")
    p.add_argument("--timeout", type=float,
                   help="seconds one single download may take before it is a FAIL "
                        "(default 60; 20 with --quick)")
    p.add_argument("--concurrent-timeout", type=float,
                   help="seconds the concurrent case may take (default 150; 40 with --quick)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="no new measurement starts after this many seconds; the rest is SKIP "
                        "(default 540)")
    p.add_argument("--main-dir", default=str(Path(__file__).resolve().parents[2]),
                   help="repo folder that holds the tftpd package (default: this checkout)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs `-m tftpd` (default: the one running the bench)")
    p.add_argument("--ours-max-blksize", type=int, default=65464,
                   help="MaxBlockSize in our daemon's config (default 65464, tftpd-hpa's limit)")
    p.add_argument("--ours-max-window", type=int, default=64,
                   help="MaxWindowSize in our daemon's config (default 64)")
    p.add_argument("--workdir-parent", default="/dev/shm" if os.access("/dev/shm", os.W_OK)
                   else None, help="where the temporary root and downloads go (default /dev/shm)")
    p.add_argument("--dnsmasq-address", metavar="ADDR",
                   help="loopback address for dnsmasq, whose TFTP port is always 69 (default: "
                        "127.0.0.1, or the first of 127.0.0.2-9 where port 69 is free)")
    p.add_argument("--retry-busy", type=int, metavar="N",
                   help="per cell, redo up to N measurements during which other processes used "
                        "more than 10%% of the machine's CPU (default 3; 0 with --quick: keep "
                        "them all, marked)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the machine to be quiet (under 10%% CPU "
                        "busy for 5 s in a row); default 0: start at once")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    a = p.parse_args(argv)
    a.size_mib = a.size_mib or (8 if a.quick else 32)
    a.repeats = a.repeats or (1 if a.quick else 7)
    a.concurrent = a.concurrent or (10 if a.quick else 50)
    a.timeout = a.timeout or (20.0 if a.quick else 60.0)
    a.concurrent_timeout = a.concurrent_timeout or (40.0 if a.quick else 150.0)
    if a.retry_busy is None:
        a.retry_busy = 0 if a.quick else 3
    if a.peer_only:
        a.servers = "tftpd-hpa,dnsmasq"
    names = [s.strip() for s in a.servers.split(",") if s.strip()]
    bad = [n for n in names if n not in SERVER_ORDER]
    if bad or not names:
        p.error(f"--servers: unknown {bad or '(empty)'}; choose from {', '.join(SERVER_ORDER)}")
    a.server_names = [n for n in SERVER_ORDER if n in names]
    return a


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.t0 = time.monotonic()
        self.cases = make_cases(args.concurrent)
        if args.cases:
            want = {c.strip() for c in args.cases.split(",") if c.strip()}
            unknown = want - {c.key for c in self.cases}
            if unknown:
                raise SystemExit(f"bench/run-tftp-bench: unknown case(s) {sorted(unknown)}; "
                                 f"known: {', '.join(c.key for c in self.cases)}")
            self.cases = [c for c in self.cases if c.key in want]
        self.servers = {}
        self.start_errors: dict[str, str] = {}
        self.results: dict[str, dict[str, Cell]] = {c.key: {} for c in self.cases}
        self.ncpu = len(os.sched_getaffinity(0))
        self.self_meter = None
        self.filename = f"bench-{args.size_mib}M.bin"
        self.size = args.size_mib * MiB

    # -- output ------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------
    def make_root(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="tftp-bench-", dir=self.a.workdir_parent))
        os.chmod(self.work, 0o755)
        self.root = self.work / "root"
        self.outdir = self.work / "out"
        self.root.mkdir(mode=0o755)
        self.outdir.mkdir()
        os.chmod(self.root, 0o755)
        h = hashlib.sha256()
        path = self.root / self.filename
        with open(path, "wb") as f:
            left = self.size
            while left:
                chunk = os.urandom(min(left, 4 * MiB))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        os.chmod(path, 0o644)
        self.digest = h.hexdigest()

    def start_servers(self) -> None:
        from .cpu import CgroupParent
        from .servers import ALL, Ours, ServerError
        self.cgroups = CgroupParent(f"tftp-bench-{os.getpid()}")
        self.self_meter = self.cgroups.enter_self("bench-and-clients")
        for name in self.a.server_names:
            cls = ALL[name]
            kw = dict(workdir=self.work, root=self.root, probe_file=self.filename,
                      concurrent=self.a.concurrent, meter=self.cgroups.meter(name))
            if cls is Ours:
                srv = cls(main_dir=Path(self.a.main_dir), python=self.a.python,
                          max_blksize=self.a.ours_max_blksize,
                          max_window=self.a.ours_max_window, **kw)
            elif name == "dnsmasq":
                srv = cls(address=self.a.dnsmasq_address, **kw)
            else:
                srv = cls(**kw)
            srv.cpus = pinned_cpus(self.a.pin)[0]
            try:
                srv.start()
            except (ServerError, OSError) as exc:
                self.start_errors[name] = f"did not start: {exc}"
                self.log(f"{name}: FAIL {self.start_errors[name]}")
                srv.stop()
                continue
            self.servers[name] = srv
            self.log(f"{name}: ready, pid {srv.pid}, {srv.host}:{srv.port}, {srv.version}")

    def stop_servers(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        if getattr(self, "cgroups", None) is not None:
            self.cgroups.close()

    # -- measuring ---------------------------------------------------------------------------
    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 > self.a.budget

    def server_dead_reason(self, name: str) -> str | None:
        srv = self.servers.get(name)
        if srv is None:
            return self.start_errors.get(name, "not started")
        if not srv.alive():
            from .servers import tail
            rc = srv.proc.returncode
            why = (f"server process exited with status {rc}: "
                   f"{tail(srv.stderr_path) or '(no output)'}")
            if name == "tftpd-hpa" and rc == 0:
                why += (" (in.tftpd exits 0 on SIGTERM/SIGINT: something else on this machine "
                        "stopped it, e.g. `/etc/init.d/tftpd-hpa stop`, which stops every "
                        "in.tftpd)")
            return why
        return None

    def accounted(self) -> tuple[float | None, float | None]:
        """(machine busy CPU s, CPU s of the bench, its clients and all servers)."""
        from .cpu import machine_busy_seconds
        if self.self_meter is None:
            return None, None
        parts = [self.self_meter.seconds()] + [s.cpu_seconds() for s in self.servers.values()
                                               if s.meter.method.startswith("cgroup")]
        if any(p is None for p in parts):
            return None, None
        return machine_busy_seconds(), sum(parts)

    def measure_once(self, case: Case, name: str, cell: Cell, rep: int) -> bool:
        """One measurement into `cell`; False when it was discarded (machine busy): redo it."""
        srv = self.servers[name]
        srv.settle()
        t0 = time.monotonic()
        busy0, ours0 = self.accounted()
        before = srv.cpu_seconds()
        tag = f"{name}-{case.key}-{rep}"
        if case.concurrent:
            res = clients.run_many(case.spec, srv.host, srv.port, self.filename, self.outdir,
                                   case.concurrent, self.size, self.digest,
                                   self.a.concurrent_timeout)
        else:
            res = clients.run_one(case.spec, srv.host, srv.port, self.filename, self.outdir, tag,
                                  self.size, self.digest, self.a.timeout)
        srv.settle()
        after = srv.cpu_seconds()
        busy1, ours1 = self.accounted()
        span = time.monotonic() - t0
        foreign = (None if None in (busy0, ours0, busy1, ours1)
                   else max(0.0, (busy1 - busy0) - (ours1 - ours0)))
        share = foreign / (span * self.ncpu) if foreign is not None and span > 0 else None
        if (res.ok and share is not None and share > self.FOREIGN_LIMIT
                and cell.retries_left > 0 and not self.over_budget()):
            cell.retries_left -= 1
            cell.discarded += 1
            self.log(f"{case.key} #{rep + 1} {name}: {res.nbytes / res.seconds / 1e6:7.1f} MB/s "
                     f"discarded, other processes used {100 * share:.0f}% of the CPU; again")
            self.wait_quiet(20.0)
            return False
        cell.sampled_s += span
        if foreign is None or cell.foreign_s is None:
            cell.foreign_s = None
        else:
            cell.foreign_s += foreign
        if not res.ok:
            cell.status = "FAIL"
            dead = self.server_dead_reason(name)
            cell.error = res.error + (f"; {dead}" if dead else "")
            self.log(f"{case.key} #{rep + 1} {name}: FAIL {cell.error}")
            return True
        mbps = res.nbytes / res.seconds / 1e6
        cell.runs_mbps.append(mbps)
        cell.runs_s.append(res.seconds)
        cell.nbytes += res.nbytes
        if before is None or after is None:
            cell.cpu_known = False
        else:
            cell.cpu_s += after - before
        self.log(f"{case.key} #{rep + 1} {name}: {mbps:7.1f} MB/s ({res.seconds:.2f} s, "
                 f"verified)")
        return True

    def wait_quiet(self, limit: float) -> None:
        """Wait up to `limit` s (within the budget) for 2 s under 10% machine CPU busy."""
        deadline = min(time.monotonic() + limit, self.t0 + self.a.budget)
        quiet = 0
        while quiet < 4 and time.monotonic() < deadline:
            busy = cpu_busy(0.5)
            quiet = quiet + 1 if busy is not None and busy < self.FOREIGN_LIMIT else 0

    def warm_up(self) -> None:
        """One unmeasured download per server before the first measurement: the first runs of a
        fresh process (page cache, CPU frequency, the scheduler's placement of client and server)
        were 30-40 % slower for both servers, which the median of a few repeats did not hide."""
        spec = next((c.spec for c in self.cases if not c.concurrent), None)
        if spec is None:
            return
        for name, srv in self.servers.items():
            if self.server_dead_reason(name):
                continue
            res = clients.run_one(spec, srv.host, srv.port, self.filename, self.outdir,
                                  f"{name}-warm-up", self.size, self.digest, self.a.timeout)
            self.log(f"warm-up {name}: {'ok' if res.ok else 'FAIL ' + str(res.error)}")

    def run_case(self, case: Case) -> None:
        cells = self.results[case.key]
        for name in self.a.server_names:
            cells[name] = Cell(retries_left=self.a.retry_busy)
            dead = self.server_dead_reason(name)
            if dead:
                cells[name].status, cells[name].error = "FAIL", dead
        if case.spec.windowsize > 1:
            for name, srv in self.servers.items():
                if cells[name].status != "ok":
                    continue
                pr = probe_options(srv.host, srv.port, self.filename,
                                   {"blksize": str(case.spec.blksize),
                                    "windowsize": str(case.spec.windowsize)})
                cells[name].probe = pr
        reps = 1 if case.concurrent else self.a.repeats
        order = list(self.a.server_names)
        for rep in range(reps):
            for name in order:
                cell = cells[name]
                if cell.status != "ok":
                    continue
                if self.over_budget():
                    cell.status = "SKIP"
                    cell.error = f"time budget of {self.a.budget:g} s used up"
                    continue
                dead = self.server_dead_reason(name)
                if dead:
                    cell.status, cell.error = "FAIL", dead
                    continue
                while not self.measure_once(case, name, cell, rep):
                    pass
            order = order[1:] + order[:1]   # rotate who goes first, repeat to repeat

    # -- report ------------------------------------------------------------------------------
    def window_note(self, case: Case, name: str) -> str:
        """'' when the case's windowsize was negotiated (or is 1), else a marker:
        '*' not acknowledged (lock-step), '~' acknowledged with another value, '?' probe failed."""
        cell = self.results[case.key].get(name)
        if case.spec.windowsize == 1 or cell is None or cell.probe is None:
            return ""
        if not cell.probe["ok"]:
            return "?"
        oack = cell.probe["oack"] or {}
        ws = oack.get("windowsize")
        if ws is None:
            return "*"
        return "" if ws == str(case.spec.windowsize) else "~"

    FOREIGN_LIMIT = 0.10

    def busy_mark(self, cell: Cell) -> str:
        share = cell.foreign_share(self.ncpu)
        return "!" if share is not None and share > self.FOREIGN_LIMIT else ""

    def ratio(self, case: Case, name: str) -> float | None:
        cells = self.results[case.key]
        if name not in cells or REF not in cells:
            return None
        x, ref = cells[name].mbps, cells[REF].mbps
        if x is None or not ref:
            return None
        return x / ref

    def goals(self) -> list[dict]:
        out = []
        by_key = {c.key: c for c in self.cases}

        def cell(key: str, name: str) -> Cell | None:
            return self.results.get(key, {}).get(name)

        def judge(goal: str, ours: Cell | None, ref: Cell | None, need: float,
                  what: str) -> dict:
            g = {"goal": goal, "need": need, "compared": what, "ratio": None, "met": None}
            if ours is None or ref is None:
                g["verdict"] = "not evaluated (needs ours and tftpd-hpa in this run)"
            elif ours.mbps is None:
                g["verdict"] = f"NOT met: ours {ours.status} (see notes)"
                g["met"] = False
            elif ref.mbps is None:
                g["verdict"] = f"not evaluated: tftpd-hpa {ref.status} (see notes)"
            else:
                r = ours.mbps / ref.mbps
                g["ratio"], g["met"] = r, r >= need
                shown = f"{r:.3f}" if abs(r - need) < 0.005 else f"{r:.2f}"
                g["verdict"] = f"{shown}x -> {'met' if r >= need else 'NOT met'}"
            return g

        for c in self.cases:
            if c.lockstep_single:
                out.append(judge(f"lock-step single >= 1.0x tftpd-hpa ({c.spec.client}, "
                                 f"blksize {c.spec.blksize})",
                                 cell(c.key, "ours"), cell(c.key, REF), 1.0,
                                 f"ours {c.key} / tftpd-hpa {c.key}"))
        for c in self.cases:
            if c.concurrent:
                out.append(judge(f"{c.concurrent} concurrent >= 1.0x tftpd-hpa",
                                 cell(c.key, "ours"), cell(c.key, REF), 1.0,
                                 f"ours {c.key} / tftpd-hpa {c.key}"))
        if "atftp-1468-w8" in by_key and "atftp-1468" in by_key:
            out.append(judge("windowsize 8 >= 1.5x tftpd-hpa lock-step (atftp, blksize 1468)",
                             cell("atftp-1468-w8", "ours"), cell("atftp-1468", REF), 1.5,
                             "ours atftp-1468-w8 / tftpd-hpa atftp-1468"))
        return out

    def report(self, meta: dict) -> str:
        names = self.a.server_names
        L = []
        m = meta["machine"]
        L.append(f"TFTP bench  {meta['date']}  {m['nproc']} CPUs (nproc), {m['cpu_model']}, "
                 f"{m['memory']} RAM, {m['kernel']}, Python {m['python']}")
        L.append(f"command: {meta['command']}")
        L.append(f"machine CPU busy (all cores, 1 s sample) before the bench: "
                 f"{pct(meta.get('busy_before'))}, after it stopped its servers: "
                 f"{pct(meta.get('busy_after'))} (other work on the machine skews the figures)")
        L.append(f"file: {self.a.size_mib} MiB random, sha256 {self.digest[:16]}..., served from "
                 f"{self.root.parent.parent} (tmpfs); all traffic on loopback")
        L.append(f"single-client cases: median of {self.a.repeats}, one client at a time, server "
                 f"order rotated per repeat; MB/s = 10^6 bytes/s, every download verified "
                 f"(size + sha256)")
        L.append({"none": "CPU placement: the scheduler's (--pin none)",
                  "one": "CPU placement: servers and clients all on CPU 0 (--pin one)",
                  "split": "CPU placement: servers on CPU 0, clients on CPU 1 (--pin split)"}
                 [self.a.pin])
        for n in names:
            srv = self.servers.get(n)
            if srv and n == "ours":
                L.append(f"  {n:10s} {srv.version}, {srv.host}:{srv.port}, pid {srv.pid}; git "
                         f"{meta.get('git', '?')}; sources sha256 {meta.get('ours_src', '?')[:12]}")
            elif srv:
                L.append(f"  {n:10s} {srv.version}, {srv.host}:{srv.port}, pid {srv.pid}")
            else:
                L.append(f"  {n:10s} {self.start_errors.get(n, 'not started')}")
        spreads = [(max(cell.runs_mbps) - min(cell.runs_mbps)) / cell.mbps
                   for cs in self.results.values() for cell in cs.values()
                   if cell.mbps and len(cell.runs_mbps) > 1]
        if spreads:
            L.append(f"run-to-run spread (max-min)/median over the single-client cells: median "
                     f"{100 * statistics.median(spreads):.0f}%, worst {100 * max(spreads):.0f}% "
                     f"(ratios closer to a goal than that are within noise)")
        L.append("")
        w0 = max(len(c.label) for c in self.cases) + 2
        head = f"{'case':{w0}s}" + "".join(f"{n:>12s}" for n in names)
        ratio_names = [n for n in names if n != REF] if REF in names else []
        head += "".join(f"{(n + '/hpa'):>14s}" for n in ratio_names)
        L.append("Throughput, MB/s")
        L.append(head)
        L.append("-" * len(head))
        for c in self.cases:
            row = f"{c.label:{w0}s}"
            for n in names:
                cell = self.results[c.key].get(n)
                if cell is None:
                    txt = "-"
                elif cell.mbps is None:
                    txt = cell.status
                else:
                    txt = f"{cell.mbps:.1f}{self.window_note(c, n)}{self.busy_mark(cell)}"
                row += f"{txt:>12s}"
            for n in ratio_names:
                r = self.ratio(c, n)
                row += f"{(f'{r:.2f}x' if r is not None else '-'):>14s}"
            L.append(row)
        L.append("")
        methods = sorted({s.meter.method for s in self.servers.values()})
        L.append("Server CPU seconds per GiB served (user+sys; client CPU not counted; "
                 f"measured by {'; '.join(methods) or '-'})")
        head2 = f"{'case':{w0}s}" + "".join(f"{n:>12s}" for n in names)
        L.append(head2)
        L.append("-" * len(head2))
        tot = {n: [0.0, 0] for n in names}
        for c in self.cases:
            row = f"{c.label:{w0}s}"
            for n in names:
                cell = self.results[c.key].get(n)
                v = cell.cpu_per_gib if cell else None
                row += f"{(f'{v:.2f}' if v is not None else '-'):>12s}"
                if v is not None:
                    tot[n][0] += cell.cpu_s
                    tot[n][1] += cell.nbytes
            L.append(row)
        row = f"{'all passed cases':{w0}s}"
        for n in names:
            s, b = tot[n]
            row += f"{(f'{s / (b / GiB):.2f}' if b else '-'):>12s}"
        L.append(row)
        # notes
        notes = []
        for c in self.cases:
            if c.spec.windowsize == 1:
                continue
            for n in names:
                mark = self.window_note(c, n)
                cell = self.results[c.key].get(n)
                pr = cell.probe if cell else None
                if mark == "*":
                    notes.append(f"* {n}, {c.key}: windowsize not in the server's OACK (it does "
                                 f"not do RFC 7440), so this transfer ran lock-step "
                                 f"(OACK: {fmt_oack(pr['oack'])})")
                elif mark == "~":
                    notes.append(f"~ {n}, {c.key}: windowsize {c.spec.windowsize} offered, "
                                 f"server acknowledged {fmt_oack(pr['oack'])}")
                elif mark == "?":
                    notes.append(f"? {n}, {c.key}: option probe failed: {pr['error']}")
        cells = [cell for cs in self.results.values() for cell in cs.values() if cell.sampled_s]
        if cells and all(c.foreign_s is not None for c in cells):
            fs = sum(c.foreign_s for c in cells)
            ss = sum(c.sampled_s for c in cells)
            marked = [(c.key, n) for c in self.cases for n in names
                      if self.results[c.key].get(n) and self.busy_mark(self.results[c.key][n])]
            notes.append(f"other processes on the machine used {fs:.1f} CPU-s while measuring "
                         f"({100 * fs / (ss * self.ncpu):.1f}% of {self.ncpu} cores over "
                         f"{ss:.0f} s)" + (f"; ! marks cells where they used more than "
                                           f"{100 * self.FOREIGN_LIMIT:.0f}%: "
                                           + ("all cells" if len(marked) == len(cells)
                                              else ", ".join(f"{n} {k}" for k, n in marked))
                                           if marked else ""))
        elif cells:
            notes.append("CPU used by other processes while measuring: unknown (no cgroup)")
        disc = sum(c.discarded for c in cells)
        if disc:
            notes.append(f"{disc} measurement(s) were discarded and redone because other "
                         f"processes used more than {100 * self.FOREIGN_LIMIT:.0f}% of the CPU "
                         f"meanwhile (--retry-busy {self.a.retry_busy} per cell)")
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for c in self.cases:
            for n in names:
                cell = self.results[c.key].get(n)
                if cell and cell.status != "ok":
                    grouped.setdefault((cell.status, n, cell.error or "?"), []).append(c.key)
        for (status, n, err), keys in grouped.items():
            where = "all cases" if len(keys) == len(self.cases) > 1 else ", ".join(keys)
            notes.append(f"{status} {n}, {where}: {err}")
        if notes:
            L.append("")
            L.append("Notes")
            L.extend(notes)
        oc = meta.get("ours_counters")
        if oc:
            keys = ("transfers_started", "transfers_completed", "transfers_failed",
                    "transfers_unconfirmed", "size_probes",
                    "blocks_resent", "malformed_packets", "refused_busy")
            L.append("")
            L.append("ours, status counters at the end: "
                     + ", ".join(f"{k}={oc[k]}" for k in keys if k in oc)
                     + (f", errors={oc['errors']}" if oc.get("errors") else ""))
        goals = self.goals()
        if goals:
            L.append("")
            L.append("Goals (ours vs tftpd-hpa, from the issue)")
            for g in goals:
                L.append(f"  {g['goal']:70s} {g['verdict']}")
        L.append("")
        L.append(f"total bench time {time.monotonic() - self.t0:.0f} s")
        return "\n".join(L)

    def to_json(self, meta: dict) -> dict:
        out = dict(meta)
        out["file"] = {"name": self.filename, "bytes": self.size, "sha256": self.digest}
        out["settings"] = {k: getattr(self.a, k) for k in
                           ("quick", "size_mib", "repeats", "concurrent", "timeout",
                            "concurrent_timeout", "budget", "retry_busy", "server_names", "pin")}
        out["servers"] = {n: (self.servers[n].describe() if n in self.servers
                              else {"name": n, "error": self.start_errors.get(n)})
                          for n in self.a.server_names}
        out["cases"] = []
        for c in self.cases:
            cd = {"key": c.key, "label": c.label, "client": c.spec.client,
                  "blksize": c.spec.blksize, "windowsize": c.spec.windowsize,
                  "concurrent": c.concurrent, "servers": {}}
            for n, cell in self.results[c.key].items():
                cd["servers"][n] = {
                    "status": cell.status, "mbps_median": cell.mbps,
                    "mbps_runs": cell.runs_mbps, "seconds_runs": cell.runs_s,
                    "verified_bytes": cell.nbytes,
                    "cpu_seconds": cell.cpu_s if cell.cpu_known else None,
                    "cpu_s_per_gib": cell.cpu_per_gib, "error": cell.error,
                    "probe": cell.probe, "ratio_to_tftpd_hpa": self.ratio(c, n),
                    "foreign_cpu_s": cell.foreign_s, "sampled_s": cell.sampled_s,
                    "foreign_share": cell.foreign_share(self.ncpu),
                    "discarded_busy": cell.discarded,
                    "windowsize_negotiated": (None if c.spec.windowsize == 1 else
                                              self.window_note(c, n) == ""),
                }
            out["cases"].append(cd)
        out["goals"] = self.goals()
        out["all_passed"] = all(cell.status == "ok" for cs in self.results.values()
                                for cell in cs.values())
        return out


def source_digest(main_dir: Path) -> str:
    """sha256 over our daemon's Python sources (tftpd/, common/), to tie figures to code."""
    h = hashlib.sha256()
    for sub in ("tftpd", "common"):
        for path in sorted((main_dir / sub).rglob("*.py")):
            h.update(str(path.relative_to(main_dir)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def git_head(main_dir: Path) -> str:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", str(main_dir), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(main_dir), "status", "--porcelain", "--",
                                "tftpd", "common"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "?"
    head = out.stdout.strip() or "no commit"
    return head + (" + uncommitted changes in tftpd/ or common/" if dirty.stdout.strip() else "")


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds`, from /proc/stat (None if unreadable)."""
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def fmt_oack(neg: dict | None) -> str:
    if neg is None:
        return "none, plain DATA"
    return " ".join(f"{k}={v}" for k, v in neg.items()) or "empty"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_cases:
        for c in make_cases(args.concurrent):
            print(f"{c.key:18s} {c.label}")
        return 0
    for tool in ("curl", "atftp"):
        if not shutil.which(tool):
            print(f"bench/run-tftp-bench: {tool} not found (apt-get install {tool})",
                  file=sys.stderr)
            return 2
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("bench/run-tftp-bench: needs psutil (pip install psutil)", file=sys.stderr)
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
        print(f"bench/run-tftp-bench: machine {'quiet' if quiet >= 5 else 'still busy'} after "
              f"waiting up to {args.wait_quiet:g} s", file=sys.stderr)
    bench = Bench(args)
    meta = {"bench": "tftp", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(), "busy_before": cpu_busy(),
            "command": " ".join(shlex.quote(x) for x in ["bench/run-tftp-bench", *sys.argv[1:]])}
    if "ours" in args.server_names:
        try:
            meta["ours_src"] = source_digest(Path(args.main_dir))
        except OSError:
            meta["ours_src"] = "?"
        meta["git"] = git_head(Path(args.main_dir))
    bench.make_root()
    try:
        bench.log(f"work folder {bench.work}; {args.size_mib} MiB file; "
                  f"servers {', '.join(args.server_names)}")
        bench.start_servers()
        clients_cpus = pinned_cpus(args.pin)[1]
        if clients_cpus is not None:     # the clients are the bench's children
            os.sched_setaffinity(0, clients_cpus)
        bench.warm_up()
        for case in bench.cases:
            bench.run_case(case)
        ours = bench.servers.get("ours")
        if ours is not None and ours.alive():
            meta["ours_counters"] = ours.counters()
    except KeyboardInterrupt:
        bench.log("interrupted; stopping servers")
        bench.stop_servers()
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
        return 130
    finally:
        bench.stop_servers()
    meta["busy_after"] = cpu_busy()
    text = bench.report(meta)
    print(text)
    if args.json:
        data = bench.to_json(meta)
        data["report"] = text
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.keep:
        print(f"(work folder kept: {bench.work})", file=sys.stderr)
    else:
        shutil.rmtree(bench.work, ignore_errors=True)
    ok = all(cell.status == "ok" for cs in bench.results.values() for cell in cs.values())
    return 0 if ok and not bench.start_errors else 1
