"""What the engine tells an imaging server about this machine and about what it did: the
machine facts it sends (with a work request, in an image's metadata), the workstation it says
it is, and the result of each operation (POST /v1/results). `img info` prints the facts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.machine import ATTRIBUTE_KINDS, normalize_mac

from .client import SESSION, ImagingClient, ServerError
from .credentials import NO_ACCESS, ServerAccess
from .errors import Failure
from .hardware import machine_facts

MiB = 1 << 20


def server_facts(disk_path: str, overrides: list[str]) -> dict[str, Any]:
    """This machine's facts as the server matches rules on them: the hardware's, the disk's
    size (when DISK opens), then each --fact KEY=VALUE. Raises Failure for a bad --fact."""
    facts = {k: v for k, v in machine_facts().items() if k in ATTRIBUTE_KINDS}
    try:
        from .disk import Disk
        with Disk.open(disk_path) as disk:
            facts["disk_mb"] = disk.size // MiB
    except OSError:
        pass
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ATTRIBUTE_KINDS:
            raise Failure(f"--fact {item}: expected KEY=VALUE with KEY one of "
                          f"{', '.join(ATTRIBUTE_KINDS)}")
        facts[key] = value.strip()
    return facts


def identity(facts: dict[str, Any]) -> tuple[str, str]:
    """(workstation name, MAC) the engine gives the server: the host name, else the MAC."""
    mac = normalize_mac(str(facts.get("mac") or "")) or ""
    return str(facts.get("hostname") or mac), mac


def report(server: str, facts: dict[str, Any], operation: str, image: str, error: str,
           image_type: str = "base", access: ServerAccess = NO_ACCESS,
           multicast: dict[str, Any] | None = None, applied_identity: str = ""
           ) -> dict[str, Any] | None:
    """POST /v1/results (with a multicast receiver's fields: multicast_session, digest,
    chunks_verified, bytes_written, path; and `identity`, the text of an identity applied
    after a restore, only when there is one); a failure to report is a warning, not a failed
    operation. The server's answer, None when there is none."""
    workstation, mac = identity(facts)
    if not workstation and not mac:
        print(f"img: warning: no workstation name or MAC to report the result to {server}",
              file=sys.stderr)
        return None
    body = {"workstation": workstation, "mac": mac, "operation": operation,
            "image_type": image_type, "image_path": image,
            "status": "failure" if error else "success", "error_message": error[:4000],
            "session": SESSION, **(multicast or {})}
    if applied_identity:
        body["identity"] = applied_identity[:4000]
    try:
        with ImagingClient(server, workstation, timeout=15, access=access) as client:
            answer = client.result(body)
        if answer.get("cleared"):
            print(f"{server}: the workstation's 'image on next boot' flag was cleared")
        return answer
    except (ServerError, ValueError) as exc:
        print(f"img: warning: result not reported: {exc}", file=sys.stderr)
        return None


def info(args: argparse.Namespace) -> int:
    """img info: what this machine reports to the imaging server."""
    facts = machine_facts()
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
    else:
        for key, value in sorted(facts.items()):
            print(f"{key}: {value}")
    return 0
