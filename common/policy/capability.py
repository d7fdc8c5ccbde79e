"""Work capabilities: a short-lived, signed statement of what one machine (or one operator) may do
on the imaging servers, the token `img` presents (docs/security.md).

When the policy assigns imaging work, policyd puts a capability on the imaging environment's
kernel line that allows the machine (by MAC) to ask the imaging server for its work; the imaging
server's work answer carries a capability for exactly that work: retrieve the image and its
add-ons (restore) or store the image (make), and report the result. An operator's capability
(made with `preboot-dir token`) names operator:NAME, the operations it allows and image path
patterns. Nothing else is trusted: a request without one is refused unless the server runs in
the explicitly open mode.

Wire form, one word (safe on a kernel command line and in an HTTP header):

    pbcap1.<key id>.<payload: base64url of compact JSON>.<HMAC-SHA256 of the first three parts>

The payload: {"s": subject, "o": [operations], "i": [image paths or patterns], "t": issued at,
"e": expires at} (Unix seconds). The key id names which key of the keyring signed it, so keys
rotate without restarting anything. This module is pure (no files, no clock: `now` is passed).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Mapping

PREFIX = "pbcap1"
MAX_TOKEN_BYTES = 4096
MAX_IMAGES = 64
OPERATIONS = ("work", "retrieve", "store", "result")
OPERATOR_PREFIX = "operator:"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MAC = re.compile(r"^[0-9A-F]{12}$")


class CapabilityError(ValueError):
    """A token that cannot be trusted or does not allow the request; str() says why, in one line
    fit for an HTTP answer and a log."""


@dataclass(frozen=True)
class Capability:
    """subject: a MAC (12 upper-case hex digits, as common.machine.normalize_mac writes it) or
    operator:NAME. images: exact image paths for a machine, fnmatch patterns for an operator.
    Times are Unix seconds."""

    subject: str
    operations: frozenset[str]
    images: tuple[str, ...]
    issued_at: int
    expires_at: int

    @property
    def is_operator(self) -> bool:
        return self.subject.startswith(OPERATOR_PREFIX)

    def refusal(self, operation: str, image: str | None = None, mac: str | None = None) -> str:
        """Why this capability does not allow `operation` (on image, for the machine mac); ""
        when it does. An operator is not bound to a machine."""
        if operation not in self.operations:
            return f"the token does not allow '{operation}' (it allows " \
                   f"{', '.join(sorted(self.operations)) or 'nothing'})"
        if mac is not None and not self.is_operator and mac != self.subject:
            return f"the token was issued to machine {self.subject}, not {mac}"
        if image is not None and not self._names(image):
            return f"the token does not name the image {image}"
        return ""

    def _names(self, image: str) -> bool:
        if self.is_operator:
            return any(fnmatch.fnmatchcase(image, pattern) for pattern in self.images)
        return image in self.images


def machine_capability(mac: str, operations: tuple[str, ...], images: tuple[str, ...],
                       now: float, lifetime_s: float) -> Capability:
    """A capability for one machine's work, from now on for lifetime_s seconds."""
    return Capability(mac, frozenset(operations), tuple(images), int(now), int(now + lifetime_s))


def encode(capability: Capability, key_id: str, secret: bytes) -> str:
    """The token for capability, signed with the key (key_id, secret)."""
    _check(capability)
    if not _KEY_ID.match(key_id):
        raise CapabilityError(f"key id {key_id!r} is not 1-32 letters, digits, - or _")
    payload = {"s": capability.subject, "o": sorted(capability.operations),
               "i": list(capability.images), "t": capability.issued_at,
               "e": capability.expires_at}
    body = f"{PREFIX}.{key_id}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
    token = f"{body}.{_b64(_sign(secret, body))}"
    if len(token) > MAX_TOKEN_BYTES:
        raise CapabilityError(f"the token would be {len(token)} bytes, more than "
                              f"{MAX_TOKEN_BYTES}")
    return token


def decode(token: str, keys: Mapping[str, bytes], now: float) -> Capability:
    """The capability a token carries, if its signature is one of keys' and it has not expired;
    CapabilityError (one line) for anything else. Checks the signature before reading the
    payload, so nothing an attacker wrote is parsed unless a key holder signed it."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise CapabilityError("the token is not a string of at most "
                              f"{MAX_TOKEN_BYTES} bytes")
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise CapabilityError(f"not a {PREFIX} token")
    _prefix, key_id, payload, signature = parts
    secret = keys.get(key_id)
    if secret is None:
        raise CapabilityError(f"the token was signed with key '{key_id[:32]}', which this "
                              "server does not hold (another site, or a key rotated out)")
    if not hmac.compare_digest(_unb64(signature), _sign(secret, f"{PREFIX}.{key_id}.{payload}")):
        raise CapabilityError("the token's signature does not match (forged or altered)")
    capability = _from_payload(_unb64(payload))
    if now >= capability.expires_at:
        raise CapabilityError(f"the token expired {int(now - capability.expires_at)} s ago")
    if now + 300 < capability.issued_at:            # clocks a few minutes apart are normal
        raise CapabilityError("the token was issued in the future (check the clocks)")
    return capability


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (RFC 6750 section 2.1), or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _from_payload(raw: bytes) -> Capability:
    try:
        data = json.loads(raw.decode("utf-8"))
        capability = Capability(str(data["s"]), frozenset(str(o) for o in data["o"]),
                                tuple(str(i) for i in data["i"]), int(data["t"]),
                                int(data["e"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CapabilityError("the token's payload is not readable") from None
    _check(capability)
    return capability


def _check(capability: Capability) -> None:
    unknown = capability.operations - set(OPERATIONS)
    if unknown:
        raise CapabilityError(f"unknown operation(s) {', '.join(sorted(unknown))}")
    if not (_MAC.match(capability.subject) or (capability.is_operator
                                                and len(capability.subject) > 9)):
        raise CapabilityError(f"subject {capability.subject[:40]!r} is neither a MAC nor "
                              "operator:NAME")
    if len(capability.images) > MAX_IMAGES:
        raise CapabilityError(f"more than {MAX_IMAGES} images")
    if capability.expires_at <= capability.issued_at:
        raise CapabilityError("the token expires before it was issued")


def _sign(secret: bytes, body: str) -> bytes:
    return hmac.new(secret, body.encode("ascii", "replace"), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise CapabilityError("the token is not base64url") from None
