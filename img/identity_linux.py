"""Applying a machine's identity to an installed Linux system, offline, on its root
filesystem mounted by img (img/identity_apply.py): the host name, and the network settings of
whichever network configuration the system uses: NetworkManager, systemd-networkd or SUSE's
wicked (several when it has several). docs/identity.md, "Applying an identity after a
restore", lists every file.

The render_* functions are pure (identity in, file text out); the rest writes them. Every file
is written whole to a temporary name beside it and renamed into place, so a system never holds
half a file; a path whose folder leads out of the system's root (a symbolic link such as
/etc -> /somewhere) is refused rather than followed onto the imaging environment's own files.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass

from common.identity import MachineIdentity

from .errors import IdentityError

NM_CONNECTION = "etc/NetworkManager/system-connections/preboot-identity.nmconnection"
NETWORKD_FILE = "etc/systemd/network/00-preboot-identity.network"
WICKED_DIR = "etc/sysconfig/network"
# NetworkManager's own connections may name the device; ours matches any Ethernet device and
# outranks them (connection.autoconnect-priority, default 0).
NM_PRIORITY = 100


@dataclass(frozen=True)
class Stack:
    """A network configuration the system uses, and why img thinks so."""

    name: str          # "NetworkManager", "systemd-networkd" or "wicked"
    reason: str


def is_linux(root: str) -> str:
    """Why root holds an installed Linux system, "" when it does not (an os-release file and
    an /etc folder: a /boot or /home partition has neither)."""
    if not os.path.isdir(os.path.join(root, "etc")):
        return ""
    for name in ("etc/os-release", "usr/lib/os-release"):
        if os.path.lexists(os.path.join(root, name)):
            return f"/{name}"
    return ""


def _enabled(root: str, service: str) -> bool:
    systemd = os.path.join(root, "etc/systemd/system")
    try:
        wants = [d for d in os.listdir(systemd) if d.endswith(".wants")]
    except OSError:
        return False
    return any(os.path.lexists(os.path.join(systemd, d, service)) for d in wants)


def _listing(root: str, folder: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(root, folder)))
    except OSError:
        return []


def wicked_ifcfgs(root: str) -> list[str]:
    """The ifcfg-* files of real interfaces (not the loopback's) in /etc/sysconfig/network."""
    return [name for name in _listing(root, WICKED_DIR)
            if name.startswith("ifcfg-") and name != "ifcfg-lo" and "." not in name[6:]
            and not name.endswith("~")]


def network_stacks(root: str) -> list[Stack]:
    """The decision: which network configurations the system uses, each with its reason."""
    found = []
    connections = _listing(root, "etc/NetworkManager/system-connections")
    if _enabled(root, "NetworkManager.service"):
        found.append(Stack("NetworkManager", "NetworkManager.service is enabled"))
    elif connections:
        found.append(Stack("NetworkManager", "/etc/NetworkManager/system-connections holds "
                           f"{len(connections)} connection(s)"))
    networks = [n for n in _listing(root, "etc/systemd/network") if n.endswith(".network")]
    if _enabled(root, "systemd-networkd.service"):
        found.append(Stack("systemd-networkd", "systemd-networkd.service is enabled"))
    elif networks:
        found.append(Stack("systemd-networkd", f"/etc/systemd/network holds {networks[0]}"))
    ifcfgs = wicked_ifcfgs(root)
    if ifcfgs:
        found.append(Stack("wicked", f"/{WICKED_DIR} holds {ifcfgs[0]}"))
    elif _enabled(root, "wicked.service"):
        found.append(Stack("wicked", "wicked.service is enabled"))
    return found


# ------------------------------------------------------------------ rendering (pure)

def fqdn(identity: MachineIdentity) -> str:
    suffix = identity.dns_suffix.rstrip(".")
    return f"{identity.name}.{suffix}" if suffix else identity.name


def render_hosts(text: str, identity: MachineIdentity) -> str:
    """/etc/hosts with its 127.0.1.1 line naming the machine (Debian's convention for a host
    name without a fixed address), added after the 127.0.0.1 line when there is none."""
    names = f"{fqdn(identity)} {identity.name}" if identity.dns_suffix else identity.name
    line = f"127.0.1.1\t{names}"
    lines = text.splitlines()
    replaced = [line if re.match(r"\s*127\.0\.1\.1\s", raw + " ") else raw for raw in lines]
    if replaced == lines and line not in lines:
        at = next((i + 1 for i, raw in enumerate(lines) if raw.split()[:1] == ["127.0.0.1"]),
                  len(lines))
        replaced.insert(at, line)
    return "\n".join(replaced) + "\n"


def render_nm_connection(identity: MachineIdentity) -> str:
    """A NetworkManager keyfile for any Ethernet device (nm-settings-keyfile(5))."""
    ip = identity.ip
    suffix = identity.dns_suffix.rstrip(".")
    lines = ["[connection]", "id=preboot-identity",
             f"uuid={uuid.uuid5(uuid.NAMESPACE_DNS, 'preboot-identity.' + identity.name)}",
             "type=ethernet", "autoconnect=true", f"autoconnect-priority={NM_PRIORITY}", "",
             "[ethernet]", "", "[ipv4]"]
    if ip is None:
        lines.append("method=auto")
    else:
        address = f"{ip.address}/{ip.prefix_len}" + (f",{ip.gateway}" if ip.gateway else "")
        lines += ["method=manual", f"address1={address}"]
        if ip.dns_servers:
            lines.append("dns=" + "".join(f"{s};" for s in ip.dns_servers))
    if suffix:
        lines.append(f"dns-search={suffix};")
    lines += ["", "[ipv6]", "method=auto", ""]
    return "\n".join(lines)


def render_networkd(identity: MachineIdentity) -> str:
    """A systemd-networkd .network file for any Ethernet device (systemd.network(5))."""
    ip = identity.ip
    suffix = identity.dns_suffix.rstrip(".")
    lines = ["# written by img identity (preboot imaging): this machine's identity",
             "[Match]", "Type=ether", "", "[Network]"]
    if ip is None:
        lines.append("DHCP=ipv4")
    else:
        lines.append(f"Address={ip.address}/{ip.prefix_len}")
        if ip.gateway:
            lines.append(f"Gateway={ip.gateway}")
        lines += [f"DNS={server}" for server in ip.dns_servers]
    if suffix:
        lines.append(f"Domains={suffix}")
    return "\n".join(lines) + "\n"


_ASSIGNMENT = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")


def set_sysconfig(text: str, values: dict[str, str]) -> str:
    """A sysconfig (shell variable) file with each KEY set to 'value': the existing assignment
    replaced in place, a missing one appended; comments and other lines kept."""
    pending = dict(values)
    out = []
    for raw in text.splitlines():
        match = _ASSIGNMENT.match(raw)
        key = match.group(1) if match else None
        if key in values:
            if key in pending:
                out.append(f"{key}='{pending.pop(key)}'")
            continue                                # a second assignment of it: dropped
        out.append(raw)
    out += [f"{key}='{value}'" for key, value in pending.items()]
    return "\n".join(out) + "\n"


def wicked_ifcfg_values(identity: MachineIdentity) -> dict[str, str]:
    ip = identity.ip
    if ip is None:
        return {"BOOTPROTO": "dhcp", "STARTMODE": "auto", "IPADDR": "", "NETMASK": ""}
    return {"BOOTPROTO": "static", "STARTMODE": "auto",
            "IPADDR": f"{ip.address}/{ip.prefix_len}", "NETMASK": ip.netmask}


def wicked_config_values(identity: MachineIdentity) -> dict[str, str]:
    """netconfig's static DNS settings in /etc/sysconfig/network/config."""
    servers = " ".join(identity.ip.dns_servers) if identity.ip else ""
    return {"NETCONFIG_DNS_STATIC_SEARCHLIST": identity.dns_suffix.rstrip("."),
            "NETCONFIG_DNS_STATIC_SERVERS": servers}


def render_wicked_routes(text: str, identity: MachineIdentity) -> str:
    """/etc/sysconfig/network/routes with its default route set (static) or removed (DHCP)."""
    kept = [raw for raw in text.splitlines() if raw.split()[:1] not in (["default"], ["0.0.0.0"])]
    ip = identity.ip
    if ip is not None and ip.gateway:
        kept.append(f"default {ip.gateway} - -")
    return "\n".join(kept) + "\n" if kept else ""


# ------------------------------------------------------------------ writing

class _System:
    """Reads and writes files of the system mounted at root, never outside it."""

    def __init__(self, root: str, where: str):
        self.root = os.path.realpath(root)
        self.where = f"{where}: " if where else ""     # what messages start with

    def _path(self, relative: str) -> str:
        path = os.path.join(self.root, relative)
        folder = os.path.realpath(os.path.dirname(path))
        if folder != self.root and not folder.startswith(self.root + os.sep):
            raise IdentityError(f"{self.where}/{os.path.dirname(relative)} leads out of the "
                                "system's root (a symbolic link); not followed")
        return path

    def exists(self, relative: str) -> bool:
        return os.path.lexists(self._path(relative))

    def read(self, relative: str) -> str:
        path = self._path(relative)
        if os.path.islink(path):
            return ""                      # its target is not ours to read; replaced below
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise IdentityError(f"{self.where}cannot read /{relative}: {exc.strerror}") from None

    def write(self, relative: str, text: str, mode: int = 0o644) -> None:
        path = self._path(relative)
        temporary = f"{path}.img-identity"
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                                 mode)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise IdentityError(f"{self.where}cannot write /{relative}: {exc.strerror}"
                                ) from None


