#!/usr/bin/env python3
"""Write the man pages of every command (and of the daemons' config files) from the commands'
own argument parsers and the daemons' config schemas, so a page cannot drift from the code.

    python3 packaging/man/genman.py --out DIR     DIR/man1/zmgmcast.1, DIR/man8/img.8, ...,
                                                  DIR/man5/preboot-tftpd.conf.5, ...

Run at package build time (packaging/rpm/preboot.spec, %build); no generated page is committed.
What a page says besides the options and keys (a daemon's one-paragraph description, its
files) is in COMMANDS below; img, preboot-dir and zmgmcast are described by their module's
docstring, the text their maintainers keep up to date.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ["COLUMNS"] = "1000"  # usage lines unwrapped: roff fills them

MANUAL = "Preboot Services"
STATE_DIR = "/var/lib/preboot"
LOG_DIR = "/var/log/preboot"


def _version() -> str:
    from common import __version__
    return __version__


@dataclass
class Command:
    name: str                       # the installed command
    section: int                    # 1: for everyone (/usr/bin), 8: administration (/usr/sbin)
    parser: Callable[[], argparse.ArgumentParser]
    summary: str = ""               # NAME line; default: the parser's description
    description: str = ""           # roff-escaped later; default: the module's docstring
    module: str = ""                # whose docstring describes the command
    daemon: str = ""                # the daemon's short name (common.daemon.services)
    files: list[tuple[str, str]] = field(default_factory=list)
    exit_status: list[tuple[str, str]] = field(default_factory=list)
    see_also: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ the commands

DAEMON_TEXT = {
    "tftpd": ("Preboot TFTP Service",
              "A TFTP server (RFC 1350, 2347, 2348, 2349, 7440) for the boot programs, kernels "
              "and initrds of Preboot Services. It serves /srv/tftp by default; uploads are off "
              "unless configured."),
    "proxydhcpd": ("Preboot Proxy DHCP Service",
                   "A PXE 2.1 proxyDHCP server (67/udp and 4011/udp): it runs beside the site's "
                   "DHCP server and tells PXE clients which boot server and boot program to "
                   "use. It is optional: the package neither starts nor enables it."),
    "policyd": ("Preboot Policy Service",
                "Answers iPXE over HTTP (8090/tcp): whether a network-booting machine has "
                "imaging work, per the work assignment rules and workstation records of the "
                "directory (embedded SQLite in /var/lib/preboot, or LDAP), and the Preboot "
                "menu."),
    "imgsrvd": ("Preboot Imaging Service",
                "The imaging server (998/tcp, HTTP/1.1): stores and retrieves disk images for "
                "the imaging engine img(8) in /var/lib/preboot/images, decides auto-imaging "
                "from the directory, refers clients to other imaging servers, keeps a "
                "well-formed XML results log and the imaging statistics that zmgmcast -status "
                "shows, and runs multicast sessions."),
}
DAEMON_PACKAGES = {"policyd": "prebootpolicyd"}
DAEMONS = list(DAEMON_TEXT)

CONTRACT = (
    "Without --foreground the daemon binds its sockets, detaches and writes its pidfile; with "
    "it (systemd Type=notify) it stays attached and tells systemd when it is ready. SIGTERM or "
    "SIGINT stops it; SIGHUP re-reads the config file, and a bad one is logged while the old "
    "configuration stays in force (StatusSocket, StatusPort, StatusAddress and PidFile changes "
    "need a restart). The status socket answers zmgmcast(1); the TCP status port also serves "
    "/metrics in the Prometheus text format.")

CONFIG_SYNTAX = (
    "One Key = Value per line; # starts a comment. Keys are CamelCase, booleans YES or NO "
    "(any case). A key with an empty value takes its default. An unknown key, a bad value, a "
    "duplicate key or a syntax error stops the daemon with one line naming the file, the line "
    "and the key (exit status 78). Relative paths are relative to the config file's folder.")


def _daemon_parser(name: str) -> Callable[[], argparse.ArgumentParser]:
    def build() -> argparse.ArgumentParser:
        from common.daemon.runner import build_parser
        from common.daemon.services import by_name
        return build_parser(by_name(name))
    return build


def schema(name: str):
    """The daemon's config schema (every key, its default and its doc)."""
    return importlib.import_module(f"{DAEMON_PACKAGES.get(name, name)}.config").SCHEMA


