"""TLS on an HTTP daemon (prebootpolicyd, imgsrvd): the TLSCertificate and TLSKey keys, their
checked settings, and the server-side SSL context built from them (docs/security.md).

Both keys empty: the daemon speaks plain HTTP, as before. Both set: only TLS (1.2 or later) on
the daemon's port. A reload (SIGHUP) loads a replaced certificate and key into the same context,
so new connections get the new certificate without a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key
from common.errors import SettingError
from common.tlspin import PinError, pem_fingerprint

HANDSHAKE_TIMEOUT_S = 15.0     # a client that connects and never finishes the handshake


def tls_keys(who: str) -> tuple[Key, ...]:
    """The keys; who says which clients speak TLS to this daemon."""
    return (
        Key("TLSCertificate", "path", "",
            f"PEM certificate (its chain after it) this service presents; with TLSKey, the "
            f"port speaks only TLS ({who}). Empty: plain HTTP. `preboot-dir tls create` makes "
            f"a self-signed one. Reloaded with the service."),
        Key("TLSKey", "path", "",
            "PEM private key of TLSCertificate (readable by the service only, mode 0600)."),
    )


@dataclass(frozen=True)
class TlsSettings:
    certificate: str
    key: str
    pin: str           # the certificate's SHA-256 fingerprint, for the log and the clients


def tls_settings(values: dict[str, Any]) -> TlsSettings | None:
    """None for plain HTTP; the checked settings when both keys are set and the pair loads."""
    certificate, key = values["TLSCertificate"], values["TLSKey"]
    if not certificate and not key:
        return None
    if not certificate:
        raise SettingError("TLSCertificate", "must be set when TLSKey is")
    if not key:
        raise SettingError("TLSKey", "must be set when TLSCertificate is")
    try:
        pin = pem_fingerprint(certificate)
    except OSError as exc:
        raise SettingError("TLSCertificate", f"{certificate}: {exc.strerror}") from None
    except PinError as exc:
        raise SettingError("TLSCertificate", str(exc)) from None
    settings = TlsSettings(certificate, key, pin)
    load_chain(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), settings)
    return settings


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(context, settings)
    return context


def load_chain(context: ssl.SSLContext, settings: TlsSettings) -> None:
    """Load the pair into context (new connections use it); SettingError naming the key."""
    try:
        context.load_cert_chain(settings.certificate, settings.key)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise SettingError("TLSKey", f"{settings.key} does not load with "
                                         f"{settings.certificate}: {exc.reason or exc}") from None
        raise SettingError("TLSKey", f"{settings.key}: {exc.strerror}") from None


def reload_tls(context: ssl.SSLContext | None, old: TlsSettings | None,
               new: TlsSettings | None) -> list[str]:
    """At a reload: the new pair loaded into the serving context (new connections get it);
    the warnings. Switching between plain HTTP and TLS needs a restart."""
    if (old is None) != (new is None) or (context is None) != (new is None):
        return ["turning TLS on or off needs a restart; kept "
                + ("plain HTTP" if context is None else "TLS")]
    if context is None or new is None:
        return []
    try:
        load_chain(context, new)
    except SettingError as exc:        # the files changed again since they were checked
        return [f"{exc}; kept the certificate in use"]
    return []
