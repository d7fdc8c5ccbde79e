"""Applying a machine's identity to a restored disk (issue 17): finding the installed systems
on it and handing each to the code that knows it: img/identity_linux.py for Linux,
img/identity_windows.py for Windows. What `img identity apply` and `img auto` (after a restore)
run; docs/identity.md, "Applying an identity after a restore".

Each partition with a filesystem img can mount (ext2/3/4, XFS, btrfs by the kernel, NTFS by
ntfs-3g, on a loop device: img/addon.py's mounting) is mounted and looked at: Linux is an /etc
folder with an os-release file, Windows a Windows/System32/config/SYSTEM hive. A disk with no
system at all is an error naming what each partition held; a system the identity cannot be
applied to stops there (an IdentityError naming the file or key), with what was already
applied to the others said in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.identity import MachineIdentity

from .addon import Target, disk_targets, mounted, refuse_mounted
from .errors import AddonError, IdentityError
from .identity_linux import apply_linux, is_linux
from .identity_windows import apply_windows, find_hive

MOUNTABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs")


@dataclass(frozen=True)
class Applied:
    """What was applied: one line per change, each naming its partition."""

    identity: MachineIdentity
    lines: tuple[str, ...]

    def text(self) -> str:
        """The results log's text: the identity, then each change."""
        return "\n".join((self.identity.describe(),) + self.lines)


def system_kind(root: str) -> tuple[str, str]:
    """The decision: ("linux" | "windows" | "", why) for a mounted filesystem."""
    hive = find_hive(root)
    if hive is not None:
        return "windows", "Windows/System32/config/SYSTEM"
    why = is_linux(root)
    if why:
        return "linux", why
    return "", "no /etc with an os-release file, no Windows/System32/config/SYSTEM"


def apply_identity(disk: str, identity: MachineIdentity, sector_size: int | None = None
                   ) -> Applied:
    """Apply identity to every installed system on disk. Raises IdentityError."""
    try:
        refuse_mounted(disk)
        targets = disk_targets(disk, sector_size)
    except (AddonError, OSError) as exc:
        raise IdentityError(f"{disk}: {exc}") from None
    lines: list[str] = []
    seen: list[str] = []
    for target in targets:
        if target.filesystem not in MOUNTABLE:
            seen.append(f"partition {target.partition}: {target.filesystem}")
            continue
        try:
            found = _apply_target(target, identity)
        except IdentityError as exc:
            done = f" (already applied: {'; '.join(lines)})" if lines else ""
            raise IdentityError(f"partition {target.partition} ({target.filesystem}): {exc}"
                                f"{done}") from None
        except AddonError as exc:
            raise IdentityError(str(exc)) from None
        if found is None:
            seen.append(f"partition {target.partition}: {target.filesystem}, no system")
        else:
            lines += found
    if not lines:
        raise IdentityError(f"{disk}: no installed Linux or Windows system found "
                            f"({'; '.join(seen) or 'no partitions'}); identity not applied")
    return Applied(identity, tuple(lines))


def _apply_target(target: Target, identity: MachineIdentity) -> list[str] | None:
    """The lines for one partition, None when it holds no system."""
    with mounted(target) as root:
        kind, why = system_kind(root)
        if not kind:
            return None
        where = f"partition {target.partition}"
        if kind == "windows":
            changes = apply_windows(root, identity)
        else:
            changes = apply_linux(root, identity)
    return [f"{where} ({kind}, {why}): {change}" for change in changes]
