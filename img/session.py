"""Multicast on the workstation: joining a session (the receiver is the data plane's,
img/mcreceive.py, imported only when a session is joined), the result report, and
`img session NAME [master|client] [clients=N [t=M]]` (docs/multicast.md).

img session keeps the original's semantics, with one change of design: a workstation master's
image goes through the imaging server, which sends it (one sender, repairs read from its disk,
the same engine as the directory's sessions), instead of the master's own NIC sending it:

    img session NAME master [clients=N [t=M]]   the master: it stores its disk as an image
        (--image PATH: an image on the server instead), then opens the session NAME on the
        server; without clients= it waits for the key g to start it; with clients=N it starts
        when N have joined (or M minutes after the last join); the console shows the session
    img session NAME client                     a receiver: it joins NAME (waiting until a
        master opens it), restores the image and reports the result
    img session NAME                            either: it waits for the key m (become the
        master, waiting for g) or for a master elsewhere to open NAME (join it)

Joins after imaging began are refused (the server says `started`). The keys are read from the
console (stdin): one key on a terminal, a line otherwise (tests feed "m\\n", "g\\n").

Why through the server: the image is then checked (a complete image, every chunk's checksum)
before anyone restores it, repairs come from a file rather than from a disk being read, the
master may leave once the image is stored, the same capabilities admit every receiver, and one
sender implementation serves both kinds of session.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import select
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

from common.imaging.imagefile import DEFAULT_LEVEL
from common.imaging.multicast import DATA_PORT, Refusal, session_name_refusal
from common.imaging.protocol import split_server

from .client import ImagingClient, ServerError, reports_to
from .progress import Progress
from .credentials import ServerAccess, server_access
from .errors import Failure
from .results import identity, report, server_facts

PATHS_SUCCEEDING = ("multicast", "multicast+unicast")
POLL_S = 1.0                     # how often a waiting console asks the server
WATCH_S = 2.0                    # how often the master's console shows the session
MAX_WAIT_MIN = 10080

# ---------------------------------------------------------------------- the receiver


@dataclass(frozen=True)
class Reception:
    """How a receiver's run ended (what img.mcreceive.receive_session returned, read by its
    fields so the two halves need share no class)."""

    ok: bool                     # every chunk received, verified and written
    digest: str                  # hex of the image digest it restored ("" when none)
    chunks_verified: int
    bytes_written: int
    path: str                    # multicast | multicast+unicast | failed
    error: str = ""
    refusal: int | None = None   # the JOIN_REFUSED reason code, when it was refused


def reception_of(result: Any) -> Reception:
    """A Reception from the receiver's result object."""
    digest = getattr(result, "digest", b"") or b""
    if isinstance(digest, (bytes, bytearray)):
        digest = bytes(digest).hex()
    refusal = getattr(result, "refusal", None)
    ok = bool(getattr(result, "ok", False))
    path = str(getattr(result, "path", "") or ("multicast" if ok else "failed"))
    return Reception(ok, str(digest), int(getattr(result, "chunks_verified", 0) or 0),
                     int(getattr(result, "bytes_written", 0) or 0), path,
                     str(getattr(result, "error", "") or ""),
                     None if refusal is None else int(refusal))


def receive(**arguments: Any) -> Reception:
    """img.mcreceive.receive_session(**arguments): the data plane's receiver, imported here
    so that every other command starts without it (and works while it is missing)."""
    try:
        from .mcreceive import receive_session
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.mcreceive":
            raise
        return Reception(False, "", 0, 0, "failed",
                         "this engine has no multicast receiver (img/mcreceive.py)")
    return reception_of(receive_session(**arguments))


def outcome(reception: Reception, expected_digest: str) -> tuple[bool, str]:
    """(success, error) as img reports it: success only when the receiver says every chunk
    is on the disk, by a path that succeeds, with the image it was told to restore."""
    if not reception.ok:
        return False, reception.error or "the multicast restore failed"
    if reception.path not in PATHS_SUCCEEDING:
        return False, f"the receiver ended by path '{reception.path}'"
    if expected_digest and reception.digest.lower() != expected_digest.lower():
        return False, (f"the image restored ({reception.digest or 'unknown'}) is not the "
                       f"session's ({expected_digest})")
    return True, ""


@dataclass(frozen=True)
class JoinPlan:
    """Where and what a receiver joins (a work answer's or GET /v1/sessions/NAME's fields)."""

    session: str
    group: str
    data_port: int
    control: tuple[str, int]
    image: str
    digest: str


