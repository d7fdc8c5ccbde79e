"""zmgmcast: the administrator's status console over every daemon's status socket.

    zmgmcast -status                 every local daemon, from its Unix status socket, and the
                                     imaging server's multicast sessions and their receivers
    zmgmcast -status -i HOST         a remote server, from the daemons' read-only TCP ports
    zmgmcast -status --json          the raw replies, for scripts
    zmgmcast -status -expect tftpd,policyd
                                     a health check: exit 0 only when these answer
    zmgmcast -log [N]                the last N (20) entries of the imaging server's results log
    zmgmcast -start NAME -image PATH [-clients N] [-t MIN]
                                     start a manual multicast session (root, this host): it
                                     starts when N have joined, MIN minutes after the last
                                     join, or when told to: zmgmcast -start NAME
    zmgmcast -start NAME             start the waiting session NAME now
    zmgmcast -stop NAME              stop a session (one of the directory's is kept, disabled)
    zmgmcast -delete NAME            stop a session and delete it (from the directory too)

The original's single-dash long options (`-status`, `-i`) are kept as users type them.
A daemon that is not running is reported as such, never as a traceback; a reply of the wrong
shape is "bad reply from HOST" (zmgmcast/reply.py), and everything printed from a reply is
escaped (no remote escape sequences on the terminal).

Exit status of -status (a health check, docs/monitoring.md):
    0  every expected daemon answers (and at least one does)
    3  no daemon answers at all
    4  some answer, but an expected one does not: stderr names each ("not running: tftpd")
    2  usage error (an unknown name in -expect)
Expected: the names given to -expect; else, on this host, every daemon whose config file is in
/etc/preboot ($PREBOOT_CONFIG_DIR), i.e. the daemons installed here; with --socket or -p, the
one asked. Asked remotely (-i) without -expect, no daemon is expected: 0 when any answers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from common.daemon import services
from common.daemon.services import SERVICES, Service
from common.daemon.logsetup import escape_control
from common.daemon.statussock import (configured_value, local_status_socket, query_tcp,
                                      query_unix)

from .reply import BadReply, checked
from .results import DEFAULT_ENTRIES, DEFAULT_RESULTS_LOG, MAX_ENTRIES, format_entries, \
    tail_entries
from .sessions import format_multicast, human_size

CONFIG_DIR = os.environ.get("PREBOOT_CONFIG_DIR", services.CONFIG_DIR)
RUN_DIR = os.environ.get("PREBOOT_RUN_DIR", services.RUN_DIR)

EX_ALL_UP = 0
EX_USAGE = 2
EX_NONE_UP = 3
EX_SOME_DOWN = 4


def unknown(display_name: str, status_port: int = 0) -> Service:
    """A daemon asked by socket path or port before its reply says which one it is."""
    return Service("unknown", display_name, status_port)


@dataclass
class DaemonReport:
    daemon: Service
    state: str                      # running / not running / not reachable / error
    reply: dict[str, Any] | None = None
    detail: str = ""


def _configured(daemon: Service, key: str) -> str | None:
    """A key from the daemon's config file, read leniently (the daemon validates it)."""
    return configured_value(daemon.config_file(CONFIG_DIR), key)


def socket_path(daemon: Service) -> str:
    return local_status_socket(daemon, CONFIG_DIR, RUN_DIR)


