"""preboot-dir's commands for the capability keys and operator capabilities (docs/security.md):

    preboot-dir key create [--key-file F]      a key file with one new key (if there is none)
    preboot-dir key rotate [--key-file F]      a new signing key; the previous one still accepted
    preboot-dir token --operator NAME --allow retrieve,store[,result] --image 'lab/*'
                [--lifetime-s N] [--key-file F]   an operator's capability, printed on stdout

They need the key file only (root-only), not the directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from common.policy.capability import (OPERATIONS, OPERATOR_PREFIX, Capability, CapabilityError,
                                      encode)
from common.policy.keyring import KeyFileError, ensure, read_keys, rotate
from common.policy.trust import DEFAULT_KEY_FILE

PROGRAM = "preboot-dir"
EX_USAGE = 64
OPERATOR_LIFETIME_S = 8 * 3600


def cmd_key_create(args: argparse.Namespace) -> int:
    if not ensure(args.key_file):
        print(f"{args.key_file} exists already (use `key rotate` for a new key)")
        return 0
    print(f"created {args.key_file}: copy it (mode 0600) to every imaging server that "
          "takes referrals")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    try:
        key_id = rotate(args.key_file)
    except KeyFileError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.key_file}: new signing key {key_id}; capabilities signed with the previous "
          "key stay valid until they expire. Copy the file to every imaging server.")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    allowed = tuple(op.strip() for op in args.allow.split(",") if op.strip())
    unknown = [op for op in allowed if op not in OPERATIONS]
    if unknown or not allowed:
        print(f"{PROGRAM}: --allow takes {', '.join(OPERATIONS)} (comma separated); got "
              f"{args.allow!r}", file=sys.stderr)
        return EX_USAGE
    now = int(time.time())
    capability = Capability(OPERATOR_PREFIX + args.operator, frozenset(allowed),
                            tuple(args.image or ["*"]), now, now + args.lifetime_s)
    try:
        key_id, secret = read_keys(args.key_file).signing
        print(encode(capability, key_id, secret))
    except (KeyFileError, CapabilityError) as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: Any) -> None:
    """The `key` and `token` commands, on preboot-dir's subcommand parser."""
    key = commands.add_parser("key", help="the capability key file (create, rotate)")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    for name, run in (("create", cmd_key_create), ("rotate", cmd_key_rotate)):
        sub = key_commands.add_parser(name)
        sub.add_argument("--key-file", default=DEFAULT_KEY_FILE)
        sub.set_defaults(run=run)
    token = commands.add_parser("token", help="an operator's capability for img --token")
    token.add_argument("--operator", required=True, help="who it is for (shown in the logs)")
    token.add_argument("--allow", required=True,
                       help=f"operations, comma separated: {', '.join(OPERATIONS)}")
    token.add_argument("--image", action="append", metavar="PATTERN",
                       help="image paths it may name (glob, repeatable; default every image)")
    token.add_argument("--lifetime-s", type=int, default=OPERATOR_LIFETIME_S,
                       help=f"seconds it stays valid (default {OPERATOR_LIFETIME_S})")
    token.add_argument("--key-file", default=DEFAULT_KEY_FILE)
    token.set_defaults(run=cmd_token)
