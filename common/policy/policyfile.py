"""The policy file: the whole directory (rules, menu, workstations, multicast sessions) as one
readable, diff-able text file in configobj syntax, the same for both backends.

`preboot-dir export` writes it and `preboot-dir import` reads it. Export is canonical (fixed key
order, canonical filter text, optional keys only when set), so export -> import -> export gives
identical bytes and `diff` shows only real changes. Errors name the file, line, section and key.

    format = 1
    [menu]
    display = hotkey            # always | never | hotkey
    timeout_s = 5
    [rules]                     # tried in order; the first enabled match decides
    [[Dell lab]]
    enabled = yes
    filter = "manufacturer = 'Dell Inc.' and ram_mb >= 4096"
    action = restore            # restore | make | multicast | maintenance | none
    image = dell/base.img
    addons = dell/drivers.add, dell/office.add
    force = no
    shrink = yes                # restore: onto a smaller disk, shrink filesystems to fit
    fileset = 2                 # restore: the image's file set (1, the default: everything)
    [workstations]
    [[00C04FDC2AB5]]
    name = lab-01
    image_on_next_boot = yes
    image = dell/base.img
    menu = always               # optional: this machine's menu display
    [sessions]                  # in order: the first enabled one a machine qualifies for
    [[weekly]]
    image = dell/base.img
    clients = 5                 # start when this many have joined ...
    timeout_min = 15            # ... or this long after the last join (0: no timer)
    enabled = yes
    delete_after = yes          # no: keep the session, disabled, when it is done
    participants = 00C04FDC2AB5, lab-02   # optional: machines named (MACs or names)
    group = 239.192.0.7         # optional: the group address (default: from the name)
    data_port = 997             # optional: the data port (default: imgsrvd's MulticastPort)
    [identities]                # identity policies (docs/identity.md); rules name them
    [[lab]]
    naming = serial             # serial | asset_tag | mac | counter
    prefix = lab-
    counter_digits = 3          # counter naming: lab-001
    dns_suffix = lab.example.com
    workgroup = LAB
    ip = pool                   # dhcp | pool
    addresses = 10.0.0.10-10.0.0.50, 10.0.0.60
    prefix_len = 24             # or netmask = 255.255.255.0
    gateway = 10.0.0.1
    dns_servers = 10.0.0.2, 10.0.0.3
    default = yes               # for machines whose rule names no identity policy

A rule names its identity policy with `identity = lab`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

import configobj

from common import __version__
from common.machine import normalize_mac

from .identitypolicy import AddressPool, IdentityPolicy, NameSource
from .model import (MAX_FILESETS, MAX_SESSION_NAME_BYTES, Action, ActionKind, ImagingPolicy,
                    MenuDisplay,
                     MenuSettings, MulticastSession, PolicyDocument, Rule, Workstation)
from .rules import FilterSyntaxError, parse_filter

FORMAT_VERSION = 1
_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_NAME_FORBIDDEN = re.compile(r'[\[\]"\x00-\x1f\x7f]')

RULE_KEYS = ("enabled", "filter", "action", "image", "addons", "session", "force", "shrink",
             "fileset", "identity")
STATION_KEYS = ("name", "image_on_next_boot", "image", "menu")
SESSION_KEYS = ("image", "clients", "timeout_min", "enabled", "delete_after", "participants",
                "group", "data_port")
MENU_KEYS = ("display", "timeout_s")
IDENTITY_KEYS = ("naming", "prefix", "counter_digits", "dns_suffix", "workgroup", "ip",
                 "addresses", "prefix_len", "netmask", "gateway", "dns_servers", "default")


class PolicyFileError(ValueError):
    def __init__(self, source: str, line: int | None, where: str, message: str):
        self.source, self.line, self.where, self.message = source, line, where, message
        location = f"{source}:{line}" if line else source
        super().__init__(f"{location}: {where}: {message}" if where else f"{location}: {message}")


def check_name(kind: str, name: str) -> str | None:
    """Why a rule or session name cannot be used, or None. Names are section headers in the
    policy file and RDNs in LDAP, so brackets, double quotes and control characters are out
    (configobj cannot quote a section name holding both kinds of quote)."""
    if not name or name != name.strip():
        return f"{kind} name '{name}' is empty or has leading/trailing spaces"
    if _NAME_FORBIDDEN.search(name) or len(name) > 128:
        return (f"{kind} name '{name}' has brackets, double quotes or control characters, "
                f"or is over 128 characters")
    return None


def check_session_name(name: str) -> str | None:
    """check_name for a multicast session, which also travels in every packet of the session:
    at most 255 bytes of UTF-8 (the wire's bound)."""
    problem = check_name("session", name)
    if problem:
        return problem
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_SESSION_NAME_BYTES:
        return (f"session name '{name}' is {size} bytes of UTF-8, more than "
                f"{MAX_SESSION_NAME_BYTES} (the multicast packets' bound)")
    return None


# -- writing ----------------------------------------------------------------------------------

def dump_policy(document: PolicyDocument, origin: str = "") -> str:
    """The canonical text of a document."""
    config = configobj.ConfigObj(encoding="utf-8", indent_type="    ")
    config.initial_comment = [
        f"# Preboot policy, written by preboot-dir {__version__}"
        + (f" from {origin}" if origin else ""),
        "# Rules are tried in order: the first enabled rule whose filter matches a machine",
        "# decides its work. Edit, then: preboot-dir import FILE",
    ]
    config["format"] = str(FORMAT_VERSION)
    menu = document.policy.menu
    config["menu"] = {"display": menu.display.value, "timeout_s": str(menu.timeout_s)}
    config["rules"] = {}
    for rule in document.policy.rules:
        config["rules"][rule.name] = _rule_values(rule)
    config["workstations"] = {}
    for station in sorted(document.workstations, key=lambda s: s.mac):
        values = {"name": station.name, "image_on_next_boot": _yes(station.image_on_next_boot)}
        if station.image:
            values["image"] = station.image
        if station.menu is not None:
            values["menu"] = station.menu.value
        config["workstations"][station.mac] = values
    config["sessions"] = {}
    for session in document.sessions:
        config["sessions"][session.name] = _session_values(session)
    if document.policy.identities:     # only when there are some: older files stay as they were
        config["identities"] = {}
        for identity in document.policy.identities:
            config["identities"][identity.name] = _identity_values(identity)
    lines = config.write()
    return "\n".join(line.decode("utf-8") if isinstance(line, bytes) else line
                     for line in lines) + "\n"


def _rule_values(rule: Rule) -> dict[str, Any]:
    values: dict[str, Any] = {"enabled": _yes(rule.enabled), "filter": rule.filter.canonical(),
                              "action": rule.action.kind.value}
    if rule.action.image:
        values["image"] = rule.action.image
    if rule.action.addons:
        values["addons"] = list(rule.action.addons)
    if rule.action.session:
        values["session"] = rule.action.session
    values["force"] = _yes(rule.force)
    if rule.action.shrink:
        values["shrink"] = "yes"
    if rule.action.fileset != 1:
        values["fileset"] = str(rule.action.fileset)
    if rule.identity:
        values["identity"] = rule.identity
    return values


def _identity_values(policy: IdentityPolicy) -> dict[str, Any]:
    values: dict[str, Any] = {"naming": policy.naming.value, "prefix": policy.prefix}
    if policy.naming is NameSource.COUNTER:
        values["counter_digits"] = str(policy.counter_digits)
    if policy.dns_suffix:
        values["dns_suffix"] = policy.dns_suffix
    if policy.workgroup:
        values["workgroup"] = policy.workgroup
    pool = policy.pool
    values["ip"] = "dhcp" if pool is None else "pool"
    if pool is not None:
        values["addresses"] = list(pool.ranges)
        values["prefix_len"] = str(pool.prefix_len)
        if pool.gateway:
            values["gateway"] = pool.gateway
        if pool.dns_servers:
            values["dns_servers"] = list(pool.dns_servers)
    values["default"] = _yes(policy.default)
    return values


def _session_values(session: MulticastSession) -> dict[str, Any]:
    values: dict[str, Any] = {
        "image": session.image, "clients": str(session.clients),
        "timeout_min": str(session.timeout_min), "enabled": _yes(session.enabled),
        "delete_after": _yes(session.delete_after)}
    if session.participants:           # optional keys only when set: older files stay as they were
        values["participants"] = list(session.participants)
    if session.group:
        values["group"] = session.group
    if session.data_port:
        values["data_port"] = str(session.data_port)
    return values


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# -- reading ----------------------------------------------------------------------------------

@dataclass
class _Reader:
    source: str
    lines: list[str]

    def fail(self, sections: tuple[str, ...], key: str | None, message: str) -> PolicyFileError:
        where = " ".join(f"{'[' * (depth + 1)}{name}{']' * (depth + 1)}"
                         for depth, name in enumerate(sections))
        if key:
            where = f"{where} {key}".strip()
        return PolicyFileError(self.source, self.line_of(sections, key), where, message)

    def line_of(self, sections: tuple[str, ...], key: str | None) -> int | None:
        """The line of `key` inside the nested `sections` (configobj keeps no line numbers)."""
        path: list[str] = []
        found_section = None
        header = re.compile(r"^\s*(\[+)\s*(.*?)\s*\]+\s*(#.*)?$")
        key_line = re.compile(r"^\s*([^=\s#][^=]*?)\s*=")
        for number, line in enumerate(self.lines, 1):
            match = header.match(line)
            if match:
                depth = len(match.group(1))
                name = match.group(2).strip("\"'")
                path = path[:depth - 1] + [name]
                if tuple(path) == sections:
                    found_section = number
                    if key is None:
                        return number
                continue
            if key is not None and tuple(path) == sections:
                match = key_line.match(line)
                if match and match.group(1) == key:
                    return number
        return found_section


def load_policy(text: str, source: str = "<policy>") -> PolicyDocument:
    """Parse a policy file; PolicyFileError on the first problem."""
    reader = _Reader(source, text.splitlines())
    try:
        config = configobj.ConfigObj(text.splitlines(), encoding="utf-8", list_values=True,
                                     interpolation=False, raise_errors=True)
    except configobj.ConfigObjError as exc:
        line = getattr(exc, "line_number", None)
        raise PolicyFileError(source, line, "", f"syntax error: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    _only(reader, (), config.scalars, ("format",))
    _only(reader, (), config.sections, ("menu", "rules", "workstations", "sessions",
                                        "identities"))
    version = config.get("format", str(FORMAT_VERSION))
    if version != str(FORMAT_VERSION):
        raise reader.fail((), "format", f"format {version} is not supported (this release reads "
                                        f"format {FORMAT_VERSION})")
    menu = _menu(reader, config.get("menu", {}))
    rules = tuple(_rule(reader, name, section)
                  for name, section in _subsections(reader, config, "rules"))
    _unique_names(reader, "rules", [rule.name for rule in rules])
    stations = tuple(_station(reader, name, section)
                     for name, section in _subsections(reader, config, "workstations"))
    macs = [s.mac for s in stations]
    for mac in macs:
        if macs.count(mac) > 1:
            raise reader.fail(("workstations",), None, f"MAC {mac} is listed more than once")
    sessions = tuple(_session(reader, name, section)
                     for name, section in _subsections(reader, config, "sessions"))
    _unique_names(reader, "sessions", [session.name for session in sessions])
    identities = tuple(_identity(reader, name, section)
                       for name, section in _subsections(reader, config, "identities"))
    policy = ImagingPolicy(rules, menu, identities)
    problem = policy.identity_problem()
    if problem:
        raise reader.fail(("identities",), None, problem)
    return PolicyDocument(policy, stations, sessions)


@dataclass(frozen=True)
class FileShape:
    """What a policy file spells out, beyond the values load_policy returns (a merge needs it:
    a key left out keeps the store's value)."""

    menu_keys: frozenset[str] | None           # None: no [menu] section
    station_keys: dict[str, frozenset[str]]    # normalised MAC -> the keys written for it


def file_shape(text: str) -> FileShape:
    """The sections and workstation keys of a file load_policy has accepted."""
    config = configobj.ConfigObj(text.splitlines(), encoding="utf-8", list_values=True,
                                 interpolation=False, raise_errors=True)
    stations = config.get("workstations") or {}
    keys: dict[str, frozenset[str]] = {}
    for name in getattr(stations, "sections", []):
        mac = normalize_mac(name)
        if mac is not None:
            keys[mac] = frozenset(stations[name].scalars)
    menu = frozenset(config["menu"].scalars) if "menu" in config.sections else None
    return FileShape(menu, keys)


def _unique_names(reader: _Reader, section: str, names: list[str]) -> None:
    """Names differing only in case are one name to LDAP (and to SQLite's NOCASE index)."""
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.casefold().split())
        if key in seen:
            raise reader.fail((section, name), None,
                              f"'{name}' and '{seen[key]}' differ only in case or spacing")
        seen[key] = name


def _subsections(reader: _Reader, config: configobj.ConfigObj, name: str) -> list[tuple[str, Any]]:
    section = config.get(name)
    if section is None:
        return []
    if section.scalars:
        raise reader.fail((name,), section.scalars[0],
                          f"[{name}] holds only [[...]] sections, one per entry")
    return [(entry, section[entry]) for entry in section.sections]


def _only(reader: _Reader, sections: tuple[str, ...], present: list[str],
          allowed: tuple[str, ...]) -> None:
    for key in present:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise reader.fail(sections, key, f"unknown key{suffix}")


def _value(reader: _Reader, where: tuple[str, ...], section: Any, key: str, default: Any,
           convert: Callable[[Any], Any]) -> Any:
    if key not in section:
        return default
    try:
        return convert(section[key])
    except (ValueError, TypeError) as exc:
        raise reader.fail(where, key, str(exc)) from None


def _text(value: Any) -> str:
    if isinstance(value, list):
        raise ValueError("one value expected; quote values that contain commas")
    return str(value)


def _flag(value: Any) -> bool:
    text = _text(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"'{value}' is not yes or no")


def _count(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        text = _text(value).strip()
        if not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"'{text}' is not a whole number from {low} to {high}")
        return int(text)
    return convert


def _display(value: Any) -> MenuDisplay:
    text = _text(value).strip().lower()
    try:
        return MenuDisplay(text)
    except ValueError:
        raise ValueError(f"'{text}' is not always, never or hotkey") from None


def _menu(reader: _Reader, section: Any) -> MenuSettings:
    where = ("menu",)
    if section:
        _only(reader, where, section.scalars, MENU_KEYS)
        _only(reader, where, section.sections, ())
    return MenuSettings(_value(reader, where, section, "display", MenuDisplay.HOTKEY, _display),
                        _value(reader, where, section, "timeout_s", 5, _count(0, 3600)))


def _rule(reader: _Reader, name: str, section: Any) -> Rule:
    where = ("rules", name)
    problem = check_name("rule", name)
    if problem:
        raise reader.fail(where, None, problem)
    _only(reader, where, section.scalars, RULE_KEYS)
    _only(reader, where, section.sections, ())
    try:
        filter_ = parse_filter(_text(section.get("filter", "")))
    except FilterSyntaxError as exc:
        raise reader.fail(where, "filter", str(exc)) from None
    except ValueError as exc:
        raise reader.fail(where, "filter", str(exc)) from None

    def kind(value: Any) -> ActionKind:
        text = _text(value).strip().lower()
        try:
            return ActionKind(text)
        except ValueError:
            names = ", ".join(k.value for k in ActionKind)
            raise ValueError(f"'{text}' is not one of {names}") from None

    if "action" not in section:
        raise reader.fail(where, None, "no action (restore, make, multicast, maintenance, none)")
    action_kind = _value(reader, where, section, "action", ActionKind.NONE, kind)
    addons = section.get("addons", [])
    addons = tuple(a.strip() for a in ([addons] if isinstance(addons, str) else addons)
                   if a.strip())
    image = _value(reader, where, section, "image", "", _text).strip()
    session = _value(reader, where, section, "session", "", _text).strip()
    shrink = _value(reader, where, section, "shrink", False, _flag)
    fileset = _value(reader, where, section, "fileset", 1, _count(1, MAX_FILESETS))
    if fileset != 1 and action_kind is not ActionKind.RESTORE:
        raise reader.fail(where, "fileset", "a file set goes only with action restore")
    try:
        action = Action(action_kind, image, addons, session, shrink, fileset)
    except ValueError as exc:
        raise reader.fail(where, "action", str(exc)) from None
    return Rule(name, filter_, action,
                _value(reader, where, section, "enabled", True, _flag),
                _value(reader, where, section, "force", False, _flag),
                _value(reader, where, section, "identity", "", _text).strip())


def _station(reader: _Reader, name: str, section: Any) -> Workstation:
    where = ("workstations", name)
    mac = normalize_mac(name)
    if mac is None:
        raise reader.fail(where, None, f"'{name}' is not a MAC address")
    _only(reader, where, section.scalars, STATION_KEYS)
    _only(reader, where, section.sections, ())
    return Workstation(mac, _value(reader, where, section, "name", "", _text).strip(),
                       _value(reader, where, section, "image_on_next_boot", False, _flag),
                       _value(reader, where, section, "image", "", _text).strip(),
                       _value(reader, where, section, "menu", None, _display))


def _session(reader: _Reader, name: str, section: Any) -> MulticastSession:
    where = ("sessions", name)
    problem = check_session_name(name)
    if problem:
        raise reader.fail(where, None, problem)
    _only(reader, where, section.scalars, SESSION_KEYS)
    _only(reader, where, section.sections, ())
    image = _value(reader, where, section, "image", "", _text).strip()
    if not image:
        raise reader.fail(where, "image", "a multicast session needs its master image")
    participants = section.get("participants", [])
    participants = tuple(p.strip() for p in ([participants] if isinstance(participants, str)
                                             else participants) if p.strip())
    group = _value(reader, where, section, "group", "", _text).strip()
    fields = dict(
        clients=_value(reader, where, section, "clients", 5, _count(1, 10000)),
        timeout_min=_value(reader, where, section, "timeout_min", 15, _count(0, 10080)),
        enabled=_value(reader, where, section, "enabled", True, _flag),
        delete_after=_value(reader, where, section, "delete_after", True, _flag),
        data_port=_value(reader, where, section, "data_port", 0, _count(0, 65535)))
    for key, value in (("image", None), ("participants", participants), ("group", group)):
        extra = {} if value is None else {key: value}
        try:
            MulticastSession(name, image, **extra)
        except ValueError as exc:
            raise reader.fail(where, key, str(exc)) from None
    try:
        return MulticastSession(name, image, participants=participants, group=group, **fields)
    except ValueError as exc:
        raise reader.fail(where, None, str(exc)) from None


def _texts(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    return tuple(item.strip() for item in items if item.strip())


def _naming(value: Any) -> NameSource:
    text = _text(value).strip().lower()
    try:
        return NameSource(text)
    except ValueError:
        raise ValueError(f"'{text}' is not one of "
                         f"{', '.join(s.value for s in NameSource)}") from None


def _netmask(value: Any) -> int:
    import ipaddress
    text = _text(value).strip()
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise ValueError(f"'{text}' is not a netmask (255.255.255.0)") from None


def _identity(reader: _Reader, name: str, section: Any) -> IdentityPolicy:
    where = ("identities", name)
    problem = check_name("identity policy", name)
    if problem:
        raise reader.fail(where, None, problem)
    _only(reader, where, section.scalars, IDENTITY_KEYS)
    _only(reader, where, section.sections, ())
    ip = _value(reader, where, section, "ip", "dhcp", _text).strip().lower()
    if ip not in ("dhcp", "pool"):
        raise reader.fail(where, "ip", f"'{ip}' is not dhcp or pool")
    pool = None
    pool_keys = ("addresses", "prefix_len", "netmask", "gateway", "dns_servers")
    if ip == "dhcp":
        for key in pool_keys:
            if key in section:
                raise reader.fail(where, key, "goes only with ip = pool")
    else:
        if "prefix_len" in section and "netmask" in section:
            raise reader.fail(where, "netmask", "give prefix_len or netmask, not both")
        if "prefix_len" not in section and "netmask" not in section:
            raise reader.fail(where, None, "ip = pool needs prefix_len (or netmask)")
        prefix_len = _value(reader, where, section, "prefix_len", None, _count(1, 32))
        if prefix_len is None:
            prefix_len = _value(reader, where, section, "netmask", None, _netmask)
        try:
            pool = AddressPool(_texts(section.get("addresses", [])), prefix_len,
                               _value(reader, where, section, "gateway", "", _text).strip(),
                               _texts(section.get("dns_servers", [])))
        except ValueError as exc:
            text = str(exc)
            key = text.split(":", 1)[0].replace("ip.", "").replace("address", "addresses")
            key = {"addresseses": "addresses", "prefix_len": "prefix_len"}.get(key, key)
            raise reader.fail(where, key if key in pool_keys else None, text) from None
    try:
        return IdentityPolicy(
            name, _value(reader, where, section, "naming", NameSource.SERIAL, _naming),
            _value(reader, where, section, "prefix", "", _text).strip(),
            _value(reader, where, section, "counter_digits", 3, _count(1, 6)),
            _value(reader, where, section, "dns_suffix", "", _text).strip(),
            _value(reader, where, section, "workgroup", "", _text).strip(),
            pool, _value(reader, where, section, "default", False, _flag))
    except ValueError as exc:
        text = str(exc)
        key = text.split(":", 1)[0]
        raise reader.fail(where, key if key in IDENTITY_KEYS else None, text) from None