def apply_linux(root: str, identity: MachineIdentity, where: str = "") -> list[str]:
    """Apply identity to the Linux system mounted at root; the lines saying what was written.
    Raises IdentityError naming the file that could not be written."""
    system = _System(root, where)
    lines = [_apply_hostname(system, identity)]
    stacks = network_stacks(root)
    if not stacks:
        lines.append("no network configuration recognised (NetworkManager, systemd-networkd, "
                     "wicked): network settings not applied")
    for stack in stacks:
        apply = {"NetworkManager": _apply_nm, "systemd-networkd": _apply_networkd,
                 "wicked": _apply_wicked}[stack.name]
        lines.append(f"{stack.name} ({stack.reason}): {apply(system, identity)}")
    if identity.workgroup:
        lines.append(f"workgroup {identity.workgroup} not applied (img does not edit Samba's "
                     "configuration)")
    return lines


def _network_words(identity: MachineIdentity) -> str:
    return "DHCP" if identity.ip is None else identity.describe().split(" ", 1)[1]


def _apply_hostname(system: _System, identity: MachineIdentity) -> str:
    system.write("etc/hostname", identity.name + "\n")
    written = ["/etc/hostname"]
    if system.exists("etc/HOSTNAME"):              # SUSE's, with the full name
        system.write("etc/HOSTNAME", fqdn(identity) + "\n")
        written.append("/etc/HOSTNAME")
    system.write("etc/hosts", render_hosts(system.read("etc/hosts"), identity))
    written.append("/etc/hosts")
    return f"host name {fqdn(identity)} ({', '.join(written)})"