def _daemon(name: str) -> Command:
    from common.daemon.services import by_name
    from common.errors import EX_CONFIG, EX_FAILURE, EX_OK, EX_SOFTWARE
    service = by_name(name)
    files = [(service.config_file(), f"the configuration, preboot-{name}.conf(5)"),
             (service.pid_file(), "the pidfile (PidFile), locked while the daemon runs"),
             (service.status_socket(), "the status socket (StatusSocket)")]
    if name in ("policyd", "imgsrvd"):
        files.append((f"{STATE_DIR}/directory.db", "the embedded directory (SQLite)"))
    if name == "imgsrvd":
        files.append((f"{STATE_DIR}/images", "the image store (ImageRoot)"))
        files.append((f"{LOG_DIR}/imgsrvd-results.xml",
                      "the results log (ResultsLog), rotated by the daemon itself"))
    files.append((f"{LOG_DIR}/{name}.log", "the log file, where LogFile names it"))
    others = [f"preboot-{d}(8)" for d in DAEMONS if d != name]
    return Command(
        name=service.program, section=8, parser=_daemon_parser(name),
        summary=DAEMON_TEXT[name][0], description=DAEMON_TEXT[name][1] + "\n\n" + CONTRACT,
        daemon=name, files=files,
        exit_status=[(str(EX_OK), "stopped cleanly, or --check found the config good"),
                     (str(EX_FAILURE), "already running (the pidfile is locked) or cannot bind"),
                     (str(EX_SOFTWARE), "internal error"),
                     (str(EX_CONFIG), "bad configuration (one line on stderr names file, line "
                                      "and key)")],
        see_also=[f"preboot-{name}.conf(5)", "zmgmcast(1)", *others, "systemctl(1)"])


def _module_parser(module: str, function: str) -> Callable[[], argparse.ArgumentParser]:
    def build() -> argparse.ArgumentParser:
        return getattr(importlib.import_module(module), function)()
    return build


def commands() -> list[Command]:
    return [
        *(_daemon(name) for name in DAEMONS),
        Command("img", 8, _module_parser("img.__main__", "_parser"), module="img.__main__",
                summary="the imaging engine: make, restore and verify disk images",
                see_also=["preboot-imgsrvd(8)", "preboot-dir(8)", "zmgmcast(1)",
                          "partclone(8)"]),
        Command("preboot-dir", 8, _module_parser("common.dircli.__main__", "_parser"),
                module="common.dircli.__main__",
                summary="manage the preboot directory: imaging rules, menu, workstations, "
                        "multicast sessions",
                files=[("/etc/preboot/policyd.conf", "names the directory (Directory =)"),
                       (f"{STATE_DIR}/directory.db", "the embedded directory (SQLite)")],
                see_also=["preboot-policyd(8)", "preboot-imgsrvd(8)", "img(8)", "zmgmcast(1)"]),
        Command("zmgmcast", 1, _module_parser("zmgmcast.__main__", "_parser"),
                module="zmgmcast.__main__",
                summary="status console of the Preboot Services and Imaging Server daemons",
                files=[("/etc/preboot", "the daemons' config files: which daemons are "
                                        "expected here"),
                       ("/run/preboot/*.sock", "the daemons' status sockets"),
                       (f"{LOG_DIR}/imgsrvd-results.xml", "the imaging server's results log "
                                                          "(-log)")],
                see_also=[f"preboot-{d}(8)" for d in DAEMONS] + ["preboot-dir(8)"]),
    ]


# ------------------------------------------------------------------------ roff

