"""Who may ask the imaging services for what: the trust keys both policyd and imgsrvd read, their
checked settings, and the Gate that decides each request (docs/security.md).

Keys: `TokenKeyFile` (the capability keys, common/policy/keyring.py), `TokenLifetime` (seconds a
capability this daemon issues stays valid), `AllowAnonymous` (the old open behaviour: requests
without a capability are served as before; off by default, a warning when on) and
`AllowedClients` (networks whose hosts may connect at all; empty: any).

The Gate's decisions are pure given the keys and the clock (both passed in by the Gate's owner
through the keyring and `now`), and each refusal says why: HTTP status and a one-line reason
for the answer and the log.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key
from common.errors import SettingError

from .capability import Capability, CapabilityError, bearer, decode, encode, machine_capability
from .keyring import KeyFileError, Keyring, ensure

DEFAULT_KEY_FILE = "/etc/preboot/imaging.key"
log = logging.getLogger("preboot.trust")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trust_keys(lifetime_s: int, what: str, checks: bool = True) -> tuple[Key, ...]:
    """The keys; lifetime_s is this daemon's default TokenLifetime, what says what its
    capabilities allow (each daemon issues different ones); checks: whether the daemon checks
    capabilities (imgsrvd) or only issues them (policyd, which has no AllowAnonymous)."""
    anonymous = (Key("AllowAnonymous", "boolean", "NO",
                     "YES serves requests without a capability as before capabilities existed "
                     "(anyone who reaches the port may store, read and report); logged as a "
                     "warning. Only for a closed lab."),) if checks else ()
    return (
        Key("TokenKeyFile", "path", DEFAULT_KEY_FILE,
            "The keys that sign and check work capabilities (docs/security.md): root-only (mode "
            "0600), shared by policyd and every imaging server; created with a random key when "
            "missing. Rotated with `preboot-dir key rotate`; read again when it changes."),
        Key("TokenLifetime", "integer(min=60, max=604800)", str(lifetime_s),
            f"Seconds a capability this service issues stays valid ({what})."),
        *anonymous,
        Key("AllowedClients", "strings", "",
            "Networks (CIDR, comma separated, e.g. 10.1.0.0/16, 192.168.7.0/24) whose hosts may "
            "connect at all; empty: any host. Others get 403."),
    )


@dataclass(frozen=True)
class TrustSettings:
    key_file: str
    lifetime_s: int
    allow_anonymous: bool
    allowed_clients: tuple[Network, ...]


def trust_settings(values: dict[str, Any]) -> TrustSettings:
    networks = []
    for text in values["AllowedClients"]:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise SettingError("AllowedClients", f"'{text.strip()}' is not a network like "
                                                 "10.1.0.0/16") from None
    return TrustSettings(values["TokenKeyFile"], values["TokenLifetime"],
                         values.get("AllowAnonymous", False), tuple(networks))


def client_allowed(address: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether a client address is inside AllowedClients (empty: every address)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class Refused(Exception):
    """A request the trust settings do not allow: status (401, 403 or 503) and reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Gate:
    """The trust settings and the keyring of one daemon: checks a request's client and
    capability, and issues capabilities. Owned by the daemon; settings swap on reload."""

    def __init__(self, settings: TrustSettings):
        self.settings = settings
        self.keyring = Keyring(settings.key_file)

    def configure(self, settings: TrustSettings) -> None:
        if settings.key_file != self.settings.key_file:
            self.keyring = Keyring(settings.key_file)
        self.settings = settings

    def prepare(self) -> list[str]:
        """At start and reload: create the key file if there is none; the warnings to log."""
        warnings = []
        if self.settings.allow_anonymous:
            warnings.append("AllowAnonymous = YES: requests without a capability are served; "
                            "anyone who reaches this service may use it (docs/security.md)")
        try:
            if ensure(self.settings.key_file):
                log.info("created the capability key file %s", self.settings.key_file)
            self.keyring.keys()
        except (OSError, KeyFileError) as exc:
            warnings.append(f"capability keys: {exc}; capabilities can be neither issued nor "
                            "checked")
        return warnings

    def check_client(self, address: str | None) -> None:
        if not client_allowed(address, self.settings.allowed_clients):
            raise Refused(403, f"{address} is not in AllowedClients")

    def authorize(self, authorization: str | None, operation: str, now: float,
                  image: str | None = None, mac: str | None = None) -> Capability | None:
        """The capability that allows operation (on image, for machine mac), or None when
        AllowAnonymous is on (whatever the request carries); Refused otherwise."""
        if self.settings.allow_anonymous:
            return None            # the open mode: anything goes, a capability or not
        token = bearer(authorization)
        if token is None:
            raise Refused(401, f"'{operation}' needs a capability (Authorization: Bearer ...): "
                               "PXE-booted machines get one with their work, operators from "
                               "`preboot-dir token`")
        try:
            capability = decode(token, self._keys().accepted, now)
        except CapabilityError as exc:
            raise Refused(401, f"capability refused: {exc}") from None
        why = capability.refusal(operation, image, mac)
        if why:
            raise Refused(403, f"capability refused: {why}")
        return capability

    def issue(self, mac: str, operations: tuple[str, ...], images: tuple[str, ...],
              now: float) -> str | None:
        """A capability for a machine's work, signed with the current key; None (logged) when
        the keys cannot be read, so the machine is told to boot without one."""
        try:
            key_id, secret = self._keys().signing
        except Refused as exc:
            log.warning("cannot issue a capability for %s: %s", mac, exc.reason)
            return None
        return encode(machine_capability(mac, operations, images, now,
                                         self.settings.lifetime_s), key_id, secret)

    def _keys(self):
        try:
            return self.keyring.keys()
        except KeyFileError as exc:
            raise Refused(503, f"this server cannot check capabilities ({exc})") from None
