"""Support for the multicast tests: a base image made in-process (common.imaging.imagefile's
ImageWriter, an MBR disk with one partition of mixed random and compressible data), its plain
local restore for comparison, and a lab of network namespaces: a switch namespace with a
bridge, a sender namespace and N receiver namespaces, each on its own veth, 10.77.0.0/24.

Multicast never leaves those namespaces (TTL 1, the interface given explicitly); the Lab
(tests/e2e/netlab.py) deletes them and stops every process it started, by PID.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.imaging.imagefile import ImageReader, ImageWriter
from tests.e2e.netlab import Lab, Netns, add_bridge, add_veth, tail, wait_for
from tests.support import REPO

MiB = 1 << 20
NETWORK = "10.77.0"
SENDER_IP = f"{NETWORK}.1"


def make_base_image(path: Path, disk_bytes: int = 48 * MiB, seed: int = 14,
                    chunk_size: int = 1 * MiB, random_share: float = 0.5) -> dict[str, Any]:
    """An MBR base image: the disk head (1 MiB, a marker in its boot gap) and partition 1 to
    the end of the disk, filled with blocks of random bytes (random_share of them) and of
    text; returns its metadata."""
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


@dataclass
class McastLab:
    """The namespaces: `sender` and `receivers[i]` (addresses SENDER_IP and .10 + i), each
    behind a veth on the bridge of `switch`."""

    lab: Lab
    switch: Netns
    sender: Netns
    receivers: list[Netns] = field(default_factory=list)

    def receiver_ip(self, n: int) -> str:
        return f"{NETWORK}.{10 + n}"


def build_lab(lab: Lab, receivers: int) -> McastLab:
    switch = lab.netns("sw")
    add_bridge(switch, "br0")
    # no IGMP snooping: the bridge floods the groups (the lab has no querier)
    switch.ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
    sender = lab.netns("snd")
    add_veth(switch, "v-snd", sender, "eth0", bridge_a="br0", cidr_b=f"{SENDER_IP}/24")
    # The wire carries packets: a UDP_SEGMENT send is cut where it leaves the sender (as a
    # NIC's segmentation offload does), not delivered whole to the receivers' namespaces,
    # where nft's loss would take 46 packets at once.
    sender.ip("link", "set", "dev", "eth0", "gso_max_segs", "1")
    result = McastLab(lab, switch, sender)
    for n in range(receivers):
        ns = lab.netns(f"r{n}")
        add_veth(switch, f"v-r{n}", ns, "eth0", bridge_a="br0",
                 cidr_b=f"{result.receiver_ip(n)}/24")
        result.receivers.append(ns)
    return result


def nft(ns: Netns, rules: str) -> None:
    """Load an nftables ruleset into the namespace (its own tables: nothing on the host)."""
    proc = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=rules,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nft in {ns.name}: {proc.stderr.strip()}")


def drop_input_percent(ns: Netns, percent: int) -> None:
    """Independent loss of the namespace's incoming UDP (nft numgen random)."""
    nft(ns, "table inet mcloss {\n chain input {\n  type filter hook input priority 0;\n"
            f"  meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n}}\n")


def limit_input_rate(ns: Netns, kbytes_s: int) -> None:
    """A slow link: incoming UDP above kbytes_s is dropped (nft limit rate)."""
    nft(ns, "table inet mcslow {\n chain input {\n  type filter hook input priority 0;\n"
            f"  meta l4proto udp limit rate over {kbytes_s} kbytes/second drop\n }}\n}}\n")


def python(*module_args: str) -> list[str]:
    return [sys.executable, "-m", *module_args]


def env() -> dict[str, str]:
    import os
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def start_sender(mlab: McastLab, image: Path, name: str, *extra: str):
    """The engine's command-line entry in the sender namespace; waits for its "ready"."""
    proc = mlab.lab.spawn(f"sender-{name}", mlab.sender,
                          python("imgsrvd.multicast.engine", "--image", str(image),
                                 "--interface", SENDER_IP, "--name", name, "--no-loop",
                                 "--log-level", os.environ.get("MC_LOG", "INFO"), *extra), cwd=REPO, env=env())
    if not wait_for(lambda: not proc.alive() or '"ready"' in proc.log.read_text(), 15):
        raise RuntimeError(f"the sender did not get ready:\n{tail(proc.log)}")
    if not proc.alive():
        raise RuntimeError(f"the sender exited:\n{tail(proc.log)}")
    return proc


