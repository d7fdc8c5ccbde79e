"""Root confinement: map a requested TFTP file name to a path inside the root, or refuse.

Rules (DESIGN.md "Nothing escapes its root"):
- `\\` is a separator (some PXE ROMs send DOS paths) and is mapped to `/`.
- A leading `/` means "from the root" (what tftp-hpa's secure mode does); a request that spells
  out the root itself (`/srv/tftp/pxelinux.0`) is accepted as the same file.
- `..` components, NUL or control characters, and anything that, after resolving symlinks, lies
  outside the root are refused with an access violation, and counted as a refused path.
- Case-insensitive lookup, when enabled, is tried only when the exact name does not exist.

`open_for_read` opens with O_NOFOLLOW on the final component and re-checks the opened file's
real path through /proc/self/fd, so a symlink swapped in after the check still cannot escape.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import packet


@dataclass(frozen=True)
class Refusal:
    code: int          # TFTP error code to send
    message: str       # sent to the client and logged
    escape: bool       # an attempt to leave the root (counted as refused path)


def _refuse_escape(why: str) -> Refusal:
    return Refusal(packet.ERR_ACCESS, f"Access violation: {why}", True)


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def normalise(root: str, filename: str) -> str | Refusal:
    """The root-relative, '/'-separated path the client asked for, before touching the disk.

    `root` is the configured root; it is recognised at the start of an absolute name both as
    configured and with symlinks resolved."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in filename):
        return _refuse_escape("control character in file name")
    name = filename.replace("\\", "/")
    if name.startswith("/"):
        for spelling in {os.path.abspath(root), os.path.realpath(root)}:
            prefix = spelling.rstrip("/") + "/"
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        name = name.lstrip("/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return _refuse_escape("'..' in file name")
    if not parts:
        return Refusal(packet.ERR_NOT_FOUND, "File not found", False)
    return "/".join(parts)


def _case_insensitive(root: str, relative: str) -> str | None:
    """Find an existing path whose components match `relative` ignoring case."""
    current = root
    for part in relative.split("/"):
        candidate = os.path.join(current, part)
        if os.path.lexists(candidate):
            current = candidate
            continue
        try:
            entries = os.listdir(current)
        except OSError:
            return None
        matches = [e for e in entries if e.lower() == part.lower()]
        if not matches:
            return None
        current = os.path.join(current, sorted(matches)[0])
    return current


def resolve_read(root: str, filename: str, case_insensitive: bool) -> str | Refusal:
    """The real path of an existing regular file inside `root`, or why not."""
    real_root = os.path.realpath(root)
    relative = normalise(root, filename)
    if isinstance(relative, Refusal):
        return relative
    candidate = os.path.join(real_root, relative)
    if case_insensitive and not os.path.lexists(candidate):
        candidate = _case_insensitive(real_root, relative) or candidate
    real = os.path.realpath(candidate)
    if not _within(real_root, real):
        return _refuse_escape("path leads outside the TFTP root")
    if not os.path.exists(real):
        return Refusal(packet.ERR_NOT_FOUND, "File not found", False)
    if not os.path.isfile(real):
        return Refusal(packet.ERR_ACCESS, "Access violation: not a regular file", False)
    return real


def open_for_read(root: str, real_path: str) -> int | Refusal:
    """Open a path from resolve_read and prove, on the open descriptor, that it is inside root."""
    try:
        fd = os.open(real_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return Refusal(packet.ERR_NOT_FOUND, "File not found", False)
    except PermissionError:
        return Refusal(packet.ERR_ACCESS, "Access violation: permission denied", False)
    except OSError as exc:  # ELOOP: the last component became a symlink
        return _refuse_escape(f"cannot open ({exc.strerror})")
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        opened = real_path
    if not _within(os.path.realpath(root), opened) or not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return _refuse_escape("file moved outside the TFTP root")
    return fd


def resolve_write(root: str, upload_dir: str, filename: str) -> str | Refusal:
    """The target path for a WRQ: inside the upload folder, which must be inside the root."""
    real_root = os.path.realpath(root)
    real_upload = os.path.realpath(upload_dir)
    relative = normalise(root, filename)
    if isinstance(relative, Refusal):
        return relative
    target = os.path.join(real_root, relative)
    parent = os.path.realpath(os.path.dirname(target))
    if not _within(real_root, parent) or not _within(real_upload, parent):
        return Refusal(packet.ERR_ACCESS, "Access violation: writes go to the upload folder only",
                       not _within(real_root, parent))
    if not os.path.isdir(parent):
        return Refusal(packet.ERR_NOT_FOUND, "Folder not found", False)
    final = os.path.join(parent, os.path.basename(target))
    if os.path.islink(final):
        return _refuse_escape("target is a symlink")
    return final
