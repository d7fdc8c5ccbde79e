"""The directory's config keys and their checked settings, shared by every daemon that reads
the directory (prebootpolicyd, imgsrvd): `Directory`, `DirectoryCredentials`,
`DirectoryTimeout` (docs/directory.md). One place says what the keys mean and how they are
checked, so the daemons cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key
from common.errors import SettingError

from .base import Directory, DirectoryURL, parse_directory_url, read_credentials

DEFAULT_URL = "sqlite:///var/lib/preboot/directory.db"


def directory_keys(when_slow: str) -> tuple[Key, ...]:
    """The three keys; `when_slow` ends DirectoryTimeout's description with what this daemon
    does when a query is slower than that (each daemon answers differently)."""
    return (
        # "strings": the commas of an LDAP base DN need no quotes; directory_settings joins them.
        Key("Directory", "strings", DEFAULT_URL,
            "Where policy and workstation records live: sqlite:///path (embedded; "
            "preboot-dir creates it, a missing file is a directory error), ldap://host[:port]/base-dn or ldaps://... (no quotes needed)."),
        Key("DirectoryCredentials", "path", "",
            "LDAP only: file of 'BindDN = ...' and 'Password = ...' lines, readable by its "
            "owner only (mode 0600); empty binds anonymously."),
        Key("DirectoryTimeout", "integer(min=1, max=60)", "3",
            f"Seconds a directory query may take; {when_slow}"),
    )


@dataclass(frozen=True)
class DirectorySettings:
    """Which directory to open and how. Equal settings mean the open directory can stay open
    across a reload; any difference means reopening it."""

    url: DirectoryURL
    credentials: str                 # path of the credentials file, "" for none
    timeout_s: float

    @property
    def text(self) -> str:
        """The URL for messages and logs, without any secret."""
        return self.url.redacted()

    def open(self) -> Directory:
        """The daemons' way in: never creates a SQLite file (preboot-dir does)."""
        from . import open_directory        # the package imports this module
        return open_directory(self.url, self.credentials, timeout_s=self.timeout_s)


def directory_settings(values: dict[str, Any]) -> DirectorySettings:
    """Check the three keys' values (as configobj validated them); SettingError names the key."""
    try:
        url = parse_directory_url(",".join(values["Directory"]))
    except ValueError as exc:
        raise SettingError("Directory", str(exc)) from None
    credentials = values["DirectoryCredentials"]
    if credentials:
        if url.scheme == "sqlite":
            raise SettingError("DirectoryCredentials", "only LDAP directories take credentials")
        try:
            read_credentials(credentials)
        except ValueError as exc:
            raise SettingError("DirectoryCredentials", str(exc)) from None
    return DirectorySettings(url, credentials, float(values["DirectoryTimeout"]))
