"""zmgmcast: the administrator's status console over every daemon's status socket.

    zmgmcast -status                 every local daemon, from its Unix status socket
    zmgmcast -status -i HOST         a remote server, from the daemons' read-only TCP ports
    zmgmcast -status --json          the raw replies, for scripts

The original's single-dash long options (`-status`, `-i`) are kept as users type them.
A daemon that is not running is reported as such, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from common.statussock import query_tcp, query_unix

CONFIG_DIR = os.environ.get("PREBOOT_CONFIG_DIR", "/etc/preboot")
RUN_DIR = os.environ.get("PREBOOT_RUN_DIR", "/run/preboot")


@dataclass(frozen=True)
class KnownDaemon:
    name: str
    service: str
    status_port: int
    # Counters shown first, in this order (the status reply sorts its keys); the rest follow.
    counter_order: tuple[str, ...] = ()


DAEMONS = (
    KnownDaemon("proxydhcpd", "Preboot Proxy DHCP Service", 9967),
    KnownDaemon("tftpd", "Preboot TFTP Service", 9969),
    KnownDaemon("policyd", "Preboot Policy Service", 9980,
                ("queries", "script_requests", "work_assigned", "no_work", "menus_shown",
                 "fallback_answers", "directory_errors", "bad_requests")),
    KnownDaemon("imgsrvd", "Preboot Imaging Service", 9998,
                ("update_requests", "images_sent", "images_received", "client_referrals",
                 "bytes_sent", "bytes_received", "active_transfers", "failures")),
)

# Counters shown with the original's names (the imaging statistics, DOMAIN.md).
LABELS = {
    "update_requests": "Update Requests",
    "images_sent": "Images Sent",
    "images_received": "Images Received",
    "client_referrals": "Client Referrals",
}


@dataclass
class DaemonReport:
    daemon: KnownDaemon
    state: str                      # running / not running / not reachable / error
    reply: dict[str, Any] | None = None
    detail: str = ""


def _configured(daemon: KnownDaemon, key: str) -> str | None:
    """A key from the daemon's config file, read leniently (the daemon validates it)."""
    path = os.path.join(CONFIG_DIR, f"{daemon.name}.conf")
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                name, sep, value = line.partition("=")
                if sep and name.strip() == key:
                    value = value.split("#", 1)[0].strip().strip('"')
                    return value or None
    except OSError:
        return None
    return None


def socket_path(daemon: KnownDaemon) -> str:
    return _configured(daemon, "StatusSocket") or os.path.join(RUN_DIR, f"{daemon.name}.sock")


def ask_local(daemon: KnownDaemon, path: str | None = None) -> DaemonReport:
    path = path or socket_path(daemon)
    try:
        reply = query_unix(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return DaemonReport(daemon, "not running")
    except PermissionError:
        return DaemonReport(daemon, "error", detail=f"permission denied on {path}")
    except (OSError, ValueError) as exc:
        return DaemonReport(daemon, "error", detail=str(exc))
    return DaemonReport(daemon, "running" if reply.get("ok") else "error", reply,
                        reply.get("error", ""))


def ask_remote(daemon: KnownDaemon, host: str, port: int | None = None) -> DaemonReport:
    port = port or daemon.status_port
    try:
        reply = query_tcp(host, port)
    except ConnectionRefusedError:
        return DaemonReport(daemon, "not running", detail=f"nothing on {host}:{port}")
    except (socket.timeout, TimeoutError):
        return DaemonReport(daemon, "not reachable", detail=f"{host}:{port} timed out")
    except socket.gaierror as exc:
        return DaemonReport(daemon, "not reachable", detail=f"{host}: {exc.strerror}")
    except (OSError, ValueError) as exc:
        return DaemonReport(daemon, "not reachable", detail=str(exc))
    if daemon.name != "unknown" and reply.get("daemon") not in (None, daemon.name):
        return DaemonReport(daemon, "error",
                            detail=f"{host}:{port} answers as {reply.get('daemon')}")
    return DaemonReport(daemon, "running" if reply.get("ok") else "error", reply,
                        reply.get("error", ""))


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    return key.replace("_", " ").capitalize()


def format_counters(counters: dict[str, Any], order: tuple[str, ...] = ()) -> list[str]:
    lines = []
    first = [key for key in order if key in counters]
    for key in first + [key for key in counters if key not in first]:
        value = counters[key]
        if isinstance(value, dict):
            if value:
                inner = ", ".join(f"{k} {v}" for k, v in value.items())
                lines.append(f"    {_label(key)}: {inner}")
            continue
        shown = _size(value) if key.startswith("bytes") and isinstance(value, int) else value
        lines.append(f"    {_label(key):<28}{shown}")
    return lines


def format_reports(reports: list[DaemonReport], where: str) -> str:
    out = [f"Preboot Services status on {where}", ""]
    out.append(f"{'Service':<30}{'State':<15}{'PID':>8}  {'Uptime':>12}")
    for report in reports:
        reply = report.reply or {}
        pid = str(reply.get("pid", "")) if report.state == "running" else ""
        uptime = _uptime(reply["uptime_s"]) if "uptime_s" in reply else ""
        out.append(f"{report.daemon.service:<30}{report.state:<15}{pid:>8}  {uptime:>12}")
    for report in reports:
        if report.state != "running":
            if report.detail:
                out += ["", f"{report.daemon.service}: {report.detail}"]
            continue
        reply = report.reply or {}
        out += ["", f"{report.daemon.service} (pid {reply.get('pid')}, "
                    f"version {reply.get('version', '?')})"]
        for endpoint in reply.get("listen", []):
            out.append(f"    Listening on {endpoint.get('proto')} "
                       f"{endpoint.get('address')}:{endpoint.get('port')}")
        out += format_counters(reply.get("counters", {}), report.daemon.counter_order)
    return "\n".join(out)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def collect(args: argparse.Namespace) -> tuple[list[DaemonReport], str]:
    if args.host:
        if args.port:
            by_port = {d.status_port: d for d in DAEMONS}
            daemon = by_port.get(args.port, KnownDaemon("unknown", f"Port {args.port}", args.port))
            report = ask_remote(daemon, args.host, args.port)
            if report.reply and report.reply.get("daemon"):
                name = report.reply["daemon"]
                report.daemon = next((d for d in DAEMONS if d.name == name), daemon)
            return [report], args.host
        return [ask_remote(d, args.host) for d in DAEMONS], args.host
    if args.socket:
        report = ask_local(KnownDaemon("unknown", args.socket, 0), args.socket)
        if report.reply and report.reply.get("daemon"):
            report.daemon = next((d for d in DAEMONS if d.name == report.reply["daemon"]),
                                 report.daemon)
        return [report], "this host"
    return [ask_local(d) for d in DAEMONS], "this host"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.status:
        print("zmgmcast: nothing to do; try 'zmgmcast -status'", file=sys.stderr)
        return 2
    reports, where = collect(args)
    if args.json:
        print(json.dumps({r.daemon.name: {"state": r.state, "detail": r.detail,
                                          "status": r.reply} for r in reports}, indent=2))
    else:
        print(format_reports(reports, where))
    return 0 if any(r.state == "running" for r in reports) else 3


if __name__ == "__main__":
    sys.exit(main())
