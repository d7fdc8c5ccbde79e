"""netascii (RFC 1350 section 5, after RFC 764): LF is sent as CR LF and CR as CR NUL.

Pure. Encoding is whole-buffer (files sent in netascii mode are small text files); decoding is
stateful because a CR can end one DATA block and its LF or NUL begin the next.
"""

from __future__ import annotations


def encode(text: bytes) -> bytes:
    return text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class Decoder:
    """Undo `encode` across block boundaries: feed() blocks in order, then finish()."""

    def __init__(self) -> None:
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        return chunk.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")

    def finish(self) -> bytes:
        tail = b"\r" if self._pending_cr else b""
        self._pending_cr = False
        return tail
