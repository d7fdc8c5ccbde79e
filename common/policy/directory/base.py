"""The directory interface: where policy, workstation records and multicast sessions live.

Two backends implement it, chosen by URL (open_directory in __init__.py): SQLite (the embedded
default) and LDAP v3 (OpenLDAP, eDirectory). Every method may raise DirectoryError when the store
cannot be reached or holds something unusable; callers turn that into their fallback answer.

Both backends are safe to call from several threads at once (prebootpolicyd runs queries on a
small pool so that a slow directory never blocks its event loop).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

from collections.abc import Iterable

from common.policy.identitypolicy import Assignment
from common.policy.model import ImagingPolicy, MulticastSession, PolicyDocument, Workstation

DEFAULT_TIMEOUT_S = 3.0


class DirectoryError(Exception):
    """The directory is unreachable, refused us, or holds data we cannot use."""


@dataclass(frozen=True)
class DirectoryChange:
    """Several writes made as one (Directory.apply): None and () leave that part alone."""

    policy: ImagingPolicy | None = None                  # all rules and the menu settings
    put_workstations: tuple[Workstation, ...] = ()       # registered or replaced, by MAC
    delete_workstations: tuple[str, ...] = ()            # normalised MACs
    sessions: tuple[MulticastSession, ...] | None = None  # all multicast sessions, in order

    def empty(self) -> bool:
        return (self.policy is None and not self.put_workstations
                and not self.delete_workstations and self.sessions is None)


class WouldBlock(Exception):
    """lookup_nowait() or lookup_async() cannot answer that way (a lock, a connection not made
    yet, a policy reload, an error best reported by the blocking methods): ask again through
    the blocking methods, on a worker thread."""


@dataclass(frozen=True)
class DirectoryURL:
    scheme: str            # sqlite, ldap or ldaps
    path: str = ""         # sqlite: the database file
    host: str = ""         # ldap: host[:port] as written
    base_dn: str = ""      # ldap: the entry under which our objects live

    def redacted(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite://{self.path}"
        return f"{self.scheme}://{self.host}/{self.base_dn}"


def parse_directory_url(text: str) -> DirectoryURL:
    """'sqlite:///var/lib/preboot/directory.db', 'ldap://host[:port]/dc=example,dc=com' or
    'ldaps://...'. Raises ValueError with a one-line reason."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = unquote(parts.netloc + parts.path)
        if not path.startswith("/"):
            raise ValueError(f"'{text}': the SQLite path must be absolute (sqlite:///var/lib/...)")
        if path.endswith("/"):
            raise ValueError(f"'{text}': names a folder, not a database file")
        return DirectoryURL("sqlite", path=os.path.normpath(path))
    if scheme in ("ldap", "ldaps"):
        if not parts.netloc:
            raise ValueError(f"'{text}': no LDAP host (ldap://host/dc=example,dc=com)")
        base_dn = unquote(parts.path.lstrip("/"))
        if "=" not in base_dn:
            raise ValueError(f"'{text}': no base DN after the host (ldap://host/dc=example,dc=com)")
        return DirectoryURL(scheme, host=parts.netloc, base_dn=base_dn)
    raise ValueError(f"'{text}': unknown directory scheme (use sqlite:///path, ldap:// or ldaps://)")


@dataclass(frozen=True)
class Credentials:
    bind_dn: str
    password: str


def read_credentials(path: str) -> Credentials:
    """A root-only file of `BindDN = ...` and `Password = ...` lines. Refused (ValueError) when
    group or others may read it: a directory password must not leak to every local user."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the credentials file: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: credentials file is readable by others "
                         f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("BindDN", "Password"):
            raise ValueError(f"{path}:{number}: expected 'BindDN = ...' or 'Password = ...'")
        values[key.strip()] = value.strip()
    if "BindDN" not in values or "Password" not in values:
        raise ValueError(f"{path}: needs both BindDN and Password")
    return Credentials(values["BindDN"], values["Password"])


class PolicyCache:
    """The parsed policy, re-read only when the store's change marker moves.

    Parsing 1,000 rules on every query would cost milliseconds; reading a marker costs one
    cheap lookup, and a change made by another program still shows on the very next query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marker: object = None
        self._policy: ImagingPolicy | None = None

    def get(self, marker: object, load: Callable[[], ImagingPolicy]) -> ImagingPolicy:
        with self._lock:
            if self._policy is not None and marker == self._marker:
                return self._policy
        policy = load()
        policy.prepare()   # compile the rules here, on the caller's (worker) thread
        with self._lock:
            self._marker, self._policy = marker, policy
        return policy

    def current(self, marker: object) -> ImagingPolicy | None:
        """The cached policy if it is still current for `marker`, else None (no loading)."""
        with self._lock:
            if self._policy is not None and marker == self._marker:
                return self._policy
        return None

    def clear(self) -> None:
        with self._lock:
            self._marker, self._policy = None, None


