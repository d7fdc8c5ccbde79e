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
"""

from __future__ import annotations

from dataclasses import dataclass

from common.daemon.counters import StatusCounters


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
