"""imgsrvd's config keys (the schema) and the frozen settings the server runs on."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key, Schema
from common.policy.directory.settings import DirectorySettings, directory_keys, directory_settings
from common.errors import SettingError
from common.daemon.runner import CommonSettings, common_keys
from common.daemon.services import IMGSRVD

from common.imaging.protocol import BadPath, clean_relative

STATUS_PORT = IMGSRVD.status_port

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
    Key("MaxClients", "integer(min=1, max=10000)", "64",
        "Image transfers (stores and retrievals) served at once; more are answered 503 with "
        "Retry-After."),
    Key("TransferTimeout", "integer(min=5, max=3600)", "120",
        "Seconds an upload may go without receiving data before it is aborted."),
    Key("ServerName", "string", "",
        "How other imaging servers and the directory name this server in //server/path "
        "image paths; empty: this host's name."),
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
    max_clients: int
    transfer_timeout_s: float
    server_name: str
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
    return Settings(
        ip_address=values["IPAddress"],
        port=values["Port"],
        image_root=os.path.normpath(root),
        allowed_upload_dirs=tuple(allowed),
        allow_overwrite=values["AllowOverwrite"],
        directory=directory,
        results_log=values["ResultsLog"],
        max_clients=values["MaxClients"],
        transfer_timeout_s=float(values["TransferTimeout"]),
        server_name=server_name,
        common=common,
    )
