"""preboot-dir's commands for identity policies and their pools (docs/identity.md):

    preboot-dir identities list               the identity policies, each pool's use
    preboot-dir identities log [POOL]         the assignment log: value, MAC, time
    preboot-dir identities release POOL MAC|VALUE   hand a machine's values (or one value) back

Identity policies themselves are edited in the policy file (export, edit, import); a rule
names one with `rules set NAME --identity POLICY`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from common.machine import normalize_mac
from common.policy.identitypolicy import KIND_ADDRESS, KIND_COUNTER, IdentityPolicy


def _use(policy: IdentityPolicy, log: list) -> str:
    addresses = sum(1 for item in log if item.kind == KIND_ADDRESS)
    counters = sum(1 for item in log if item.kind == KIND_COUNTER)
    parts = []
    if policy.pool is not None:
        size = policy.pool.size()
        parts.append(f"{addresses} of {size} addresses handed out, {size - addresses} free")
    if counters:
        parts.append(f"{counters} counter values handed out")
    return "; ".join(parts) or "nothing handed out (DHCP)"


def cmd_list(args: argparse.Namespace, open_directory: Callable[..., Any]) -> int:
    with open_directory(args, create=False) as directory:
        policy = directory.policy()
        log = directory.assignments()
    if not policy.identities:
        print("no identity policies: work answers carry only the identity on a machine's disk")
    for item in policy.identities:
        mine = [entry for entry in log if entry.pool.casefold() == item.name.casefold()]
        default = " (default)" if item.default else ""
        print(f"{item.name}{default}: {item.describe()}")
        print(f"     {_use(item, mine)}")
        users = [rule.name for rule in policy.rules if rule.identity.casefold() ==
                 item.name.casefold()]
        if users:
            print(f"     named by rules: {', '.join(users)}")
    known = {item.name.casefold() for item in policy.identities}
    orphans = sorted({entry.pool for entry in log if entry.pool.casefold() not in known})
    for pool in orphans:
        print(f"{pool}: no such identity policy any more; its assignments are kept "
              "(identities release to free them)")
    return 0


def cmd_log(args: argparse.Namespace, open_directory: Callable[..., Any]) -> int:
    with open_directory(args, create=False) as directory:
        log = directory.assignments(args.pool or None)
    if not log:
        print("the assignment log is empty")
    for item in log:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.assigned_at))
        print(f"{item.pool}\t{item.kind}\t{item.value}\t{item.mac}\t{when}")
    return 0


def cmd_release(args: argparse.Namespace, open_directory: Callable[..., Any],
                usage_error: type[Exception]) -> int:
    mac = normalize_mac(args.who) or ""
    with open_directory(args, create=False) as directory:
        released = directory.release(args.pool, mac=mac, value="" if mac else args.who.strip())
    if not released:
        raise usage_error(f"pool '{args.pool}' has no assignment of '{args.who}'")
    for item in released:
        print(f"released {item.kind} {item.value} of pool {item.pool} (held by {item.mac})")
    return 0


def add_commands(commands: Any, open_directory: Callable[..., Any],
                 usage_error: type[Exception]) -> None:
    parser = commands.add_parser("identities", help="identity policies, their pools and the "
                                                    "assignment log (docs/identity.md)")
    verbs = parser.add_subparsers(dest="identities_command", required=True)
    verbs.add_parser("list", help="identity policies and each pool's use").set_defaults(
        run=lambda a: cmd_list(a, open_directory))
    log = verbs.add_parser("log", help="the assignment log")
    log.add_argument("pool", nargs="?", help="only this pool (identity policy)")
    log.set_defaults(run=lambda a: cmd_log(a, open_directory))
    release = verbs.add_parser("release", help="hand a machine's values, or one value, back")
    release.add_argument("pool", help="the identity policy's name")
    release.add_argument("who", help="a MAC (all its values) or an address or counter value")
    release.set_defaults(run=lambda a: cmd_release(a, open_directory, usage_error))