class Directory(ABC):
    """One store. Writes are whole-record: callers read, change a frozen value, write back."""

    url: DirectoryURL

    @abstractmethod
    def policy(self) -> ImagingPolicy:
        """The ordered rules and the menu settings, current as of this call."""

    @abstractmethod
    def replace_policy(self, policy: ImagingPolicy) -> None:
        """Replace all rules and the menu settings in one step."""

    @abstractmethod
    def workstation(self, mac: str) -> Workstation | None:
        """The registered workstation with this (normalised) MAC, or None."""

    @abstractmethod
    def workstations(self) -> list[Workstation]:
        """All registered workstations, ordered by MAC."""

    @abstractmethod
    def put_workstation(self, station: Workstation) -> None:
        """Register a workstation or replace its record."""

    @abstractmethod
    def delete_workstation(self, mac: str) -> bool:
        """Remove a record; False when there was none."""

    @abstractmethod
    def sessions(self) -> list[MulticastSession]:
        """Multicast sessions in their order."""

    @abstractmethod
    def replace_sessions(self, sessions: list[MulticastSession]) -> None:
        """Replace all multicast sessions."""

    # The assignment log (docs/identity.md): each value of a pool goes to one MAC, once.

    @abstractmethod
    def assign(self, pool: str, kind: str, mac: str, candidates: Iterable[str],
               now_s: float) -> Assignment | None:
        """The value of `pool` (an identity policy's name) and `kind` (an address or a counter
        value) that `mac` holds, else the first of `candidates` no MAC holds, recorded for
        `mac` at `now_s`; None when every candidate is held (the pool is dry). Atomic: two
        callers at once, in any processes, never get one value."""

    @abstractmethod
    def assignments(self, pool: str | None = None) -> list[Assignment]:
        """The assignment log (of one pool), by pool, kind and value."""

    @abstractmethod
    def release(self, pool: str, mac: str = "", value: str = "") -> list[Assignment]:
        """Remove the assignments of `pool` held by `mac` or of `value`; those removed."""

    def assignment_of(self, pool: str, kind: str, mac: str) -> Assignment | None:
        """The value `mac` holds in `pool`, without handing out anything."""
        for item in self.assignments(pool):
            if item.kind == kind and item.mac == mac:
                return item
        return None

    @abstractmethod
    def close(self) -> None:
        """Close every connection; the object is unusable afterwards."""

    def lookup_nowait(self, mac: str) -> tuple[ImagingPolicy, Workstation | None]:
        """policy() and workstation(mac) at once, only if that needs no waiting at all (a
        local store whose cached policy is current); else WouldBlock. prebootpolicyd calls
        this on its event loop, sparing the thread hop that otherwise dominates a query."""
        raise WouldBlock

    async def lookup_async(self, mac: str, timeout_s: float
                           ) -> tuple[ImagingPolicy, Workstation | None]:
        """policy() and workstation(mac) at once, waited for on the running event loop rather
        than on a thread (a network store), only while the cached policy is current; else
        WouldBlock. Never blocks the loop; an answer later than timeout_s is DirectoryError.
        The store's change marker is read after the call is made, as policy() reads it."""
        raise WouldBlock

    def clear_next_boot(self, mac: str) -> bool:
        """Clear the image-on-next-boot flag (imgsrvd, after a successful restore). False when
        the workstation is unknown or was not flagged."""
        station = self.workstation(mac)
        if station is None or not station.image_on_next_boot:
            return False
        self.put_workstation(dataclasses.replace(station, image_on_next_boot=False))
        return True

    def export_document(self) -> PolicyDocument:
        return PolicyDocument(self.policy(), tuple(self.workstations()), tuple(self.sessions()))

    def import_document(self, document: PolicyDocument) -> None:
        """Make the store hold exactly this document."""
        wanted = {station.mac for station in document.workstations}
        self.apply(DirectoryChange(
            document.policy, tuple(document.workstations),
            tuple(station.mac for station in self.workstations() if station.mac not in wanted),
            tuple(document.sessions)))

    def apply(self, change: DirectoryChange) -> None:
        """Make every write of `change`. SQLite makes them in one transaction (all or none);
        this default, which LDAP uses (no multi-entry transactions), makes them in turn:
        the policy, the deleted and the put workstations, the sessions. Callers check every
        value first, so only the store itself failing half-way can leave part of it."""
        if change.policy is not None:
            self.replace_policy(change.policy)
        for mac in change.delete_workstations:
            self.delete_workstation(mac)
        for station in change.put_workstations:
            self.put_workstation(station)
        if change.sessions is not None:
            self.replace_sessions(list(change.sessions))

    def __enter__(self) -> "Directory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
