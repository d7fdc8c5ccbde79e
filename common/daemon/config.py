"""Config files: `Key = Value` lines parsed by configobj and checked by validate.

This module owns the syntax every daemon shares (DESIGN.md, "Contracts"): CamelCase keys, `#`
comments, YES/NO booleans, an empty value meaning "use the default", relative paths taken from
the config file's folder, and one-line errors naming file, line and key. Each daemon declares
its keys as a `Schema`; `load_config` returns plain converted values that the daemon turns into
its own frozen settings dataclass.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import configobj
import validate

from common.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key: its validate check, its default (as written in a file) and its meaning."""

    name: str
    check: str
    default: str
    doc: str = ""

    @property
    def is_path(self) -> bool:
        return self.check.startswith("path")


@dataclass(frozen=True)
class Schema:
    keys: tuple[Key, ...]

    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def configspec(self) -> list[str]:
        lines = []
        for key in self.keys:
            default = key.default.replace('"', '\\"')
            check = key.check
            if check.endswith(")"):
                lines.append(f'{key.name} = {check[:-1]}, default="{default}")')
            else:
                lines.append(f'{key.name} = {check}(default="{default}")')
        return lines

    def with_keys(self, extra: Iterable[Key]) -> "Schema":
        return Schema(self.keys + tuple(extra))


def _check_ip(value: Any) -> str:
    if not isinstance(value, str):
        raise validate.VdtTypeError(value)
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise validate.VdtValueError(value) from None
    return str(address)


def _check_ipv4(value: Any) -> str:
    address = _check_ip(value)
    if ":" in address:
        raise validate.VdtValueError(value)
    return address


def _check_path(value: Any) -> str:
    if not isinstance(value, str):
        raise validate.VdtTypeError(value)
    if "\0" in value:
        raise validate.VdtValueError(value)
    return value


def _check_loglevel(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise validate.VdtValueError(value)
    return value.upper()


def _check_string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise validate.VdtTypeError(value)
    return [v.strip() for v in value if v.strip()]


_VALIDATOR = validate.Validator(
    {"ip_addr": _check_ip, "ipv4_addr": _check_ipv4, "path": _check_path, "loglevel": _check_loglevel,
     "strings": _check_string_list}
)


def _line_of(raw_lines: list[str], key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, text in enumerate(raw_lines, start=1):
        if pattern.match(text):
            return number
    return None


def line_of_key(path: str, key: str) -> int | None:
    """The line where `key` is set in `path`, for messages about values checked later."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return _line_of(handle.read().splitlines(), key)
    except (OSError, UnicodeDecodeError):
        return None


def _describe_failure(key: Key, value: Any, failure: Any) -> str:
    shown = value if isinstance(value, str) else ", ".join(map(str, value))
    if key.check.startswith("boolean"):
        return f"value '{shown}' is not YES or NO"
    if key.check.startswith("integer"):
        bounds = re.findall(r"(min|max)=(\d+)", key.check)
        limits = ", ".join(f"{k} {v}" for k, v in bounds)
        kind = "out of range" if isinstance(failure, (validate.VdtValueTooBigError,
                                                      validate.VdtValueTooSmallError)) \
            else "not an integer"
        return f"value '{shown}' is {kind}" + (f" ({limits})" if limits else "")
    if key.check.startswith("ipv4_addr"):
        return f"value '{shown}' is not an IPv4 address"
    if key.check.startswith("ip_addr"):
        return f"value '{shown}' is not an IP address"
    if key.check.startswith("loglevel"):
        return f"value '{shown}' is not one of DEBUG, INFO, WARNING, ERROR"
    if isinstance(value, list) and not key.check.startswith("strings"):
        return f"value '{shown}' is a list; quote values that contain commas"
    reason = str(failure) if isinstance(failure, Exception) else "bad value"
    return f"value '{shown}' is not valid: {reason}"


def _read(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # tolerate a Windows editor's BOM
            return handle.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None


def _parse(path: str, raw_lines: list[str]) -> configobj.ConfigObj:
    try:
        parsed = configobj.ConfigObj(raw_lines, interpolation=False, list_values=True,
                                     raise_errors=True, file_error=False)
    except configobj.DuplicateError as exc:
        line = getattr(exc, "line_number", None)
        key = raw_lines[line - 1].split("=", 1)[0].strip() if line else None
        raise ConfigError(path, "key given twice", line, key) from None
    except configobj.ConfigObjError as exc:
        line = getattr(exc, "line_number", None)
        raise ConfigError(path, "not a 'Key = Value' line", line) from None
    if parsed.sections:
        section = parsed.sections[0]
        raise ConfigError(path, "sections are not supported", _find_section(raw_lines, section),
                          f"[{section}]")
    return parsed


def _find_section(raw_lines: list[str], section: str) -> int | None:
    for number, text in enumerate(raw_lines, start=1):
        if text.strip().startswith(f"[{section}]"):
            return number
    return None


def _reject_unknown(path: str, raw_lines: list[str], parsed: Mapping[str, Any],
                    schema: Schema) -> None:
    known = schema.names()
    for name in parsed:
        if name in known:
            continue
        hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        lower = {k.lower(): k for k in known}
        if name.lower() in lower:
            hint = [lower[name.lower()]]
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(path, f"unknown key{suggestion}", _line_of(raw_lines, name), name)


def load_config(path: str, schema: Schema) -> dict[str, Any]:
    """Read, check and convert `path` against `schema`; raise ConfigError on the first problem."""
    path = os.path.abspath(path)
    raw_lines = _read(path)
    parsed = _parse(path, raw_lines)
    _reject_unknown(path, raw_lines, parsed, schema)
    for name in [n for n, v in parsed.items() if v == "" or v == []]:
        del parsed[name]  # present but empty: the default applies (DOMAIN.md)
    given = dict(parsed)
    spec = configobj.ConfigObj(schema.configspec(), list_values=False, _inspec=True)
    parsed.configspec = spec
    outcome = parsed.validate(_VALIDATOR, preserve_errors=True, copy=True)
    if outcome is not True:
        for key in schema.keys:
            failure = outcome.get(key.name, True) if isinstance(outcome, dict) else False
            if failure is not True:
                raise ConfigError(path, _describe_failure(key, given.get(key.name, ""), failure),
                                  _line_of(raw_lines, key.name), key.name)
    base = os.path.dirname(path)
    values = {}
    for key in schema.keys:
        value = parsed[key.name]
        if key.is_path and isinstance(value, str) and value and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base, value))
        values[key.name] = value
    return values


def defaults(schema: Schema) -> dict[str, Any]:
    """The converted default of every key, as if the file were empty."""
    spec = configobj.ConfigObj(schema.configspec(), list_values=False, _inspec=True)
    empty = configobj.ConfigObj([], configspec=spec)
    empty.validate(_VALIDATOR, copy=True)
    return {key.name: empty[key.name] for key in schema.keys}


def render_reference(schema: Schema) -> str:
    """A commented sample config listing every key with its default, for docs and packaging."""
    out = []
    for key in schema.keys:
        if key.doc:
            out.extend(f"# {line}" for line in key.doc.splitlines())
        out.append(f"#{key.name} = {key.default}")
        out.append("")
    return "\n".join(out)
