"""`img identity apply`: an administrator applies an identity to a restored disk by hand (the
same code img auto runs after a restore: img/identity_apply.py). Only arguments here; the
work is imported when the command runs.

    img identity apply --disk DISK --name NAME [--dns-suffix S] [--workgroup W]
        [--ip ADDRESS/PREFIX [--gateway G] [--dns A,B]]     (no --ip: DHCP)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common.identity import BadIdentity, IpSettings, MachineIdentity


def add_parser(commands: Any, disk_arguments: Any) -> None:
    identity = commands.add_parser("identity", help="apply a machine identity to a restored "
                                                    "disk's systems (Linux, Windows)")
    actions = identity.add_subparsers(dest="identity_command", required=True)
    apply = actions.add_parser(
        "apply", help="set the host name and network settings of every installed system on "
                      "the disk, offline")
    disk_arguments(apply)
    apply.add_argument("--name", required=True, help="the host name (Windows: its first 15 "
                                                     "characters, upper case, are the "
                                                     "computer name)")
    apply.add_argument("--dns-suffix", default="", metavar="SUFFIX",
                       help="the DNS domain (search list, FQDN)")
    apply.add_argument("--workgroup", default="", help="workgroup or domain name (reported; "
                                                       "see docs/identity.md)")
    apply.add_argument("--ip", metavar="ADDRESS/PREFIX",
                       help="a static IPv4 address, e.g. 10.0.0.5/24 (default: DHCP)")
    apply.add_argument("--gateway", default="", help="the default gateway (with --ip)")
    apply.add_argument("--dns", default="", metavar="A,B",
                       help="DNS servers, comma-separated (with --ip; at most 3)")
    apply.set_defaults(run=run, parser=apply)


def identity_from_args(args: argparse.Namespace) -> MachineIdentity:
    """The identity the arguments give; BadIdentity or ValueError naming the argument."""
    ip = None
    if args.ip:
        address, slash, prefix = args.ip.partition("/")
        if not slash or not prefix.isdigit():
            raise BadIdentity(f"--ip {args.ip}: expected ADDRESS/PREFIX, e.g. 10.0.0.5/24")
        servers = tuple(s.strip() for s in args.dns.split(",") if s.strip())
        ip = IpSettings(address, int(prefix), args.gateway, servers)
    elif args.gateway or args.dns:
        raise BadIdentity("--gateway and --dns go with --ip (without --ip the system uses "
                          "DHCP)")
    return MachineIdentity(args.name, args.dns_suffix, args.workgroup, ip)


def run(args: argparse.Namespace) -> int:
    try:
        identity = identity_from_args(args)
    except BadIdentity as exc:
        args.parser.error(str(exc))
    from .identity_apply import apply_identity
    applied = apply_identity(args.disk, identity, args.sector_size)
    print(f"identity {identity.describe()} applied to {args.disk}:")
    for line in applied.lines:
        print(f"  {line}")
    return 0


__all__ = ["add_parser", "identity_from_args", "run"]
