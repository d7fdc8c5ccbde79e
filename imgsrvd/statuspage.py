"""GET /status: a read-only HTML page of the Preboot Services on this host (docs/monitoring.md).

Two halves:

* **render(PageData) -> str**, pure: the four daemons (up or down, version, uptime, listen
  addresses, counters), the latest results of the results log (newest first) and the multicast
  sessions. Every value goes through `_text`: at most MAX_TEXT_CHARS (then "..."), control
  characters written `\\xNN` (common.daemon.logsetup.escape_control), then HTML-escaped, quotes
  included. Workstation names, error messages and image paths are a client's text: none of it
  can become markup. No script; the stylesheet is one constant whose hash is in the CSP.
* **StatusPage**, the gathering: the other daemons' status from their local Unix status
  sockets (the socket paths as zmgmcast finds them: StatusSocket of
  $PREBOOT_CONFIG_DIR/<name>.conf, else the default in $PREBOOT_RUN_DIR), each on a worker
  thread with a short timeout (QUERY_TIMEOUT_S), all at once; imgsrvd's own from the server in
  this process; the results log's last RESULT_ROWS entries read from its last TAIL_BYTES on a
  worker thread. The rendered page is kept CACHE_S seconds and one render runs at a time, so
  any number of viewers cost one render per CACHE_S: the event loop never waits on a socket
  or the disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from common.daemon import services
from common.daemon.logsetup import escape_control
from common.daemon.services import SERVICES, Service
from common.daemon.statussock import local_status_socket, query_unix

log = logging.getLogger("preboot.imgsrvd.status")

PATH = "/status"
REFRESH_S = 10
CACHE_S = 2.0
QUERY_TIMEOUT_S = 1.0
GATHER_TIMEOUT_S = 3.0
RESULT_ROWS = 50
TAIL_BYTES = 1 << 20
MAX_TEXT_CHARS = 200
MAX_ROWS = 500                 # counters, addresses, sessions, receivers: each list at most

STYLE = (
    "body{font-family:sans-serif;margin:1em 2em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".up{color:#060;font-weight:bold}.down{color:#a00;font-weight:bold}"
    ".daemon{display:inline-block;vertical-align:top;margin-right:2em}"
    ".failure,.denied{color:#a00}.success{color:#060}"
    "small{color:#666}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src '{STYLE_HASH}'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

RESULT_COLUMNS = (("timestamp", "Time"), ("workstation", "Workstation"),
                  ("operation", "Operation"), ("image_path", "Image"), ("status", "Status"),
                  ("error_message", "Error"))


# ---- the data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DaemonView:
    """One daemon as the page shows it; `up` False with `detail` saying why."""

    service: Service
    up: bool
    detail: str = ""
    version: str = ""
    uptime_s: float | None = None
    listen: tuple[dict[str, Any], ...] = ()
    counters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PageData:
    generated_at: float
    host: str
    daemons: tuple[DaemonView, ...]
    results: tuple[dict[str, str], ...] = ()     # newest first
    results_problem: str = ""                    # why there are none to show, if not "none yet"
    multicast: dict[str, Any] | None = None      # imgsrvd's status reply "multicast"


# ---- rendering (pure) ----------------------------------------------------------------------------

# Bidirectional formatting characters: a name holding U+202E would show its text reversed.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """VALUE as HTML text: bounded, control and bidi characters visible, markup escaped."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    text = _BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", escape_control(text))
    return html.escape(text, quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def uptime_text(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _number(value: Any) -> str:
    if isinstance(value, float):
        return _text(f"{value:g}")
    return _text(value)


def _counter_rows(view: DaemonView) -> list[str]:
    counters = view.counters
    first = [key for key in view.service.counter_order if key in counters]
    rows = []
    for key in (first + [key for key in counters if key not in first])[:MAX_ROWS]:
        value = counters[key]
        label = _text(view.service.label(str(key)))
        attr = _text(key)
        if isinstance(value, dict):
            inner = ", ".join(f"{_text(k, 60)} {_number(v)}" for k, v in
                              list(value.items())[:MAX_ROWS])
            rows.append(f'<tr data-counter="{attr}"><th>{label}</th><td>{inner}</td></tr>')
        else:
            rows.append(f'<tr data-counter="{attr}"><th>{label}</th>'
                        f'<td class="n">{_number(value)}</td></tr>')
    return rows


def _daemon(view: DaemonView) -> str:
    name = _text(view.service.name)
    state = "up" if view.up else "down"
    out = [f'<section class="daemon" id="daemon-{name}" data-daemon="{name}" '
           f'data-state="{state}">',
           f"<h3>{_text(view.service.display_name)} <small>({name})</small></h3>",
           f'<p>State: <span class="{state}" data-field="state">{state}</span>']
    if view.detail:
        out.append(f' <small data-field="detail">({_text(view.detail)})</small>')
    out.append("</p>")
    if view.up:
        facts = []
        if view.version:
            facts.append(f'Version <span data-field="version">{_text(view.version)}</span>')
        if view.uptime_s is not None:
            facts.append(f'up <span data-field="uptime">{_text(uptime_text(view.uptime_s))}'
                         "</span>")
        if facts:
            out.append(f"<p>{', '.join(facts)}</p>")
        if view.listen:
            out.append('<ul data-field="listen">')
            for endpoint in view.listen[:MAX_ROWS]:
                tls = " (TLS)" if endpoint.get("tls") is True else ""
                out.append(f"<li>{_text(endpoint.get('proto', '?'))} "
                           f"{_text(endpoint.get('address', '?'))}:"
                           f"{_text(endpoint.get('port', '?'))}{tls}</li>")
            out.append("</ul>")
        rows = _counter_rows(view)
        if rows:
            out.append('<table class="counters">')
            out.extend(rows)
            out.append("</table>")
    out.append("</section>")
    return "\n".join(out)


def _results(data: PageData) -> str:
    out = ["<h2>Recent results</h2>"]
    if data.results_problem:
        out.append(f'<p data-field="results-problem">{_text(data.results_problem)}</p>')
    if not data.results:
        if not data.results_problem:
            out.append("<p>No results logged yet.</p>")
        return "\n".join(out)
    out.append(f"<p><small>The latest {len(data.results)}, newest first.</small></p>")
    out.append('<table id="results"><tr>' +
               "".join(f"<th>{title}</th>" for _key, title in RESULT_COLUMNS) + "</tr>")
    for entry in data.results[:RESULT_ROWS]:
        status = entry.get("status", "")
        cells = []
        for key, _title in RESULT_COLUMNS:
            value = entry.get(key) or ""
            css = f' class="{_text(status, 20)}"' if key == "status" else ""
            cells.append(f'<td data-field="{key}"{css}>{_text(value)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _percent(part: Any, whole: Any) -> str:
    if not (_is_number(part) and _is_number(whole)) or whole <= 0:
        return "-"
    return f"{min(100.0, 100.0 * part / whole):.1f} %"


def _multicast(multicast: dict[str, Any] | None) -> str:
    if not isinstance(multicast, dict):
        return ""
    sessions = multicast.get("sessions")
    if not isinstance(sessions, list) or not sessions:
        return ""
    out = ["<h2>Multicast sessions</h2>",
           '<table id="sessions"><tr><th>Session</th><th>Image</th><th>State</th>'
           "<th>Receivers</th><th>Sent</th><th>Rate</th></tr>"]
    receivers: list[str] = []
    for session in sessions[:MAX_ROWS]:
        if not isinstance(session, dict):
            continue
        name = session.get("name", "?")
        rate = session.get("rate_kbit_s")
        out.append(
            f'<tr data-session="{_text(name)}"><td>{_text(name)}</td>'
            f"<td>{_text(session.get('image', ''))}</td>"
            f'<td data-field="state">{_text(session.get("state", "?"))}</td>'
            f'<td class="n" data-field="receivers">{_number(session.get("receivers", 0))}</td>'
            f'<td class="n">{_percent(session.get("bytes_sent"), session.get("image_bytes"))}'
            f'</td><td class="n">{_number(rate) + " kbit/s" if _is_number(rate) else "-"}'
            "</td></tr>")
        participants = session.get("participants")
        for p in participants[:MAX_ROWS] if isinstance(participants, list) else []:
            if not isinstance(p, dict):
                continue
            progress = p.get("progress")
            shown = f"{100.0 * progress:.1f} %" if _is_number(progress) else "-"
            receivers.append(
                f"<tr><td>{_text(name)}</td><td>{_text(p.get('mac') or '')}</td>"
                f"<td>{_text(p.get('address') or '')}</td><td>{_text(p.get('state', '?'))}"
                f'</td><td class="n">{shown}</td></tr>')
    out.append("</table>")
    if receivers:
        out.append('<table id="receivers"><tr><th>Session</th><th>MAC</th><th>Address</th>'
                   "<th>State</th><th>Progress</th></tr>")
        out.extend(receivers)
        out.append("</table>")
    return "\n".join(out)


def render(data: PageData) -> str:
    """The whole page: an HTML document, every value escaped."""
    when = datetime.fromtimestamp(data.generated_at, timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
    up = sum(1 for view in data.daemons if view.up)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>Preboot Services on {_text(data.host)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Preboot Services on {_text(data.host)}</h1>",
        f'<p><small>As of <span id="generated">{when}</span>; {up} of {len(data.daemons)} '
        f"daemons up; this page refreshes every {REFRESH_S} s and is read-only.</small></p>",
        "<h2>Daemons</h2>",
        '<div id="daemons">',
        *(_daemon(view) for view in data.daemons),
        "</div>",
        _results(data),
        _multicast(data.multicast),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


# ---- gathering -------------------------------------------------------------------------------------

def _view_of_reply(service: Service, reply: Any) -> DaemonView:
    """A status reply as a DaemonView; a reply of the wrong shape is a daemon that is down
    (whatever answers on the socket, the page shows only what it can check)."""
    if not isinstance(reply, dict):
        return DaemonView(service, False, "bad reply: not a JSON object")
    if reply.get("ok") is not True:
        error = reply.get("error")
        return DaemonView(service, False, f"answers with an error: {error}"
                          if isinstance(error, str) else "bad reply")
    if isinstance(reply.get("daemon"), str) and reply["daemon"] != service.name:
        return DaemonView(service, False, f"the socket answers as {reply['daemon']}")
    counters = reply.get("counters")
    counters = {str(k): v for k, v in counters.items()
                if _is_number(v) or (isinstance(v, dict) and all(_is_number(x) for x in
                                                                  v.values()))} \
        if isinstance(counters, dict) else {}
    listen = reply.get("listen")
    listen = tuple(e for e in listen if isinstance(e, dict)) if isinstance(listen, list) else ()
    uptime = reply.get("uptime_s")
    version = reply.get("version")
    return DaemonView(service, True, version=version if isinstance(version, str) else "",
                      uptime_s=uptime if _is_number(uptime) and uptime >= 0 else None,
                      listen=listen, counters=counters)


def ask_daemon(service: Service, path: str, timeout_s: float = QUERY_TIMEOUT_S) -> DaemonView:
    """SERVICE's status from its Unix status socket PATH (blocking: run it on a thread)."""
    try:
        reply = query_unix(path, timeout_s=timeout_s)
    except (FileNotFoundError, ConnectionRefusedError):
        return DaemonView(service, False, "not running")
    except PermissionError:
        return DaemonView(service, False, "permission denied on its status socket")
    except TimeoutError:                     # socket.timeout: it is there but silent
        return DaemonView(service, False, f"no answer within {timeout_s:g} s")
    except OSError as exc:
        return DaemonView(service, False, exc.strerror or str(exc))
    except ValueError as exc:
        return DaemonView(service, False, f"bad reply: {exc}")
    return _view_of_reply(service, reply)


def result_row(entry: Any) -> dict[str, str]:
    """The fields the page shows of a resultslog.ResultEntry."""
    return {key: str(getattr(entry, key) or "") for key, _ in RESULT_COLUMNS
            if key != "timestamp"} | {
        "timestamp": entry.timestamp.strftime("%Y-%m-%d %H:%M:%SZ")}


class StatusPage:
    """The page's cache and gathering. SELF gives imgsrvd's own view (it is serving this page),
    RESULTS_LOG the results log's path (or None), MULTICAST the status reply's "multicast"."""

    def __init__(self, own_view: Callable[[], DaemonView],
                 results_log: Callable[[], str | None],
                 multicast: Callable[[], dict[str, Any] | None],
                 config_dir: str | None = None, run_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._own_view = own_view
        self._results_log = results_log
        self._multicast = multicast
        self.config_dir = config_dir or os.environ.get("PREBOOT_CONFIG_DIR",
                                                       services.CONFIG_DIR)
        self.run_dir = run_dir or os.environ.get("PREBOOT_RUN_DIR", services.RUN_DIR)
        self._clock = clock
        self._cached: tuple[float, bytes] | None = None
        self._lock = asyncio.Lock()
        self.renders = 0

    async def page(self) -> bytes:
        """The rendered page, at most CACHE_S old; one render at a time."""
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < CACHE_S:
            return cached[1]
        async with self._lock:
            cached = self._cached
            if cached is not None and self._clock() - cached[0] < CACHE_S:
                return cached[1]
            body = render(await self.gather()).encode("utf-8")
            self.renders += 1
            self._cached = (self._clock(), body)
            return body

    async def gather(self) -> PageData:
        others = [s for s in SERVICES if s is not services.IMGSRVD]
        asks = [self._ask(service) for service in others]
        views, (results, problem) = await asyncio.gather(asyncio.gather(*asks),
                                                         self._read_results())
        by_name = {view.service.name: view for view in views}
        by_name[services.IMGSRVD.name] = self._own_view()
        daemons = tuple(by_name[s.name] for s in SERVICES)
        return PageData(time.time(), os.uname().nodename, daemons, results, problem,
                        self._multicast())

    async def _ask(self, service: Service) -> DaemonView:
        path = local_status_socket(service, self.config_dir, self.run_dir)
        try:
            return await asyncio.wait_for(asyncio.to_thread(ask_daemon, service, path),
                                          GATHER_TIMEOUT_S)
        except asyncio.TimeoutError:
            return DaemonView(service, False, f"no answer within {GATHER_TIMEOUT_S:g} s")

    async def _read_results(self) -> tuple[tuple[dict[str, str], ...], str]:
        from .resultslog import tail_entries
        path = self._results_log()
        if path is None:
            return (), "The results log is not open (see the imaging server's log)."
        try:
            entries: Sequence[Any] = await asyncio.wait_for(
                asyncio.to_thread(tail_entries, path, RESULT_ROWS, TAIL_BYTES),
                GATHER_TIMEOUT_S)
        except FileNotFoundError:
            return (), ""
        except asyncio.TimeoutError:
            return (), f"The results log could not be read within {GATHER_TIMEOUT_S:g} s."
        except OSError as exc:
            return (), f"The results log cannot be read: {exc.strerror or exc}"
        return tuple(result_row(entry) for entry in reversed(entries)), ""
