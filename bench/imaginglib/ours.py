"""Ours: a real imgsrvd on 127.0.0.1 and `python3 -m img make/restore --server` against it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import profiling
from .sysutil import REPO, Proc, Usage

sys.path.insert(0, str(REPO))
from tests.support import DaemonProcess, write_config  # noqa: E402

IMAGE_PATH = "bench/base.img"


@dataclass
class Timed:
    seconds: float
    client: Usage
    server: Usage
    output: str = ""


class OurServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.root = workdir / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        values = {
            "IPAddress": "127.0.0.1", "Port": 0, "ImageRoot": str(self.root),
            "Directory": f"sqlite://{workdir / 'directory.db'}", "StatusPort": 0,
            "ResultsLog": str(workdir / "results.xml"), "ServerName": "bench.test",
            "StatusSocket": str(workdir / "s.sock"), "PidFile": str(workdir / "s.pid"),
            "LogLevel": "WARNING", "LogFile": str(workdir / "s.log"),
            "AllowAnonymous": True, "TokenKeyFile": str(workdir / "imaging.key"),
            "AllowOverwrite": True, "TransferTimeout": 600,
        }
        config = write_config(workdir / "imgsrvd.conf", values)
        self.daemon = DaemonProcess("imgsrvd", config, values["StatusSocket"],
                                    Path(values["LogFile"]))
        self.address = ""
        self.process: psutil.Process | None = None

    def start(self) -> "OurServer":
        self.daemon.start(timeout_s=30)
        self.address = f"127.0.0.1:{self.daemon.port}"
        self.process = psutil.Process(self.daemon.pid)
        return self

    def cpu(self) -> Usage:
        assert self.process is not None
        times = self.process.cpu_times()
        return Usage(times.user + times.children_user, times.system + times.children_system)

    def stop(self) -> None:
        self.daemon.stop()

    @property
    def image(self) -> Path:
        return self.root / IMAGE_PATH

    def _img(self, *args: str, profile: str | None = None) -> Timed:
        before = self.cpu()
        prefix = [sys.executable]
        sampler = None
        if profile and profiling.have_pyspy():
            prefix = profiling.client_prefix(Path(profile)) + prefix
            assert self.process is not None
            sampler = profiling.ServerSampler(self.process.pid,
                                              Path(profile).with_suffix(".server.txt"))
            time.sleep(1.0)                              # py-spy attached
            before = self.cpu()
        elif profile:
            prefix += ["-m", "cProfile", "-o", profile]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        started = time.perf_counter()
        log_path = self.workdir / f"img-{args[0]}.log"
        with open(log_path, "w") as log_file:
            proc = Proc.start([*prefix, "-m", "img", *args], "img " + args[0], cwd=str(REPO),
                              env=env, stdout=log_file, stderr=log_file)
            status = proc.wait(timeout=1800)
        seconds = time.perf_counter() - started
        if sampler:
            sampler.stop()
        output = log_path.read_text(errors="replace")
        if status != 0:
            raise RuntimeError(f"img {args[0]} exited with {status}: {output.strip()[-800:]}")
        after = self.cpu()
        lines = [line for line in output.splitlines() if line.startswith(("made", "restored"))]
        return Timed(seconds, proc.usage, Usage(after.user - before.user,
                                                after.sys - before.sys),
                     lines[-1] if lines else "")

    def make(self, disk: Path, level: int, threads: int, profile: str | None = None) -> Timed:
        return self._img("make", "--disk", str(disk), "--server", self.address, IMAGE_PATH,
                         "--level", str(level), "--threads", str(threads), profile=profile)

    def restore(self, disk: Path, threads: int, profile: str | None = None) -> Timed:
        return self._img("restore", "--disk", str(disk), "--server", self.address, IMAGE_PATH,
                         "--threads", str(threads), profile=profile)