def plan_from(answer: dict[str, Any], server: str) -> JoinPlan:
    """The join of a multicast work answer (or a session's GET answer); Failure when it is
    not usable. The control port is on the imaging server's host."""
    host, _port = split_server(server)
    try:
        session, group, image, digest = (str(answer[k]) for k in ("session", "group", "image",
                                                                   "digest"))
        data_port, control_port = int(answer["data_port"]), int(answer["control_port"])
    except (KeyError, TypeError, ValueError):
        raise Failure(f"{server} named a multicast session img cannot join ({answer}); the "
                      "disk was not changed") from None
    if session_name_refusal(session) or not 0 < control_port < 65536 or \
            not 0 < data_port < 65536 or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
        raise Failure(f"{server} named a multicast session img cannot join ({answer}); the "
                      "disk was not changed")
    return JoinPlan(session, group, data_port, (host, control_port), image, digest.lower())


def join(args: argparse.Namespace, server: str, plan: JoinPlan, facts: dict[str, Any],
         access: ServerAccess, mode: str) -> Reception:
    """Join the session and restore its image onto --disk (the receiver's work)."""
    _name, mac = identity(facts)
    print(f"{server}: joining multicast session '{plan.session}' ({plan.image}, group "
          f"{plan.group}:{plan.data_port}, sender {plan.control[0]}:{plan.control[1]})")
    return receive(
        disk=args.disk, session=plan.session, server=server, control=plan.control,
        group=plan.group, data_port=plan.data_port, digest=bytes.fromhex(plan.digest),
        image=plan.image, token=access.token or "", mac=mac, access=access, mode=mode,
        threads=getattr(args, "threads", 2), sector_size=getattr(args, "sector_size", None),
        grow=getattr(args, "grow", False),
        progress=Progress(f"multicast {plan.session}"), log=print)


def report_reception(server: str, facts: dict[str, Any], plan: JoinPlan,
                     reception: Reception, access: ServerAccess, applied_identity: str = "",
                     failure: str = "") -> bool:
    """Report the receiver's result (the fields of docs/multicast.md, "Results"); whether it
    succeeded as img sees it (the server may still judge otherwise, and says so).
    applied_identity: the text of the identity applied after the restore (img auto); failure:
    why what ran after a good reception failed (the report is then a failure, its transfer
    fields still true)."""
    succeeded, error = outcome(reception, plan.digest)
    fields = {"multicast_session": plan.session, "digest": reception.digest.lower(),
              "chunks_verified": reception.chunks_verified,
              "bytes_written": reception.bytes_written,
              "path": reception.path if succeeded else "failed"}
    if succeeded and failure:
        succeeded, error = False, failure
    answer = report(server, facts, "download", plan.image, "" if succeeded else error,
                    access=access, multicast=fields, applied_identity=applied_identity)
    if succeeded and answer is not None and answer.get("verified") is False:
        print(f"img: {server} did not accept the result as the session's image on this disk",
              file=sys.stderr)
        return False
    return succeeded


# ---------------------------------------------------------------------- img auto's part

ASK_AGAIN = -1                   # the session began before this machine joined: ask again


