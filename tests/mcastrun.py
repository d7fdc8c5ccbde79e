"""Running our multicast sender and receiver in the multicast lab (tests/mcastlab.py), for the
tests of issue 14 and for the bench: a base image made in-process (ImageWriter: an MBR disk
with one partition of mixed random and compressible data), its plain local restore for
comparison, the engine's and the receiver's command-line entries started in the lab's
namespaces, their JSON lines read back, and a real imgsrvd in the sender's namespace for the
unicast fallback.

    with MulticastLab(workdir, receivers=3) as lab:
        sender = start_sender(lab, image, "room-101", "--clients", "3")
        procs = [start_receiver(lab, n, "room-101", disk_n) for n in range(3)]
        results = [outcome(p) for p in procs]          # img.mcreceive's outcome lines
        final = sender_final(sender)                  # the engine's final numbers
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.imaging.imagefile import ImageReader, ImageWriter
from tests.e2e import netlab
from tests.mcastlab import MulticastLab
from tests.support import REPO

MiB = 1 << 20
IMGSRVD_PORT = 998
IMAGE_PATH = "lab/mc.img"


def make_base_image(path: Path, disk_bytes: int = 48 * MiB, seed: int = 14,
                    chunk_size: int = 1 * MiB, random_share: float = 0.5) -> dict[str, Any]:
    """An MBR base image: the disk head (1 MiB, a marker in its boot gap) and partition 1 to
    the end of the disk, filled with chunks of random bytes (random_share of them), of zeros
    now and then, and of text; returns its metadata."""
    from img.disklayout import DiskLayout, Partition

    sectors = disk_bytes // 512
    layout = DiskLayout("mbr", 512, disk_bytes, "0x0e14d15c",
                        (Partition(1, 2048, sectors - 2048, "0x83"),))
    part_bytes = (sectors - 2048) * 512
    meta = {"format": 1, "type": "base", "tool": "tests", "created": "2026-12-01T00:00:00Z",
            "compression": {"algorithm": "zstd", "level": 1},
            "disk": {"size": disk_bytes, "sector_size": 512, "layout": layout.to_dict()},
            "streams": [
                {"number": 0, "role": "disk-head", "size": MiB, "fill": "zero",
                 "disk_offset": 0},
                {"number": 1, "role": "partition", "partition": 1, "filesystem": "raw",
                 "size": part_bytes, "used_bytes": part_bytes, "fill": "zero",
                 "disk_offset": MiB}]}
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]
    with open(path, "wb") as out:
        writer = ImageWriter(out, meta, chunk_size=chunk_size, threads=2)
        head = bytearray(MiB)
        head[64 * 1024:64 * 1024 + 21] = b"BOOTLOADER-GAP-MARKER"
        for start in range(0, MiB, chunk_size):
            writer.add(0, start, bytes(head[start:start + chunk_size]))
        offset = 0
        while offset < part_bytes:
            size = min(chunk_size, part_bytes - offset)
            if rng.random() < random_share:
                data = rng.randbytes(size)
            elif rng.random() < 0.1:
                data = bytes(size)                        # a zero chunk now and then
            else:
                text = b" ".join(rng.choice(words) for _ in range(size // 4))
                data = (text * 2)[:size]
            writer.add(1, offset, data)
            offset += size
        writer.close({"test": True})
    return meta


def blank_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def local_restore(image: Path, disk: Path, size: int) -> Path:
    """The reference: the same image restored from the file, no network."""
    from img.restore import restore_image

    blank_disk(disk, size)
    with open(image, "rb") as f:
        restore_image(ImageReader(f, str(image)), str(disk))
    return disk


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def start_sender(lab: MulticastLab, image: Path, name: str, *extra: str) -> netlab.Proc:
    """The engine's command-line entry on the lab's sender; waits for its "ready" line."""
    proc = lab.spawn(lab.sender, f"sender-{name}",
                     [sys.executable, "-m", "imgsrvd.multicast.engine", "--image", str(image),
                      "--interface", lab.sender.addr, "--name", name, "--no-loop",
                      "--log-level", os.environ.get("MC_LOG", "INFO"), *extra],
                     cwd=REPO, env=env())
    if not netlab.wait_for(lambda: not proc.alive() or '"ready"' in proc.log.read_text(), 15):
        raise RuntimeError(f"the sender did not get ready:\n{netlab.tail(proc.log)}")
    if not proc.alive():
        raise RuntimeError(f"the sender exited:\n{netlab.tail(proc.log)}")
    return proc


def start_receiver(lab: MulticastLab, n: int, name: str, disk: Path | None, *extra: str,
                   by_name: bool = False, run: str = "") -> netlab.Proc:
    """img's receiver on lab.receivers[n] restoring `disk` (None: extra says --output);
    by_name: without --server, finding the session by its ANNOUNCE; run: tells a second run
    on the same receiver apart (its process name and log)."""
    host = lab.receivers[n]
    where = ["--interface", host.addr] if by_name else ["--server", lab.sender.addr]
    target = ["--disk", str(disk)] if disk is not None else []
    return lab.spawn(host, f"receiver{n}-{name}{run}",
                     [sys.executable, "-m", "img.mcreceive", *where, "--session", name,
                      *target, *extra], cwd=REPO, env=env())


def outcome(proc: netlab.Proc, timeout_s: float = 120.0) -> dict[str, Any]:
    """The receiver's JSON outcome line (its last)."""
    try:
        proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still runs after {timeout_s} s:\n"
                             f"{netlab.tail(proc.log)}") from None
    for line in reversed(proc.log.read_text().splitlines()):
        if line.startswith("{") and '"path"' in line:
            return json.loads(line)
    raise AssertionError(f"{proc.name}: no outcome:\n{netlab.tail(proc.log)}")