def _apply_nm(system: _System, identity: MachineIdentity) -> str:
    system.write(NM_CONNECTION, render_nm_connection(identity), mode=0o600)
    return f"{_network_words(identity)} in /{NM_CONNECTION}"


def _apply_networkd(system: _System, identity: MachineIdentity) -> str:
    system.write(NETWORKD_FILE, render_networkd(identity))
    return f"{_network_words(identity)} in /{NETWORKD_FILE}"


def _apply_wicked(system: _System, identity: MachineIdentity) -> str:
    names = wicked_ifcfgs(system.root) or ["ifcfg-eth0"]
    values = wicked_ifcfg_values(identity)
    # A static address goes to one interface only, so two never share it.
    targets = names[:1] if identity.ip is not None else names
    for name in targets:
        relative = f"{WICKED_DIR}/{name}"
        system.write(relative, set_sysconfig(system.read(relative), values))
    config = f"{WICKED_DIR}/config"
    system.write(config, set_sysconfig(system.read(config), wicked_config_values(identity)))
    routes = f"{WICKED_DIR}/routes"
    text = render_wicked_routes(system.read(routes), identity)
    if text or system.exists(routes):
        system.write(routes, text)
    files = ", ".join(f"/{WICKED_DIR}/{n}" for n in targets)
    return f"{_network_words(identity)} in {files}, /{config}, /{routes}"
