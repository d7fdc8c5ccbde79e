"""bench/run-multicast-bench: the cases, one run, the table and the JSON.

One run = one fresh `MulticastLab` (a switch namespace with a bridge, the sender's namespace,
one namespace per receiver; see tests/mcastlab.py), the case's impairments, the peer's
receivers started and ready, then the sender; the clock starts just before the sender. It
stops when every surviving receiver has its copy by the peer's own signal (udp-receiver
exited 0, uftpd moved the file into place), or at the case's timeout (a stall: everything is
killed). Then, untimed, every receiver's file is compared with the source (size, then
sha256), the lab is deleted and the receivers' files with it.

Per run:

- seconds: sender start -> the last surviving receiver has its copy (only when every surviving
  receiver's copy verified; otherwise no number);
- MB/s: image bytes / seconds (10^6 bytes/s);
- wire/delivered: bytes through the sender's veth both ways (data out, feedback in) / (image
  bytes x verified copies); tx copies: bytes the sender's veth sent / image bytes (one copy's
  worth of packets is ~1.03 with headers: what multicast costs the sender's link);
- sender CPU-s: user+sys of the sender process (wait4);
- outcome: ok; stall (timeout); fail (a surviving receiver has no good copy, and both the
  sender and that receiver said so: non-zero exit or a failure status); silent (a surviving
  receiver has no good copy, yet the sender exited 0 or that receiver reported success).
  The receiver the bench kills is not a survivor.
"""

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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from machineinfo import machine
from imaginglib.sysutil import cpu_busy, wait_quiet
from tftplib.cpu import machine_busy_seconds
from tests.e2e import netlab
from tests.mcastlab import KillAt, MulticastLab, folder_bytes

from .peers import PEERS, Peer, Session, install_peers, log

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
OTHER_LIMIT = 0.15
POLL = 0.02


@dataclass(frozen=True)
class Case:
    name: str
    receivers: int
    label: str
    loss_one: float = 0.0      # % independent loss on receiver 1's input
    loss_each: float = 0.0     # % independent loss on every receiver's input
    loss_all: float = 0.0      # % loss on the sender's output (correlated: all miss the same)
    slow: bool = False         # what reaches receiver 1 policed to --slow-mbit
    kill: bool = False         # the last receiver killed at --kill-at of the image

    @property
    def impaired(self) -> bool:
        return bool(self.loss_one or self.loss_each or self.loss_all or self.slow or self.kill)


CASES = [
    Case("r1", 1, "1 receiver, 0 % loss"),
    Case("r3", 3, "3 receivers, 0 % loss"),
    Case("r5", 5, "5 receivers, 0 % loss"),
    Case("r3-loss1-one", 3, "3 rx, 1 % loss on r1", loss_one=1),
    Case("r3-loss5-one", 3, "3 rx, 5 % loss on r1", loss_one=5),
    Case("r3-loss1-all", 3, "3 rx, 1 % correlated loss", loss_all=1),
    Case("r3-loss5-all", 3, "3 rx, 5 % correlated loss", loss_all=5),
    Case("r3-loss5-each", 3, "3 rx, 5 % loss on each", loss_each=5),
    Case("r3-slow", 3, "3 rx, r1 slow", slow=True),
    Case("r3-kill", 3, "3 rx, r3 killed", kill=True),
]
BY_NAME = {c.name: c for c in CASES}
DEFAULT_CASES = ["r1", "r3", "r5", "r3-loss1-one", "r3-loss5-one", "r3-loss1-all",
                 "r3-loss5-all", "r3-slow", "r3-kill"]
