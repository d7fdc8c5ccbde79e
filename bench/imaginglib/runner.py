"""bench/run-imaging-bench: orchestration, the table and the JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from img.disk import SYNC_STEP_BYTES
from machineinfo import machine

from . import ceiling, diskgen, profiling
from .ours import OurServer
from .peers import Pipe
from .sysutil import (MiB, REPO, Usage, cpu_busy, drop_caches, log, machine_busy_seconds,
                      tool_version, wait_disk_idle, wait_quiet)

TOOLS = ("partclone.ext4", "partclone.dd", "zstd", "socat", "sgdisk", "sfdisk", "losetup",
         "mkfs.ext4", "e2fsck", "dumpe2fs", "mount", "umount", "dd")
OTHER_LIMIT = 0.10
WRITE_CEILINGS = (("ceiling decompress+write", 0),
                  ("ceiling decompress+write, synced behind", SYNC_STEP_BYTES))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run-imaging-bench",
        description="Make and restore of a GPT disk image (ext4 with files, zeros, random data, "
                    "and a raw partition) through our imgsrvd on loopback, against partclone | "
                    "zstd | plain TCP (socat), and against the loopback sendfile and the "
                    "decompress-and-write ceilings. Needs root (loop devices, mount, "
                    "drop_caches). See bench/README.md.")
    p.add_argument("--size", default="2G",
                   help="disk size, with M or G (default 2G; at least 256M)")
    p.add_argument("--level", type=int, default=1, help="zstd level for img and for zstd (1)")
    p.add_argument("--threads", type=int, default=2,
                   help="compression/decompression threads: img --threads, zstd -T (2)")
    p.add_argument("--partclone-buffer", type=int, default=0, metavar="BYTES",
                   help="partclone -z for the pipe (0: partclone's default, 1 MiB, the faster "
                        "here; Clonezilla passes 10485760)")
    p.add_argument("--seed", type=int, default=1, help="content seed (1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="times each make/restore runs; the table shows the median (1)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the work folder (disks, image stores) goes; a real disk, not "
                        "tmpfs (default /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work folder (source disk, images, logs)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each measured step, wait up to this long for the machine to "
                        "be under 10%% CPU busy for 3 s")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--profile", metavar="DIR",
                   help="sample img and imgsrvd with py-spy (every thread, waits included: "
                        "DIR/make.txt, make.server.txt, restore.txt, restore.server.txt, "
                        "summarised at the end), or without py-spy run img under cProfile "
                        "(DIR/make.prof, restore.prof); the times then include the "
                        "profiler's cost")
    return p.parse_args(argv)


def compile_bytecode() -> None:
    """Byte-compile img and common first, as an installed package is (the RPM does it): with
    PYTHONDONTWRITEBYTECODE set, every img start would compile them again."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "img"),
                    str(REPO / "common")], check=False, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def filesystem_of(path: str) -> str:
    best, fstype, device = "", "?", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            dev, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, fstype, device = point, kind, dev
    return f"{fstype} ({device} on {best})"


