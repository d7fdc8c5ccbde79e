"""preboot-dir's commands for the services' TLS certificate (docs/security.md, "TLS"):

    preboot-dir tls create [--cert F] [--key F] [--name NAME ...] [--days N] [--force]
        a self-signed certificate and its key (ECDSA P-256, which iPXE also speaks), for
        TLSCertificate/TLSKey; prints its pin
    preboot-dir tls pin [--cert F]     the SHA-256 pin of a certificate (img --server-pin)

The pair is made by the openssl program and written under temporary names first, so an
interrupted run leaves no half pair under the final names; the key is mode 0600.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from common.tlspin import PinError, pem_fingerprint

PROGRAM = "preboot-dir"
DEFAULT_CERT = "/etc/preboot/tls/server.crt"
DEFAULT_KEY = "/etc/preboot/tls/server.key"
DEFAULT_DAYS = 3650
OPENSSL_TIMEOUT_S = 60


def cmd_tls_create(args: argparse.Namespace) -> int:
    if not args.force and (os.path.exists(args.cert) or os.path.exists(args.key)):
        print(f"{args.cert} or {args.key} exists already (--force replaces them; services "
              "that pin the old certificate must then be told the new pin)")
        return 0
    names = args.name or [socket.getfqdn()]
    try:
        _make_pair(args.cert, args.key, names, args.days)
        pin = pem_fingerprint(args.cert)
    except (OSError, PinError, subprocess.SubprocessError) as exc:
        print(f"{PROGRAM}: tls create: {exc}", file=sys.stderr)
        return 1
    print(f"created {args.cert} and {args.key} (for {', '.join(names)}, {args.days} days)\n"
          f"pin: sha256:{pin}\n"
          "Set TLSCertificate and TLSKey in imgsrvd.conf, and ImagingServerCertificate in "
          "policyd.conf, to use it (docs/security.md).")
    return 0


def cmd_tls_pin(args: argparse.Namespace) -> int:
    try:
        print(f"sha256:{pem_fingerprint(args.cert)}")
    except OSError as exc:
        print(f"{PROGRAM}: {args.cert}: {exc.strerror}", file=sys.stderr)
        return 1
    except PinError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 1
    return 0


def _subject_names(names: list[str]) -> str:
    entries = []
    for name in names:
        try:
            entries.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            entries.append(f"DNS:{name}")
    return ",".join(entries)


def _make_pair(cert: str, key: str, names: list[str], days: int) -> None:
    for path in (cert, key):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    tmp_cert = _temporary_name(cert)
    tmp_key = _temporary_name(key)
    try:
        proc = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", tmp_key, "-out", tmp_cert,
             "-days", str(days), "-subj", f"/CN={names[0][:64]}",
             "-addext", f"subjectAltName={_subject_names(names)}"],
            capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S)
        if proc.returncode != 0:
            raise OSError(f"openssl failed: {proc.stderr.strip().splitlines()[-1:]}")
        os.chmod(tmp_key, 0o600)
        os.chmod(tmp_cert, 0o644)
        os.replace(tmp_key, key)
        os.replace(tmp_cert, cert)
    finally:
        for path in (tmp_cert, tmp_key):
            if os.path.exists(path):
                os.unlink(path)


def _temporary_name(path: str) -> str:
    """An unused name next to path (the key's is created 0600 before openssl writes it)."""
    handle, name = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                    dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    return name


def add_commands(commands: Any) -> None:
    """The `tls` commands, on preboot-dir's subcommand parser."""
    tls = commands.add_parser("tls", help="the services' TLS certificate (create, pin)")
    tls_commands = tls.add_subparsers(dest="tls_command", required=True)
    create = tls_commands.add_parser("create", help="a self-signed certificate and its key")
    create.add_argument("--cert", default=DEFAULT_CERT)
    create.add_argument("--key", default=DEFAULT_KEY)
    create.add_argument("--name", action="append",
                        help="a DNS name or address the clients use (repeatable; default this "
                             "host's name)")
    create.add_argument("--days", type=int, default=DEFAULT_DAYS)
    create.add_argument("--force", action="store_true", help="replace an existing pair")
    create.set_defaults(run=cmd_tls_create)
    pin = tls_commands.add_parser("pin", help="the SHA-256 pin of a certificate")
    pin.add_argument("--cert", default=DEFAULT_CERT)
    pin.set_defaults(run=cmd_tls_pin)
