"""The key file the imaging services sign and check work capabilities with (TokenKeyFile).

One key a line, `KEY-ID HEX-SECRET` (at least 32 bytes), `#` comments; the first key signs, every
key listed is accepted. Rotating (`preboot-dir key rotate`) puts a new key first and keeps the
previous one, so tokens already handed out stay valid until they expire; the daemons notice the
new file by itself (its size, inode or modification time), no restart or reload needed.

The file is a secret: it must belong to root (or the daemon's user) and be readable by nobody
else (mode 0600), or it is refused. ensure() creates one (a random key, mode 0600, written
atomically) when there is none, so a fresh install works out of the box: policyd and imgsrvd on
one machine read the same file; other imaging servers that take referrals get a copy.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass

from common.fileio import publish, temporary_name

MIN_SECRET_BYTES = 32
MAX_KEYS = 8
RECHECK_S = 1.0
_LINE = re.compile(r"^([A-Za-z0-9_-]{1,32})\s+([0-9a-fA-F]+)$")


class KeyFileError(Exception):
    """A key file that is missing, unsafe or malformed; str() names the file and the reason."""


@dataclass(frozen=True)
class Keys:
    """The keys of one version of the file: signing is the first; accepted, all by id."""

    signing_id: str
    accepted: dict[str, bytes]

    @property
    def signing(self) -> tuple[str, bytes]:
        return self.signing_id, self.accepted[self.signing_id]


def parse_keys(text: str, where: str) -> Keys:
    """The keys of a key file's text (pure); KeyFileError naming where and the line."""
    accepted: dict[str, bytes] = {}
    first = ""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match or len(match.group(2)) % 2:
            raise KeyFileError(f"{where}:{number}: expected 'KEY-ID HEX-SECRET'")
        key_id, secret = match.group(1), bytes.fromhex(match.group(2))
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(f"{where}:{number}: key '{key_id}' is shorter than "
                               f"{MIN_SECRET_BYTES} bytes")
        if key_id in accepted:
            raise KeyFileError(f"{where}:{number}: key '{key_id}' is listed twice")
        accepted[key_id] = secret
        first = first or key_id
        if len(accepted) > MAX_KEYS:
            raise KeyFileError(f"{where}: more than {MAX_KEYS} keys")
    if not first:
        raise KeyFileError(f"{where}: no key in it")
    return Keys(first, accepted)


def new_key_line(now: float | None = None) -> str:
    """A fresh key: its id tells when it was made (kYYYYmmddHHMMSS), its secret is random."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return f"k{stamp}-{secrets.token_hex(2)} {secrets.token_hex(MIN_SECRET_BYTES)}\n"


def read_keys(path: str) -> Keys:
    """The keys of the file at path, after checking it is safe to trust."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(f"{path}: readable or writable by others (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        if info.st_uid not in (0, os.geteuid()):
            raise KeyFileError(f"{path}: belongs to uid {info.st_uid}, not root")
        text = os.read(fd, 64 * 1024).decode("ascii", "replace")
    finally:
        os.close(fd)
    return parse_keys(text, path)


def write_keys(path: str, lines: list[str], replace: bool) -> None:
    """Write key lines to path atomically with mode 0600 (replace=False: never over a file that
    exists: FileExistsError, so two daemons starting at once agree on one key)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, 0o755, exist_ok=True)
    temporary = temporary_name(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write("# Preboot imaging capability keys: the first signs, all are accepted.\n")
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        publish(temporary, path, replace=replace)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def ensure(path: str) -> bool:
    """Create the key file with one new key if there is none; True when it was created."""
    if os.path.lexists(path):
        return False
    try:
        write_keys(path, [new_key_line()], replace=False)
    except FileExistsError:
        return False                      # another daemon made it first: use theirs
    return True


def rotate(path: str, keep: int = 1) -> str:
    """Put a new signing key first, keeping the `keep` newest of the old ones; its id."""
    old = read_keys(path)
    fresh = new_key_line()
    kept = [f"{key_id} {secret.hex()}\n" for key_id, secret in
            list(old.accepted.items())[:max(0, min(keep, MAX_KEYS - 1))]]
    write_keys(path, [fresh] + kept, replace=True)
    return fresh.split()[0]


class Keyring:
    """The key file as the daemons hold it: read once, read again when it changes (checked at
    most every RECHECK_S seconds), the last good version kept if a new one is unreadable."""

    def __init__(self, path: str):
        self.path = path
        self._keys: Keys | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.last_error = ""

    def keys(self) -> Keys:
        """The current keys; KeyFileError when the file never could be read."""
        now = time.monotonic()
        with self._lock:
            if self._keys is None or now - self._checked >= RECHECK_S:
                self._checked = now
                self._refresh()
            if self._keys is None:
                raise KeyFileError(self.last_error or f"{self.path}: not read yet")
            return self._keys

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror}"
            return
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if stamp == self._stamp and self._keys is not None:
            return
        try:
            self._keys = read_keys(self.path)
            self._stamp = stamp
            self.last_error = ""
        except KeyFileError as exc:
            self.last_error = str(exc)
