"""Who may list the image root over HTTP (`GET /v1/images`, docs/security.md) and what they see:
an operator's capability allowing `retrieve` sees the images its patterns name; a machine's
capability sees nothing (a machine is told its image by its work, never browses); the open mode
(AllowAnonymous) sees everything. Pure: the capability is already checked by the Gate."""

from __future__ import annotations

from typing import Any, Iterable

from common.imaging.imagelist import ImageEntry

MACHINE_REFUSAL = ("listing images needs an operator's capability (preboot-dir token "
                   "--operator NAME --allow retrieve --image PATTERN), not a machine's")


def refusal(capability: Any) -> str:
    """Why this capability may not list ("" when it may); None is the open mode."""
    if capability is not None and not capability.is_operator:
        return MACHINE_REFUSAL
    return ""


def visible(entries: Iterable[ImageEntry], capability: Any) -> list[ImageEntry]:
    """The entries the capability may retrieve: its image patterns decide, as for a GET."""
    if capability is None:
        return list(entries)
    return [entry for entry in entries if not capability.refusal("retrieve", entry.path)]
