"""What a work answer's capability allows (pure): the imaging server issues one with every work
answer that names an image, bound to the machine, so the engine may do exactly that work and
report it, and nothing else (docs/security.md).

- restore: retrieve the image and each add-on, report the result;
- make: store the image, report the result;
- a referral: the same, for the image as the other server names it (the imaging servers that
  refer to each other share the capability keys);
- multicast: retrieve the session's image (the JOIN presents it: the sender admits a machine
  whose capability allows retrieving what the session sends; a receiver dropped from the
  session finishes over unicast with it), report the result;
- anything else (none, maintenance): no capability.
"""

from __future__ import annotations

from typing import Any

from common.imaging.protocol import BadPath, parse_image_path

OPERATIONS = {"restore": ("retrieve", "result"), "make": ("store", "result"),
              "multicast": ("retrieve", "result")}


def work_grant(answer: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(operations, images) for the capability of a work answer, or None when it needs none."""
    kind = answer.get("action") if answer.get("work") == "referral" else answer.get("work")
    operations = OPERATIONS.get(str(kind))
    if operations is None:
        return None
    image = answer.get("path") if answer.get("work") == "referral" else answer.get("image")
    images = [str(image or "")]
    if kind == "restore":
        images += [_as_served(str(addon)) for addon in answer.get("addons") or []]
    return operations, tuple(name for name in images if name)


def _as_served(path: str) -> str:
    """An add-on path as the server that holds it names it: //other/path -> path."""
    if not path.startswith("//"):
        return path
    try:
        where = parse_image_path(path, ())
    except BadPath:
        return path
    return where.path