def sender_lines(proc: netlab.Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.log.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def events(proc: netlab.Proc, kind: str) -> list[dict[str, Any]]:
    return [line for line in sender_lines(proc) if line.get("event") == kind]


def sender_final(proc: netlab.Proc, timeout_s: float = 120.0) -> dict[str, Any]:
    """The engine's final line (its numbers once the session ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in sender_lines(proc):
            if "final" in line:
                return line
        if not proc.alive():
            break
        time.sleep(0.1)
    for line in sender_lines(proc):
        if "final" in line:
            return line
    raise AssertionError(f"{proc.name}: no final line:\n{netlab.tail(proc.log, 60)}")


def start_imgsrvd(lab: MulticastLab, image: Path) -> str:
    """A real imgsrvd on the sender's host serving `image` as IMAGE_PATH (AllowAnonymous;
    multicast off): the unicast path a receiver continues on. Returns HOST:PORT."""
    from common.policy.directory import open_directory
    from common.policy.model import ImagingPolicy, MenuDisplay, MenuSettings

    workdir = lab.workdir / "imgsrvd"
    root = workdir / "images"
    (root / "lab").mkdir(parents=True)
    os.link(image, root / IMAGE_PATH)
    db = workdir / "directory.db"
    open_directory(f"sqlite://{db}", create=True).close()
    with open_directory(f"sqlite://{db}") as directory:
        directory.replace_policy(ImagingPolicy((), MenuSettings(MenuDisplay.NEVER, 5)))
    settings = {
        "IPAddress": lab.sender.addr, "Port": IMGSRVD_PORT, "StatusPort": 0,
        "ImageRoot": root, "Directory": f"sqlite://{db}", "DirectoryTimeout": 2,
        "ResultsLog": workdir / "results.xml", "ServerName": "mcast.test",
        "StatusSocket": workdir / "imgsrvd.sock", "PidFile": workdir / "imgsrvd.pid",
        "LogLevel": "INFO", "LogFile": workdir / "imgsrvd.log",
        "AllowAnonymous": True, "TokenKeyFile": workdir / "imaging.key",
        "MaxSessions": 0,                # no multicast here: the engine under test has 997
    }
    config = netlab.write_config(workdir / "imgsrvd.conf", settings)
    proc = lab.spawn(lab.sender, "imgsrvd", [sys.executable, "-m", "imgsrvd", "--config",
                                             str(config), "--foreground"], cwd=REPO, env=env())

    def ready() -> bool:
        if not proc.alive():
            return True
        try:
            return bool(netlab.status_query(workdir / "imgsrvd.sock", timeout=1.0).get("ok"))
        except (OSError, ValueError):
            return False
    if not netlab.wait_for(ready, 20.0, 0.05) or not proc.alive():
        raise RuntimeError(f"imgsrvd did not start:\n{netlab.tail(proc.log)}\n"
                           f"{netlab.tail(workdir / 'imgsrvd.log')}")
    return f"{lab.sender.addr}:{IMGSRVD_PORT}"
