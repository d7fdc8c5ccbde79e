"""Durable file writes: the one copy of "fsync the folder" and of "write a file atomically".

A file appears under its final name only when it is complete and on disk: it is written under a
temporary name in the same folder (same file system, so the last step is atomic), fsynced, given
its final name (rename, or link when an existing file must not be replaced), and then the folder
is fsynced so the new name itself survives a power cut. On any failure the temporary file is
removed and the final name is left as it was.

    fsync_folder(folder)                      make a folder's entries (renames, links) durable
    fsync_parent(path)                        the same for the folder that holds PATH
    publish(temporary, final, replace=...)    give a complete, fsynced file its final name
    atomic_file(path)                         a context manager: the whole write in one `with`

Used by the daemons (tftpd uploads, imgsrvd's image store and results log), the imaging engine
(img make, img addon) and the `preboot-dir` program. Standard library only; it imports nothing
else of the project: it is part of the foundation of common/, which every wing may import.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Iterator


def fsync_folder(folder: str) -> None:
    """fsync a folder, so the names created, renamed or removed in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path: str) -> None:
    """fsync the folder that holds PATH (after PATH was created, renamed or removed)."""
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def publish(temporary: str, final: str, *, replace: bool) -> None:
    """Give the complete, fsynced file TEMPORARY its FINAL name (same folder), then fsync the
    folder. replace=True renames over an existing file; replace=False links instead, which
    raises FileExistsError rather than replace one (the temporary name then stays: the caller
    removes it, as on any failure)."""
    if replace:
        os.replace(temporary, final)
    else:
        os.link(temporary, final)
        os.unlink(temporary)
    fsync_parent(final)


def temporary_name(path: str) -> str:
    """The hidden name a file is written under before it becomes PATH: `.NAME.part-<pid>` in
    PATH's folder."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.part-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """Write PATH atomically: the body writes the binary file it is given (created exclusively
    under temporary_name(path)); when the body ends it is flushed, fsynced, renamed over PATH
    and the folder fsynced. If the body or any of those steps fails, the temporary file is
    removed and PATH is untouched."""
    temporary = temporary_name(path)
    try:
        with open(temporary, "xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        publish(temporary, path, replace=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