def esc(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def paragraphs(text: str) -> str:
    """Prose into roff: blank lines part paragraphs; indented lines (examples, usage lines,
    tables) stay as they are, unfilled."""
    out: list[str] = []
    mode = ""
    for line in text.strip("\n").split("\n"):
        kind = "" if not line.strip() else ("pre" if line.startswith("    ") else "text")
        if kind != mode:
            if mode == "pre":
                out.append(".EE")
            if mode and kind:
                out.append(".PP")
            if kind == "pre":
                out.append(".EX")
            mode = kind
            if not kind:
                out.append(".PP")
                mode = ""
        if kind == "pre":
            out.append(esc(line[4:]) if line[4:].strip() else ".sp")
        elif kind == "text":
            out.append(esc(line.strip()))
    if mode == "pre":
        out.append(".EE")
    while out and out[0] == ".PP":
        out.pop(0)
    while out and out[-1] == ".PP":
        out.pop()
    return "\n".join(out)


def docstring_parts(module: str) -> tuple[str, str]:
    """The module docstring without its first line: (description, exit status), the second
    from its first "Exit status" on."""
    doc = importlib.import_module(module).__doc__ or ""
    body = doc.split("\n", 1)[1] if "\n" in doc else ""
    at = body.find("Exit status")
    if at < 0:
        return body, ""
    return body[:at], body[at:]


# ------------------------------------------------------------------------ argparse

def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), text: str = ""
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every parser and subcommand parser: (the subcommand words, its parser, its help)."""
    yield path, parser, text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,), helps.get(name, ""))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS]


def invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """`-i HOST`, `--disk DISK`, `image` in roff: option strings bold, values italic."""
    formatter = parser._get_formatter()
    if not action.option_strings:
        metavar = formatter._metavar_formatter(action, action.dest)(1)[0]
        return f"\\fI{esc(metavar)}\\fR"
    args = ""
    if action.nargs != 0:
        args = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
    parts = [f"\\fB{esc(opt)}\\fR" + (f" \\fI{esc(args)}\\fR" if args else "")
             for opt in action.option_strings]
    return ", ".join(parts)


def option_list(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    formatter = parser._get_formatter()
    for action in options(parser):
        out.append(".TP")
        out.append(invocation(parser, action))
        text = formatter._expand_help(action) if action.help else ""
        out.append(esc(text) if text else "\\&")
    return out


def usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())[len("usage: "):]


def usage_roff(text: str) -> str:
    """A usage line to fill: a line may break after a comma or a bar of {a,b,c} and (A | B)."""
    return esc(text).replace(",", ",\\:").replace("|", "|\\:")


# ------------------------------------------------------------------------ pages

def header(name: str, section: int) -> list[str]:
    date = ""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        import time
        date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ["SOURCE_DATE_EPOCH"])))
    return ['.\\" Generated by packaging/man/genman.py from the argument parser; do not edit.',
            f'.TH "{name.upper()}" "{section}" "{date}" "preboot {_version()}" "{MANUAL}"',
            ".nh",  # no hyphenation: option and file names are copied from the page
            ".ad l"]  # nor justification: long usage lines would leave gaps


def config_keys(name: str) -> list[str]:
    out = []
    for key in schema(name).keys:
        out.append(".TP")
        default = f" = \\fI{esc(key.default)}\\fR" if key.default else " = (empty)"
        out.append(f"\\fB{esc(key.name)}\\fR{default}")
        out.append(esc(" ".join(key.doc.split())) if key.doc else "\\&")
    return out


def man_page(command: Command) -> str:
    parser = command.parser()
    summary = command.summary or parser.description or ""
    out = header(command.name, command.section)
    out += [".SH NAME", f"{esc(command.name)} \\- {esc(summary)}"]
    out += [".SH SYNOPSIS", ".B " + esc(command.name)]
    out.append(usage_roff(usage(parser)[len(command.name):].strip()))
    description, exit_text = (docstring_parts(command.module) if command.module
                              else (command.description, ""))
    out += [".SH DESCRIPTION", paragraphs(description)]
    out += [".SH OPTIONS", *option_list(parser)]
    subcommands = [(p, sub, h) for p, sub, h in walk(parser) if p]
    if subcommands:
        out.append(".SH COMMANDS")
        for path, sub, text in subcommands:
            out.append(f'.SS "{esc(" ".join((command.name,) + path))}"')
            if text:
                out.append(esc(text[:1].upper() + text[1:]) + ("" if text.endswith(".") else "."))
                out.append(".PP")
            out.append(usage_roff(usage(sub)))
            out += option_list(sub)
    if command.daemon:
        out += [".SH CONFIGURATION",
                esc(f"Read from {command.files[0][0]} unless --config names another file "
                    f"(preboot-{command.daemon}.conf(5)). " + CONFIG_SYNTAX),
                ".PP", "Every key, with its default:", *config_keys(command.daemon)]
    if command.files:
        out.append(".SH FILES")
        for path, text in command.files:
            out += [".TP", f"\\fI{esc(path)}\\fR", esc(text)]
    if command.exit_status or exit_text:
        out.append(".SH EXIT STATUS")
        for code, text in command.exit_status:
            out += [".TP", f"\\fB{code}\\fR", esc(text)]
        if exit_text:
            out.append(paragraphs(exit_text))
    out += [".SH SEE ALSO", see_also(command.see_also)]
    return "\n".join(out) + "\n"


def see_also(pages: list[str]) -> str:
    items = []
    for page in pages:
        name, _, section = page.partition("(")
        items.append(f".BR {esc(name)} ({section}")
    return ",\n".join(items)


def config_page(name: str) -> str:
    from common.daemon.services import by_name
    service = by_name(name)
    page = f"preboot-{name}.conf"
    out = header(page, 5)
    out += [".SH NAME", f"{esc(page)} \\- configuration of {esc(service.program)}, the "
            f"{esc(service.display_name)}"]
    out += [".SH SYNOPSIS", f"\\fI{esc(service.config_file())}\\fR"]
    out += [".SH DESCRIPTION",
            esc(f"{service.program}(8) reads this file at start and again on SIGHUP (or "
                f"systemctl reload {service.program}). " + CONFIG_SYNTAX),
            ".PP",
            esc(f"{service.program} --check validates the file and exits 0 (or 78 naming "
                "the error). The packaged file lists every key, commented out, with its "
                "default.")]
    out += [".SH KEYS", *config_keys(name)]
    out += [".SH FILES", ".TP", f"\\fI{esc(service.config_file())}\\fR",
            "the file the daemon reads unless started with \\-\\-config"]
    out += [".SH SEE ALSO", see_also([f"{service.program}(8)", "zmgmcast(1)"])]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ shell scripts

BOOTFILES = Path(__file__).resolve().parents[1] / "bootfiles" / "place-bootfiles.sh"


def script_help(path: Path = BOOTFILES) -> str:
    """What the script prints for --help (its header comment): the page's one source."""
    result = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout


