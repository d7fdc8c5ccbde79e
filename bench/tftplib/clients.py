"""Run the TFTP clients (curl, atftp) and verify what they downloaded, byte for byte."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Spec:
    client: str          # "curl" or "atftp"
    blksize: int
    windowsize: int = 1  # 1: lock-step, no windowsize option sent


def argv(spec: Spec, host: str, port: int, filename: str, out: Path) -> list[str]:
    if spec.client == "curl":
        if spec.windowsize != 1:
            raise ValueError("curl does not offer windowsize")
        return ["curl", "-sS", "--tftp-blksize", str(spec.blksize), "-o", str(out),
                f"tftp://{host}:{port}/{filename}"]
    if spec.client == "atftp":
        cmd = ["atftp", "--option", f"blksize {spec.blksize}"]
        if spec.windowsize != 1:
            cmd += ["--option", f"windowsize {spec.windowsize}"]
        return cmd + ["-g", "-r", filename, "-l", str(out), host, str(port)]
    raise ValueError(f"unknown client {spec.client!r}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(out: Path, size: int, digest: str) -> str | None:
    """None when `out` is exactly the served file, else the reason it is not."""
    try:
        got = out.stat().st_size
    except FileNotFoundError:
        return "no output file"
    if got != size:
        return f"wrong size: {got} of {size} bytes"
    if sha256_file(out) != digest:
        return "sha256 mismatch (same size, different bytes)"
    return None


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[float, int]:
    """Block until every process has exited; SIGKILL those still running after `timeout`.

    Returns (perf_counter when the last one exited, how many were killed). Blocking waits, not
    Popen.wait(timeout=...), which polls with sleeps of up to 50 ms and so would round every
    elapsed time up to the next poll.
    """
    killed = []

    def expire():
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                except ProcessLookupError:
                    pass
    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        for p in procs:
            p.wait()
        return time.perf_counter(), len(killed)
    finally:
        timer.cancel()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _why(proc: subprocess.Popen, errfile: Path) -> str:
    try:
        text = errfile.read_text(errors="replace")
    except OSError:
        text = ""
    # atftp echoes its options on stderr; keep the lines that are not that echo
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith("Option ")]
    errs = [ln for ln in lines if "error" in ln.lower()]
    msg = (errs[-1] if errs else lines[-1]) if lines else "(no message)"
    return f"{os.path.basename(proc.args[0])} exit {proc.returncode}: {msg[:160]}"


@dataclass
class Outcome:
    ok: bool
    seconds: float
    nbytes: int          # verified bytes delivered
    error: str | None = None


def run_one(spec: Spec, host: str, port: int, filename: str, outdir: Path, tag: str,
            size: int, digest: str, timeout: float) -> Outcome:
    out = outdir / f"{tag}.out"
    err = outdir / f"{tag}.err"
    out.unlink(missing_ok=True)
    with open(err, "wb") as ef:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv(spec, host, port, filename, out), stdin=subprocess.DEVNULL,
                                stdout=ef, stderr=ef)
        try:
            t1, killed = _wait_all([proc], timeout)
        except BaseException:
            _kill(proc)
            raise
        if killed:
            got = out.stat().st_size if out.exists() else 0
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
            return Outcome(False, timeout, 0,
                           f"timeout after {timeout:g} s ({got} of {size} bytes received)")
        elapsed = t1 - t0
    try:
        if proc.returncode != 0:
            return Outcome(False, elapsed, 0, _why(proc, err))
        bad = verify(out, size, digest)
        if bad:
            return Outcome(False, elapsed, 0, bad)
        return Outcome(True, elapsed, size)
    finally:
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


def run_many(spec: Spec, host: str, port: int, filename: str, outdir: Path, n: int,
             size: int, digest: str, timeout: float) -> Outcome:
    """n clients started together; seconds = first start to last exit."""
    procs = []
    files = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            out, err = outdir / f"c{i}.out", outdir / f"c{i}.err"
            out.unlink(missing_ok=True)
            ef = open(err, "wb")
            try:
                procs.append(subprocess.Popen(argv(spec, host, port, filename, out),
                                              stdin=subprocess.DEVNULL,
                                              stdout=ef, stderr=ef))
            finally:
                ef.close()
            files.append((out, err))
        t1, timed_out = _wait_all(procs, max(timeout - (time.perf_counter() - t0), 0.01))
        elapsed = t1 - t0
        reasons: dict[str, int] = {}
        good = 0
        for p, (out, err) in zip(procs, files):
            if p.returncode == -signal.SIGKILL and timed_out:
                why = f"timeout after {timeout:g} s"
            elif p.returncode != 0:
                why = _why(p, err)
            else:
                why = verify(out, size, digest)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
            else:
                good += 1
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        if good == n:
            return Outcome(True, elapsed, n * size)
        detail = "; ".join(f"{c}x {w}" for w, c in sorted(reasons.items(), key=lambda x: -x[1]))
        return Outcome(False, elapsed, good * size, f"{n - good} of {n} clients failed: {detail}")
    finally:
        for p in procs:
            _kill(p)
        for out, err in files:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
