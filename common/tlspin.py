"""Certificate pins: the SHA-256 fingerprint of a server's certificate (its DER bytes), the one
form a pin takes wherever it travels (policyd's kernel line `preboot.serverpin=`, img's
`--server-pin`, docs/security.md). Standard library only; no sockets.

A pin names one certificate, not a name or a CA: the imaging environment, told the pin by the
policy service that booted it, accepts only that certificate, with no CA store to trust and no
clock to check validity against (a VM's or a PC's clock is often wrong at boot).
"""

from __future__ import annotations

import base64
import hashlib
import re

PIN_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PinError(ValueError):
    """A pin that is not a SHA-256 fingerprint, or a certificate file without a certificate."""


def fingerprint(der: bytes) -> str:
    """The pin of a certificate given as DER bytes: 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def parse_pin(text: str) -> str:
    """A pin as written by a person or a program: `sha256:` optional, hex in either case,
    colons optional (openssl x509 -fingerprint -sha256 prints AB:CD:...). Raises PinError."""
    value = text.strip().lower()
    if value.startswith(PIN_PREFIX):
        value = value[len(PIN_PREFIX):]
    value = value.replace(":", "")
    if not _HEX64.fullmatch(value):
        raise PinError(f"'{text.strip()[:80]}' is not a SHA-256 certificate fingerprint "
                       "(64 hex digits, as `openssl x509 -noout -fingerprint -sha256` prints)")
    return value


def pem_fingerprint(path: str) -> str:
    """The pin of the first certificate in the PEM file at path. Raises OSError or PinError."""
    with open(path, encoding="ascii", errors="replace") as handle:
        text = handle.read(1 << 20)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise PinError(f"{path} holds no PEM certificate")
    body = "".join(text[start + len(begin):stop].split())
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        der = b""
    if not _one_der_sequence(der):
        raise PinError(f"{path}: the certificate is not valid PEM (not base64 of one DER "
                       "sequence)")
    return fingerprint(der)


def _one_der_sequence(der: bytes) -> bool:
    """Whether der is exactly one DER SEQUENCE (X.690 section 8.1: tag 0x30, then a short or
    long-form length that covers the rest): a certificate's outer shape."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    first = der[1]
    if first < 0x80:
        return 2 + first == len(der)
    count = first & 0x7F
    if count == 0 or count > 4 or len(der) < 2 + count:
        return False
    return 2 + count + int.from_bytes(der[2:2 + count], "big") == len(der)