QUICK_CASES = ["r3", "r3-loss5-one", "r3-loss5-all", "r3-slow", "r3-kill"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run-multicast-bench",
        description="Multicast an incompressible image from a sender to 1, 3 or 5 receivers in "
                    "network namespaces on one bridge, with udpcast, UFTP and ours, "
                    "at 0/1/5 %% loss, with a slow and a killed receiver; time to a verified "
                    "copy on every receiver, wire bytes, sender CPU, stalls and silent "
                    "failures. Needs root. See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help=f"64 MiB image and the cases {', '.join(QUICK_CASES)}")
    p.add_argument("--size-mib", type=int, help="image size in MiB (512; --quick: 64)")
    p.add_argument("--peers", default="udpcast,uftp,ours",
                   help="any of udpcast, uftp, ours (default all)")
    p.add_argument("--cases", help="comma-separated case names (see --list-cases)")
    p.add_argument("--list-cases", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="runs per case and peer (1)")
    p.add_argument("--slow-mbit", type=float, default=100.0,
                   help="the slow receiver's input rate in Mbit/s (100: Fast Ethernet)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="kill the last receiver when it has this share of the image (0.5)")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="an impaired case stalls after FACTOR x the peer's 0 %% time with the "
                        "same receivers + --timeout-extra (+ the image at the slow rate) (3)")
    p.add_argument("--timeout-extra", type=float, default=60.0, help="seconds (60)")
    p.add_argument("--base-timeout-mbs", type=float, default=5.0,
                   help="a 0 %% case stalls after --timeout-extra + the image at this MB/s (5)")
    p.add_argument("--dir", default="/var/tmp/preboot-multicast-bench",
                   help="work folder: the cached image, the run logs (default "
                        "/var/tmp/preboot-multicast-bench)")
    p.add_argument("--shm", default="/dev/shm",
                   help="tmpfs for the staged image and the receivers' copies (/dev/shm)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing peers (they are skipped)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to this long for the machine to be under "
                        "10%% CPU busy for 3 s")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="start no new run after this many seconds (0: no limit); the rest is "
                        "SKIP")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep every run's logs under DIR/runs (default: only failed runs')")
    p.add_argument("--json", metavar="FILE",
                   help="write the results as JSON (default DIR/results-DATE.json)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# the image


def make_image(folder: Path, size: int) -> tuple[Path, str]:
    """DIR/image-<N>MiB.bin from /dev/urandom, made once and reused; (path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"image-{size // MiB}MiB.bin"
    digest_file = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == size and digest_file.exists() \
            and digest_file.stat().st_mtime >= path.stat().st_mtime:
        return path, digest_file.read_text().split()[0]
    log(f"making {path} ({size // MiB} MiB from /dev/urandom)")
    digest = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with open("/dev/urandom", "rb") as src, open(tmp, "wb") as out:
        left = size
        while left:
            block = src.read(min(left, 4 * MiB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    tmp.rename(path)
    digest_file.write_text(f"{digest.hexdigest()}  {path.name}\n")
    return path, digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# machine load




# --------------------------------------------------------------------------------------------
# one run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.size = (args.size_mib or (64 if args.quick else 512)) * MiB
        self.work = Path(args.dir)
        self.ncpu = len(os.sched_getaffinity(0))
        self.runs: list[dict[str, Any]] = []
        self.base_times: dict[tuple[str, int], list[float]] = {}
        self.started = time.monotonic()
        self.errors: list[str] = []
        self.stage_dir = Path(args.shm) / f"preboot-mcast-{os.getpid()}"
        self.source: Path | None = None
        self.digest = ""

    @property
    def slow_rate(self) -> float:
        return self.a.slow_mbit * 1e6 / 8

    def timeout_for(self, peer: str, case: Case) -> float:
        base = self.a.timeout_extra + self.size / (self.a.base_timeout_mbs * 1e6)
        if not case.impaired:
            return base
        times = self.base_times.get((peer, case.receivers))
        limit = (self.a.timeout_factor * statistics.median(times) + self.a.timeout_extra
                 if times else base)
        if case.slow:
            limit += self.size / self.slow_rate
        return limit

    def stage(self, image: Path) -> None:
        """A copy of the image on tmpfs for the sender to read (the bench measures the network
        protocol, not the disk: the receivers write to tmpfs too)."""
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.source = self.stage_dir / "image.bin"
        shutil.copyfile(image, self.source)

    def run_one(self, peer: Peer, case: Case, rep: int) -> dict[str, Any]:
        prefix = netlab.unique_prefix("mcb")
        rundir = self.work / "runs" / f"{peer.name}-{case.name}-{rep + 1}"
        shutil.rmtree(rundir, ignore_errors=True)
        outroot = self.stage_dir / prefix
        timeout = self.timeout_for(peer.name, case)
        result: dict[str, Any] = {"peer": peer.name, "case": case.name, "repeat": rep + 1,
                                  "receivers": case.receivers, "timeout_s": round(timeout, 1),
                                  "namespaces": prefix, "logs": str(rundir)}
        lab: MulticastLab | None = None
        session: Session | None = None
        killer: KillAt | None = None
        try:
            lab = MulticastLab(rundir, receivers=case.receivers, prefix=prefix)
            rx = lab.receivers
            if case.loss_one:
                lab.loss_in(rx[0], case.loss_one)
            for host in rx if case.loss_each else []:
                lab.loss_in(host, case.loss_each)
            if case.loss_all:
                lab.loss_out(lab.sender, case.loss_all)
            if case.slow:
                lab.rate_limit_in(rx[0], int(self.slow_rate))
            killed = len(rx) - 1 if case.kill else None
            outdirs = [outroot / h.name for h in rx]
            for d in outdirs:
                d.mkdir(parents=True)
            assert self.source is not None
            session = peer.session(lab, self.source, outdirs, killed)
            session.start_receivers()
            link0 = lab.link_stats(lab.sender)
            udp0 = [lab.udp_counters(h) for h in rx]
            busy0 = machine_busy_seconds()
            t0 = time.monotonic()
            session.start_sender()
            if killed is not None:
                proc = session.receivers[killed]
                assert proc is not None
                killer = KillAt(proc, outdirs[killed], int(self.size * self.a.kill_at))
            stalled = False
            first_byte: float | None = None
            while True:
                now = time.monotonic()
                session.poll(now)
                if first_byte is None and any(folder_bytes(d) for d in outdirs):
                    first_byte = now
                if session.finished(now):
                    break
                if now - t0 > timeout:
                    stalled = True
                    break
                time.sleep(POLL)
            end = time.monotonic()
            if killer is not None:
                killer.cancel()
            session.stop()
            busy1 = machine_busy_seconds()
            link1 = lab.link_stats(lab.sender)
            udp1 = [lab.udp_counters(h) for h in rx]
            drops = {h.name: lab.nft_drops(h) for h in lab.hosts}
            result.update(self.assess(session, case, t0, end, stalled, killer))
            result["first_byte_s"] = round(first_byte - t0, 3) if first_byte else None
            tx = link1["tx_bytes"] - link0["tx_bytes"]
            rxb = link1["rx_bytes"] - link0["rx_bytes"]
            copies = result["verified_copies"]
            result.update({
                "sender_tx_bytes": tx, "sender_rx_bytes": rxb,
                "tx_copies": round(tx / self.size, 4),
                "wire_per_delivered": round((tx + rxb) / (self.size * copies), 4)
                if copies else None,
                "nft_drops": {k: v for k, v in drops.items() if v},
                # datagrams the receivers' kernels dropped for a full socket buffer
                "rcvbuf_errors": [b.get("RcvbufErrors", 0) - a.get("RcvbufErrors", 0)
                                  for a, b in zip(udp0, udp1)],
                "commands": {k: shlex.join(v) for k, v in session.commands.items()},
            })
            cpu = (result["sender_cpu_s"] or 0) + sum(result["receiver_cpu_s"])
            wall = end - t0
            result["other_busy"] = (round(max(0.0, (busy1 - busy0 - cpu) / (wall * self.ncpu)), 3)
                                    if busy0 is not None and busy1 is not None and wall > 0
                                    else None)
        except Exception as exc:
            result.update({"outcome": "error", "error": f"{type(exc).__name__}: {exc}"})
            self.errors.append(f"{peer.name} {case.name} #{rep + 1}: {exc}")
            log(f"{peer.name} {case.name}: bench error: {exc}")
        finally:
            if killer is not None:
                killer.cancel()
            if session is not None:
                try:
                    session.stop()
                except Exception as exc:  # keep cleaning up
                    log(f"stopping {peer.name}: {exc}")
            if lab is not None:
                lab.close()
            shutil.rmtree(outroot, ignore_errors=True)
        if result.get("outcome") == "ok" and not self.a.keep_logs:
            shutil.rmtree(rundir, ignore_errors=True)
            result["logs"] = None
        return result

    def assess(self, session: Session, case: Case, t0: float, end: float, stalled: bool,
               killer: KillAt | None) -> dict[str, Any]:
        """Verify every copy; the outcome, the time and per-receiver facts."""
        notes = session.sender_notes()
        sender = session.sender_exit
        receivers: list[dict[str, Any]] = []
        problems: list[str] = []
        silent = 0
        good = 0
        for i, host in enumerate(session.lab.receivers):
            out = session.output(i)
            size = out.stat().st_size if out is not None and out.exists() else None
            verified = size == self.size and sha256_of(out) == self.digest
            ex = session.receiver_exit[i]
            info = {"name": host.name, "bytes": size, "verified": verified,
                    "exit": ex.code if ex else None,
                    "cpu_s": round(ex.cpu, 2) if ex else None,
                    "says_ok": session.receiver_says_ok(i),
                    "done_s": round(session.done[i] - t0, 3) if session.done[i] else None,
                    "killed": i == session.killed, "sender_note": notes.get(i),
                    "receiver_note": session.receiver_notes(i) or None}
            if i == session.killed:
                info["killed_at_bytes"] = killer.progress if killer else None
                info["killed_at_s"] = (round(killer.killed_at - t0, 3)
                                       if killer and killer.killed_at else None)
            receivers.append(info)
            if i == session.killed:
                if killer is None or killer.killed_at is None:
                    problems.append(f"{host.name} was to be killed but finished first "
                                    f"(or never reached {self.a.kill_at:.0%})")
                continue
            if verified and session.done[i] is not None:
                good += 1
                continue
            what = ("missing" if size is None else
                    f"{size} of {self.size} bytes" if size != self.size else
                    "copy verified, but the receiver reported failure" if verified else
                    "content differs")
            if verified:
                good += 1
            said_ok = (sender is not None and sender.code == 0) or info["says_ok"]
            said = ((f"; sender said: {notes[i]}" if i in notes else "")
                    + (f"; receiver said: {info['receiver_note']}"
                       if info["receiver_note"] else ""))
            if said_ok and not verified and not stalled:
                silent += 1
                problems.append(
                    f"SILENT {host.name}: {what}; sender exit "
                    f"{sender.code if sender else '-'}, receiver "
                    f"{'reported success' if info['says_ok'] else 'exit %s' % info['exit']}"
                    + said)
            else:
                problems.append(f"{host.name}: {what}; receiver exit {info['exit']}" + said)
        survivors = session.survivors()
        all_good = all(receivers[i]["verified"] and session.done[i] is not None
                       for i in survivors)
        if stalled:
            outcome = "stall"
            waiting = [session.lab.receivers[i].name for i in survivors
                       if session.done[i] is None]
            problems.insert(0, f"STALL: no end after {end - t0:.0f} s (sender "
                               f"{'exited %s' % sender.code if sender else 'still running'}; "
                               f"waiting for {', '.join(waiting) or 'the sender'})")
        elif all_good:
            outcome = "ok"
        elif silent:
            outcome = "silent"
        else:
            outcome = "fail"
        seconds = (max(session.done[i] for i in survivors) - t0  # type: ignore[type-var]
                   if outcome == "ok" else None)
        return {
            "outcome": outcome, "seconds": round(seconds, 3) if seconds else None,
            "mb_s": round(self.size / seconds / 1e6, 2) if seconds else None,
            "wall_s": round(end - t0, 3),
            "sender_exit": sender.code if sender else None,
            "sender_exit_s": round(sender.at - t0, 3) if sender else None,
            "sender_cpu_s": round(sender.cpu, 2) if sender else None,
            "receiver_cpu_s": [r["cpu_s"] or 0 for r in receivers],
            "verified_copies": sum(1 for i in survivors if receivers[i]["verified"]),
            "silent_failures": silent, "receivers_detail": receivers, "problems": problems,
        }


# --------------------------------------------------------------------------------------------
# report


def fmt(value: Any, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def summarize(bench: Bench, peers: list[str], cases: list[Case]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        for peer in peers:
            runs = [r for r in bench.runs if r["peer"] == peer and r["case"] == case.name]
            if not runs:
                continue
            ok = [r for r in runs if r["outcome"] == "ok"]

            def med(key: str, pool: list[dict[str, Any]] = ok) -> Any:
                vals = [r[key] for r in pool if r.get(key) is not None]
                return statistics.median(vals) if vals else None
            rows.append({
                "case": case.name, "label": case.label, "peer": peer, "runs": len(runs),
                "ok": len(ok), "seconds": med("seconds"), "mb_s": med("mb_s"),
                "first_byte_s": med("first_byte_s", runs),
                "wire_per_delivered": med("wire_per_delivered", runs),
                "tx_copies": med("tx_copies", runs), "sender_cpu_s": med("sender_cpu_s", runs),
                "rcvbuf_errors": statistics.median(sum(r["rcvbuf_errors"]) for r in runs)
                if all(r.get("rcvbuf_errors") is not None for r in runs) else None,
                "stalls": sum(r["outcome"] == "stall" for r in runs),
                "silent": sum(r["outcome"] == "silent" for r in runs),
                "failed": sum(r["outcome"] in ("fail", "error") for r in runs),
                "skipped": sum(r["outcome"] == "skip" for r in runs),
                "other_busy": max((r.get("other_busy") or 0) for r in runs),
            })
    return rows


def report(bench: Bench, meta: dict[str, Any], rows: list[dict[str, Any]],
           peers: list[str]) -> str:
    L: list[str] = []
    m = meta["machine"]
    L.append(f"bench/run-multicast-bench {meta['date']}  {m['nproc']} CPUs ({m['cpu_model']}), "
             f"{m['memory']}, {m['kernel']}, Python {m['python']}")
    L.append(f"image: {bench.size // MiB} MiB from /dev/urandom (sha256 {bench.digest[:16]}), "
             f"staged on tmpfs; receivers write to tmpfs")
    L.append("lab: sender + N receivers, one network namespace each, veth pairs to a bridge in "
             "a switch namespace (no IGMP snooping), 10.79.0.0/24, TTL 1; GRO on every host's "
             "interface; loss and the slow rate per packet at the switch port")
    for name, info in meta["peers"].items():
        L.append(f"  {name:8s} {info.get('version', '')}"
                 + (f"  SKIPPED: {info['skipped']}" if info.get("skipped") else ""))
    L.append(f"repeats {bench.a.repeats}; slow receiver {bench.a.slow_mbit:g} Mbit/s (nft limit "
             f"at its switch port); killed receiver SIGKILLed at {bench.a.kill_at:.0%} of the image")
    L.append("time = sender start -> last surviving receiver has its copy; every copy "
             "verified by sha256 afterwards (untimed); MB/s = 10^6 bytes/s")
    L.append("commands (first run of each peer; receiver r1 shown, the others alike):")
    for peer in peers:
        first = next((r for r in bench.runs if r["peer"] == peer and r.get("commands")), None)
        for name, command in (first or {}).get("commands", {}).items():
            if name.endswith(("-r2", "-r3", "-r4", "-r5")):
                continue
            L.append(f"  $ {command}")
    L.append("")
    head = (f"{'case':32s} {'peer':8s} {'ok/runs':>7s} {'start s':>7s} {'seconds':>8s} {'MB/s':>7s} "
            f"{'x udpcast':>9s} {'wire/deliv':>10s} {'tx copies':>9s} {'snd CPU-s':>9s} "
            f"{'buf drops':>9s} {'stall':>5s} {'silent':>6s} {'fail':>4s} {'other':>6s}")
    L.append(head)
    L.append("-" * len(head))
    base = {r["case"]: r["mb_s"] for r in rows if r["peer"] == "udpcast"}
    for r in rows:
        ratio = (r["mb_s"] / base[r["case"]]) if r["mb_s"] and base.get(r["case"]) else None
        mark = "!" if r["other_busy"] > OTHER_LIMIT else " "
        L.append(f"{r['case'] + '  ' + r['label']:32.32s} {r['peer']:8s} "
                 f"{str(r['ok']) + '/' + str(r['runs']):>7s} {fmt(r['first_byte_s'], '.2f', 7)} "
                 f"{fmt(r['seconds'], '.2f', 8)} {fmt(r['mb_s'], '.1f', 7)} "
                 f"{fmt(ratio, '.2f', 8)}{'x' if ratio else ' '} "
                 f"{fmt(r['wire_per_delivered'], '.3f', 10)} {fmt(r['tx_copies'], '.3f', 9)} "
                 f"{fmt(r['sender_cpu_s'], '.2f', 9)} {fmt(r['rcvbuf_errors'], '.0f', 9)} "
                 f"{r['stalls']:>5d} {r['silent']:>6d} "
                 f"{r['failed']:>4d} {r['other_busy'] * 100:>5.0f}%{mark}")
    L.append("")
    L.append("start s: sender start -> the first byte written by any receiver (median of "
             "all runs); seconds, MB/s: median of the runs where every surviving receiver "
             "verified ('-': none did); wire/deliv: sender veth bytes both ways / (image x verified "
             "copies); tx copies: sender veth bytes out / image; buf drops: datagrams the "
             "receivers' kernels dropped for a full socket buffer (all receivers); "
             "other: share of the CPUs "
             f"used by anything but the sender and receivers (! above {OTHER_LIMIT:.0%}: "
             "not comparable)")
    notes = []
    for r in bench.runs:
        if r["outcome"] != "ok" or r.get("problems"):
            head = (f"{r['peer']} {r['case']} #{r['repeat']}: {r['outcome'].upper()}"
                    f" (timeout {r['timeout_s']:.0f} s, sender exit {r.get('sender_exit')}"
                    f" at {r.get('sender_exit_s')} s)")
            notes.append(head + ("" if not r.get("logs") else f", logs {r['logs']}"))
            for p in r.get("problems", []):
                notes.append(f"    {p}")
            if r.get("error"):
                notes.append(f"    {r['error']}")
    if notes:
        L.append("")
        L.append("Runs that were not clean")
        L.extend("  " + n for n in notes)
    L.append("")
    L.append("Goals (issue 14; ours vs udpcast, 3 receivers)")
    ours = {r["case"]: r for r in rows if r["peer"] == "ours"}
    for case, factor in (("r3", 1.5), ("r3-loss5-one", 2.0), ("r3-loss5-all", 2.0)):
        o, u = ours.get(case), base.get(case)
        if not o:
            verdict = "not run (this case or ours was left out)"
        elif o["mb_s"] and u:
            ratio = o["mb_s"] / u
            verdict = f"{ratio:.2f}x -> {'met' if ratio >= factor else 'NOT met'}"
        else:
            verdict = "no ratio (a side has no verified time)"
        L.append(f"  {BY_NAME[case].label} >= {factor}x udpcast".ljust(52) + verdict)
    if ours:
        bad = sum(r["stalls"] + r["silent"] for r in ours.values())
        L.append("  zero stalls and zero silent failures, every case".ljust(52)
                 + ("met" if bad == 0 else f"NOT met ({bad})"))
    else:
        L.append("  zero stalls and zero silent failures, every case".ljust(52)
                 + "not run (ours was left out)")
    for peer in peers:
        if peer == "ours":
            continue
        pr = [r for r in rows if r["peer"] == peer]
        if pr:
            L.append(f"  ({peer}: {sum(r['stalls'] for r in pr)} stall(s), "
                     f"{sum(r['silent'] for r in pr)} silent failure(s), "
                     f"{sum(r['failed'] for r in pr)} other failure(s) in "
                     f"{sum(r['runs'] for r in pr)} runs)")
    L.append("")
    L.append(f"total bench time {time.monotonic() - bench.started:.0f} s")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# main


def git_state() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" + local changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_cases:
        for c in CASES:
            tags = ("default " if c.name in DEFAULT_CASES else "") + \
                   ("quick" if c.name in QUICK_CASES else "")
            print(f"{c.name:16s} {c.label:36s} {tags}")
        return 0
    if os.geteuid() != 0:
        print("bench/run-multicast-bench: needs root (network namespaces, nft)", file=sys.stderr)
        return 2
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            print(f"bench/run-multicast-bench: {tool} not found (apt-get install "
                  f"{'iproute2' if tool == 'ip' else 'nftables'})", file=sys.stderr)
            return 2
    names = [c.strip() for c in (args.cases.split(",") if args.cases else
                                 QUICK_CASES if args.quick else DEFAULT_CASES) if c.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"bench/run-multicast-bench: unknown case(s) {', '.join(unknown)} "
              f"(--list-cases)", file=sys.stderr)
        return 2
    # the 0 % cases first: the impaired cases' timeouts come from them
    cases = sorted((BY_NAME[n] for n in names), key=lambda c: (c.impaired, names.index(c.name)))
    peer_names = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in peer_names):
        print(f"bench/run-multicast-bench: peers are {', '.join(PEERS)}", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(args)
    problems = {} if args.no_install else install_peers(peer_names)
    peers: list[Peer] = []
    meta: dict[str, Any] = {
        "bench": "multicast", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(), "git": git_state(),
        "command": shlex.join(["bench/run-multicast-bench", *sys.argv[1:]]),
        "image_bytes": bench.size, "repeats": args.repeats, "slow_mbit": args.slow_mbit,
        "kill_at": args.kill_at, "cases": [asdict(c) for c in cases], "peers": {}}
    for name in peer_names:
        peer = PEERS[name]()
        why = problems.get(name) or peer.unavailable()
        meta["peers"][name] = {"version": peer.version()} | ({"skipped": why} if why else {})
        if why:
            log(f"{name}: {why}")
        else:
            peers.append(peer)
    if not peers:
        log("no peer can run")
        return 2
    need = bench.size * (2 + max(c.receivers for c in cases))
    free = shutil.disk_usage(args.shm).free
    if free < need:
        log(f"{args.shm} has {free // MiB} MiB free; the runs need {need // MiB} MiB")
        return 2
    status = 0
    try:
        image, bench.digest = make_image(bench.work, bench.size)
        bench.stage(image)
        meta["busy_before"] = cpu_busy()
        for rep in range(args.repeats):
            for case in cases:
                for peer in peers:
                    if args.budget and time.monotonic() - bench.started > args.budget:
                        bench.runs.append({"peer": peer.name, "case": case.name,
                                           "repeat": rep + 1, "outcome": "skip",
                                           "receivers": case.receivers, "timeout_s": 0,
                                           "problems": ["over --budget"]})
                        continue
                    if args.wait_quiet > 0:
                        wait_quiet(args.wait_quiet)
                    log(f"{peer.name} {case.name} ({case.label}) #{rep + 1}, timeout "
                        f"{bench.timeout_for(peer.name, case):.0f} s")
                    r = bench.run_one(peer, case, rep)
                    bench.runs.append(r)
                    if r["outcome"] == "ok" and not case.impaired:
                        bench.base_times.setdefault((peer.name, case.receivers),
                                                    []).append(r["seconds"])
                    log(f"  -> {r['outcome']}"
                        + (f" {r['seconds']:.2f} s, {r['mb_s']:.1f} MB/s" if r.get("seconds")
                           else "")
                        + (f", sender CPU {r['sender_cpu_s']:.2f} s"
                           if r.get("sender_cpu_s") is not None else ""))
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaning up")
        status = 1
    finally:
        shutil.rmtree(bench.stage_dir, ignore_errors=True)
    rows = summarize(bench, [p.name for p in peers] + [p for p in peer_names
                                                        if p not in [x.name for x in peers]],
                     cases)
    text = report(bench, meta, rows, peer_names)
    print(text)
    out = Path(args.json) if args.json else bench.work / (
        "results-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "image_sha256": bench.digest, "summary": rows,
                               "runs": bench.runs, "errors": bench.errors}, indent=1) + "\n")
    log(f"results written to {out}")
    if bench.errors or any(r["outcome"] == "skip" for r in bench.runs):
        status = 1
    return status
