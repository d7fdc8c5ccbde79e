"""The directory (policy store): one interface, backends chosen by URL. See base.py."""

from __future__ import annotations

from .base import (DEFAULT_TIMEOUT_S, Credentials, Directory, DirectoryChange,
                   DirectoryError, DirectoryURL,
                   WouldBlock, parse_directory_url, read_credentials)

__all__ = ["Credentials", "Directory", "DirectoryChange", "DirectoryError", "DirectoryURL",
           "WouldBlock", "open_directory",
           "parse_directory_url", "read_credentials"]


def open_directory(url: str | DirectoryURL, credentials_file: str = "",
                   timeout_s: float = DEFAULT_TIMEOUT_S, create: bool = False) -> Directory:
    """Open the store a `Directory =` URL names. ValueError for a bad URL or credentials file;
    DirectoryError when the store cannot be opened, a missing SQLite file included: only
    preboot-dir's writing commands pass create=True (the daemons must not invent an empty
    policy from a typo, and answer every machine "no work" from it)."""
    parsed = url if isinstance(url, DirectoryURL) else parse_directory_url(url)
    if parsed.scheme == "sqlite":
        from .sqlite import SqliteDirectory
        return SqliteDirectory(parsed, timeout_s=timeout_s, create=create)
    from .ldap import LdapDirectory
    credentials = read_credentials(credentials_file) if credentials_file else None
    return LdapDirectory(parsed, credentials, timeout_s=timeout_s)