def from_work(args: argparse.Namespace, server: str, answer: dict[str, Any],
              facts: dict[str, Any], access: ServerAccess,
              after_restore: Callable[[], str] | None = None) -> int:
    """img auto's multicast work: join, restore, report. ASK_AGAIN when the session began
    before this machine joined (the server then sends it into the next one, or has no work
    for it); else the exit status. after_restore runs after a reception that put the session's
    image on the disk (img auto's identity step, as after a unicast restore): its text goes
    into the report's `identity`, a Failure it raises fails the operation."""
    try:
        plan = plan_from(answer, server)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    reports_to(server)
    reception = join(args, server, plan, facts, access, "auto")
    if reception.refusal == Refusal.STARTED and reception.bytes_written == 0:
        print(f"{server}: session '{plan.session}' began before this machine joined "
              f"({reception.error or 'started'}); asking for work again")
        return ASK_AGAIN
    received, why = outcome(reception, plan.digest)
    applied, failure = "", ""
    if received and after_restore is not None:
        try:
            applied = after_restore()
        except Failure as exc:
            failure = str(exc)
    succeeded = report_reception(server, facts, plan, reception, access, applied, failure)
    if succeeded:
        print(f"restored {plan.image} from multicast session '{plan.session}' "
              f"({reception.path}): {reception.chunks_verified} chunks verified, "
              f"{reception.bytes_written} bytes written")
        return 0
    if failure:
        print(f"img: {failure}", file=sys.stderr)
        return 1
    changed = "the disk was changed" if reception.bytes_written else "the disk was not changed"
    print(f"img: multicast session '{plan.session}' failed: "
          f"{why or 'the server did not accept the result'} ({changed})", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- img session

@dataclass(frozen=True)
class SessionWords:
    role: str | None             # "master", "client", or None: wait for m
    clients: int                 # 0: no clients trigger (the master waits for g)
    wait_min: int                # 0: no timer


def parse_session_words(words: list[str]) -> SessionWords:
    """[master|client] [clients=N [t=M]], as the original wrote them; ValueError with why."""
    role, clients, wait_min = None, 0, 0
    seen: set[str] = set()
    for word in words:
        key, sep, value = word.partition("=")
        key = key.strip().lower()
        if not sep and key in ("master", "client"):
            if role is not None:
                raise ValueError(f"'{word}': master or client, once")
            role = key
            continue
        if not sep or key not in ("clients", "t") or key in seen:
            raise ValueError(f"'{word}': expected master, client, clients=N or t=M (once each)")
        seen.add(key)
        top = 10000 if key == "clients" else MAX_WAIT_MIN
        if not value.isascii() or not value.isdigit() or not 0 < int(value) <= top:
            raise ValueError(f"'{word}': {key} must be a whole number from 1 to {top}")
        if key == "clients":
            clients = int(value)
        else:
            wait_min = int(value)
    if wait_min and not clients:
        raise ValueError("t=M goes with clients=N (img session NAME master clients=N t=M)")
    if role == "client" and clients:
        raise ValueError("clients= is the master's: the master says when the session starts")
    return SessionWords(role, clients, wait_min)


def master_image_path(name: str) -> str:
    """Where a workstation master stores its image when no --image is given:
    multicast/<the name, anything but letters, digits, - and _ made _>.img, with a short hash of
    the name when it had to change (so "room 101" and "room_101" do not share an image)."""
    slug = re.sub(r"[^\w-]", "_", name).strip("_") or "session"
    if slug != name:
        slug += "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"multicast/{slug[:200]}.img"


class Keys:
    """Keys typed on the console: one key on a terminal (cbreak mode while it runs), lines
    otherwise; poll() returns a lower-case key or None within timeout_s."""

    def __init__(self, stream: Any = None):
        self._stream = stream if stream is not None else sys.stdin
        self._fd = self._stream.fileno()
        self._saved: Any = None
        self._ended = False
        self._pending = ""

    def __enter__(self) -> "Keys":
        if os.isatty(self._fd):
            import termios
            import tty
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def poll(self, timeout_s: float) -> str | None:
        if self._pending:
            key, self._pending = self._pending[0], self._pending[1:]
            return key
        if self._ended:
            time.sleep(timeout_s)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout_s)
        if not ready:
            return None
        data = os.read(self._fd, 64)
        if not data:
            self._ended = True
            return None
        self._pending = "".join(c for c in data.decode("utf-8", "replace").lower()
                                if not c.isspace())
        return self.poll(0)


def _url(name: str, suffix: str = "") -> str:
    return f"/v1/sessions/{quote(name, safe='')}{suffix}"


def lookup(server: str, name: str, access: ServerAccess) -> dict[str, Any] | None:
    """The session NAME on the server (GET), None when there is none."""
    with ImagingClient(server, access=access, timeout=15) as client:
        try:
            return client.call_json("GET", _url(name), None, f"session {name}", ok=(200,))
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise


def run(args: argparse.Namespace, keys: Keys | None = None) -> int:
    """img session NAME [master|client] [clients=N [t=M]] --server HOST --disk DISK."""
    try:
        words = parse_session_words(args.words)
    except ValueError as exc:
        print(f"img session: {exc}", file=sys.stderr)
        return 2
    problem = session_name_refusal(args.name)
    if problem:
        print(f"img session: {problem}", file=sys.stderr)
        return 2
    try:
        split_server(args.server)
        access = server_access(args)
        facts = server_facts(args.disk, getattr(args, "fact", []))
    except (Failure, ValueError) as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    try:
        with (keys or Keys()) as console:
            return _session(args, words, access, facts, console)
    except ServerError as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1


def _session(args: argparse.Namespace, words: SessionWords, access: ServerAccess,
             facts: dict[str, Any], console: Keys) -> int:
    name, server = args.name, args.server
    role = words.role
    if role is None:
        print(f"session '{name}': press m to become its master, or wait for a master to "
              "open it")
        found = None
        while found is None:
            found = lookup(server, name, access)
            if found is not None:
                role = "client"
                break
            if console.poll(POLL_S) == "m":
                role = "master"
                break
        if role == "client":
            return _client(args, access, facts, found, console)
    if role == "master":
        return _master(args, words, access, facts, console)
    return _client(args, access, facts, None, console)


