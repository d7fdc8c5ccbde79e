"""The multicast senders and receivers the bench runs: udpcast, UFTP, and ours (a hook).

Each peer makes a `Session` for one run in a `tests.mcastlab.MulticastLab`. The runner drives
every session the same way::

    session.start_receivers()   # every receiver running and ready to be found
    session.start_sender()      # the clock starts just before this call
    while not session.finished(now):
        session.poll(now)       # reap processes, notice receivers that have their copy
    session.stop()              # stop what still runs (daemons, a stalled run)

and then reads, per receiver i: `done[i]` (monotonic time it had its whole copy, by the peer's
own signal: udp-receiver exited, uftpd moved the file into its destination folder),
`output(i)` (the file to verify), `receiver_exit[i]` and `receiver_says_ok(i)` (what the
receiver itself said), and `sender_exit`, `sender_notes()` (what the sender said: its exit
status, a dropped receiver, a status line). The runner, not the peer, verifies every copy
against the source's sha256.

A peer subclasses `Peer` and `Session`: udpcast, UFTP and ours (`OursPeer`: our engine and
img's receiver, restoring the source wrapped as an image onto a disk file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tests.e2e import netlab
from tests.mcastlab import Exit, Host, MulticastLab, reap
from tests.support import REPO

UDPCAST_PORTBASE = 9000
UFTP_PORT = 1044

APT = {"udpcast": ("udpcast", ("udp-sender", "udp-receiver")),
       "uftp": ("uftp", ("uftp", "uftpd"))}


def log(message: str) -> None:
    print(f"bench/run-multicast-bench: {message}", file=sys.stderr, flush=True)


def missing_binaries(peer: str) -> list[str]:
    return [b for b in APT[peer][1] if shutil.which(b) is None]


def install_peers(peers: Sequence[str]) -> dict[str, str]:
    """apt-get install the Debian packages of `peers` that are missing, without letting their
    maintainer scripts start a service (uftp ships a uftpd service that would listen on the
    host's interfaces): /usr/sbin/policy-rc.d answers 101 while apt runs, as
    scripts/install-deps.sh does. Returns {peer: why it is still unavailable}."""
    wanted = [p for p in peers if p in APT and missing_binaries(p)]
    problems: dict[str, str] = {}
    if not wanted:
        return problems
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        for p in wanted:
            problems[p] = (f"{', '.join(missing_binaries(p))} not installed (apt-get install "
                           f"{APT[p][0]}; the bench installs it itself when run as root on a "
                           f"Debian-like system)")
        return problems
    packages = [APT[p][0] for p in wanted]
    log(f"installing {' '.join(packages)} with apt-get (no service is started)")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for package in packages:
            args = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
            result = subprocess.run(args, capture_output=True, text=True, env=env)
            if result.returncode != 0:          # a stale package list: update once, retry
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
                result = subprocess.run(args, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                log(f"apt-get install {package} failed: {' / '.join(tail)}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    for p in wanted:
        if missing_binaries(p):
            problems[p] = f"{', '.join(missing_binaries(p))} still missing after apt-get install"
    return problems


def package_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "?"


class Session:
    """One run of a peer in a lab; see the module docstring for the protocol."""

    def __init__(self, lab: MulticastLab, source: Path, outdirs: list[Path],
                 killed: int | None) -> None:
        self.lab = lab
        self.source = source
        self.outdirs = outdirs
        self.killed = killed                      # index of the receiver the bench kills
        n = len(lab.receivers)
        self.sender: netlab.Proc | None = None
        self.receivers: list[netlab.Proc | None] = [None] * n
        self.sender_exit: Exit | None = None
        self.receiver_exit: list[Exit | None] = [None] * n
        self.done: list[float | None] = [None] * n
        self.commands: dict[str, list[str]] = {}

    # to implement
    def start_receivers(self) -> None:
        raise NotImplementedError

    def start_sender(self) -> None:
        raise NotImplementedError

    def output(self, i: int) -> Path | None:
        raise NotImplementedError

    def receiver_says_ok(self, i: int) -> bool:
        """Whether receiver i itself reported success (exit 0, a 'copied' status line)."""
        raise NotImplementedError

    def sender_notes(self) -> dict[int, str]:
        """What the sender said about individual receivers ({i: 'dropped ...'})."""
        return {}

    def receiver_notes(self, i: int) -> str:
        """What receiver i said about a failure ('' if nothing)."""
        return ""

    # shared
    def _spawn(self, host: Host, name: str, args: list[str]) -> netlab.Proc:
        self.commands[name] = args
        return self.lab.spawn(host, name, args)

    def wait_ready(self, port: int, timeout: float = 10.0) -> None:
        for i, host in enumerate(self.lab.receivers):
            proc = self.receivers[i]
            ok = netlab.wait_for(lambda: (proc is not None and not proc.alive())
                                 or self.lab.udp_bound(host, port), timeout, 0.05)
            if not ok or proc is None or not proc.alive():
                raise RuntimeError(f"receiver {host.name} not ready on UDP {port}:\n"
                                   f"{netlab.tail(proc.log) if proc else ''}")

    def poll(self, now: float) -> None:
        if self.sender is not None and self.sender_exit is None:
            self.sender_exit = reap(self.sender)
        for i, proc in enumerate(self.receivers):
            if proc is not None and self.receiver_exit[i] is None:
                self.receiver_exit[i] = reap(proc)

    def survivors(self) -> list[int]:
        return [i for i in range(len(self.receivers)) if i != self.killed]

    def finished(self, now: float) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop everything still running (SIGTERM, then SIGKILL), collecting exit and CPU."""
        procs = [(None, self.sender)] + list(enumerate(self.receivers))
        for _i, proc in procs:
            if proc is not None and proc.popen.returncode is None:
                self.lab.kill(proc, signal.SIGTERM)
        netlab.wait_for(lambda: all(p is None or reap(p) is not None for _, p in procs),
                        5.0, 0.02)
        for _i, proc in procs:
            if proc is not None and proc.popen.returncode is None:
                self.lab.kill(proc, signal.SIGKILL)
        netlab.wait_for(lambda: all(p is None or reap(p) is not None for _, p in procs),
                        5.0, 0.02)
        if self.sender is not None and self.sender_exit is None:
            self.sender_exit = reap(self.sender)
        for i, proc in enumerate(self.receivers):
            if proc is not None and self.receiver_exit[i] is None:
                self.receiver_exit[i] = reap(proc)


class Peer:
    name = "?"
    description = ""

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (None: it can)."""
        return None

    def version(self) -> str:
        return "?"

    def session(self, lab: MulticastLab, source: Path, outdirs: list[Path],
                killed: int | None) -> Session:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# udpcast


class UdpcastSession(Session):
    """udp-sender --full-duplex --nopointopoint ... --min-receivers N; one udp-receiver per
    receiver writing a file. A receiver has its copy when its udp-receiver exits 0."""

    max_wait = 30          # start anyway 30 s after the first receiver connected

    def start_receivers(self) -> None:
        for i, host in enumerate(self.lab.receivers):
            self.receivers[i] = self._spawn(host, f"udp-receiver-{host.name}", [
                "udp-receiver", "--file", str(self.output(i)), "--interface", host.iface,
                "--nokbd", "--portbase", str(UDPCAST_PORTBASE)])
        self.wait_ready(UDPCAST_PORTBASE)

    def start_sender(self) -> None:
        s = self.lab.sender
        self.sender = self._spawn(s, "udp-sender", [
            "udp-sender", "--file", str(self.source), "--full-duplex", "--nopointopoint",
            "--interface", s.iface, "--ttl", "1", "--portbase", str(UDPCAST_PORTBASE),
            "--min-receivers", str(len(self.lab.receivers)), "--min-wait", "0",
            "--max-wait", str(self.max_wait), "--nokbd"])

    def output(self, i: int) -> Path:
        return self.outdirs[i] / "image.bin"

    def poll(self, now: float) -> None:
        super().poll(now)
        for i, ex in enumerate(self.receiver_exit):
            if ex is not None and self.done[i] is None and ex.code == 0:
                self.done[i] = ex.at

    def finished(self, now: float) -> bool:
        return self.sender_exit is not None and all(
            self.receiver_exit[i] is not None for i in self.survivors())

    def receiver_says_ok(self, i: int) -> bool:
        ex = self.receiver_exit[i]
        return ex is not None and ex.code == 0

    def sender_notes(self) -> dict[int, str]:
        """udp-sender prints "Disconnecting #k (ADDR)" for every receiver at the end; one
        printed before "Transfer complete." is a receiver it dropped mid-transfer."""
        if self.sender is None:
            return {}
        text = netlab.read_text(self.sender.log)
        before, complete, _after = text.partition("Transfer complete.")
        notes: dict[int, str] = {}
        for i, host in enumerate(self.lab.receivers):
            for line in before.splitlines() if complete else []:
                if f"({host.addr})" in line and "Disconnecting" in line:
                    notes[i] = f"'{line.strip()}' before 'Transfer complete.'"
            for line in text.splitlines():
                if host.addr in line and re.search(r"(?i)drop", line):
                    notes[i] = line.strip()
        return notes

    def receiver_notes(self, i: int) -> str:
        proc = self.receivers[i]
        text = netlab.read_text(proc.log) if proc else ""
        said = [ln.strip() for ln in text.splitlines()
                if re.search(r"(?i)dropped|error|timeout|abort", ln)]
        return "; ".join(said[-2:])

    def sender_said_complete(self) -> bool:
        return self.sender is not None and "Transfer complete" in netlab.read_text(
            self.sender.log)


class UdpcastPeer(Peer):
    name = "udpcast"

    def unavailable(self) -> str | None:
        missing = missing_binaries("udpcast")
        return f"{', '.join(missing)} not installed (apt-get install udpcast)" if missing \
            else None

    def version(self) -> str:
        return f"udpcast {package_version('udpcast')}"

    def session(self, lab, source, outdirs, killed):
        return UdpcastSession(lab, source, outdirs, killed)


# --------------------------------------------------------------------------------------------
# UFTP


class UftpSession(Session):
    """uftp -R -1 (as fast as the interface allows: the lab's links are all the sender's speed,
    where UFTP's manual recommends it) to the closed group of the N receivers (-H: it starts
    as soon as all have registered, like udpcast's --min-receivers); one uftpd per receiver,
    in the foreground (-d), receiving into a temp folder (-T) and moving the file into its
    destination folder when the session completes: that is when the receiver has its copy.
    uftpd does not exit; the bench stops it after the sender has exited."""

    rate = "-1"
    grace = 3.0            # after the sender's exit, how long to wait for a file to land

    def start_receivers(self) -> None:
        for i, host in enumerate(self.lab.receivers):
            dest, tmp = self.outdirs[i] / "dest", self.outdirs[i] / "tmp"
            dest.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(parents=True, exist_ok=True)
            self.receivers[i] = self._spawn(host, f"uftpd-{host.name}", [
                "uftpd", "-d", "-q", "-I", host.iface, "-p", str(UFTP_PORT), "-D", str(dest),
                "-T", str(tmp), "-F", str(self.outdirs[i] / "status.txt")])
        self.wait_ready(UFTP_PORT)

    def start_sender(self) -> None:
        s = self.lab.sender
        ids = ",".join(self.uid(h) for h in self.lab.receivers)
        self.status = self.lab.lab.workdir / "uftp-status.txt"
        self.sender = self._spawn(s, "uftp", [
            "uftp", "-I", s.iface, "-R", self.rate, "-t", "1", "-p", str(UFTP_PORT),
            "-H", ids, "-S", str(self.status), str(self.source)])

    def output(self, i: int) -> Path:
        return self.outdirs[i] / "dest" / self.source.name

    def poll(self, now: float) -> None:
        super().poll(now)
        for i in range(len(self.receivers)):
            if self.done[i] is None and self.output(i).exists():
                self.done[i] = now

    def finished(self, now: float) -> bool:
        if self.sender_exit is None:
            return False
        if all(self.done[i] is not None for i in self.survivors()):
            return True
        return now - self.sender_exit.at > self.grace

    def receiver_says_ok(self, i: int) -> bool:
        try:
            text = (self.outdirs[i] / "status.txt").read_text()
        except OSError:
            return False
        return any(line.startswith("RESULT;") and line.rstrip().endswith(";copied")
                   for line in text.splitlines())

    @staticmethod
    def uid(host: Host) -> str:
        return "0x%08x" % int.from_bytes(bytes(int(x) for x in host.addr.split(".")), "big")

    def sender_notes(self) -> dict[int, str]:
        """uftp's end-of-session table: "Host: 0x... Status: Completed" (or Dropped, Aborted,
        ...) per receiver, and the status file's RESULT lines."""
        text = netlab.read_text(self.sender.log) if self.sender else ""
        notes: dict[int, str] = {}
        for i, host in enumerate(self.lab.receivers):
            for line in text.splitlines():
                m = re.match(r"\s*Host:\s*(0x[0-9a-fA-F]+)\s+Status:\s*(\w+)", line)
                if m and m.group(1).lower() == self.uid(host) and m.group(2) != "Completed":
                    notes[i] = f"status {m.group(2)}"
        return notes

    def receiver_notes(self, i: int) -> str:
        proc = self.receivers[i]
        text = netlab.read_text(proc.log) if proc else ""
        said = [ln.strip() for ln in text.splitlines()
                if re.search(r"(?i)abort|drop|error|timed out|lost", ln)]
        left = [p for p in (self.outdirs[i] / "tmp").glob("*") if p.is_file()]
        if left and not self.output(i).exists():
            said.append(f"its temp folder holds {', '.join(p.name for p in left)} "
                        f"({sum(p.stat().st_size for p in left)} bytes), never moved into place")
        return "; ".join(said[-3:])


class UftpPeer(Peer):
    name = "uftp"

    def unavailable(self) -> str | None:
        missing = missing_binaries("uftp")
        return f"{', '.join(missing)} not installed (apt-get install uftp)" if missing else None

    def version(self) -> str:
        return f"uftp {package_version('uftp')} (-R -1)"

    def session(self, lab, source, outdirs, killed):
        return UftpSession(lab, source, outdirs, killed)


# --------------------------------------------------------------------------------------------
# ours


class OursSession(Session):
    """Our engine (imgsrvd/multicast/engine.py's command-line entry) sending the source wrapped
    as an image (`img make --disk SOURCE`: a raw disk, stored chunks), one img.mcreceive per
    receiver restoring it onto a disk file of the source's size through the normal restore
    path (every chunk's BLAKE2b checked, the disk synced). A receiver has its copy when its
    receiver exits 0 with an outcome that says so; the runner then compares the disk file with
    the source, as it does udpcast's and UFTP's files."""

    name = "bench"

    def __init__(self, lab, source, outdirs, killed, image: Path):
        super().__init__(lab, source, outdirs, killed)
        self.image = image

    def _env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(REPO))

    def start_receivers(self) -> None:
        size = self.source.stat().st_size
        for i, host in enumerate(self.lab.receivers):
            with open(self.output(i), "wb") as disk:
                disk.truncate(size)
            self.receivers[i] = self._spawn(host, f"ours-receiver-{host.name}", [
                sys.executable, "-m", "img.mcreceive", "--server", self.lab.sender.addr,
                "--session", self.name, "--disk", str(self.output(i))])

    def _spawn(self, host: Host, name: str, args: list[str]) -> netlab.Proc:
        self.commands[name] = args
        return self.lab.spawn(host, name, args, cwd=REPO, env=self._env())

    def start_sender(self) -> None:
        s = self.lab.sender
        self.sender = self._spawn(s, "ours-sender", [
            sys.executable, "-m", "imgsrvd.multicast.engine", "--image", str(self.image),
            "--interface", s.addr, "--name", self.name, "--no-loop", "--ttl", "1",
            "--clients", str(len(self.lab.receivers)), "--start-after", "30"])

    def output(self, i: int) -> Path:
        return self.outdirs[i] / "image.bin"

    def _outcome(self, i: int) -> dict:
        proc = self.receivers[i]
        if proc is None:
            return {}
        for line in reversed(netlab.read_text(proc.log).splitlines()):
            if line.startswith("{") and '"path"' in line:
                try:
                    return json.loads(line)
                except ValueError:
                    return {}
        return {}

    def poll(self, now: float) -> None:
        super().poll(now)
        for i, ex in enumerate(self.receiver_exit):
            if ex is not None and self.done[i] is None and ex.code == 0 \
                    and self._outcome(i).get("ok") is True:
                self.done[i] = ex.at

    def finished(self, now: float) -> bool:
        return self.sender_exit is not None and all(
            self.receiver_exit[i] is not None for i in self.survivors())

    def receiver_says_ok(self, i: int) -> bool:
        ex = self.receiver_exit[i]
        return ex is not None and ex.code == 0 and self._outcome(i).get("ok") is True

    def receiver_notes(self, i: int) -> str:
        found = self._outcome(i)
        return "" if found.get("ok") else str(found.get("reason") or found.get("error") or "")

    def sender_notes(self) -> dict[int, str]:
        """The engine's receiver events (lost, dropped to unicast, failed), by address."""
        if self.sender is None:
            return {}
        notes: dict[int, str] = {}
        for line in netlab.read_text(self.sender.log).splitlines():
            if not line.startswith("{") or "receiver-" not in line:
                continue
            for i, host in enumerate(self.lab.receivers):
                if host.addr in line and not any(k in line for k in ("joined", "done")):
                    notes[i] = line.strip()[:200]
        return notes


class OursPeer(Peer):
    """Our multicast sender and receiver (issue 14)."""

    name = "ours"

    def __init__(self) -> None:
        self._images: dict[Path, Path] = {}

    def version(self) -> str:
        from common import __version__
        return f"ours {__version__} (imgsrvd.multicast.engine, img.mcreceive)"

    def _image_of(self, source: Path) -> Path:
        """The source as an image (a raw disk of stored chunks), made once per source."""
        image = source.with_suffix(".zmg")
        if source not in self._images:
            done = subprocess.run([sys.executable, "-m", "img", "make", "--disk", str(source),
                                   str(image), "--overwrite"] if image.exists() else
                                  [sys.executable, "-m", "img", "make", "--disk", str(source),
                                   str(image)],
                                  cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"img make of {source} failed: {done.stderr[-500:]}")
            self._images[source] = image
        return self._images[source]

    def session(self, lab, source, outdirs, killed):
        return OursSession(lab, source, outdirs, killed, self._image_of(source))


PEERS: dict[str, type[Peer]] = {"udpcast": UdpcastPeer, "uftp": UftpPeer, "ours": OursPeer}
