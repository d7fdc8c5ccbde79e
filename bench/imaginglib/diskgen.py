"""The bench's source disk: a GPT disk image file with an ext4 partition full of files
(compressible text, random data, mostly-zero "sparse-ish" files and all-zero files that
mkfs turns into holes) to ~55-60 % used, a raw partition of an unknown type (random data,
then text, then zeros), and unpartitioned zeros at the end. Everything comes from --seed.

`Layout` holds where things are; `build()` makes the disk and returns the manifest (sha256 of
every file, of the raw partition and of the disk head) that `verify()` checks a restored
disk against: e2fsck, every file's hash (the filesystem mounted read-only), the raw partition,
the disk head and the partition table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .sysutil import MiB, loop_device, run

SECTOR = 512
RAW_TYPE = "B0B0B0B0-1234-4321-8765-0123456789AB"      # no such type: a raw partition
DISK_GUID = "2F5A1C3E-7B64-4D0E-9A51-6C0D2B7E4F10"
EXT4_GUID = "6E2B9F41-3C8A-4E57-B1D2-0A9C8E7F6D53"
RAW_GUID = "91C7D3A2-5E64-4B8F-A0E1-3D2C4B5A6978"
FS_UUID = "4b1d0c2e-8f7a-4e69-b35d-2a1c0e9f8d76"


@dataclass(frozen=True)
class Layout:
    size: int               # the disk, bytes
    head: int               # bytes before the first partition
    ext4_offset: int
    ext4_size: int
    raw_offset: int
    raw_size: int
    raw_random: int         # the raw partition: random bytes first,
    raw_text: int           # then text, then zeros to its end

    @classmethod
    def for_size(cls, size: int) -> "Layout":
        if size < 256 * MiB or size % MiB:
            raise ValueError("--size: at least 256 MiB, a whole number of MiB")
        mib = size // MiB
        ext4 = (mib * 3 // 4) * MiB                    # 1536 MiB of 2 GiB
        raw = (mib * 3 // 16) * MiB                    # 384 MiB
        return cls(size, MiB, MiB, ext4, MiB + ext4, raw,
                   (raw * 2 // 5) // MiB * MiB, (raw * 3 // 20) // MiB * MiB)


# ------------------------------------------------------------------ content

def _vocabulary(rng: random.Random, count: int = 6000) -> tuple[list[bytes], list[float]]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [1 / (i + 1) ** 0.6 for i in range(len(letters))]
    words = {"".join(rng.choices(letters, weights, k=rng.randint(2, 11))).encode()
             for _ in range(count * 2)}
    words_list = sorted(words)[:count]
    rng.shuffle(words_list)
    zipf = list(itertools.accumulate(1 / (i + 1) for i in range(len(words_list))))
    return words_list, zipf


class Text:
    """Pseudo-English: Zipf-distributed words in lines ending in a number (zstd -1: ~2.8x).
    A 32 MiB pool is made once; each piece of text is random 4-64 KiB slices of it (repeats
    lie megabytes apart, beyond the reach of zstd's low levels)."""

    POOL = 32 * MiB

    def __init__(self, rng: random.Random):
        self.rng = rng
        words, cum = _vocabulary(rng)
        out = bytearray()
        while len(out) < self.POOL:
            chosen = rng.choices(words, cum_weights=cum, k=12000)
            for i in range(11, len(chosen), 12):
                chosen[i] = b"%d\n" % rng.randrange(100000)
            out += b" ".join(chosen)
        self.pool = bytes(out[:self.POOL])

    def make(self, size: int) -> bytes:
        rng = self.rng
        parts = []
        left = size
        while left > 0:
            length = min(left, rng.randint(4096, 65536))
            start = rng.randrange(self.POOL - length)
            parts.append(self.pool[start:start + length])
            left -= length
        return b"".join(parts)


def _sparse_ish(size: int, rng: random.Random) -> bytes:
    """Mostly zeros: 8 bytes of data at the start of every 4 KiB block."""
    data = bytearray(size)
    stamp = rng.randrange(1 << 32)
    for offset in range(0, size, 4096):
        data[offset:offset + 8] = ((stamp << 32) | offset // 4096).to_bytes(8, "little")
    return bytes(data)


def _file_plan(rng: random.Random, target: int) -> list[tuple[str, str, int]]:
    """(path, kind, size): 40 % text, 40 % random, 20 % sparse-ish of `target` bytes, in many
    small files, some medium and a few large ones; plus all-zero files (holes, not counted)."""
    plan: list[tuple[str, str, int]] = []
    budget = {"text": target * 40 // 100, "random": target * 40 // 100,
              "sparse": target * 20 // 100}
    n = 0
    for kind, total in budget.items():
        used = 0
        while used < total:
            roll = rng.random()
            if roll < 0.93:
                size = rng.randint(1, 64) * 1024 + rng.randrange(1024)
            elif roll < 0.995:
                size = rng.randint(256 * 1024, 8 * MiB)
            else:
                size = rng.randint(16 * MiB, 48 * MiB)
            size = min(size, total - used)
            if size <= 0:
                break
            folder = f"d{rng.randrange(40):02d}/s{rng.randrange(8)}"
            plan.append((f"{folder}/{kind}-{n:05d}.{'txt' if kind == 'text' else 'bin'}",
                         kind, size))
            used += size
            n += 1
    for i in range(4):
        plan.append((f"zeros/zero-{i}.img", "zero", rng.randint(4 * MiB, 24 * MiB)))
    rng.shuffle(plan)
    return plan


# ------------------------------------------------------------------ build

def build(disk: Path, layout: Layout, seed: int, staging_parent: str | None = None) -> dict:
    """Make the source disk; returns the manifest."""
    rng = random.Random(seed)
    text = Text(random.Random(seed + 1))
    with open(disk, "wb") as handle:       # written out: reading it costs what a disk's read does
        zeros = bytes(16 * MiB)
        for _ in range(layout.size // len(zeros)):
            handle.write(zeros)
        handle.truncate(layout.size)
    last = (layout.raw_offset + layout.raw_size) // SECTOR - 1
    run("sgdisk", "--clear", "-U", DISK_GUID,
        f"-n1:{layout.ext4_offset // SECTOR}:{layout.raw_offset // SECTOR - 1}",
        "-t1:8300", "-c1:bench-ext4", f"-u1:{EXT4_GUID}",
        f"-n2:{layout.raw_offset // SECTOR}:{last}",
        f"-t2:{RAW_TYPE}", "-c2:bench-raw", f"-u2:{RAW_GUID}", str(disk))
    # boot code in the MBR and a "boot loader" in the gap after the GPT entries
    boot = random.Random(seed + 2)
    with open(disk, "r+b") as handle:
        handle.seek(0)
        handle.write(boot.randbytes(440))
        handle.seek(64 * 1024)
        handle.write(boot.randbytes(192 * 1024))

    files: dict[str, str] = {}
    staging = Path(tempfile.mkdtemp(prefix="pbimg-bench-src-", dir=staging_parent))
    try:
        target = layout.ext4_size * 52 // 100
        for path, kind, size in _file_plan(rng, target):
            if kind == "text":
                data = text.make(size)
            elif kind == "random":
                data = rng.randbytes(size)
            elif kind == "sparse":
                data = _sparse_ish(size, rng)
            else:
                data = bytes(size)
            out = staging / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            files[path] = hashlib.sha256(data).hexdigest()
        env = dict(os.environ, E2FSPROGS_FAKE_TIME="1764000000")
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", FS_UUID, "-L", "bench",
             "-E", f"offset={layout.ext4_offset},hash_seed={FS_UUID},root_owner=0:0,"
                   "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
             "-d", str(staging), str(disk), f"{layout.ext4_size // 1024}k"],
            check=True, capture_output=True, env=env, timeout=900)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    raw_rng = random.Random(seed + 3)
    with open(disk, "r+b") as handle:
        position = layout.raw_offset
        left = layout.raw_random
        while left:
            piece = raw_rng.randbytes(min(left, 16 * MiB))
            handle.seek(position)
            handle.write(piece)
            position += len(piece)
            left -= len(piece)
        handle.write(text.make(layout.raw_text))
    os.sync()
    return {"seed": seed, "layout": asdict(layout), "files": files,
            "raw_sha256": _range_hash(disk, layout.raw_offset, layout.raw_size),
            "head_sha256": _range_hash(disk, 0, layout.head),
            "table": _table(disk)}


# ------------------------------------------------------------------ checks

def _range_hash(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while length:
            piece = handle.read(min(length, 8 * MiB))
            if not piece:
                raise OSError(f"{path}: short read")
            digest.update(piece)
            length -= len(piece)
    return digest.hexdigest()


def _table(disk: Path) -> list:
    table = json.loads(run("sfdisk", "--json", str(disk)))["partitiontable"]
    return [[p["start"], p["size"], p["type"], p.get("uuid"), p.get("name")]
            for p in table["partitions"]]


def ext4_used_bytes(disk: Path, layout: Layout) -> int:
    """Used bytes of the ext4 partition as dumpe2fs counts them (blocks - free blocks)."""
    with loop_device(disk, layout.ext4_offset, layout.ext4_size, readonly=True) as dev:
        out = run("dumpe2fs", "-h", dev)
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    blocks = int(fields["Block count"])
    free = int(fields["Free blocks"])
    size = int(fields["Block size"])
    return (blocks - free) * size


def verify(disk: Path, manifest: dict, mount_parent: str | None = None) -> list[str]:
    """Problems found on a restored disk (empty: it is the source disk again)."""
    layout = Layout(**manifest["layout"])
    problems: list[str] = []
    try:
        table = _table(disk)
        if table != manifest["table"]:
            problems.append(f"partition table differs: {table} != {manifest['table']}")
    except RuntimeError as exc:
        problems.append(f"no partition table: {exc}")
    if _range_hash(disk, layout.raw_offset, layout.raw_size) != manifest["raw_sha256"]:
        problems.append("raw partition differs")
    if _range_hash(disk, 0, layout.head) != manifest["head_sha256"]:
        problems.append("disk head (first MiB: boot code, GPT, boot loader gap) differs")
    with loop_device(disk, layout.ext4_offset, layout.ext4_size, readonly=True) as dev:
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        if fsck.returncode != 0:
            problems.append(f"e2fsck -fn: exit {fsck.returncode}: {fsck.stdout[-300:]}")
        where = Path(tempfile.mkdtemp(prefix="pbimg-bench-mnt-", dir=mount_parent))
        try:
            mounted = subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", dev, str(where)],
                                     capture_output=True, text=True)
            if mounted.returncode != 0:
                problems.append(f"mount failed: {mounted.stderr.strip()}")
            else:
                try:
                    problems += _check_files(where, manifest["files"])
                finally:
                    run("umount", str(where))
        finally:
            where.rmdir()
    return problems


def _check_files(root: Path, files: dict[str, str]) -> list[str]:
    problems = []
    seen = 0
    for path, expected in files.items():
        try:
            digest = hashlib.sha256()
            with open(root / path, "rb") as handle:
                while piece := handle.read(8 * MiB):
                    digest.update(piece)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        seen += 1
        if digest.hexdigest() != expected:
            problems.append(f"{path}: content differs")
        if len(problems) > 10:
            problems.append("... (stopped counting)")
            break
    return problems