def _client(args: argparse.Namespace, access: ServerAccess, facts: dict[str, Any],
            found: dict[str, Any] | None, console: Keys) -> int:
    name, server = args.name, args.server
    if found is None:
        print(f"session '{name}': waiting for its master to open it")
        while found is None:
            found = lookup(server, name, access)
            if found is None:
                console.poll(POLL_S)
    plan = plan_from(found, server)
    reports_to(server)
    reception = join(args, server, plan, facts, access, "manual")
    if reception.refusal == Refusal.STARTED:
        print(f"img: session '{name}': {reception.error or 'imaging began'}: registrations "
              "after imaging began are denied; the disk was not changed", file=sys.stderr)
        return 1
    succeeded = report_reception(server, facts, plan, reception, access)
    if succeeded:
        print(f"restored {plan.image} from session '{name}' ({reception.path})")
        return 0
    print(f"img: session '{name}' failed: {outcome(reception, plan.digest)[1]}", file=sys.stderr)
    return 1


def _master(args: argparse.Namespace, words: SessionWords, access: ServerAccess,
            facts: dict[str, Any], console: Keys) -> int:
    name, server = args.name, args.server
    image = args.image
    if not image:
        image = master_image_path(name)
        from .serverops import make_remote
        workstation, _ = identity(facts)
        print(f"session '{name}': storing this disk as {image} on {server} first")
        make_remote(server, image, args.disk, facts, args.level, args.threads, workstation,
                    "manual", args.sector_size, access)
    with ImagingClient(server, access=access, timeout=30) as client:
        answer = client.call_json("POST", "/v1/sessions",
                                  {"name": name, "image": image, "clients": words.clients,
                                   "t": words.wait_min}, f"session {name}")
    trigger = (f"it starts when {words.clients} have joined" +
               (f" or {words.wait_min} min after the last join" if words.wait_min else "")
               if words.clients else "press g to start it")
    print(f"session '{name}' is open on {server}: {image} to {answer.get('group')}:"
          f"{answer.get('data_port', DATA_PORT)}; {trigger}; q leaves this console (the "
          "session goes on)")
    return _watch(server, name, access, console, waits_for_g=not words.clients)


def _watch(server: str, name: str, access: ServerAccess, console: Keys,
           waits_for_g: bool, say: Callable[[str], None] = print) -> int:
    """The master's console: the session's state and receivers until it ends (or q)."""
    shown = ""
    started = False
    while True:
        key = console.poll(WATCH_S)
        if key == "q":
            say(f"session '{name}' goes on without this console (zmgmcast -status shows it)")
            return 0
        if key == "g" and waits_for_g and not started:
            try:
                with ImagingClient(server, access=access, timeout=15) as client:
                    answer = client.call_json("POST", _url(name, "/start"), {},
                                              f"start {name}", ok=(200,))
                say(str(answer.get("message", f"session '{name}' starts")))
                started = True
            except ServerError as exc:
                if exc.status != 409:
                    raise
                # not now (nobody has joined yet): the session keeps waiting, g again later
                say(f"{exc}; press g again when the receivers have joined")
        found = lookup(server, name, access)
        if found is None:
            say(f"session '{name}' has ended (the imaging server's results log has each "
                "receiver's result)")
            return 0
        line = f"session '{name}': {found.get('state')}, {found.get('receivers', 0)} receivers"
        if line != shown:
            say(line)
            shown = line


def add_parser(commands: Any) -> None:
    """The `img session` command's arguments."""
    from .credentials import access_arguments
    session = commands.add_parser(
        "session", help="a multicast session every workstation names alike",
        description="img session NAME [master|client] [clients=N [t=M]]: without master or "
                    "client, press m to become the master (or join the master that opens "
                    "NAME); without clients=, the master presses g to start")
    session.add_argument("name", help="the session's name (every workstation gives the same)")
    session.add_argument("words", nargs="*", metavar="master|client|clients=N|t=M",
                         help="master or client: this workstation's role (default: ask); "
                              "clients=N: the master starts once N receivers joined; t=M: or "
                              "after M minutes")
    session.add_argument("--server", required=True, help="HOST[:PORT] of the imaging server")
    session.add_argument("--disk", required=True, help="the disk to restore (a receiver) or "
                                                       "to send (a master without --image)")
    session.add_argument("--image", help="master: send this image on the server instead of "
                                         "storing this disk first")
    session.add_argument("--sector-size", type=int, choices=(512, 4096), metavar="512|4096",
                         help="a disk image file's logical sector size (default 512); a block "
                              "device's own is asked of the kernel")
    session.add_argument("--grow", action="store_true",
                         help="grow the last partition and its filesystem to fill a larger "
                              "disk (ext2/3/4, XFS, btrfs, NTFS, FAT32)")
    session.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                         help="master: zstd level (1-19)")
    session.add_argument("--threads", type=int, default=2,
                         help="worker threads for reading, checking and (de)compressing chunks (default 2)")
    session.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE",
                         help="override a machine fact (mac, ram_mb, manufacturer, ...)")
    access_arguments(session)
    session.set_defaults(run=run)