def parse_script_help(name: str, text: str) -> dict[str, object]:
    """The parts of a script's --help: summary, usage, description, options [(invocation,
    text)], exit codes [(code, text)] and the trailing notes ("Test hooks: ...")."""
    head, _, rest = text.partition("\n\n")
    summary = " ".join(head.split()).removeprefix(f"{name}: ")
    summary = re.split(r"[,.]", summary, maxsplit=1)[0]
    body, _, after = rest.partition("Options:\n")
    usage_line, description = "", []
    for line in body.rstrip("\n").split("\n"):
        if line.strip().startswith(f"{name} ") and not usage_line:
            usage_line = line.strip()
        else:  # two-space tables of the help become unfilled examples
            description.append("  " + line if line.startswith("  ") else line)
    options_text, _, tail = after.partition("\n\n")
    options: list[list[str]] = []
    for line in options_text.split("\n"):
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            options.append([invocation, help_text.strip()])
        elif line.strip() and options:
            options[-1][1] = (options[-1][1] + " " + line.strip()).strip()
    exit_para, _, notes = tail.partition("\n")
    while not exit_para.rstrip().endswith(".") and notes:
        more, _, notes = notes.partition("\n")
        exit_para += " " + more
    codes = [(m.group(1), m.group(2).strip()) for m in
             re.finditer(r"(\d+) ([^;]+?)(?:;|\.$)", exit_para.removeprefix("Exit: ").strip())]
    return {"summary": summary, "usage": usage_line, "description": "\n".join(description),
            "options": [tuple(o) for o in options], "exit": codes, "notes": notes.strip()}


def _option_roff(invocation: str) -> str:
    parts = []
    for item in invocation.split(", "):
        option, _, value = item.partition(" ")
        parts.append(f"\\fB{esc(option)}\\fR" + (f" \\fI{esc(value)}\\fR" if value else ""))
    return ", ".join(parts)


def script_page(name: str = "preboot-bootfiles", path: Path = BOOTFILES) -> str:
    """preboot-bootfiles(8) from the script's own --help: change the help, the page follows."""
    parts = parse_script_help(name, script_help(path))
    out = header(name, 8)
    out[0] = '.\\" Generated by packaging/man/genman.py from the script\'s --help; do not edit.'
    out += [".SH NAME", f"{esc(name)} \\- {esc(parts['summary'])}"]
    out += [".SH SYNOPSIS", ".B " + esc(name),
            usage_roff(str(parts["usage"])[len(name):].strip())]
    out += [".SH DESCRIPTION", paragraphs(str(parts["description"]))]
    out.append(".SH OPTIONS")
    for invocation, text in parts["options"]:
        out += [".TP", _option_roff(invocation), esc(text)]
    out.append(".SH EXIT STATUS")
    for code, text in parts["exit"]:
        out += [".TP", f"\\fB{code}\\fR", esc(text)]
    if parts["notes"]:
        out += [".SH ENVIRONMENT", paragraphs(str(parts["notes"]))]
    out += [".SH FILES", ".TP", "\\fI/var/cache/preboot/bootfiles\\fR",
            "the packages \\-\\-download fetched, and their unpacked files",
            ".TP", "\\fIROOT/.preboot\\-bootfiles\\fR",
            "the SHA\\-256 of every file this command placed in ROOT"]
    out += [".SH SEE ALSO", see_also(["preboot-tftpd(8)", "preboot-proxydhcpd(8)"])]
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """Every page: its file (man8/img.8, ...) and its roff text."""
    out = {}
    for command in commands():
        out[f"man{command.section}/{command.name}.{command.section}"] = man_page(command)
    out["man8/preboot-bootfiles.8"] = script_page()
    for name in DAEMONS:
        out[f"man5/preboot-{name}.conf.5"] = config_page(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genman.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write man1/, man5/, man8/ in")
    args = parser.parse_args(argv)
    for relative, text in pages().items():
        path = Path(args.out) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
