"""What img presents to an imaging server and what it demands of one (docs/security.md): the
capability it shows (a token) and how it trusts the server (TLS with a pinned certificate or a
CA file, or plain HTTP). One ServerAccess per run, handed to every ImagingClient it opens.

Where they come from: --token, --token-file or $PREBOOT_TOKEN; --server-pin or
$PREBOOT_SERVER_PIN (the imaging environment's, from the kernel line's preboot.serverpin), or
--server-ca FILE. A work answer's capability replaces the one the run started with
(with_token); the TLS trust stays.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass, replace

from common.tlspin import PinError, parse_pin

from .errors import Failure


@dataclass(frozen=True)
class TlsTrust:
    """TLS to the server, trusting exactly the certificate whose SHA-256 is `pin`, or any
    certificate a CA in `ca_file` signed for the server's name."""

    pin: str | None = None
    ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        if self.pin:
            # The pin is the whole check (common/tlspin.py): no CA, no name, no clock.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def describe(self) -> str:
        return f"certificate sha256:{self.pin}" if self.pin else f"CA file {self.ca_file}"


@dataclass(frozen=True)
class ServerAccess:
    token: str | None = None
    tls: TlsTrust | None = None

    def with_token(self, token: str | None) -> "ServerAccess":
        """The same trust, presenting token (a work answer's capability) when there is one."""
        return replace(self, token=token) if token else self


NO_ACCESS = ServerAccess()     # no capability, plain HTTP


def access_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that make a run's ServerAccess."""
    parser.add_argument("--token", help="a capability (an operator's, from `preboot-dir token`); "
                                        "default: --token-file, else $PREBOOT_TOKEN")
    parser.add_argument("--token-file", metavar="FILE",
                        help="a file whose first line is the capability")
    parser.add_argument("--server-pin", metavar="SHA256",
                        help="talk TLS and accept only the server certificate with this SHA-256 "
                             "fingerprint (default: $PREBOOT_SERVER_PIN)")
    parser.add_argument("--server-ca", metavar="FILE",
                        help="talk TLS and accept a server certificate that a CA in FILE signed "
                             "for the server's name")


def server_access(args: argparse.Namespace) -> ServerAccess:
    """The run's ServerAccess from its options and environment; Failure when an option
    cannot be used (an unreadable token file, a malformed pin, both a pin and a CA)."""
    return ServerAccess(_token(args), _tls(args))


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token", None):
        return args.token.strip()
    token_file = getattr(args, "token_file", None)
    if token_file:
        try:
            with open(token_file, encoding="ascii", errors="replace") as handle:
                return handle.readline(8192).strip() or None
        except OSError as exc:
            raise Failure(f"--token-file {token_file}: {exc.strerror}") from None
    return os.environ.get("PREBOOT_TOKEN", "").strip() or None


def _tls(args: argparse.Namespace) -> TlsTrust | None:
    pin_text = getattr(args, "server_pin", None) or os.environ.get("PREBOOT_SERVER_PIN", "")
    ca_file = getattr(args, "server_ca", None)
    if pin_text.strip() and ca_file:
        raise Failure("give --server-pin or --server-ca, not both")
    if ca_file:
        if not os.access(ca_file, os.R_OK):
            raise Failure(f"--server-ca {ca_file}: cannot read it")
        return TlsTrust(ca_file=ca_file)
    if not pin_text.strip():
        return None
    try:
        return TlsTrust(pin=parse_pin(pin_text))
    except PinError as exc:
        raise Failure(f"--server-pin: {exc}") from None
