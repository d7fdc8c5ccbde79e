"""Ask a TFTP server which options it acknowledges (RFC 2347 OACK), then abort.

Used to say honestly, per server, whether windowsize (RFC 7440) was negotiated: a server
that leaves it out of its OACK runs the transfer lock-step whatever the client offered.
"""

from __future__ import annotations

import socket
import struct

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


def build_rrq(filename: str, options: dict[str, str]) -> bytes:
    parts = [filename.encode(), b"octet"]
    for key, value in options.items():
        parts += [key.encode(), str(value).encode()]
    return struct.pack("!H", RRQ) + b"".join(p + b"\0" for p in parts)


def parse_oack(payload: bytes) -> dict[str, str]:
    fields = payload.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    out = {}
    for i in range(0, len(fields) - 1, 2):
        out[fields[i].decode(errors="replace").lower()] = fields[i + 1].decode(errors="replace")
    return out


def probe_options(host: str, port: int, filename: str, options: dict[str, str],
                  timeout: float = 3.0) -> dict:
    """Send one RRQ with `options`; return {"ok", "oack" (dict or None), "error"}.

    "oack" is None when the server answered with DATA (no options acknowledged) and a dict of
    the acknowledged options otherwise. The transfer is aborted with an ERROR packet.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.bind((host, 0))
        sock.sendto(build_rrq(filename, options), (host, port))
        try:
            data, peer = sock.recvfrom(70000)
        except socket.timeout:
            return {"ok": False, "oack": None, "error": f"no answer within {timeout:g} s"}
        if len(data) < 2:
            return {"ok": False, "oack": None, "error": "runt packet"}
        opcode = struct.unpack("!H", data[:2])[0]
        abort = struct.pack("!HH", ERROR, 0) + b"option probe done\0"
        if opcode == OACK:
            sock.sendto(abort, peer)
            return {"ok": True, "oack": parse_oack(data[2:]), "error": None}
        if opcode == DATA:
            sock.sendto(abort, peer)
            return {"ok": True, "oack": None, "error": None}
        if opcode == ERROR:
            msg = data[4:].split(b"\0")[0].decode(errors="replace")
            code = struct.unpack("!H", data[2:4])[0] if len(data) >= 4 else -1
            return {"ok": False, "oack": None, "error": f"TFTP error {code}: {msg}"}
        return {"ok": False, "oack": None, "error": f"unexpected opcode {opcode}"}
    except OSError as exc:
        return {"ok": False, "oack": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        sock.close()
