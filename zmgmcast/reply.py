"""A status reply as zmgmcast may print it: checked for shape, every string escaped.

A remote status port is anyone who answers on it: a reply of the wrong shape must be "bad
reply from HOST", not a traceback, and its text must not carry escape sequences or newlines
to the administrator's terminal. The local socket's replies go through the same check.
"""

from __future__ import annotations

from typing import Any

from common.daemon.logsetup import escape_control


class BadReply(ValueError):
    """The reply is not a status reply; str() says what is wrong with it."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clean(value: Any) -> Any:
    """VALUE with every string in it (keys too) escaped, containers copied."""
    if isinstance(value, str):
        return escape_control(value)
    if isinstance(value, dict):
        return {escape_control(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _check_counters(counters: Any) -> None:
    if not isinstance(counters, dict):
        raise BadReply("counters is not an object")
    for name, value in counters.items():
        if isinstance(value, dict):
            if not all(_is_number(v) for v in value.values()):
                raise BadReply(f"counter {name}: not numbers")
        elif not (_is_number(value) or isinstance(value, str)):
            raise BadReply(f"counter {name}: not a number")


def _check_listen(listen: Any) -> None:
    if not isinstance(listen, list) or not all(isinstance(e, dict) for e in listen):
        raise BadReply("listen is not a list of objects")


# field -> what it must be, when present
_SCALARS = {"ok": (bool,), "daemon": (str,), "service": (str,), "version": (str,),
            "error": (str,), "config": (str,)}


def checked(reply: Any) -> dict[str, Any]:
    """REPLY with its strings escaped, or BadReply when a field has the wrong type."""
    if not isinstance(reply, dict):
        raise BadReply("not a JSON object")
    for name, kinds in _SCALARS.items():
        if name in reply and not isinstance(reply[name], kinds):
            raise BadReply(f"{name} is not a {kinds[0].__name__}")
    for name in ("pid", "uptime_s", "started_at"):
        if name in reply and not _is_number(reply[name]):
            raise BadReply(f"{name} is not a number")
    if "uptime_s" in reply and not 0 <= reply["uptime_s"] < 1e12:
        raise BadReply("uptime_s is out of range")
    _check_listen(reply.get("listen", []))
    _check_counters(reply.get("counters", {}))
    if "multicast" in reply:
        from .sessions import check_multicast
        check_multicast(reply["multicast"])
    return _clean(reply)
