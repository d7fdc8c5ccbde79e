"""img auto: ask the imaging server what this machine should do (POST /v1/work with its
facts), and do it: restore a base image and its add-on images, make an image, follow a
referral to another server, join a multicast session (session.py), or nothing. What the
imaging environment runs at boot; the console of an unattended machine shows what it printed.

A machine's identity (issue 17, docs/identity.md): the one in the disk's image-safe data is
read before the work request and sent with it; the answer says which identity the machine
should have, and after a restore that wrote the disk (unicast, or a multicast session's: the
same identity_step, handed to session.from_work) img applies it to the installed systems
(img/identity_apply.py), stores it back in the image-safe data and reports it.

A multicast session that began before this machine joined refuses it; img then asks for work
again (at most MAX_WORK_ROUNDS times): the server sends it into the next session it qualifies
for, or gives it other work, or none.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from common.identity import BadIdentity, MachineIdentity, identity_from_wire, identity_to_wire

from common.imaging.protocol import work_fileset

from . import isdstore, session
from .client import ImagingClient, ServerError
from .errors import EXIT_FAILED, DiskError, Failure, IdentityError
from .results import identity, server_facts
from .credentials import server_access
from .serverops import apply_addons_remote, check_server, server_operation

MAX_WORK_ROUNDS = 3


def run(args: argparse.Namespace) -> int:
    """img auto --disk DISK --server HOST[:PORT] [--fact KEY=VALUE ...]."""
    try:
        check_server(args.server)
        facts = server_facts(args.disk, args.fact)
        access = server_access(args)
    except Failure as exc:
        print(f"img: {exc}", file=sys.stderr)
        return 1
    print_disk(args.disk, args.sector_size)
    on_disk = disk_identity(args.disk)
    for _round in range(MAX_WORK_ROUNDS):
        status = _one_round(args, facts, access, on_disk)
        if status != session.ASK_AGAIN:
            return status
    print(f"img: {args.server} kept sending this machine into sessions that had begun; the "
          "disk was not changed", file=sys.stderr)
    return 1


def _one_round(args: argparse.Namespace, facts: dict[str, Any], access: Any,
               on_disk: MachineIdentity | None = None) -> int:
    """Ask for work and do it: the exit status, or session.ASK_AGAIN."""
    workstation, _ = identity(facts)
    server = args.server
    try:
        with ImagingClient(server, workstation, "auto", access=access) as client:
            answer = client.work(facts, "auto", identity=None if on_disk is None
                                 else identity_to_wire(on_disk))
    except ServerError as exc:
        print(f"img: work request to {server} failed: {exc}; the disk was not changed",
              file=sys.stderr)
        return 1
    # The work answer's capability allows exactly that work; without one, keep presenting ours.
    access = access.with_token(str(answer.get("token") or ""))
    work, reason = answer.get("work"), answer.get("reason", "")
    image = answer.get("image", "")
    shrink = answer.get("shrink") is True
    try:
        fileset = work_fileset(answer)
    except ValueError as exc:
        print(f"img: {server} sent a work answer img cannot use: {exc}; the disk was not "
              "changed", file=sys.stderr)
        return 1
    try:
        after_restore = identity_step(args, answer)
    except BadIdentity as exc:
        print(f"img: {server} sent an identity img cannot use ({exc}); the disk was not "
              "changed", file=sys.stderr)
        return 1
    if work == "referral":
        action, other, path = answer.get("action"), answer.get("server"), answer.get("path")
        print(f"{server}: referral: {action} //{other}/{path} ({reason})")
        if action not in ("restore", "make") or not other or not path:
            print(f"img: {server} sent a referral img cannot follow ({answer}); the disk "
                  "was not changed", file=sys.stderr)
            return 1
        status = server_operation(action, args, other, path, facts, "auto", args.server,
                                  shrink, access, fileset, after_restore)
        if status == EXIT_FAILED or action != "restore":
            return status
        return apply_addons_remote(other, addon_paths(answer), args.disk, None, args.threads,
                                   facts, "auto", args.server, args.sector_size, access) or status
    fit = " (shrink to fit)" if shrink else ""
    subset = f" file set {fileset}" if fileset != 1 else ""
    print(f"{server}: {work}{' ' + image if image else ''}{subset}{fit} ({reason})")
    if work == "none":
        print(f"no work for this machine: {reason}")
        return 0
    if work == "restore":
        status = server_operation("restore", args, server, image, facts, "auto", args.server,
                                  shrink, access, fileset, after_restore)
        if status == EXIT_FAILED:
            return status
        return apply_addons_remote(server, addon_paths(answer), args.disk, None, args.threads,
                                   facts, "auto", args.server, args.sector_size, access) or status
    if work == "make":
        return server_operation("make", args, server, image, facts, "auto", args.server,
                                access=access)
    if work == "multicast":
        return session.from_work(args, server, answer, facts, access, after_restore)
    print(f"img: {server} asks for '{work}', which this engine does not do yet; the disk "
          "was not changed", file=sys.stderr)
    return 1


def print_disk(path: str, sector_size: int | None) -> None:
    """The disk as img sees it, for the console of an unattended machine."""
    from .disk import Disk
    try:
        with Disk.open(path, sector_size=sector_size) as disk:
            print(f"disk {path}: {disk.size} bytes, {disk.sector_size}-byte logical sectors")
    except (OSError, DiskError) as exc:
        print(f"img: warning: disk {path}: {exc}", file=sys.stderr)


def addon_paths(answer: dict[str, Any]) -> list[str]:
    """The add-on images a work answer lists, in order."""
    addons = answer.get("addons") or []
    return [str(addon) for addon in addons] if isinstance(addons, list) else []


# --- the machine's identity (issue 17): read from the disk before the work request, applied and
# stored after a restore. A damaged record is said and passed over: the machine then gets its
# identity from the policy, as one without a record.

def disk_identity(disk: str) -> MachineIdentity | None:
    """The identity in the disk's image-safe data, None when there is none."""
    try:
        found = isdstore.read_identity(disk)
    except Exception as exc:  # noqa: BLE001 (a damaged record, an unreadable disk: say, go on)
        print(f"img: warning: identity on {disk} not read: {exc}", file=sys.stderr)
        return None
    if found is not None:
        print(f"identity on the disk: {found.describe()}")
    return found