class Step:
    """One measured operation: seconds, CPU on each side, other work on the machine."""

    def __init__(self, name: str):
        self.name = name
        self.runs: list[dict[str, Any]] = []

    def add(self, seconds: float, client: Usage, server: Usage, other: float | None,
            **extra: Any) -> dict[str, Any]:
        run = {"seconds": round(seconds, 3), "client_cpu_s": round(client.total, 2),
               "server_cpu_s": round(server.total, 2),
               "other_busy": None if other is None else round(other, 3), **extra}
        self.runs.append(run)
        return run

    @property
    def seconds(self) -> float | None:
        return statistics.median(r["seconds"] for r in self.runs) if self.runs else None

    def median(self, key: str) -> Any:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    @property
    def disturbed(self) -> bool:
        return any((r["other_busy"] or 0) > OTHER_LIMIT for r in self.runs)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.size = parse_size(args.size)
        self.layout = diskgen.Layout.for_size(self.size)
        self.work = Path(tempfile.mkdtemp(prefix="pbimg-bench-", dir=args.dir))
        self.src = self.work / "source.disk"
        self.target = self.work / "target.disk"
        self.server: OurServer | None = None
        self.steps: dict[str, Step] = {}
        self.failures: list[str] = []
        self.dropped = True
        self.ncpu = len(os.sched_getaffinity(0))

    # -------------------------------------------------------------- helpers
    def step(self, name: str) -> Step:
        return self.steps.setdefault(name, Step(name))

    def before_step(self) -> None:
        if self.a.wait_quiet > 0:
            wait_quiet(self.a.wait_quiet)
        self.dropped = drop_caches() and self.dropped
        # The step before may have left the (virtual) disk writing back; a step that starts on
        # a busy disk would pay for the one before.
        wait_disk_idle(self.work)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float | None, float]:
        """Run fn; (its result, machine CPU-s busy meanwhile, wall seconds)."""
        busy0 = machine_busy_seconds()
        started = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - started
        busy1 = machine_busy_seconds()
        busy = None if busy0 is None or busy1 is None else busy1 - busy0
        return result, busy, wall

    def other(self, busy: float | None, wall: float, client: Usage, server: Usage
              ) -> float | None:
        """Share of the machine's CPUs that other work used during a step."""
        if busy is None or wall <= 0:
            return None
        return max(0.0, (busy - client.total - server.total) / (wall * self.ncpu))

    def blank_target(self) -> None:
        self.target.unlink(missing_ok=True)
        with open(self.target, "wb") as handle:
            handle.truncate(self.size)

    def check(self, label: str) -> None:
        problems = diskgen.verify(self.target, self.manifest)
        if problems:
            message = f"{label}: the restored disk is wrong: " + "; ".join(problems[:5])
            self.failures.append(message)
            log(message)
        else:
            log(f"{label}: restored disk verified (table, head, raw partition, e2fsck, "
                f"{len(self.manifest['files'])} file hashes)")

    # -------------------------------------------------------------- phases
    def build(self) -> None:
        log(f"building a {self.size >> 20} MiB source disk in {self.work} "
            f"({filesystem_of(str(self.work))}), seed {self.a.seed}")
        started = time.monotonic()
        self.manifest = diskgen.build(self.src, self.layout, self.a.seed,
                                      "/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.ext4_used = diskgen.ext4_used_bytes(self.src, self.layout)
        self.used = self.layout.head + self.ext4_used + self.layout.raw_size
        log(f"source disk built in {time.monotonic() - started:.0f} s: ext4 "
            f"{self.ext4_used / MiB:.0f} of {self.layout.ext4_size / MiB:.0f} MiB used "
            f"({100 * self.ext4_used / self.layout.ext4_size:.0f} %), "
            f"{len(self.manifest['files'])} files; used bytes in all "
            f"{self.used / MiB:.0f} MiB")

    def ours_make(self, rep: int) -> None:
        assert self.server
        self.before_step()
        profile = str(Path(self.a.profile) / "make.prof") if self.a.profile else None
        timed, busy, wall = self.measure(
            lambda: self.server.make(self.src, self.a.level, self.a.threads, profile))
        stored = self.server.image.stat().st_size
        run = self.step("ours make").add(timed.seconds, timed.client, timed.server,
                                         self.other(busy, wall, timed.client, timed.server),
                                         stored=stored)
        log(f"ours make #{rep + 1}: {timed.seconds:.1f} s, stored {stored / MiB:.0f} MiB, "
            f"CPU client {run['client_cpu_s']} s server {run['server_cpu_s']} s")

    def ours_restore(self, rep: int) -> None:
        assert self.server
        self.blank_target()
        self.before_step()
        profile = str(Path(self.a.profile) / "restore.prof") if self.a.profile else None
        timed, busy, wall = self.measure(
            lambda: self.server.restore(self.target, self.a.threads, profile))
        run = self.step("ours restore").add(timed.seconds, timed.client, timed.server,
                                            self.other(busy, wall, timed.client, timed.server))
        log(f"ours restore #{rep + 1}: {timed.seconds:.1f} s, CPU client "
            f"{run['client_cpu_s']} s server {run['server_cpu_s']} s")
        self.check(f"ours restore #{rep + 1}")

    def pipe_make(self, rep: int) -> None:
        self.before_step()
        result, busy, wall = self.measure(lambda: self.pipe.make(self.src))
        run = self.step("pipe make").add(result.seconds, result.client, result.server,
                                         self.other(busy, wall, result.client, result.server),
                                         stored=result.stored)
        log(f"pipe make #{rep + 1}: {result.seconds:.1f} s, stored {result.stored / MiB:.0f} "
            f"MiB, CPU client {run['client_cpu_s']} s server {run['server_cpu_s']} s")

    def pipe_restore(self, rep: int) -> None:
        self.blank_target()
        self.before_step()
        result, busy, wall = self.measure(lambda: self.pipe.restore(self.target))
        run = self.step("pipe restore").add(result.seconds, result.client, result.server,
                                            self.other(busy, wall, result.client,
                                                       result.server))
        log(f"pipe restore #{rep + 1}: {result.seconds:.1f} s, CPU client "
            f"{run['client_cpu_s']} s server {run['server_cpu_s']} s")
        self.check(f"pipe restore #{rep + 1}")

    def sendfile_ceilings(self, rep: int = 0) -> None:
        assert self.server
        image = self.server.image
        for label, cold in (("sendfile cold", True), ("sendfile warm", False)):
            if cold:
                self.before_step()
            else:
                with open(image, "rb") as handle:        # into the page cache
                    while handle.read(16 * MiB):
                        pass
            (seconds, sender, receiver), busy, wall = self.measure(
                lambda: ceiling.sendfile(image))
            self.step(f"ceiling {label}").add(seconds, receiver, sender,
                                              self.other(busy, wall, receiver, sender))
            log(f"ceiling {label}: {seconds:.2f} s")

    def write_ceilings(self, rep: int = 0) -> None:
        """Decompress and write, the disk left to one fsync at the end and synced behind (as
        img does); the faster median of the two is the ceiling."""
        assert self.server
        image = self.server.image
        for name, sync_step in WRITE_CEILINGS:
            self.blank_target()
            self.before_step()
            (seconds, inner, usage, written), busy, wall = self.measure(
                lambda: ceiling.decompress_to_disk_process(image, self.target, self.a.threads,
                                                           sync_step))
            self.step(name).add(seconds, usage, Usage(), self.other(busy, wall, usage, Usage()),
                                written=written, inner_seconds=round(inner, 3))
            log(f"{name}: {seconds:.2f} s as a process, {inner:.2f} s of it the work "
                f"({written / MiB:.0f} MiB written)")

    # -------------------------------------------------------------- the run
    def run(self) -> int:
        self.build()
        self.server = OurServer(self.work / "imgsrvd").start()
        self.pipe = Pipe(self.work, self.layout, self.a.level, self.a.threads,
                         self.a.partclone_buffer)
        if self.a.profile:
            Path(self.a.profile).mkdir(parents=True, exist_ok=True)
        # The ceilings are repeated like the rest (their final fsync varies as much as a
        # restore's on this virtual disk): every row is a median of the same number of runs.
        # Our restore and the write ceilings run next to each other, in turns first, so that
        # neither always follows the same step.
        compile_bytecode()
        for rep in range(self.a.repeats):
            restores = [self.ours_restore, self.write_ceilings]
            if rep % 2:
                restores.reverse()
            for fn in (self.ours_make, self.pipe_make, *restores, self.pipe_restore,
                       self.sendfile_ceilings):
                try:
                    fn(rep)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    message = f"{fn.__name__.replace('_', ' ')} #{rep + 1} FAILED: {exc}"
                    self.failures.append(message)
                    log(message)
        return 1 if self.failures else 0

    def close(self) -> None:
        if self.server:
            self.server.stop()
        if self.a.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -------------------------------------------------------------- report
    def report(self, meta: dict[str, Any]) -> dict[str, Any]:
        size, used = self.size, self.used
        rows = []
        out: list[str] = []
        head = (f"{'operation':<28}{'seconds':>9}{'MB/s disk':>11}{'MB/s used':>11}"
                f"{'stored MB':>11}{'client CPU-s':>14}{'server CPU-s':>14}{'other':>7}")
        out.append(head)
        out.append("-" * len(head))
        names = ["ours make", "pipe make", "ours restore", "pipe restore",
                 "ceiling sendfile cold", "ceiling sendfile warm", "ceiling decompress+write",
                 "ceiling decompress+write, synced behind"]
        labels = {"ours make": "ours   make (img -> imgsrvd)",
                  "pipe make": "pipe   make (partclone|zstd)",
                  "ours restore": "ours   restore",
                  "pipe restore": "pipe   restore",
                  "ceiling sendfile cold": "ceiling sendfile, cold",
                  "ceiling sendfile warm": "ceiling sendfile, warm",
                  "ceiling decompress+write": "ceiling decompress+write",
                  "ceiling decompress+write, synced behind": "ceiling ... synced behind"}
        for name in names:
            step = self.steps.get(name)
            if not step or step.seconds is None:
                out.append(f"{labels[name]:<28}{'FAIL':>9}")
                rows.append({"operation": name, "seconds": None})
                continue
            seconds = step.seconds
            stored = step.median("stored")
            if name.startswith("ceiling sendfile"):
                moved = self.server.image.stat().st_size if self.server else 0
                disk_mbs, used_mbs = moved / seconds / 1e6, None
                stored = None
            else:
                disk_mbs, used_mbs = size / seconds / 1e6, used / seconds / 1e6
            mark = "!" if step.disturbed else ""
            other = step.median("other_busy")
            client_label = step.median("client_cpu_s")
            server_label = step.median("server_cpu_s")
            out.append(f"{labels[name]:<28}{seconds:>8.2f}{mark:1}{disk_mbs:>11.1f}"
                       f"{used_mbs if used_mbs is not None else float('nan'):>11.1f}"
                       f"{stored / 1e6 if stored else float('nan'):>11.1f}"
                       f"{client_label:>14.2f}{server_label:>14.2f}"
                       f"{'-' if other is None else f'{100 * other:.0f}%':>7}"
                       .replace("nan", "  -"))
            rows.append({"operation": name, "seconds": seconds, "mb_s_disk": round(disk_mbs, 1),
                         "mb_s_used": None if used_mbs is None else round(used_mbs, 1),
                         "stored_bytes": stored, "client_cpu_s": client_label,
                         "server_cpu_s": server_label, "other_busy": other,
                         "disturbed": step.disturbed,
                         "runs": step.runs})

        def ratio(a: str, b: str) -> float | None:
            sa, sb = self.steps.get(a), self.steps.get(b)
            if not sa or not sb or sa.seconds is None or sb.seconds is None:
                return None
            return sb.seconds / sa.seconds          # speed of a over speed of b

        def ratio_to_ceiling(a: str) -> float | None:
            found = [r for r in (ratio(a, name) for name, _ in WRITE_CEILINGS) if r is not None]
            return min(found) if found else None     # against the faster ceiling

        ratios = {
            "make ours/pipe": ratio("ours make", "pipe make"),
            "restore ours/pipe": ratio("ours restore", "pipe restore"),
            "restore ours/ceiling (decompress+write)": ratio_to_ceiling("ours restore"),
            "pipe restore/ceiling (decompress+write)": ratio_to_ceiling("pipe restore"),
        }
        inner = [self.steps[name].median("inner_seconds") for name, _ in WRITE_CEILINGS
                 if self.steps.get(name)]
        ours_restore = self.steps.get("ours restore")
        if ours_restore and ours_restore.seconds and inner and None not in inner:
            # The same ceilings without their process start: what the work alone took.
            ratios["restore ours/ceiling work alone (in-process)"] = \
                min(inner) / ours_restore.seconds
        if self.steps.get("ours make") and self.steps.get("pipe make"):
            s_ours = self.steps["ours make"].median("stored")
            s_pipe = self.steps["pipe make"].median("stored")
            if s_ours and s_pipe:
                ratios["stored size ours/pipe"] = s_ours / s_pipe
        out.append("")
        out.append("Ratios (speed; >1 means the first is faster)")
        for key, value in ratios.items():
            out.append(f"  {key:<44}{'-' if value is None else f'{value:.2f}x':>8}")
        goals = [("make >= 1.0x the partclone+zstd pipe", ratios["make ours/pipe"], 1.0),
                 ("restore >= 1.0x the partclone+zstd pipe", ratios["restore ours/pipe"], 1.0),
                 ("restore >= 0.9x the decompress+write ceiling",
                  ratios["restore ours/ceiling (decompress+write)"], 0.9)]
        out.append("")
        out.append("Goals (issue 5, item 5)")
        goal_rows = []
        for text, value, want in goals:
            verdict = "-" if value is None else ("met" if value >= want else "NOT met")
            shown = "-" if value is None else f"{value:.2f}x"
            out.append(f"  {text:<48}{shown:>8} -> {verdict}")
            goal_rows.append({"goal": text, "value": value, "target": want,
                              "met": verdict == "met"})
        notes = []
        if self.a.repeats > 1:
            notes.append("seconds per run: " + "; ".join(
                f"{name} " + ", ".join(f"{r['seconds']:.2f}" for r in step.runs)
                for name, step in self.steps.items() if len(step.runs) > 1))
        notes.append("other = share of the machine's CPUs used by other processes during the "
                     "step (median over runs)")
        if inner and None not in inner:
            notes.append("the write ceilings run as processes, like img, timed from spawn to "
                         "exit; the work inside them took (median) " +
                         " and ".join(f"{value:.2f} s" for value in inner))
        if any(s.disturbed for s in self.steps.values()):
            notes.append(f"! other processes used more than {OTHER_LIMIT:.0%} of the machine's "
                         "CPU during that step: not comparable, run again on a quiet machine")
        if not self.dropped:
            notes.append("the page cache could NOT be dropped (/proc/sys/vm/drop_caches)")
        for failure in self.failures:
            notes.append(f"FAIL: {failure}")
        if notes:
            out.append("")
            out.append("Notes")
            out += [f"  {n}" for n in notes]
        if self.a.profile and profiling.have_pyspy():
            out += ["", f"Profiles (py-spy, {profiling.RATE} Hz, wall time per thread; "
                        f"files in {self.a.profile})"]
            for name in ("make", "make.server", "restore", "restore.server"):
                out += profiling.summary(Path(self.a.profile) / f"{name}.txt")
        print("\n".join(self.preamble(meta) + [""] + out))
        return {**meta, "rows": rows, "ratios": ratios, "goals": goal_rows,
                "failures": self.failures}

    def preamble(self, meta: dict[str, Any]) -> list[str]:
        lay = self.layout
        m = meta["machine"]
        return [
            f"bench/run-imaging-bench {meta['date']}  {m['nproc']} CPUs ({m['cpu_model']}), "
            f"{m['memory']}, {m['kernel']}, Python {m['python']}",
            f"work folder on {meta['work_fs']}; page cache dropped (sync; echo 3 > "
            f"/proc/sys/vm/drop_caches) before every measured step: "
            f"{'yes' if self.dropped else 'NO (not allowed)'}",
            f"disk: {self.size / MiB:.0f} MiB GPT, seed {self.a.seed}: head 1 MiB (boot code, "
            f"GPT, 192 KiB boot loader gap); p1 ext4 {lay.ext4_size / MiB:.0f} MiB, "
            f"{self.ext4_used / MiB:.0f} MiB used ({100 * self.ext4_used / lay.ext4_size:.0f} %, "
            f"{len(self.manifest['files'])} files: text, random, mostly-zero, all-zero/holes); "
            f"p2 raw (unknown type) {lay.raw_size / MiB:.0f} MiB: {lay.raw_random / MiB:.0f} "
            f"random, {lay.raw_text / MiB:.0f} text, rest zeros; "
            f"{(self.size - lay.raw_offset - lay.raw_size) / MiB:.0f} MiB unpartitioned zeros",
            f"MB/s = 10^6 bytes/s of the whole disk ({self.size / 1e6:.0f} MB) or of its used "
            f"bytes ({self.used / 1e6:.0f} MB: head + ext4 used blocks + the raw partition); "
            f"sendfile rows: of the image file",
            f"ours: {meta['ours']}",
            f"pipe: {meta['pipe']}",
            f"level {self.a.level}, {self.a.threads} threads; "
            f"{self.a.repeats} run(s) per operation, median shown; every restore verified",
        ]


def socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    for line in out.splitlines():
        if line.startswith("socat version"):
            return line.split()[2]
    return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run-imaging-bench: needs root (loop devices, mount, drop_caches)",
              file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench/run-imaging-bench: missing tools: {', '.join(missing)} (apt-get install "
              f"partclone zstd socat gdisk e2fsprogs)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "img",
                            "imgsrvd", "common"], capture_output=True, text=True).stdout.strip()
    buffer_text = (f"-z {args.partclone_buffer}" if args.partclone_buffer
                   else "(default 1 MiB buffer)")
    meta = {
        "bench": "imaging", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(), "busy_before": cpu_busy(),
        "command": " ".join(shlex.quote(x) for x in ["bench/run-imaging-bench", *sys.argv[1:]]),
        "work_fs": filesystem_of(args.dir), "size": bench.size,
        "ours": f"img make/restore --server -> imgsrvd (aiohttp) on 127.0.0.1, git {git}"
                f"{' + local changes in img/imgsrvd/common' if dirty else ''}",
        "pipe": f"{tool_version('partclone.ext4', '-v').split('(')[0].strip()} "
                f"{buffer_text} | "
                f"zstd {tool_version('zstd', '--version').split(',')[0].split()[-1]} "
                f"-{args.level} -T{args.threads} | socat "
                f"{socat_version()} over TCP; "
                "through loop devices",
    }
    status = 1
    try:
        status = bench.run()
        result = bench.report(meta)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    except KeyboardInterrupt:
        log("interrupted")
        status = 1
    finally:
        bench.close()
    return status
