"""TFTP option negotiation: RFC 2347 (framework), 2348 (blksize), 2349 (timeout, tsize),
7440 (windowsize). Pure: the request's options and our limits in, the agreed values out.

RFC 2347 section "Option Acknowledgment": the server ignores options it does not know or whose
value it will not honour, and acknowledges only those it accepts; a client that asked for no
option (or none we accept) gets plain RFC 1350 behaviour (DATA 1 or ACK 0, no OACK).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464          # RFC 2348
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255            # RFC 2349
WINDOWSIZE_MIN, WINDOWSIZE_MAX = 1, 65535    # RFC 7440
DEFAULT_BLKSIZE = 512


@dataclass(frozen=True)
class Limits:
    max_blksize: int
    max_windowsize: int
    default_timeout_s: float


@dataclass(frozen=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout_s: float = 1.0
    tsize: int | None = None               # the size the client announced (WRQ) or we report
    acknowledged: dict[str, str] = field(default_factory=dict)   # what goes into the OACK
    ignored: tuple[str, ...] = ()         # options refused, for the DEBUG log


def _as_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 10 else None


def negotiate(options: dict[str, str], limits: Limits, file_size: int | None,
              is_write: bool) -> Negotiated:
    """Agree on options. `file_size` is the size we will send (RRQ), None when unknown."""
    blksize, windowsize, timeout_s, tsize = DEFAULT_BLKSIZE, 1, limits.default_timeout_s, None
    acked: dict[str, str] = {}
    ignored: list[str] = []
    for name, raw in options.items():
        value = _as_int(raw)
        if name == "blksize" and value is not None and value >= BLKSIZE_MIN:
            blksize = min(value, BLKSIZE_MAX, limits.max_blksize)
            acked[name] = str(blksize)
        elif name == "windowsize" and value is not None and value >= WINDOWSIZE_MIN:
            windowsize = min(value, WINDOWSIZE_MAX, limits.max_windowsize)
            acked[name] = str(windowsize)
        elif name == "timeout" and value is not None and TIMEOUT_MIN <= value <= TIMEOUT_MAX:
            timeout_s = float(value)
            acked[name] = str(value)  # RFC 2349: the server must echo the same value
        elif name == "tsize" and value is not None:
            if is_write:
                tsize = value
                acked[name] = str(value)
            elif file_size:
                tsize = file_size
                acked[name] = str(file_size)
            else:
                # netascii: the size on the wire is not known up front; an empty file: curl
                # (lib/tftp.c) rejects "tsize 0" in an OACK, so say nothing.
                ignored.append(name)
        else:
            ignored.append(name)
    return Negotiated(blksize, windowsize, timeout_s, tsize, acked, tuple(ignored))
