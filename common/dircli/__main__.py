"""preboot-dir: the administrator's tool for the directory (either backend).

    preboot-dir init                          create an empty directory (SQLite) if missing
    preboot-dir export [FILE]                 the whole policy as one readable file
    preboot-dir import FILE [--check]         replace the store with a file (or only validate)
    preboot-dir import --merge FILE           merge a file in (rules, sessions by name; MACs)
    preboot-dir import [--merge] --dry-run FILE   what an import would change, written nowhere
    preboot-dir rules list
    preboot-dir rules add NAME --action restore --image IMG [--filter F] [--addon A]... [--force]
                                   [--shrink] [--fileset N] [--disabled] [--position N]
    preboot-dir rules set NAME [--filter F] [--action ...] [--image ...] [--addon ...] ...
                                   [--identity POLICY|""]
    preboot-dir rules remove|enable|disable NAME
    preboot-dir rules move NAME POSITION
    preboot-dir menu show | menu set [--display always|never|hotkey] [--timeout-s N]
    preboot-dir workstations list | add MAC [--name N] | remove MAC
    preboot-dir workstations import FILE.csv [--skip-bad] [--dry-run]
                                   columns mac (required), name, image, next_boot
    preboot-dir nextboot set MAC [--image IMG] | nextboot clear MAC
    preboot-dir sessions list
    preboot-dir sessions add NAME --image IMG [--clients N] [--timeout-min T] [--keep]
                                   [--participant MAC|NAME]... [--group ADDR] [--data-port P]
                                   [--disabled] [--position N]
    preboot-dir sessions set NAME [--image ...] [--clients ...] [--timeout-min ...]
                                   [--delete-after yes|no] [--participant ...]... [--add ...]
                                   [--drop ...] [--group ADDR|""] [--data-port P]
    preboot-dir sessions remove|enable|disable NAME
    preboot-dir sessions move NAME POSITION
    preboot-dir explain --mac MAC [--serial S] [--manufacturer M] [--ram-mb N] ...
                                   (the work and the identity the machine would get)
    preboot-dir identities list | log [POOL] | release POOL MAC|VALUE   (docs/identity.md)
    preboot-dir images [--root DIR | --server HOST[:PORT]] [--json]  what an imaging server holds

The store is the `Directory =` of prebootpolicyd's config (--config, default
/etc/preboot/policyd.conf), or --directory URL. Only the writing commands (init, import, add,
set, ...) create a missing SQLite file; the daemons never do. Exit status: 0 done, 1 the directory failed,
2 usage error, 65 a bad policy file or value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

import configobj

from common.dircli import csvimport, identities, images, keys, tls
from common.fileio import atomic_file
from common.machine import ATTRIBUTE_KINDS, facts_from_strings, normalize_mac
from common.policy.identityassign import identity_for
from common.policy.directory import Directory, DirectoryError, open_directory
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation, explain_rules, menu_for,
                                 normalize_participant)
from common.policy.merge import plan_import
from common.policy.policyfile import (PolicyFileError, check_name, check_session_name,
                                      dump_policy, file_shape, load_policy)
from common.policy.sessions import qualification, session_key, work_for
from common.policy.rules import FilterSyntaxError, parse_filter

PROGRAM = "preboot-dir"
DEFAULT_CONFIG = "/etc/preboot/policyd.conf"
DEFAULT_DIRECTORY = "sqlite:///var/lib/preboot/directory.db"
EX_USAGE_ERROR, EX_DIRECTORY, EX_DATAERR = 2, 1, 65


class UsageError(Exception):
    """A bad value on the command line (exit 65)."""


def _directory_from_config(path: str) -> tuple[str, str]:
    """Directory and DirectoryCredentials from prebootpolicyd's config, if it exists."""
    if not os.path.exists(path):
        return DEFAULT_DIRECTORY, ""
    try:
        values = configobj.ConfigObj(path, encoding="utf-8-sig", list_values=False,
                                     interpolation=False)
    except configobj.ConfigObjError as exc:
        raise UsageError(f"{path}: {exc}") from None
    url = (values.get("Directory") or "").strip() or DEFAULT_DIRECTORY
    credentials = (values.get("DirectoryCredentials") or "").strip()
    if credentials and not os.path.isabs(credentials):
        credentials = os.path.join(os.path.dirname(os.path.abspath(path)), credentials)
    return url, credentials


