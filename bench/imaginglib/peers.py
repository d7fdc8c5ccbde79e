"""The peers' way (Clonezilla, FOG): per partition `partclone.X -c | zstd | plain TCP` to a
receiver that writes a file, and back: TCP | zstd -d | partclone.X -r onto the partition.

The TCP ends are socat 1.7 (`socat -u - TCP:...` sends a pipe; `socat -u TCP-LISTEN:...
OPEN:file` stores; `socat -u OPEN:file TCP-LISTEN:...` serves). The disk head (boot code, GPT,
boot loader gap: the first MiB) goes the same way with dd; `sgdisk --backup` of the partition
table is written straight into the store (17 KiB) and loaded with `sgdisk --load-backup`.
Partitions are read and written through loop devices over the disk file (partclone needs a
block device), one after the other, as Clonezilla does.
"""

from __future__ import annotations

import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .diskgen import Layout
from .sysutil import MiB, Proc, Usage, fsync_path, loop_device, run, shell

CLONEZILLA_BUFFER = 10 * MiB       # Clonezilla passes -z 10485760; partclone's default is 1 MiB


@dataclass
class PipeResult:
    seconds: float
    client: Usage
    server: Usage
    stored: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pipe:
    def __init__(self, workdir: Path, layout: Layout, level: int, threads: int,
                 buffer: int = 0):
        self.store = workdir / "pipe-store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.logs = workdir
        self.layout = layout
        self.level = level
        self.threads = threads
        self.z = f"-z {buffer} " if buffer else ""        # 0: partclone's default (1 MiB)
        self.client = Usage()
        self.server = Usage()

    def _add(self, into: Usage, proc: Proc) -> None:
        into.user += proc.usage.user
        into.sys += proc.usage.sys

    def _transfer(self, server_args: list[str], client_command: str, port: int) -> None:
        server = Proc.start(server_args, "socat (server)")
        try:
            client = shell(client_command, client_command.split()[0])
            try:
                client.check(1800)
            finally:
                client.stop()
            self._add(self.client, client)
            server.check(60)
            self._add(self.server, server)
        finally:
            server.stop()

    def _receive(self, name: str, source_command: str) -> None:
        port = free_port()
        self._transfer(
            ["socat", "-u", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
             f"OPEN:{self.store / name},creat,trunc"],
            f"{source_command} | zstd -{self.level} -T{self.threads} -q -c | "
            f"socat -u - TCP:127.0.0.1:{port},retry=200,interval=0.05", port)

    def _send(self, name: str, sink_command: str) -> None:
        port = free_port()
        self._transfer(
            ["socat", "-u", f"OPEN:{self.store / name},rdonly",
             f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"],
            f"socat -u TCP:127.0.0.1:{port},retry=200,interval=0.05 - | zstd -d -q -c | "
            f"{sink_command}", port)

    def make(self, disk: Path) -> PipeResult:
        self.client, self.server = Usage(), Usage()
        layout = self.layout
        q = shlex.quote
        started = time.perf_counter()
        run("sgdisk", f"--backup={self.store / 'gpt.sgdisk'}", str(disk))
        self._receive("head.zst", f"dd if={q(str(disk))} bs=1M count={layout.head // MiB} "
                                  "status=none")
        with loop_device(disk, layout.ext4_offset, layout.ext4_size, readonly=True) as dev:
            self._receive("part1.ext4.zst",
                          f"partclone.ext4 -c -q {self.z}"
                          f"-L {q(str(self.logs / 'partclone-p1.log'))} -s {dev} -o -")
        with loop_device(disk, layout.raw_offset, layout.raw_size, readonly=True) as dev:
            self._receive("part2.dd.zst",
                          f"partclone.dd -q {self.z}"
                          f"-L {q(str(self.logs / 'partclone-p2.log'))} -s {dev} -o -")
        for path in self.store.iterdir():
            fsync_path(path)
        fsync_path(self.store)
        seconds = time.perf_counter() - started
        stored = sum(p.stat().st_size for p in self.store.iterdir())
        return PipeResult(seconds, self.client, self.server, stored)

    def restore(self, disk: Path) -> PipeResult:
        self.client, self.server = Usage(), Usage()
        layout = self.layout
        q = shlex.quote
        started = time.perf_counter()
        self._send("head.zst", f"dd of={q(str(disk))} bs=1M conv=notrunc status=none")
        run("sgdisk", f"--load-backup={self.store / 'gpt.sgdisk'}", str(disk))
        with loop_device(disk, layout.ext4_offset, layout.ext4_size, readonly=False) as dev:
            self._send("part1.ext4.zst",
                       f"partclone.ext4 -r -q {self.z}"
                       f"-L {q(str(self.logs / 'partclone-r1.log'))} -s - -o {dev}")
        with loop_device(disk, layout.raw_offset, layout.raw_size, readonly=False) as dev:
            self._send("part2.dd.zst",
                       f"partclone.dd -q {self.z}"
                       f"-L {q(str(self.logs / 'partclone-r2.log'))} -s - -o {dev}")
        fsync_path(disk)
        seconds = time.perf_counter() - started
        return PipeResult(seconds, self.client, self.server)
