"""`img isd show|set|clear DISK`: the image-safe data on a disk, for people (the record and
where it lies: img/isd.py, img/isdstore.py, docs/image-format.md "Image-safe data").

    img isd show DISK [--json]           the identity kept on DISK and where it lies
    img isd set DISK --name NAME [--dns-suffix S] [--workgroup W]
                (--dhcp | --ip ADDR/PREFIX [--gateway GW] [--dns SERVER]...)
    img isd clear DISK                   remove it
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.identity import MAX_DNS_SERVERS, BadIdentity, IpSettings, MachineIdentity

from .errors import EXIT_OK, EXIT_USAGE
from .isd import describe
from .isdstore import clear_identity, read_record, write_identity


def show(args: argparse.Namespace) -> int:
    record, slot = read_record(args.disk, args.sector_size)
    if args.json:
        print(json.dumps(None if record is None else
                         dict(describe(record), offset=slot.offset, length=slot.length)))
        return EXIT_OK
    if slot.offset is None:
        print(f"{args.disk}: no image-safe data (no room for it: {slot.reason})")
    elif record is None:
        print(f"{args.disk}: no image-safe data (it would lie at {slot.reason})")
    else:
        print(f"{args.disk}: image-safe data at {slot.reason}")
        print(f"  {record.identity.describe()}")
        print(f"  written {record.written or '(unknown)'} by {record.tool or '(unknown)'}")
    return EXIT_OK


def set_identity(args: argparse.Namespace) -> int:
    try:
        identity = identity_from_args(args)
    except BadIdentity as exc:
        print(f"img isd set: {exc}", file=sys.stderr)
        return EXIT_USAGE
    write_identity(args.disk, identity, args.sector_size)
    print(f"{args.disk}: image-safe data written: {identity.describe()}")
    return EXIT_OK


def clear(args: argparse.Namespace) -> int:
    if clear_identity(args.disk, args.sector_size):
        print(f"{args.disk}: image-safe data removed")
        return EXIT_OK
    print(f"{args.disk}: had no image-safe data; nothing changed")
    return EXIT_OK


def identity_from_args(args: argparse.Namespace) -> MachineIdentity:
    """The identity the options of `img isd set` give; BadIdentity naming the option."""
    if args.dhcp and (args.gateway or args.dns):
        raise BadIdentity("--gateway and --dns go with --ip, not --dhcp")
    ip = None
    if args.ip is not None:
        address, slash, prefix = args.ip.partition("/")
        if not slash or not prefix.isdigit():
            raise BadIdentity(f"--ip {args.ip!r}: expected ADDRESS/PREFIX, e.g. 10.0.0.5/24")
        ip = IpSettings(address, int(prefix), args.gateway or "", tuple(args.dns))
    return MachineIdentity(args.name, args.dns_suffix, args.workgroup, ip)


def add_parser(commands: Any, sector_sizes: tuple[int, ...]) -> None:
    """The `img isd` command and its three actions."""
    isd = commands.add_parser(
        "isd", help="the image-safe data on a disk: the identity a restore keeps",
        description="Image-safe data: a machine's identity (name, DNS suffix, workgroup, IP "
                    "settings) kept in the 4 KiB below byte 1 MiB of its disk, outside every "
                    "partition; img restore keeps it, img make leaves it out "
                    "(docs/image-format.md).")
    actions = isd.add_subparsers(dest="isd_command", required=True)
    for name, run, text in (("show", show, "print the identity on DISK and where it lies"),
                            ("set", set_identity, "write an identity onto DISK"),
                            ("clear", clear, "remove the identity from DISK")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("disk", metavar="DISK", help="a block device or a disk image file")
        action.add_argument("--sector-size", type=int, choices=sector_sizes, metavar="512|4096",
                            help="a disk image file's logical sector size (default: 512, or "
                                 "4096 where the table reads right only so); a block device's "
                                 "own is asked of the kernel")
        action.set_defaults(run=run)
        if name == "show":
            action.add_argument("--json", action="store_true",
                                help="print the record as one JSON object (null: none)")
        if name == "set":
            _set_arguments(action)


def _set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True,
                        help="the host name (letters, digits, hyphens; up to 63; Windows uses "
                             "the first 15)")
    parser.add_argument("--dns-suffix", default="", metavar="DOMAIN",
                        help="the DNS suffix (domain), e.g. lab.example.com (default: none)")
    parser.add_argument("--workgroup", default="", metavar="NAME",
                        help="the Windows workgroup or domain (up to 15; default: none)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--dhcp", action="store_true", help="the address comes from DHCP")
    how.add_argument("--ip", metavar="ADDR/PREFIX",
                     help="a static IPv4 address and the mask's length, e.g. 10.0.0.5/24")
    parser.add_argument("--gateway", metavar="ADDR",
                        help="with --ip: the default gateway (in the --ip network)")
    parser.add_argument("--dns", action="append", default=[], metavar="ADDR",
                        help=f"with --ip: a DNS server (repeatable, up to {MAX_DNS_SERVERS})")


__all__ = ["add_parser", "clear", "identity_from_args", "set_identity", "show"]
