"""The imaging server's multicast sessions as zmgmcast shows them: each session (state, origin,
image and group, the start trigger's countdown, rate, repair share) and its receivers (MAC,
address, state, progress, loss, round trip), from the "multicast" field of imgsrvd's status
reply (imgsrvd/status.py). Pure: a checked reply in, lines out (zmgmcast escapes every line
again before it prints it)."""

from __future__ import annotations

from typing import Any

from .reply import BadReply
from common.units import human as human_size

MAX_NAME_SHOWN = 80             # a session name or image path longer than this is cut (…)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SESSION_NUMBERS = ("start_clients", "rate_kbit_s", "bytes_sent", "repair_bytes",
                    "repair_share", "image_bytes", "receivers", "participants_omitted")
_PARTICIPANT_NUMBERS = ("progress", "loss", "bytes_received", "bytes_written",
                        "chunks_verified")


def check_multicast(value: Any) -> None:
    """BadReply when the reply's "multicast" field is not what imgsrvd sends."""
    if not isinstance(value, dict):
        raise BadReply("multicast is not an object")
    if "control_port" in value and not _is_number(value["control_port"]):
        raise BadReply("multicast control_port is not a number")
    sessions = value.get("sessions", [])
    if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
        raise BadReply("multicast sessions is not a list of objects")
    for session in sessions:
        for key in ("name", "state", "origin", "image", "group"):
            if key in session and not isinstance(session[key], str):
                raise BadReply(f"multicast session {key} is not text")
        for key in _SESSION_NUMBERS:
            if key in session and not _is_number(session[key]):
                raise BadReply(f"multicast session {key} is not a number")
        if session.get("start_in_s") is not None and not _is_number(session["start_in_s"]):
            raise BadReply("multicast session start_in_s is not a number")
        participants = session.get("participants", [])
        if not isinstance(participants, list) or \
                not all(isinstance(p, dict) for p in participants):
            raise BadReply("multicast participants is not a list of objects")
        for participant in participants:
            for key in ("mac", "address", "state"):
                if key in participant and not isinstance(participant[key], str):
                    raise BadReply(f"multicast participant {key} is not text")
            for key in _PARTICIPANT_NUMBERS:
                if key in participant and not _is_number(participant[key]):
                    raise BadReply(f"multicast participant {key} is not a number")
            if participant.get("srtt_ms") is not None and \
                    not _is_number(participant["srtt_ms"]):
                raise BadReply("multicast participant srtt_ms is not a number")


def _cut(text: Any, limit: int = MAX_NAME_SHOWN) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _percent(fraction: Any) -> str:
    return f"{100 * fraction:.1f} %" if _is_number(fraction) else "-"


def trigger(session: dict[str, Any]) -> str:
    """When a waiting session starts: "starts when 5 have joined (2 now) or in 12:30"."""
    state = session.get("state")
    if state not in (None, "waiting"):
        return ""
    parts = []
    clients = session.get("start_clients") or 0
    if clients:
        parts.append(f"when {clients} have joined ({session.get('receivers', 0)} now)")
    start_in_s = session.get("start_in_s")
    if _is_number(start_in_s):
        parts.append(f"in {_clock(start_in_s)}")
    return "starts " + " or ".join(parts) if parts else "starts when told to (zmgmcast -start)"


def format_multicast(multicast: dict[str, Any]) -> list[str]:
    """The lines under the imaging service's counters."""
    if not multicast.get("enabled", True):
        return ["    Multicast: off"]
    sessions = multicast.get("sessions", [])
    port = multicast.get("control_port")
    where = f" (control port {port}/udp)" if _is_number(port) and port else ""
    lines = [f"    Multicast sessions{where}: {len(sessions) or 'none'}"]
    for session in sessions:
        receivers = session.get("receivers", len(session.get("participants", [])))
        lines.append(f"      {_cut(session.get('name', '?'))}: {session.get('state', '?')} "
                     f"({session.get('origin', '?')}), {_cut(session.get('image', '?'))} to "
                     f"{session.get('group', '?')}, {receivers} receiver"
                     f"{'' if receivers == 1 else 's'}")
        rate = session.get("rate_kbit_s") or 0
        details = [trigger(session)] if trigger(session) else []
        details.append(f"{rate / 1000:.1f} Mbit/s" if rate else "rate -")
        details.append(f"{human_size(session.get('bytes_sent', 0))} sent, repairs "
                       f"{_percent(session.get('repair_share', 0.0))}")
        lines.append(f"        {'; '.join(details)}")
        for participant in session.get("participants", []):
            srtt = participant.get("srtt_ms")
            lines.append(
                f"        {_cut(participant.get('mac') or '-', 17):<14}"
                f"{_cut(participant.get('address', '-'), 40):<17}"
                f"{_cut(participant.get('state', '?'), 12):<11}"
                f"{_percent(participant.get('progress')):>8}  loss "
                f"{_percent(participant.get('loss')):>7}  rtt "
                f"{f'{srtt:.1f} ms' if _is_number(srtt) else '-'}")
        omitted = session.get("participants_omitted") or 0
        if omitted:
            lines.append(f"        ... and {omitted} more receivers")
    omitted = multicast.get("sessions_omitted") or 0
    if _is_number(omitted) and omitted:
        lines.append(f"      ... and {omitted} more sessions")
    return lines
