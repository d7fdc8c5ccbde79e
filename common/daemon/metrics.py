"""/metrics: a daemon's status counters in the Prometheus text exposition format (0.0.4).

    text = render_metrics(service, counters, started_at)    # pure: no clock, no sockets

SERVICE is the daemon's entry in the registry (common.daemon.services): its name makes the
prefix (preboot_<name>_), its labels the HELP lines and its `gauges` the counters typed gauge.
COUNTERS is the status reply's "counters" (StatusCounters.snapshot(), what `zmgmcast -status`
shows):

    an integer (or float)  bytes_sent 600         -> preboot_tftpd_bytes_sent_total 600
                                                     (a gauge: preboot_tftpd_active_transfers 0)
    a dict by kind         errors {"timeout": 2}  -> preboot_tftpd_errors_total{kind="timeout"} 2

STARTED_AT (seconds since the epoch) adds preboot_<name>_start_time_seconds. Anything else (a
string, a bool, a dict entry that is not a number) is left out. Served by every daemon's TCP
status port (common.daemon.statussock) and by policyd's and imgsrvd's HTTP ports
(docs/monitoring.md).

Bounded and safe whatever the counters hold: names are made valid
([a-zA-Z_:][a-zA-Z0-9_:]*; anything else becomes "_") and unique (a later name that would
repeat an earlier one is left out); a label value is at most MAX_LABEL_CHARS, control
characters in it written as \\xNN (common.daemon.logsetup.escape_control) and then escaped as
the format says (backslash, double quote, newline); at most MAX_KINDS kinds per counter (the
rest summed under kind="_other"). Standard library only.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .logsetup import escape_control
from .services import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "preboot"
LABEL = "kind"
MAX_KINDS = 200
MAX_LABEL_CHARS = 100
OTHER_KIND = "_other"

NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    """PARTS joined by "_", as a valid metric name."""
    name = _NOT_NAME.sub("_", "_".join(parts)) or "_"
    return "_" + name if name[0].isdigit() else name


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: int | float) -> str:
    """A sample value as the format writes it: an integer exactly, NaN, +Inf, -Inf."""
    if isinstance(value, int) and abs(value) < 2 ** 53:
        return str(value)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def _printable(text: str) -> str:
    """TEXT as valid UTF-8 (lone surrogates written as \\udXXX) without control characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escape_control(text)


def escape_help(text: str) -> str:
    """A HELP text: backslash and newline escaped (0.0.4), on one line."""
    return _printable(text).replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    """A label value: bounded, control characters as \\xNN, then backslash, double quote and
    newline escaped (0.0.4)."""
    text = _printable(text[:MAX_LABEL_CHARS])
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _kinds(values: dict[Any, Any]) -> list[tuple[str, int | float]]:
    """The numeric entries of a by-kind counter, sorted, at most MAX_KINDS (the rest summed
    under OTHER_KIND); kinds that read the same once bounded are summed."""
    merged: dict[str, int | float] = {}
    for kind, value in values.items():
        if _is_number(value):
            key = escape_label_value(str(kind))
            merged[key] = merged.get(key, 0) + value
    kinds = sorted(merged.items())
    if len(kinds) <= MAX_KINDS:
        return kinds
    kept = dict(kinds[:MAX_KINDS - 1])
    rest = sum(value for _kind, value in kinds[MAX_KINDS - 1:])
    kept[OTHER_KIND] = kept.get(OTHER_KIND, 0) + rest
    return sorted(kept.items())


def render_metrics(service: Service, counters: dict[str, Any],
                   started_at: float | None = None) -> str:
    """COUNTERS (a status reply's "counters") as Prometheus text, one family per counter."""
    out: list[str] = []
    used: set[str] = set()
    gauges = set(service.gauges)

    def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        out.append(f"# HELP {name} {escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)

    def claim(*names: str) -> bool:
        if any(name in used for name in names):
            return False
        used.update(names)
        return True

    if started_at is not None and _is_number(started_at):
        name = metric_name(PREFIX, service.name, "start_time_seconds")
        if claim(name):
            family(name, "gauge", f"{service.display_name}: start time, seconds since the epoch",
                   [f"{name} {format_value(started_at)}"])
    for key, value in counters.items():
        key = str(key)
        gauge = key in gauges
        base = metric_name(PREFIX, service.name, key)
        if not gauge and base.endswith("_total"):
            base = base[:-len("_total")]
        name = base if gauge else base + "_total"
        # A counter's family claims its _created name too (what an OpenMetrics reader pairs
        # with it), so no gauge of that name can be taken for part of it.
        names = (name,) if gauge else (name, base, base + "_created")
        help_text = f"{service.display_name}: {service.label(key)}"
        kind = "gauge" if gauge else "counter"
        if isinstance(value, dict):
            if not claim(*names):
                continue
            help_text += f", by {LABEL}"
            family(name, kind, help_text,
                   [f'{name}{{{LABEL}="{k}"}} {format_value(v)}' for k, v in _kinds(value)])
        elif _is_number(value):
            if not claim(*names):
                continue
            family(name, kind, help_text, [f"{name} {format_value(value)}"])
    return "\n".join(out) + "\n" if out else ""
