"""img auto: ask the imaging server what this machine should do (POST /v1/work with its
facts), and do it: restore a base image and its add-on images, make an image, follow a
referral to another server, join a multicast session (session.py), or nothing. What the
imaging environment runs at boot; the console of an unattended machine shows what it printed.

A multicast session that began before this machine joined refuses it; img then asks for work
again (at most MAX_WORK_ROUNDS times): the server sends it into the next session it qualifies
for, or gives it other work, or none.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common.imaging.protocol import work_fileset

from . import session
from .client import ImagingClient, ServerError
from .errors import EXIT_FAILED, DiskError, Failure
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
    for _round in range(MAX_WORK_ROUNDS):
        status = _one_round(args, facts, access)
        if status != session.ASK_AGAIN:
            return status
    print(f"img: {args.server} kept sending this machine into sessions that had begun; the "
          "disk was not changed", file=sys.stderr)
    return 1


def _one_round(args: argparse.Namespace, facts: dict[str, Any], access: Any) -> int:
    """Ask for work and do it: the exit status, or session.ASK_AGAIN."""
    workstation, _ = identity(facts)
    server = args.server
    try:
        with ImagingClient(server, workstation, "auto", access=access) as client:
            answer = client.work(facts, "auto")
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
    if work == "referral":
        action, other, path = answer.get("action"), answer.get("server"), answer.get("path")
        print(f"{server}: referral: {action} //{other}/{path} ({reason})")
        if action not in ("restore", "make") or not other or not path:
            print(f"img: {server} sent a referral img cannot follow ({answer}); the disk "
                  "was not changed", file=sys.stderr)
            return 1
        status = server_operation(action, args, other, path, facts, "auto", args.server,
                                  shrink, access, fileset)
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
                                  shrink, access, fileset)
        if status == EXIT_FAILED:
            return status
        return apply_addons_remote(server, addon_paths(answer), args.disk, None, args.threads,
                                   facts, "auto", args.server, args.sector_size, access) or status
    if work == "make":
        return server_operation("make", args, server, image, facts, "auto", args.server,
                                access=access)
    if work == "multicast":
        return session.from_work(args, server, answer, facts, access)
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
