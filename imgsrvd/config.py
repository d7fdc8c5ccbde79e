"""imgsrvd's config keys (the schema) and the frozen settings the server runs on."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key, Schema
from common.policy.directory.settings import DirectorySettings, directory_keys, directory_settings
from common.errors import SettingError
from common.daemon.runner import CommonSettings, common_keys
from common.daemon.services import IMGSRVD
from common.policy.trust import TrustSettings, trust_keys, trust_settings
from common.daemon.tls import TlsSettings, tls_keys, tls_settings

from common.imaging.multicast import CONTROL_PORT, DATA_PORT
from common.imaging.protocol import BadPath, clean_relative

from .multicast.model import EngineSettings

STATUS_PORT = IMGSRVD.status_port

# Multicast sessions (docs/multicast.md, docs/multicast-protocol.md): the keys the engine's
# EngineSettings are made from. They take effect at start; a reload that changes them says so.
MULTICAST_KEYS = (
    Key("MulticastPort", "integer(min=0, max=65535)", str(CONTROL_PORT),
        "UDP port of multicast sessions: receivers join on it at IPAddress (the control port), "
        "and sessions that name no data port send to their group on it. 0: a free control port "
        f"(data to port {DATA_PORT}). Below 1024 needs root or CAP_NET_BIND_SERVICE."),
    Key("MulticastInterface", "string", "",
        "IPv4 address of the interface sessions send their groups from; empty: IPAddress, or "
        "the interface of the default route when IPAddress is 0.0.0.0."),
    Key("MulticastTTL", "integer(min=1, max=255)", "1",
        "Time to live of multicast packets: 1 keeps sessions on this network segment; more "
        "crosses that many routers, which must route multicast."),
    Key("MaxBitrate", "integer(min=0, max=100000000)", "0",
        "Kilobits per second one session sends at most (its first pass and repairs); 0: no "
        "limit but the adaptation to the receivers' loss."),
    Key("MinReceiverRate", "integer(min=0, max=100000000)", "1000",
        "Kilobits per second a receiver must keep up with; one slower than this for a while "
        "is dropped from the session and finishes over unicast HTTP, so it does not hold the "
        "others back. 0: none is dropped for being slow."),
    Key("MaxReceiverLoss", "integer(min=1, max=100)", "20",
        "Percent of packets a receiver may lose for a while; one losing more is dropped from "
        "the session and finishes over unicast HTTP. 100: none is dropped for its loss."),
    Key("MulticastFinishTimeout", "integer(min=10, max=86400)", "300",
        "Seconds repairs go on after a session's first pass at most; receivers not done then "
        "finish over unicast HTTP."),
    Key("MaxSessions", "integer(min=0, max=1000)", "16",
        "Multicast sessions at once (the directory's, workstations' and operators'); 0: no "
        "multicast (the port is not opened)."),
    Key("MaxSessionReceivers", "integer(min=1, max=10000)", "256",
        "Receivers one session admits; more are refused (full) and restore over unicast."),
)

SCHEMA = Schema((
    Key("IPAddress", "ip_addr", "0.0.0.0",
        "Address the imaging service listens on; 0.0.0.0: every IPv4 "
        "interface."),
    Key("Port", "integer(min=0, max=65535)", "998",
        "TCP port of the imaging protocol (HTTP/1.1, docs/imaging-protocol.md); 0 picks a "
        "free one. Below 1024 needs root or CAP_NET_BIND_SERVICE."),
    Key("ImageRoot", "path", "/var/lib/preboot/images",
        "Folder that holds the images; every image path a client names is relative to it, and "
        "nothing outside it is ever read or written."),
    Key("AllowedUploadDirs", "strings", "",
        "Folders under ImageRoot that clients may store images in, comma separated; empty: "
        "anywhere under ImageRoot (the original's default)."),
    Key("AllowOverwrite", "boolean", "NO",
        "YES lets an upload replace an existing image; NO refuses it (409)."),
    *directory_keys("slower or failing queries are answered 503 (the imaging engine "
                    "then boots the local disk)."),
    Key("ResultsLog", "path", "/var/log/preboot/imgsrvd-results.xml",
        "Well-formed XML log of every imaging request (the original's Zimglog.xml)."),
    Key("ResultsLogMaxSize", "integer(min=0, max=16777216)", "65536",
        "KiB the results log may reach before it is rotated (renamed ResultsLog.1, the older "
        "ones shifted to .2 ...); 0: never rotated."),
    Key("ResultsLogKeep", "integer(min=0, max=1000)", "5",
        "Rotated results logs kept (ResultsLog.1 ... ResultsLog.N); the oldest beyond them is "
        "deleted."),
    Key("ResultsPerMinute", "integer(min=0, max=1000000)", "60",
        "Results (POST /v1/results) one host may report per minute (that many at once, then one "
        "every 60/N s); more are answered 429 with Retry-After. 0: no limit."),
    Key("ResultsQueue", "integer(min=1, max=100000)", "256",
        "Results log entries that may wait to be written; when that many are waiting, a report "
        "is answered 503 with Retry-After (and the server's own entries are dropped, counted)."),
    Key("MaxClients", "integer(min=1, max=10000)", "64",
        "Image transfers (stores and retrievals) served at once; more are answered 503 with "
        "Retry-After."),
    Key("MaxTransfersPerClient", "integer(min=1, max=10000)", "8",
        "Image transfers one client address may hold at once (at most MaxClients); more are "
        "answered 503 with Retry-After, so one host cannot take every slot."),
    Key("TransferTimeout", "integer(min=5, max=3600)", "120",
        "Seconds of the progress window: an upload that receives, or a retrieve whose client "
        "takes, fewer than MinTransferRate x TransferTimeout bytes (nothing, with a rate of 0) "
        "in a window is aborted and its slot freed."),
    Key("MinTransferRate", "integer(min=0, max=1073741824)", "16384",
        "Bytes per second a transfer must average over each TransferTimeout window."),
    Key("MaxTransferTime", "integer(min=60, max=604800)", "43200",
        "Seconds one transfer request (a store, or one retrieve request) may take in all."),
    Key("ServerName", "string", "",
        "How other imaging servers and the directory name this server in //server/path "
        "image paths; empty: this host's name."),
    *MULTICAST_KEYS,
    *trust_keys(43200, "with every work answer: retrieve or store the work's images and "
                       "report its result; long enough for the largest restore"),
    *tls_keys("img: the imaging environment pins it when policyd's ImagingServerCertificate "
              "names this certificate; operators use img --server-pin or --server-ca"),
) + common_keys(IMGSRVD))


@dataclass(frozen=True)
class Settings:
    ip_address: str
    port: int
    image_root: str
    allowed_upload_dirs: tuple[str, ...]    # relative to image_root, normalised; () = all
    allow_overwrite: bool
    directory: DirectorySettings
    results_log: str
    results_log_max_bytes: int              # 0: never rotated
    results_log_keep: int
    results_per_minute: int                 # per host; 0: no limit
    results_queue_entries: int
    max_clients: int
    max_transfers_per_client: int
    transfer_timeout_s: float               # the progress window
    min_transfer_rate_bps: int
    max_transfer_time_s: float
    server_name: str
    multicast: EngineSettings | None        # None: no multicast (MaxSessions = 0)
    data_port: int                          # the data port of sessions that name none
    trust: TrustSettings
    tls: TlsSettings | None                 # None: plain HTTP
    common: CommonSettings


def make_settings(values: dict[str, Any], common: CommonSettings) -> Settings:
    directory = directory_settings(values)
    root = values["ImageRoot"]
    if not root:
        raise SettingError("ImageRoot", "must not be empty")
    allowed = []
    for text in values["AllowedUploadDirs"]:
        try:
            allowed.append(clean_relative(text.strip("/")) if text.strip("/") else "")
        except BadPath as exc:
            raise SettingError("AllowedUploadDirs", f"'{text}': {exc}") from None
    server_name = values["ServerName"].strip() or socket.gethostname()
    if values["MaxTransferTime"] < values["TransferTimeout"]:
        raise SettingError("MaxTransferTime", "must not be shorter than TransferTimeout")
    return Settings(
        ip_address=values["IPAddress"],
        port=values["Port"],
        image_root=os.path.normpath(root),
        allowed_upload_dirs=tuple(allowed),
        allow_overwrite=values["AllowOverwrite"],
        directory=directory,
        results_log=values["ResultsLog"],
        results_log_max_bytes=values["ResultsLogMaxSize"] * 1024,
        results_log_keep=values["ResultsLogKeep"],
        results_per_minute=values["ResultsPerMinute"],
        results_queue_entries=values["ResultsQueue"],
        max_clients=values["MaxClients"],
        # more than MaxClients would never be reached: MaxClients alone limits then
        max_transfers_per_client=min(values["MaxTransfersPerClient"], values["MaxClients"]),
        transfer_timeout_s=float(values["TransferTimeout"]),
        min_transfer_rate_bps=values["MinTransferRate"],
        max_transfer_time_s=float(values["MaxTransferTime"]),
        server_name=server_name,
        multicast=multicast_settings(values),
        data_port=values["MulticastPort"] or DATA_PORT,
        trust=trust_settings(values),
        tls=tls_settings(values),
        common=common,
    )


def multicast_settings(values: dict[str, Any]) -> EngineSettings | None:
    """The engine's settings from the multicast keys; None when MaxSessions is 0."""
    if not values["MaxSessions"]:
        return None
    interface = values["MulticastInterface"].strip()
    if interface:
        try:
            interface = str(ipaddress.IPv4Address(interface))
        except ValueError:
            raise SettingError("MulticastInterface", f"'{interface}' is not an IPv4 address "
                                                     "(multicast is IPv4 only)") from None
    address = values["IPAddress"]
    control = address if ":" not in address else "0.0.0.0"   # version 1 is IPv4 only
    if not interface and control != "0.0.0.0":
        interface = control
    return EngineSettings(
        control_address=control,
        control_port=values["MulticastPort"],
        interface_address=interface,
        ttl=values["MulticastTTL"],
        max_bitrate_kbit_s=values["MaxBitrate"],
        min_receiver_rate_kbit_s=values["MinReceiverRate"],
        max_receiver_loss=values["MaxReceiverLoss"] / 100,
        finish_timeout_s=float(values["MulticastFinishTimeout"]),
        max_sessions=values["MaxSessions"],
        max_receivers=values["MaxSessionReceivers"],
    )