def ask_local(daemon: Service, path: str | None = None) -> DaemonReport:
    path = path or socket_path(daemon)
    try:
        reply = query_unix(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return DaemonReport(daemon, "not running")
    except PermissionError:
        return DaemonReport(daemon, "error", detail=f"permission denied on {path}")
    except (OSError, ValueError) as exc:
        return DaemonReport(daemon, "error", detail=str(exc))
    return _report(daemon, reply, path)


def ask_remote(daemon: Service, host: str, port: int | None = None) -> DaemonReport:
    port = port or daemon.status_port
    try:
        reply = query_tcp(host, port)
    except ConnectionRefusedError:
        return DaemonReport(daemon, "not running", detail=f"nothing on {host}:{port}")
    except (socket.timeout, TimeoutError):
        return DaemonReport(daemon, "not reachable", detail=f"{host}:{port} timed out")
    except socket.gaierror as exc:
        return DaemonReport(daemon, "not reachable", detail=f"{host}: {exc.strerror}")
    except ValueError as exc:                  # too long, not JSON, not an object
        return DaemonReport(daemon, "error", detail=f"bad reply from {host}:{port}: {exc}")
    except OSError as exc:
        return DaemonReport(daemon, "not reachable", detail=str(exc))
    report = _report(daemon, reply, f"{host}:{port}")
    if report.reply and daemon.name != "unknown" and \
            report.reply.get("daemon") not in (None, daemon.name):
        return DaemonReport(daemon, "error",
                            detail=f"{host}:{port} answers as {report.reply.get('daemon')}")
    return report


def _report(daemon: Service, reply: dict[str, Any], source: str) -> DaemonReport:
    """The report of a reply from SOURCE: its strings escaped, or an error if misshapen."""
    try:
        reply = checked(reply)
    except BadReply as exc:
        return DaemonReport(daemon, "error", detail=f"bad reply from {source}: {exc}")
    return DaemonReport(daemon, "running" if reply.get("ok") else "error", reply,
                        reply.get("error", ""))


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def format_counters(counters: dict[str, Any], daemon: Service) -> list[str]:
    """The counter rows: the registry's counter_order first, then the rest as replied, each
    under its label (common.daemon.services)."""
    lines = []
    first = [key for key in daemon.counter_order if key in counters]
    for key in first + [key for key in counters if key not in first]:
        value = counters[key]
        if isinstance(value, dict):
            if value:
                inner = ", ".join(f"{k} {v}" for k, v in value.items())
                lines.append(f"    {daemon.label(key)}: {inner}")
            continue
        shown = human_size(value) if key.startswith("bytes") and isinstance(value, int) else value
        lines.append(f"    {daemon.label(key):<28}{shown}")
    return lines


def _identity(reply: dict[str, Any]) -> str:
    """' (pid N, version V)' from a local socket; a remote status port says neither."""
    said = [f"{key} {reply[key]}" for key in ("pid", "version") if key in reply]
    return f" ({', '.join(said)})" if said else ""


def format_reports(reports: list[DaemonReport], where: str) -> str:
    out = [f"Preboot Services status on {where}", ""]
    out.append(f"{'Service':<30}{'State':<15}{'PID':>8}  {'Uptime':>12}")
    for report in reports:
        reply = report.reply or {}
        pid = str(reply.get("pid", "")) if report.state == "running" else ""
        uptime = _uptime(reply["uptime_s"]) if "uptime_s" in reply else ""
        out.append(f"{report.daemon.display_name:<30}{report.state:<15}{pid:>8}  {uptime:>12}")
    for report in reports:
        if report.state != "running":
            if report.detail:
                out += ["", f"{report.daemon.display_name}: {report.detail}"]
            continue
        reply = report.reply or {}
        out += ["", report.daemon.display_name + _identity(reply)]
        for endpoint in reply.get("listen", []):
            out.append(f"    Listening on {endpoint.get('proto')} "
                       f"{endpoint.get('address')}:{endpoint.get('port')}"
                       f"{' (TLS)' if endpoint.get('tls') is True else ''}")
        out += format_counters(reply.get("counters", {}), report.daemon)
        if isinstance(reply.get("multicast"), dict):
            out += format_multicast(reply["multicast"])
    # Belt and braces: whatever reached a line, the terminal gets no control character.
    return "\n".join(escape_control(line) for line in out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmgmcast", description="Status of the Preboot Services and Imaging Server daemons")
    parser.add_argument("-status", "--status", action="store_true", dest="status",
                        help="show every daemon's status and statistics")
    parser.add_argument("-i", dest="host", metavar="HOST",
                        help="ask the remote server HOST (IP address or DNS name)")
    parser.add_argument("-p", "--port", type=int, metavar="PORT",
                        help="with -i: ask only the daemon on this status port")
    parser.add_argument("--socket", metavar="PATH",
                        help="ask only the daemon on this local status socket")
    parser.add_argument("--json", action="store_true", help="print the raw replies as JSON")
    parser.add_argument("-expect", "--expect", metavar="NAMES",
                        help="with -status: the daemons that must answer, comma-separated "
                             "(proxydhcpd, tftpd, policyd, imgsrvd, or all); default: those "
                             "with a config file on this host. Exit 0 when all answer, 4 "
                             "naming those that do not, 3 when none answers")
    parser.add_argument("-log", "--log", nargs="?", type=int, const=DEFAULT_ENTRIES,
                        metavar="N", help=f"print the last N (default {DEFAULT_ENTRIES}) "
                        "entries of the imaging server's results log, one line each")
    parser.add_argument("--results-log", metavar="PATH",
                        help="with -log: this results log (default: ResultsLog of "
                             "imgsrvd.conf)")
    control = parser.add_mutually_exclusive_group()
    control.add_argument("-start", "--start", metavar="NAME",
                         help="start a manual multicast session (with -image), or start the "
                              "waiting session NAME now")
    control.add_argument("-stop", "--stop", metavar="NAME", help="stop a multicast session")
    control.add_argument("-delete", "--delete", metavar="NAME",
                         help="stop a multicast session and delete it (from the directory too)")
    parser.add_argument("-image", "--image", metavar="PATH",
                        help="with -start: the image on the imaging server to send")
    parser.add_argument("-clients", "--clients", type=int, metavar="N", default=0,
                        help="with -start -image: start when N have joined")
    parser.add_argument("-t", "--t", dest="wait_min", type=int, metavar="MIN", default=0,
                        help="with -start -image -clients: ... or MIN minutes after the last "
                             "join")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def control_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]] | str | None:
    """The imaging server's control verb and fields for -start/-stop/-delete, None when none
    is asked for, or what is wrong with the options."""
    if args.start is None and args.stop is None and args.delete is None:
        if args.image or args.clients or args.wait_min:
            return "-image, -clients and -t go with -start NAME"
        return None
    if args.host:
        return "-start, -stop and -delete work on this host only (the status port of -i is " \
               "read-only)"
    if args.stop is not None:
        return "mcast-stop", {"name": args.stop}
    if args.delete is not None:
        return "mcast-delete", {"name": args.delete}
    if args.image is None:
        if args.clients or args.wait_min:
            return "-clients and -t go with -image (a new manual session)"
        return "mcast-start", {"name": args.start}
    if args.wait_min and not args.clients:
        return "-t goes with -clients"
    return "mcast-start", {"name": args.start, "image": args.image, "clients": args.clients,
                           "t": args.wait_min}