def start_receiver(mlab: McastLab, n: int, name: str, disk: Path, *extra: str,
                   tag: str = "", by_name: bool = False):
    """img's receiver in receiver namespace n; by_name: without --server, finding the
    session by its ANNOUNCE."""
    where = ["--interface", mlab.receiver_ip(n)] if by_name else ["--server", SENDER_IP]
    return mlab.lab.spawn(f"receiver{n}{tag}-{name}", mlab.receivers[n],
                          python("img.mcreceive", *where, "--session", name,
                                 "--disk", str(disk), *extra), cwd=REPO, env=env())


def outcome(proc, timeout_s: float = 120.0) -> dict[str, Any]:
    """The receiver's JSON outcome line (its last line of output)."""
    try:
        proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still runs after {timeout_s} s:\n"
                             f"{tail(proc.log)}") from None
    for line in reversed(proc.log.read_text().splitlines()):
        if line.startswith("{") and '"path"' in line:
            return json.loads(line)
    raise AssertionError(f"{proc.name}: no outcome:\n{tail(proc.log)}")


def sender_lines(proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.log.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def sender_final(proc, timeout_s: float = 120.0) -> dict[str, Any]:
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
    raise AssertionError(f"{proc.name}: no final line:\n{tail(proc.log, 60)}")


IMGSRVD_PORT = 998
IMAGE_PATH = "lab/mc.img"


def start_imgsrvd(mlab: McastLab, image: Path) -> str:
    """A real imgsrvd in the sender namespace serving `image` as lab/mc.img (AllowAnonymous):
    the unicast path a dropped receiver continues on. Returns HOST:PORT."""
    import os
    from common.policy.directory import open_directory
    from common.policy.model import ImagingPolicy, MenuDisplay, MenuSettings
    from tests.e2e import netlab

    workdir = mlab.lab.workdir / "imgsrvd"
    root = workdir / "images"
    (root / "lab").mkdir(parents=True)
    os.link(image, root / IMAGE_PATH)
    db = workdir / "directory.db"
    open_directory(f"sqlite://{db}", create=True).close()
    with open_directory(f"sqlite://{db}") as directory:
        directory.replace_policy(ImagingPolicy((), MenuSettings(MenuDisplay.NEVER, 5)))
    settings = {
        "IPAddress": SENDER_IP, "Port": IMGSRVD_PORT, "StatusPort": 0,
        "ImageRoot": root, "Directory": f"sqlite://{db}", "DirectoryTimeout": 2,
        "ResultsLog": workdir / "results.xml", "ServerName": "mcast.test",
        "StatusSocket": workdir / "imgsrvd.sock", "PidFile": workdir / "imgsrvd.pid",
        "LogLevel": "INFO", "LogFile": workdir / "imgsrvd.log",
        "AllowAnonymous": True, "TokenKeyFile": workdir / "imaging.key",
    }
    config = netlab.write_config(workdir / "imgsrvd.conf", settings)
    proc = mlab.lab.spawn("imgsrvd", mlab.sender, [sys.executable, "-m", "imgsrvd", "--config",
                                                   str(config), "--foreground"],
                          cwd=REPO, env=env())

    def ready() -> bool:
        if not proc.alive():
            return True
        try:
            return bool(netlab.status_query(workdir / "imgsrvd.sock", timeout=1.0).get("ok"))
        except (OSError, ValueError):
            return False
    if not wait_for(ready, 20.0, 0.05) or not proc.alive():
        raise RuntimeError(f"imgsrvd did not start:\n{tail(proc.log)}\n"
                           f"{tail(workdir / 'imgsrvd.log')}")
    return f"{SENDER_IP}:{IMGSRVD_PORT}"
