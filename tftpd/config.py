"""tftpd's config keys (the schema) and the frozen settings the server runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key, Schema
from common.errors import SettingError
from common.daemon.runner import CommonSettings, common_keys
from common.daemon.services import TFTPD

STATUS_PORT = TFTPD.status_port

SCHEMA = Schema((
    Key("IPAddress", "ipv4_addr", "0.0.0.0",
        "Address to listen on; 0.0.0.0 answers on every interface, from the address asked."),
    Key("Port", "integer(min=0, max=65535)", "69", "UDP port for requests; 0 picks a free one."),
    Key("Root", "path", "/srv/tftp", "Folder served; nothing outside it is ever read."),
    Key("AllowWrite", "boolean", "NO", "Accept WRQ (uploads)."),
    Key("UploadDir", "string", "upload",
        "Folder uploads go to; relative to Root, and must lie inside Root."),
    Key("AllowOverwrite", "boolean", "NO", "Let an upload replace an existing file."),
    Key("MaxBlockSize", "integer(min=8, max=65464)", "65464",
        "Largest blksize granted (RFC 2348)."),
    Key("MaxWindowSize", "integer(min=1, max=65535)", "64",
        "Largest windowsize granted (RFC 7440)."),
    Key("Timeout", "integer(min=1, max=255)", "1",
        "Seconds before a block is sent again, unless the client asks (RFC 2349)."),
    Key("Retries", "integer(min=1, max=100)", "6", "Resends before a transfer is given up."),
    Key("MaxTransfers", "integer(min=1, max=100000)", "5000",
        "Concurrent transfers; requests beyond are dropped (the client retries)."),
    Key("MaxUploadSize", "integer(min=0)", "0", "Largest upload in bytes; 0 means no limit."),
    Key("CaseInsensitive", "boolean", "NO",
        "Find 'PXELINUX.0' when only 'pxelinux.0' exists."),
    Key("PolicyGateway", "string", "http://{server}:8090",
        "Preboot Policy Service that answers Secure Boot clients' GRUB (grub/grub.cfg and "
        "preboot/policy.grub/..., docs/secure-boot.md); {server} is the address the client "
        "asked on. off: those names are read from Root like any file."),
) + common_keys(TFTPD))


@dataclass(frozen=True)
class Settings:
    ip_address: str
    port: int
    root: str
    allow_write: bool
    upload_dir: str
    allow_overwrite: bool
    max_blksize: int
    max_windowsize: int
    timeout_s: float
    retries: int
    max_transfers: int
    max_upload_bytes: int
    case_insensitive: bool
    common: CommonSettings
    policy_gateway: str = ""         # base URL, may hold {server}; "": no gateway


def _gateway(value: str) -> str:
    value = value.strip()
    if value.lower() in ("off", "no", "none"):
        return ""
    if not value.startswith(("http://", "https://")):
        raise SettingError("PolicyGateway", f"'{value}' is not an http:// or https:// URL, "
                                            "or off")
    if any(c.isspace() or ord(c) < 32 for c in value):
        raise SettingError("PolicyGateway", f"'{value}' holds blanks or control characters")
    return value


def make_settings(values: dict[str, Any], common: CommonSettings) -> Settings:
    root = os.path.abspath(values["Root"])
    upload = os.path.normpath(os.path.join(root, values["UploadDir"]))  # relative to Root
    settings = Settings(
        ip_address=values["IPAddress"], port=values["Port"], root=root,
        allow_write=values["AllowWrite"], upload_dir=upload,
        allow_overwrite=values["AllowOverwrite"], max_blksize=values["MaxBlockSize"],
        max_windowsize=values["MaxWindowSize"], timeout_s=float(values["Timeout"]),
        retries=values["Retries"], max_transfers=values["MaxTransfers"],
        max_upload_bytes=values["MaxUploadSize"], case_insensitive=values["CaseInsensitive"],
        common=common, policy_gateway=_gateway(values["PolicyGateway"]))
    if not os.path.isdir(root):
        raise SettingError("Root", f"folder {root} does not exist")
    if not (upload == root or upload.startswith(root.rstrip("/") + "/")):
        raise SettingError("UploadDir", f"{upload} is not inside Root {root}")
    return settings