def store_identity(disk: str, identity: MachineIdentity) -> str:
    """Write identity into the disk's image-safe data; the line saying what happened."""
    try:
        isdstore.write_identity(disk, identity)
    except Exception as exc:  # noqa: BLE001 (no room, another program's bytes, I/O: say which)
        raise Failure(f"identity {identity.name} applied but not stored on {disk}: {exc}; "
                      "the disk was restored") from None
    return "identity stored in the disk's image-safe data"


def identity_step(args: argparse.Namespace, answer: dict[str, Any]
                  ) -> Callable[[], str] | None:
    """What runs after a restore when the answer carries an identity: apply it, store it,
    and return the text for the result report. Raises BadIdentity for a malformed one."""
    value = answer.get("identity")
    if value is None:
        return None
    wanted = identity_from_wire(value)
    source = str(answer.get("identity_source") or "the server")

    def apply() -> str:
        from .identity_apply import apply_identity
        print(f"identity ({source}): {wanted.describe()}")
        try:
            applied = apply_identity(args.disk, wanted, args.sector_size)
        except IdentityError as exc:
            raise Failure(f"identity {wanted.name} not applied: {exc}; the disk was "
                          "restored") from None
        for line in applied.lines:
            print(f"  {line}")
        stored = store_identity(args.disk, wanted)
        print(f"  {stored}")
        return applied.text() + "\n" + stored
    return apply