def run_control(verb: str, fields: dict[str, Any], path: str | None) -> int:
    """Send one control verb to the local imaging server; 0 done, 1 refused, 3 not running."""
    path = path or socket_path(services.IMGSRVD)
    try:
        reply = query_unix(path, verb, timeout_s=15.0, fields=fields)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"zmgmcast: the imaging service is not running (no {path})", file=sys.stderr)
        return 3
    except PermissionError:
        print(f"zmgmcast: permission denied on {path}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"zmgmcast: {path}: {escape_control(str(exc))}", file=sys.stderr)
        return 1
    if reply.get("ok") is True:
        print(escape_control(str(reply.get("message", "done"))))
        return 0
    print(f"zmgmcast: {escape_control(str(reply.get('error', 'refused')))}", file=sys.stderr)
    return 1


def collect(args: argparse.Namespace) -> tuple[list[DaemonReport], str]:
    if args.host:
        if args.port:
            daemon = services.by_status_port(args.port) or \
                unknown(f"Port {args.port}", args.port)
            report = ask_remote(daemon, args.host, args.port)
            if report.reply and report.reply.get("daemon"):
                report.daemon = services.by_name(report.reply["daemon"]) or daemon
            return [report], args.host
        return [ask_remote(d, args.host) for d in SERVICES], args.host
    if args.socket:
        report = ask_local(unknown(args.socket), args.socket)
        if report.reply and report.reply.get("daemon"):
            report.daemon = services.by_name(report.reply["daemon"]) or report.daemon
        return [report], "this host"
    return [ask_local(d) for d in SERVICES], "this host"


def parse_expect(text: str) -> list[Service] | str:
    """The daemons -expect names, or what is wrong with the list."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(SERVICES)
    expected = []
    for name in names:
        daemon = services.by_name(name)
        if daemon is None:
            known = ", ".join(s.name for s in SERVICES)
            return f"-expect: unknown daemon {escape_control(name)!r} (known: {known}, all)"
        expected.append(daemon)
    return expected


def expected_daemons(args: argparse.Namespace, reports: list[DaemonReport]
                     ) -> list[Service] | str:
    """Who must answer for exit 0 (see the module's docstring)."""
    if args.expect is not None:
        return parse_expect(args.expect)
    if args.socket or args.host:
        return []      # the one asked, or a remote host: "none answers" (3) is the check
    return [d for d in SERVICES if os.path.exists(d.config_file(CONFIG_DIR))]


def health(reports: list[DaemonReport], expected: list[Service]) -> tuple[int, list[str]]:
    """The exit status and, for 4, each expected daemon that does not answer and why."""
    if not any(r.state == "running" for r in reports):
        return EX_NONE_UP, [f"{r.daemon.name} ({r.state})" for r in reports]
    states = {r.daemon.name: r.state for r in reports}
    down = [f"{d.name} ({states.get(d.name, 'not asked')})" for d in expected
            if states.get(d.name) != "running"]
    return (EX_SOME_DOWN, down) if down else (EX_ALL_UP, [])


def results_log_path(args: argparse.Namespace) -> str:
    if args.results_log:
        return args.results_log
    configured = _configured(services.IMGSRVD, "ResultsLog")
    if configured is None:
        return DEFAULT_RESULTS_LOG
    # relative paths are relative to the config file's folder (docs/daemon-contract.md)
    return os.path.join(os.path.dirname(services.IMGSRVD.config_file(CONFIG_DIR)), configured)


def run_log(args: argparse.Namespace) -> int:
    """-log N: 0 printed (maybe nothing), 1 the log cannot be read, 2 a bad N."""
    if not 1 <= args.log <= MAX_ENTRIES:
        print(f"zmgmcast: -log takes 1 to {MAX_ENTRIES} entries", file=sys.stderr)
        return EX_USAGE
    path = results_log_path(args)
    try:
        entries = tail_entries(path, args.log)
    except OSError as exc:
        print(f"zmgmcast: cannot read the results log {escape_control(path)}: "
              f"{escape_control(exc.strerror or str(exc))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for line in format_entries(entries):
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.log is not None:
        if args.status or args.host or args.start or args.stop or args.delete:
            print("zmgmcast: -log reads this host's results log; it goes alone",
                  file=sys.stderr)
            return EX_USAGE
        return run_log(args)
    request = control_request(args)
    if isinstance(request, str):
        print(f"zmgmcast: {request}", file=sys.stderr)
        return 2
    if request is not None:
        return run_control(*request, args.socket)
    if not args.status:
        print("zmgmcast: nothing to do; try 'zmgmcast -status'", file=sys.stderr)
        return 2
    if args.expect is not None and isinstance(parse_expect(args.expect), str):
        print(f"zmgmcast: {parse_expect(args.expect)}", file=sys.stderr)
        return EX_USAGE
    reports, where = collect(args)
    if args.json:
        print(json.dumps({r.daemon.name: {"state": r.state, "detail": r.detail,
                                          "status": r.reply} for r in reports}, indent=2))
    else:
        print(format_reports(reports, where))
    expected = expected_daemons(args, reports)
    assert not isinstance(expected, str)
    code, down = health(reports, expected)
    if code == EX_SOME_DOWN:
        print(f"zmgmcast: expected but not answering: {', '.join(down)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