def _open(args: argparse.Namespace, create: bool) -> Directory:
    url, credentials = _directory_from_config(args.config)
    url = args.directory or url
    credentials = args.credentials or credentials
    try:
        return open_directory(url, credentials, timeout_s=args.directory_timeout_s, create=create)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- init / export / import ---------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    """Create the directory empty (no rules, no workstations) unless it exists: first start."""
    with _open(args, create=True) as directory:
        print(f"directory {directory.url.redacted()} ready")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open(args, create=False) as directory:
        text = dump_policy(directory.export_document(), directory.url.redacted())
    if args.file in (None, "-"):
        sys.stdout.write(text)
    else:
        with atomic_file(args.file) as handle:
            handle.write(text.encode("utf-8"))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    source = "<stdin>" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8-sig").read()
    except OSError as exc:
        raise UsageError(f"{source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    document = load_policy(text, source)   # PolicyFileError -> exit 65, store untouched
    summary = (f"{len(document.policy.rules)} rules, {len(document.workstations)} workstations, "
               f"{len(document.sessions)} multicast sessions")
    if document.policy.identities:
        summary += f", {len(document.policy.identities)} identity policies"
    if args.check:
        print(f"OK: {source}: {summary}")
        return 0
    shape = file_shape(text)
    with _open(args, create=not args.dry_run) as directory:
        where = directory.url.redacted()
        try:
            current = directory.export_document()
        except DirectoryError as exc:
            if args.merge or args.dry_run:
                raise
            # A replace is the repair for a store that cannot be read (an interrupted LDAP
            # policy write, a rule that does not parse): write the whole file, as before.
            print(f"note: the store could not be read ({exc}); writing the whole file")
            directory.import_document(document)
            print(f"imported {summary} into {where}")
            return 0
        change, report = plan_import(current, document, merge=args.merge,
                                     menu_keys=shape.menu_keys,
                                     station_keys=shape.station_keys)
        if not args.merge:
            # the rules, menu and sessions are written whole even when unchanged: that also
            # completes an interrupted LDAP policy write (docs/directory-ldap.md)
            change = dataclasses.replace(change, policy=document.policy,
                                         sessions=tuple(document.sessions))
        if args.dry_run:
            verb = "merging" if args.merge else "importing"
            print(f"dry run: {verb} {source} ({summary}) into {where} would change:")
        else:
            if not change.empty():
                directory.apply(change)     # one transaction on SQLite: all or nothing
            if args.merge:
                print(f"merged {summary} from {source} into {where}")
            else:
                print(f"imported {summary} into {where}")
    for line in report.summary_lines():
        print(f"  {line}")
    if args.dry_run:
        for line in report.detail_lines():
            print(line)
        print("nothing written (dry run)")
    return 0


# -- rules ----------------------------------------------------------------------------------------

def cmd_rules_list(args: argparse.Namespace) -> int:
    with _open(args, create=False) as directory:
        policy = directory.policy()
    if not policy.rules:
        print("no rules: every machine that is not flagged gets no work")
    for position, rule in enumerate(policy.rules, 1):
        state = "" if rule.enabled else " (disabled)"
        force = " [force]" if rule.force else ""
        named = f" [identity {rule.identity}]" if rule.identity else ""
        print(f"{position:3d}. {rule.name}{state}: {rule.action.describe()}{force}{named}")
        print(f"     if {rule.filter.canonical() or '(any machine)'}")
    return 0


def _find(policy: ImagingPolicy, name: str) -> int:
    for index, rule in enumerate(policy.rules):
        if rule.name == name:
            return index
    raise UsageError(f"no rule named '{name}'")


def _action_from(args: argparse.Namespace, base: Action | None) -> Action:
    base = base or Action()
    kind = ActionKind(args.action) if args.action else base.kind
    image = base.image if args.image is None else args.image
    addons = base.addons if args.addon is None else tuple(args.addon)
    session = base.session if args.session is None else args.session
    # add: a flag (True/False); set: yes/no, or None to keep the rule's
    shrink = base.shrink if args.shrink is None else args.shrink in (True, "yes")
    if kind is not ActionKind.RESTORE and args.addon is None:
        addons = ()
    if kind is not ActionKind.RESTORE and args.shrink is None:
        shrink = False
    fileset = base.fileset if args.fileset is None else args.fileset
    if kind is not ActionKind.RESTORE and args.fileset is None:
        fileset = 1
    try:
        return Action(kind, image, addons, session, shrink, fileset)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _filter(text: str):
    try:
        return parse_filter(text)
    except FilterSyntaxError as exc:
        raise UsageError(f"filter: {exc}") from None


def _update_rules(args: argparse.Namespace, change) -> int:
    with _open(args, create=True) as directory:
        policy = directory.policy()
        rules = list(policy.rules)
        message = change(rules)
        changed = dataclasses.replace(policy, rules=tuple(rules))
        problem = changed.identity_problem()
        if problem:
            raise UsageError(problem)
        directory.replace_policy(changed)
    print(message)
    return 0


def cmd_rules_add(args: argparse.Namespace) -> int:
    problem = check_name("rule", args.name)
    if problem:
        raise UsageError(problem)
    if args.action is None:
        raise UsageError("--action is required (restore, make, multicast, maintenance, none)")
    rule = Rule(args.name, _filter(args.filter or ""), _action_from(args, None),
                not args.disabled, args.force, (args.identity or "").strip())

    def change(rules: list[Rule]) -> str:
        if any(r.name == args.name for r in rules):
            raise UsageError(f"a rule named '{args.name}' exists; use 'rules set'")
        position = len(rules) + 1 if args.position is None else args.position
        if not 1 <= position <= len(rules) + 1:
            raise UsageError(f"position must be 1..{len(rules) + 1}")
        rules.insert(position - 1, rule)
        return f"added rule {position}: {rule.name}: {rule.action.describe()}"
    return _update_rules(args, change)


def cmd_rules_set(args: argparse.Namespace) -> int:
    def change(rules: list[Rule]) -> str:
        index = _find(ImagingPolicy(tuple(rules)), args.name)
        old = rules[index]
        rules[index] = Rule(
            old.name, old.filter if args.filter is None else _filter(args.filter),
            _action_from(args, old.action), old.enabled,
            old.force if args.force is None else args.force == "yes",
            old.identity if args.identity is None else args.identity.strip())
        return f"changed rule {index + 1}: {old.name}"
    return _update_rules(args, change)


def cmd_rules_remove(args: argparse.Namespace) -> int:
    def change(rules: list[Rule]) -> str:
        index = _find(ImagingPolicy(tuple(rules)), args.name)
        rules.pop(index)
        return f"removed rule {args.name}"
    return _update_rules(args, change)


def cmd_rules_enable(args: argparse.Namespace, enabled: bool) -> int:
    def change(rules: list[Rule]) -> str:
        index = _find(ImagingPolicy(tuple(rules)), args.name)
        rules[index] = dataclasses.replace(rules[index], enabled=enabled)
        return f"{'enabled' if enabled else 'disabled'} rule {args.name}"
    return _update_rules(args, change)


def cmd_rules_move(args: argparse.Namespace) -> int:
    def change(rules: list[Rule]) -> str:
        index = _find(ImagingPolicy(tuple(rules)), args.name)
        if not 1 <= args.position <= len(rules):
            raise UsageError(f"position must be 1..{len(rules)}")
        rules.insert(args.position - 1, rules.pop(index))
        return f"moved rule {args.name} to position {args.position}"
    return _update_rules(args, change)


# -- menu --------------------------------------------------------------------------------------

def cmd_menu(args: argparse.Namespace) -> int:
    with _open(args, create=args.menu_command == "set") as directory:
        policy = directory.policy()
        menu = policy.menu
        if args.menu_command == "set":
            try:
                menu = MenuSettings(MenuDisplay(args.display) if args.display else menu.display,
                                    menu.timeout_s if args.timeout_s is None else args.timeout_s)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            directory.replace_policy(dataclasses.replace(policy, menu=menu))
    print(f"menu display = {menu.display.value}, timeout_s = {menu.timeout_s}")
    return 0


# -- workstations and the next-boot flag ------------------------------------------------------

def _mac(text: str) -> str:
    mac = normalize_mac(text)
    if mac is None:
        raise UsageError(f"'{text}' is not a MAC address")
    return mac


def _describe_station(station: Workstation) -> str:
    flag = ""
    if station.image_on_next_boot:
        flag = f"  image on next boot: {station.image or '(what the rules pick)'}"
    if station.menu is not None:
        flag += f"  menu: {station.menu.value}"
    return f"{station.mac}  {station.name or '-'}{flag}"


def cmd_workstations(args: argparse.Namespace) -> int:
    command = args.ws_command
    with _open(args, create=command != "list") as directory:
        if command == "list":
            for station in directory.workstations():
                print(_describe_station(station))
        elif command == "add":
            mac = _mac(args.mac)
            old = directory.workstation(mac) or Workstation(mac)
            station = dataclasses.replace(old, name=args.name if args.name is not None else old.name)
            if args.menu is not None:
                menu = None if args.menu == "policy" else MenuDisplay(args.menu)
                station = dataclasses.replace(station, menu=menu)
            directory.put_workstation(station)
            print(f"registered {_describe_station(station)}")
        elif command == "remove":
            mac = _mac(args.mac)
            if not directory.delete_workstation(mac):
                raise UsageError(f"no workstation {mac}")
            print(f"removed workstation {mac}")
    return 0


def cmd_nextboot(args: argparse.Namespace) -> int:
    mac = _mac(args.mac)
    with _open(args, create=True) as directory:
        station = directory.workstation(mac)
        if args.nb_command == "set":
            if station is None:
                station = Workstation(mac)
                print(f"note: {mac} was not registered; registering it")
            station = dataclasses.replace(station, image_on_next_boot=True,
                                          image=args.image if args.image is not None else station.image)
            directory.put_workstation(station)
            print(f"flagged {_describe_station(station)}")
        else:
            if not directory.clear_next_boot(mac):
                print(f"{mac} was not flagged")
            else:
                print(f"cleared the next-boot flag of {mac}")
    return 0


# -- multicast sessions -------------------------------------------------------------------------

def _describe_session(position: int, session: MulticastSession) -> list[str]:
    state = "" if session.enabled else " (disabled)"
    timer = f" or {session.timeout_min} min after the last join" if session.timeout_min else ""
    after = "deleted" if session.delete_after else "kept, disabled"
    lines = [f"{position:3d}. {session.name}{state}: {session.image}",
             f"     starts when {session.clients} have joined{timer}; when done: {after}"]
    if session.participants:
        lines.append(f"     participants: {', '.join(session.participants)}")
    extra = []
    if session.group:
        extra.append(f"group {session.group}")
    if session.data_port:
        extra.append(f"data port {session.data_port}")
    if extra:
        lines.append(f"     {', '.join(extra)}")
    return lines


def _find_session(sessions: list[MulticastSession], name: str) -> int:
    key = session_key(name)
    for index, session in enumerate(sessions):
        if session_key(session.name) == key:
            return index
    raise UsageError(f"no multicast session named '{name}'")


def _update_sessions(args: argparse.Namespace, change) -> int:
    with _open(args, create=True) as directory:
        sessions = directory.sessions()
        message = change(sessions)
        directory.replace_sessions(sessions)
    print(message)
    return 0


def _session(name: str, image: str, **fields) -> MulticastSession:
    try:
        return MulticastSession(name, image, **fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_sessions_list(args: argparse.Namespace) -> int:
    with _open(args, create=False) as directory:
        sessions = directory.sessions()
    if not sessions:
        print("no multicast sessions")
    for position, session in enumerate(sessions, 1):
        print("\n".join(_describe_session(position, session)))
    return 0


def cmd_sessions_add(args: argparse.Namespace) -> int:
    problem = check_session_name(args.name)
    if problem:
        raise UsageError(problem)
    session = _session(args.name, args.image, clients=args.clients,
                       timeout_min=args.timeout_min, enabled=not args.disabled,
                       delete_after=not args.keep, participants=tuple(args.participant or ()),
                       group=args.group or "", data_port=args.data_port)

    def change(sessions: list[MulticastSession]) -> str:
        if any(session_key(s.name) == session_key(args.name) for s in sessions):
            raise UsageError(f"a multicast session named '{args.name}' exists; use "
                             "'sessions set'")
        position = len(sessions) + 1 if args.position is None else args.position
        if not 1 <= position <= len(sessions) + 1:
            raise UsageError(f"position must be 1..{len(sessions) + 1}")
        sessions.insert(position - 1, session)
        return f"added session {position}: {session.name}: {session.image}"
    return _update_sessions(args, change)


def cmd_sessions_set(args: argparse.Namespace) -> int:
    def change(sessions: list[MulticastSession]) -> str:
        index = _find_session(sessions, args.name)
        old = sessions[index]
        participants = list(old.participants if args.participant is None else args.participant)
        participants += args.add or []
        drop = {normalize_participant(p).casefold() for p in (args.drop or [])}
        participants = [p for p in participants if p.casefold() not in drop]
        sessions[index] = _session(
            old.name, old.image if args.image is None else args.image,
            clients=old.clients if args.clients is None else args.clients,
            timeout_min=old.timeout_min if args.timeout_min is None else args.timeout_min,
            enabled=old.enabled,
            delete_after=old.delete_after if args.delete_after is None
            else args.delete_after == "yes",
            participants=tuple(participants),
            group=old.group if args.group is None else args.group,
            data_port=old.data_port if args.data_port is None else args.data_port)
        return f"changed session {index + 1}: {old.name}"
    return _update_sessions(args, change)


def cmd_sessions_remove(args: argparse.Namespace) -> int:
    def change(sessions: list[MulticastSession]) -> str:
        removed = sessions.pop(_find_session(sessions, args.name))
        return f"removed session {removed.name}"
    return _update_sessions(args, change)


def cmd_sessions_enable(args: argparse.Namespace, enabled: bool) -> int:
    def change(sessions: list[MulticastSession]) -> str:
        index = _find_session(sessions, args.name)
        sessions[index] = dataclasses.replace(sessions[index], enabled=enabled)
        return f"{'enabled' if enabled else 'disabled'} session {sessions[index].name}"
    return _update_sessions(args, change)


def cmd_sessions_move(args: argparse.Namespace) -> int:
    def change(sessions: list[MulticastSession]) -> str:
        index = _find_session(sessions, args.name)
        if not 1 <= args.position <= len(sessions):
            raise UsageError(f"position must be 1..{len(sessions)}")
        moved = sessions.pop(index)
        sessions.insert(args.position - 1, moved)
        return f"moved session {moved.name} to position {args.position}"
    return _update_sessions(args, change)


# -- explain ----------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    values = {name: getattr(args, name) for name in ATTRIBUTE_KINDS
              if getattr(args, name, None) is not None}
    facts, problems = facts_from_strings(values)
    if problems:
        raise UsageError("; ".join(problems))
    with _open(args, create=False) as directory:
        policy = directory.policy()
        station = directory.workstation(facts.mac) if facts.mac else None
        sessions = directory.sessions()
        assignment = work_for(policy, station, facts, sessions)
        # what the machine would get, read from the assignment log: nothing is handed out
        identity = identity_for(directory, policy, assignment, facts, None, time.time(),
                                allocate=False) if facts.mac else None
    print(f"machine: {facts.describe()}")
    if station is not None:
        print(f"registered: {_describe_station(station)}")
    decided = False
    for verdict in explain_rules(policy, facts):
        if not verdict.enabled:
            mark = "off"
        elif verdict.matched and not decided:
            mark, decided = "WINS", True
        elif verdict.matched:
            mark = "later"      # would match, but an earlier rule already decided
        else:
            mark = "no"
        print(f"  {verdict.position:3d}. [{mark:5}] {verdict.name}: {verdict.reason}")
    for position, session in enumerate(sessions, 1):
        found = qualification(session, policy, station, facts)
        mark = "off" if not session.enabled else ("JOINS" if found else "no")
        why = found[0] if found else "neither named in it nor chosen by a multicast rule"
        print(f"  session {position:3d}. [{mark:5}] {session.name}: {why}")
    print(f"menu: {menu_for(policy, station).display.value}")
    print(f"answer: {assignment.action.describe()}")
    print(f"because: {assignment.reason}")
    if identity is not None:
        if identity.identity is not None:
            print(f"identity: {identity.identity.describe()}")
        print(f"identity because: {identity.reason} (unless its disk holds an identity)")
    return 0


# -- argument parsing -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Manage the preboot directory: "
                                     "imaging rules, menu, workstations, multicast sessions.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"prebootpolicyd config naming the directory (default {DEFAULT_CONFIG})")
    parser.add_argument("--directory", help="directory URL (sqlite:///path, ldap://host/base)")
    parser.add_argument("--credentials", help="root-only file with BindDN and Password (LDAP)")
    parser.add_argument("--directory-timeout-s", type=float, default=10.0,
                        help="give up on the directory after this long (default 10)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("init", help="create an empty directory if there is none").set_defaults(
        run=cmd_init)
    export = commands.add_parser("export", help="write the whole policy as one file")
    export.add_argument("file", nargs="?", help="output file (default stdout)")
    export.set_defaults(run=cmd_export)
    imp = commands.add_parser("import", help="replace the store with a policy file (or merge "
                                             "one into it)")
    imp.add_argument("file", help="policy file, - for stdin")
    imp.add_argument("--check", action="store_true", help="only validate the file")
    imp.add_argument("--merge", action="store_true",
                     help="merge the file in: rules and sessions by name, workstations by MAC, "
                          "the menu only if the file has [menu]; nothing else is removed")
    imp.add_argument("--dry-run", action="store_true",
                     help="show what would be added, replaced and removed; write nothing")
    imp.set_defaults(run=cmd_import)

    rules = commands.add_parser("rules", help="list and edit work assignment rules")
    rule_commands = rules.add_subparsers(dest="rules_command", required=True)
    rule_commands.add_parser("list").set_defaults(run=cmd_rules_list)
    for name, run in (("add", cmd_rules_add), ("set", cmd_rules_set)):
        sub = rule_commands.add_parser(name)
        sub.add_argument("name")
        sub.add_argument("--filter", help="e.g. \"manufacturer = 'Dell Inc.' and ram_mb >= 4096\"")
        sub.add_argument("--action", choices=[k.value for k in ActionKind])
        sub.add_argument("--image", help="restore: base image; make: where to store")
        sub.add_argument("--addon", action="append", help="add-on image (repeatable)")
        sub.add_argument("--session", help="multicast session name")
        sub.add_argument("--fileset", type=int, metavar="N",
                         help="restore: the image's file set, 1 (everything, the default) to "
                              "10 (img show lists an image's sets)")
        sub.add_argument("--identity", help="the identity policy its machines get "
                                            "(\"\": the default one)")
        if name == "add":
            sub.add_argument("--force", action="store_true",
                             help="send the image even to machines that already have it")
            sub.add_argument("--shrink", action="store_true",
                             help="restore: onto a smaller disk, shrink filesystems to fit")
            sub.add_argument("--disabled", action="store_true")
            sub.add_argument("--position", type=int, help="1 = first (default: last)")
        else:
            sub.add_argument("--force", choices=["yes", "no"])
            sub.add_argument("--shrink", choices=["yes", "no"])
        sub.set_defaults(run=run)
    for name, run in (("remove", cmd_rules_remove),
                      ("enable", lambda a: cmd_rules_enable(a, True)),
                      ("disable", lambda a: cmd_rules_enable(a, False))):
        sub = rule_commands.add_parser(name)
        sub.add_argument("name")
        sub.set_defaults(run=run)
    move = rule_commands.add_parser("move")
    move.add_argument("name")
    move.add_argument("position", type=int)
    move.set_defaults(run=cmd_rules_move)

    menu = commands.add_parser("menu", help="Preboot menu display and timeout")
    menu_commands = menu.add_subparsers(dest="menu_command", required=True)
    menu_commands.add_parser("show").set_defaults(run=cmd_menu)
    menu_set = menu_commands.add_parser("set")
    menu_set.add_argument("--display", choices=[d.value for d in MenuDisplay])
    menu_set.add_argument("--timeout-s", type=int)
    menu_set.set_defaults(run=cmd_menu)

    stations = commands.add_parser("workstations", help="registered workstations")
    ws_commands = stations.add_subparsers(dest="ws_command", required=True)
    ws_commands.add_parser("list").set_defaults(run=cmd_workstations)
    add = ws_commands.add_parser("add")
    add.add_argument("mac")
    add.add_argument("--name")
    add.add_argument("--menu", choices=[d.value for d in MenuDisplay] + ["policy"],
                     help="this machine's Preboot menu display (policy: the policy's)")
    add.set_defaults(run=cmd_workstations)
    remove = ws_commands.add_parser("remove")
    remove.add_argument("mac")
    remove.set_defaults(run=cmd_workstations)
    csvimport.add_command(ws_commands, _open, UsageError)

    nextboot = commands.add_parser("nextboot", help="the 'image on next boot' flag")
    nb_commands = nextboot.add_subparsers(dest="nb_command", required=True)
    nb_set = nb_commands.add_parser("set")
    nb_set.add_argument("mac")
    nb_set.add_argument("--image", help="image to put down (default: what the rules pick)")
    nb_set.set_defaults(run=cmd_nextboot)
    nb_clear = nb_commands.add_parser("clear")
    nb_clear.add_argument("mac")
    nb_clear.set_defaults(run=cmd_nextboot)

    _sessions_parser(commands)

    explain = commands.add_parser("explain", help="what a machine would get, and why")
    for name in ATTRIBUTE_KINDS:
        explain.add_argument(f"--{name.replace('_', '-')}", dest=name)
    explain.set_defaults(run=cmd_explain)
    images.add_command(commands, UsageError)
    identities.add_commands(commands, _open, UsageError)
    keys.add_commands(commands)
    tls.add_commands(commands)
    return parser


def _count(low: int, high: int):
    def convert(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number from {low} to "
                                             f"{high}")
        return int(text)
    return convert


def _sessions_parser(commands) -> None:
    sessions = commands.add_parser("sessions", help="multicast sessions (in order: the first "
                                                    "enabled one a machine qualifies for)")
    verbs = sessions.add_subparsers(dest="sessions_command", required=True)
    verbs.add_parser("list").set_defaults(run=cmd_sessions_list)
    for name, run in (("add", cmd_sessions_add), ("set", cmd_sessions_set)):
        sub = verbs.add_parser(name)
        sub.add_argument("name")
        sub.add_argument("--image", required=name == "add", help="the master image")
        sub.add_argument("--clients", type=_count(1, 10000),
                         default=5 if name == "add" else None,
                         help="start when this many have joined (default 5)")
        sub.add_argument("--timeout-min", type=_count(0, 10080),
                         default=15 if name == "add" else None,
                         help="... or this many minutes after the last join (default 15; "
                              "0: no timer)")
        sub.add_argument("--participant", action="append", metavar="MAC|NAME",
                         help="a machine the session takes (repeatable; set: replaces them)")
        sub.add_argument("--group", help="the group address (default: from the name; set "
                                         "\"\" to go back to it)")
        sub.add_argument("--data-port", type=_count(0, 65535),
                         default=0 if name == "add" else None,
                         help="the data port (default: the imaging server's MulticastPort)")
        if name == "add":
            sub.add_argument("--keep", action="store_true",
                             help="keep the session, disabled, when done (default: delete it)")
            sub.add_argument("--disabled", action="store_true")
            sub.add_argument("--position", type=int, help="1 = first (default: last)")
        else:
            sub.add_argument("--delete-after", choices=["yes", "no"])
            sub.add_argument("--add", action="append", metavar="MAC|NAME",
                             help="add a participant (repeatable)")
            sub.add_argument("--drop", action="append", metavar="MAC|NAME",
                             help="remove a participant (repeatable)")
        sub.set_defaults(run=run)
    for name, run in (("remove", cmd_sessions_remove),
                      ("enable", lambda a: cmd_sessions_enable(a, True)),
                      ("disable", lambda a: cmd_sessions_enable(a, False))):
        sub = verbs.add_parser(name)
        sub.add_argument("name")
        sub.set_defaults(run=run)
    move = verbs.add_parser("move")
    move.add_argument("name")
    move.add_argument("position", type=int)
    move.set_defaults(run=cmd_sessions_move)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except PolicyFileError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return EX_DATAERR
    except UsageError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return EX_DATAERR
    except DirectoryError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return EX_DIRECTORY
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
