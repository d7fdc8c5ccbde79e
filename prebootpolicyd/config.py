"""policyd's config keys (the schema) and the frozen settings the server runs on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from common.daemon.config import Key, Schema
from common.policy.directory.settings import DirectorySettings, directory_keys, directory_settings
from common.errors import SettingError
from common.daemon.runner import CommonSettings, common_keys
from common.daemon.services import POLICYD
from common.policy.trust import TrustSettings, trust_keys, trust_settings
from common.daemon.tls import TlsSettings, tls_keys, tls_settings
from common.tlspin import PinError, pem_fingerprint

from .bootfiles import BootFileSettings, bootfile_keys, bootfile_settings

STATUS_PORT = POLICYD.status_port
FALLBACKS = ("local", "maintenance")

SCHEMA = Schema((
    Key("IPAddress", "ip_addr", "0.0.0.0",
        "Address the HTTP service listens on; 0.0.0.0: every IPv4 "
        "interface."),
    Key("Port", "integer(min=0, max=65535)", "8090",
        "HTTP port iPXE asks on (proxydhcpd's IPXEScriptURL names it); 0 picks a free one."),
    *directory_keys("slower or failing queries get FallbackAnswer."),
    Key("FallbackAnswer", "string", "local",
        "What a machine is told when the directory cannot be read: local (boot the local disk) "
        "or maintenance (the imaging environment's shell)."),
    Key("ImagingServer", "string", "",
        "Imaging server the imaging environment talks to (preboot.server=); empty: {server}, "
        "the address iPXE reached this service on."),
    Key("ImagingServerCertificate", "path", "",
        "The certificate the imaging server presents (its TLSCertificate, PEM): the imaging "
        "environment then talks TLS to it and accepts only this certificate (its SHA-256 goes on "
        "the kernel line as preboot.serverpin=). Empty: plain HTTP. Reload after replacing it."),
    Key("ImagingKernel", "string", "http://{server}:{port}/boot/preboot/linux",
        "URL of the imaging environment's kernel; {server} and {port} are replaced by the "
        "address and port iPXE reached this service on (its /boot/ serves BootFilesRoot); "
        "tftp://{server}/preboot/linux fetches it from tftpd instead."),
    Key("ImagingInitrd", "string", "http://{server}:{port}/boot/preboot/initrd",
        "URL of the imaging environment's initrd; {server} and {port} are replaced as for "
        "ImagingKernel."),
    Key("KernelArgs", "string", "console=ttyS0 console=tty0 quiet",
        "Kernel command line put before the preboot.* arguments; quote it if it holds a comma."),
    Key("GrubKernel", "string", "preboot/linux",
        "Secure Boot clients (GRUB, docs/secure-boot.md): the imaging environment's kernel as a "
        "path on the TFTP server GRUB booted from (GRUB cannot fetch over HTTP)."),
    Key("GrubInitrd", "string", "preboot/initrd",
        "Secure Boot clients: the imaging environment's initrd as a path on that TFTP server."),
    Key("MenuHotKey", "string", "Ctrl-A",
        "Key that opens the Preboot menu during the hot-key prompt: Ctrl-A ... Ctrl-Z or Esc "
        "(iPXE cannot see Ctrl+Alt held, the original's hot key)."),
    Key("Workers", "integer(min=1, max=64)", "8",
        "Threads for directory queries (a slow directory never blocks the service)."),
    *bootfile_keys(),
    *trust_keys(1800, "the imaging environment asks the imaging server for the machine's "
                      "work with it, within minutes of the answer", checks=False),
    *tls_keys("iPXE: only a build with HTTPS that trusts this certificate (iPXE's TRUST= build "
              "option); the stock iPXE binaries cannot, so keep it empty for them"),
) + common_keys(POLICYD))


@dataclass(frozen=True)
class HotKey:
    label: str       # "Ctrl-A", "Esc"
    code: int        # what iPXE's prompt --key compares: 0x01, 0x1b

    @property
    def ipxe(self) -> str:
        return f"0x{self.code:02x}"


@dataclass(frozen=True)
class Settings:
    ip_address: str
    port: int
    directory: DirectorySettings
    fallback: str                    # "local" or "maintenance"
    imaging_server: str              # may hold {server}
    imaging_server_pin: str          # SHA-256 of its certificate; "": plain HTTP
    imaging_kernel: str
    imaging_initrd: str
    kernel_args: str
    hot_key: HotKey
    workers: int
    boot_files: BootFileSettings
    trust: TrustSettings
    tls: TlsSettings | None          # None: plain HTTP
    common: CommonSettings
    grub_kernel: str = "/preboot/linux"  # Secure Boot clients: paths on GRUB's TFTP server
    grub_initrd: str = "/preboot/initrd"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOT_KEY = re.compile(r"(?i)(?:ctrl|control|\^)[-+ ]?([a-z])")


def parse_hot_key(text: str) -> HotKey | None:
    """'Ctrl-A', 'ctrl+a', '^A' -> Ctrl-A (0x01); 'Esc' / 'Escape' -> 0x1b; else None."""
    text = text.strip()
    if text.lower() in ("esc", "escape"):
        return HotKey("Esc", 0x1B)
    match = _HOT_KEY.fullmatch(text)
    if match is None:
        return None
    letter = match.group(1).upper()
    return HotKey(f"Ctrl-{letter}", ord(letter) - ord("A") + 1)


def _script_word(key: str, value: str, required: bool = True) -> str:
    """A value that goes into an iPXE script as one word: no blanks, no control characters."""
    value = value.strip()
    if required and not value:
        raise SettingError(key, "must not be empty")
    if _CONTROL.search(value) or any(c.isspace() for c in value):
        raise SettingError(key, f"'{value}' must be one word (no blanks or control characters)")
    if value.startswith("#"):
        raise SettingError(key, f"'{value}' starts with '#', which iPXE reads as a comment")
    return value


_TFTP_PATH = re.compile(r"/?[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


def _tftp_path(key: str, value: str) -> str:
    """A path on the TFTP server, as GRUB takes it (absolute on its TFTP device): letters,
    digits, '.', '_', '-' and '/' only, so it is one plain word in a GRUB script."""
    value = value.strip()
    if not _TFTP_PATH.fullmatch(value) or ".." in value.split("/"):
        raise SettingError(key, f"'{value}' is not a path on the TFTP server (letters, digits, "
                                ". _ - and /)")
    return "/" + value.lstrip("/")


def _kernel_args(value: str) -> str:
    if _CONTROL.search(value):
        raise SettingError("KernelArgs", "contains control characters")
    words = value.split()
    for word in words:
        if word in ("||", "&&", ";") or word.startswith("#"):
            raise SettingError("KernelArgs", f"'{word}' would end the iPXE kernel command")
    return " ".join(words)


def _server_pin(path: str) -> str:
    """The pin of the imaging server's certificate file, or "" when none is named."""
    if not path:
        return ""
    try:
        return pem_fingerprint(path)
    except OSError as exc:
        raise SettingError("ImagingServerCertificate", f"{path}: {exc.strerror}") from None
    except PinError as exc:
        raise SettingError("ImagingServerCertificate", str(exc)) from None


