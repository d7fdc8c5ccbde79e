"""imgsrvd's status counters: what `zmgmcast -status` shows. All start at zero.

The first four are the original's imaging statistics (DOMAIN.md, "Imaging statistics"); zmgmcast
shows them first and under the original's names, as the registry of services says
(common.daemon.services.IMGSRVD: counter_order, counter_labels):

update_requests    imaging operations of any kind (store, retrieve, work query, referral, a
                   report of an operation served elsewhere), including those that failed, were
                   denied or were referred; a retrieve's many Range requests are one
                   (imgsrvd/operations.py)
images_sent        images sent to clients (retrieves that sent every byte of the image)
images_received    images received and stored here
client_referrals   auto-imaging requests referred to another imaging server

bytes_sent         image bytes sent (ranges included)
bytes_received     image bytes received by uploads (stored or not)
active_transfers   uploads and downloads in progress now
failures           requests that failed: refused, bad, aborted, disk full, directory errors
busy_refusals      transfers refused with 503 because MaxClients were in progress
directory_errors   work queries or results the directory could not answer
results_logged     result reports (POST /v1/results) logged
results_rate_limited  result reports refused (429) by ResultsPerMinute
results_queue_full    result reports refused (503) because ResultsQueue entries were waiting
results_dropped    the server's own entries not logged because the queue was full
multicast_receivers   multicast receivers whose result was logged (reported or not)
multicast_verified    ... of which verified: the session's image on their disk (these, and only
                      these, count as Images Sent)
identities_assigned   addresses handed out from identity policies' pools (docs/identity.md)
identities_from_disk  work answers carrying the identity the machine's disk holds
identities_refused    machines an identity policy could not name (no serial, ...): no work
pools_exhausted       machines refused because their identity policy's pool had no free value

The status reply also carries "multicast" (multicast_status below): each session (state, the
start trigger's countdown, rate, repair share) and its receivers (MAC, address, progress,
loss, round trip, state), bounded, for `zmgmcast -status`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from common.daemon.counters import StatusCounters

from .multicast.model import ParticipantStatus, SessionStatus

# A status reply must stay far below what zmgmcast reads (1 MiB): a few hundred bytes each.
MAX_STATUS_SESSIONS = 100
MAX_STATUS_PARTICIPANTS = 1000


@dataclass
class ImagingCounters(StatusCounters):
    update_requests: int = 0
    images_sent: int = 0
    images_received: int = 0
    client_referrals: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    active_transfers: int = 0
    failures: int = 0
    busy_refusals: int = 0
    directory_errors: int = 0
    results_logged: int = 0
    results_rate_limited: int = 0
    results_queue_full: int = 0
    results_dropped: int = 0
    multicast_receivers: int = 0
    multicast_verified: int = 0
    identities_assigned: int = 0
    identities_from_disk: int = 0
    identities_refused: int = 0
    pools_exhausted: int = 0


def multicast_status(enabled: bool, control_port: int,
                     sessions: Iterable[SessionStatus]) -> dict[str, Any]:
    """The reply's "multicast" field: sessions and their receivers, at most
    MAX_STATUS_SESSIONS and MAX_STATUS_PARTICIPANTS (the rest counted as omitted)."""
    listed: list[dict[str, Any]] = []
    omitted_sessions = 0
    room = MAX_STATUS_PARTICIPANTS
    for status in sorted(sessions, key=lambda item: item.name):
        if len(listed) >= MAX_STATUS_SESSIONS:
            omitted_sessions += 1
            continue
        shown = status.participants[:room]
        room -= len(shown)
        listed.append({
            "name": status.name, "image": status.image, "group": status.group,
            "origin": status.origin.value, "state": status.state.value,
            "start_clients": status.start_clients,
            "start_in_s": None if status.start_in_s is None else round(status.start_in_s, 1),
            "rate_kbit_s": status.rate_kbit_s, "bytes_sent": status.bytes_sent,
            "repair_bytes": status.repair_bytes, "repair_share": round(status.repair_share, 4),
            "image_bytes": status.image_bytes, "receivers": len(status.participants),
            "participants": [_participant(p, status.image_bytes) for p in shown],
            "participants_omitted": len(status.participants) - len(shown),
        })
    return {"enabled": enabled, "control_port": control_port, "sessions": listed,
            "sessions_omitted": omitted_sessions}


def _participant(participant: ParticipantStatus, image_bytes: int) -> dict[str, Any]:
    progress = participant.bytes_received / image_bytes if image_bytes else 0.0
    return {"mac": participant.mac, "address": participant.address,
            "state": participant.state.value, "progress": round(min(progress, 1.0), 4),
            "bytes_received": participant.bytes_received,
            "bytes_written": participant.bytes_written,
            "chunks_verified": participant.chunks_verified,
            "loss": round(participant.loss_fraction, 4),
            "srtt_ms": None if participant.srtt_ms is None else round(participant.srtt_ms, 2)}
