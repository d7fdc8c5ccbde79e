"""Exit codes and the exceptions that carry a one-line message to the administrator."""

from __future__ import annotations

# sysexits.h values that the init scripts and systemd units rely on.
EX_OK = 0
EX_FAILURE = 1
EX_SOFTWARE = 70
EX_CONFIG = 78


class PrebootError(Exception):
    """An error whose str() is a complete one-line message for the administrator."""


class ConfigError(PrebootError):
    """A config file is missing, unreadable, malformed, or holds a bad key or value.

    Rendered as ``FILE:LINE: KEY: message`` (line and key omitted when unknown), which is the
    one-line form DESIGN.md promises for every daemon.
    """

    def __init__(self, path: str, message: str, line: int | None = None, key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f"{self.key}: {self.message}" if self.key else self.message
        return f"{where}: {what}"


class SettingError(PrebootError):
    """A value that passed the syntax check but cannot work (a missing folder, say).

    Raised by a daemon's make_settings, which does not know the file; the runner turns it into a
    ConfigError naming the file and the key's line.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class AlreadyRunning(PrebootError):
    """The pidfile is locked by a live instance."""