def make_settings(values: dict[str, Any], common: CommonSettings) -> Settings:
    directory = directory_settings(values)
    fallback = values["FallbackAnswer"].strip().lower()
    if fallback not in FALLBACKS:
        raise SettingError("FallbackAnswer",
                           f"value '{values['FallbackAnswer']}' is not local or maintenance")
    hot_key = parse_hot_key(values["MenuHotKey"])
    if hot_key is None:
        raise SettingError("MenuHotKey",
                           f"value '{values['MenuHotKey']}' is not Ctrl-A ... Ctrl-Z or Esc")
    return Settings(
        ip_address=values["IPAddress"],
        port=values["Port"],
        directory=directory,
        fallback=fallback,
        imaging_server=_script_word("ImagingServer", values["ImagingServer"], required=False),
        imaging_server_pin=_server_pin(values["ImagingServerCertificate"]),
        imaging_kernel=_script_word("ImagingKernel", values["ImagingKernel"]),
        imaging_initrd=_script_word("ImagingInitrd", values["ImagingInitrd"]),
        kernel_args=_kernel_args(values["KernelArgs"]),
        grub_kernel=_tftp_path("GrubKernel", values["GrubKernel"]),
        grub_initrd=_tftp_path("GrubInitrd", values["GrubInitrd"]),
        hot_key=hot_key,
        workers=values["Workers"],
        boot_files=bootfile_settings(values),
        trust=trust_settings(values),
        tls=tls_settings(values),
        common=common,
    )
