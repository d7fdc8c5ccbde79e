"""The engine's failures that reach the command line, in a module of their own so `img`
can catch them without importing what raises them (the add-on code pulls in tarfile; a
restore should not pay for that at start)."""

from __future__ import annotations


class RestoreError(Exception):
    """A restore that cannot or must not go ahead; the message says why."""


class AddonError(Exception):
    """An add-on that cannot be made or applied. `changed` says whether the target partition
    was already written to when it failed."""

    def __init__(self, message: str, changed: bool = False):
        super().__init__(message)
        self.changed = changed


class DiskError(Exception):
    """A disk img cannot use as asked (a --sector-size a block device contradicts, a partition
    table written for another sector size); nothing was written."""


class Failure(Exception):
    """A server-mode operation that failed; str() is the one-line message (server, what failed,
    whether the disk was changed)."""


class IsdError(Exception):
    """Image-safe data that cannot be read or written as asked (no room on the disk, a damaged
    record, foreign bytes where it would go); the message says why and whether the disk
    changed."""


# img's exit statuses (img --help lists them).
EXIT_OK = 0              # done
EXIT_FAILED = 1          # failed; the message says why and whether the disk was changed
EXIT_USAGE = 2           # bad arguments (argparse)
EXIT_NOT_GROWN = 3       # restored completely, but a grown partition's filesystem was not grown


class IdentityError(Exception):
    """An identity that cannot be applied to a restored system (img/identity_apply.py): no
    system found, a file or registry key that is not as expected; the text names it."""
