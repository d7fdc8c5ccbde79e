"""What a policy file changes in the directory: `preboot-dir import` (replace) and
`preboot-dir import --merge`, as one DirectoryChange plus a report of what it adds, replaces and
removes, so that --dry-run can show it without writing.

Replace: the store ends up holding exactly the file. Merge: nothing the file does not name is
touched. Rules are matched by name and sessions by session name (both ignoring case and repeated
blanks, as the backends and the policy file compare them), workstations by MAC. A rule or
session in the file replaces the one of that name where it stands; new ones are appended in the
file's order. A workstation in the file has the keys the file gives it replaced and keeps the
others. The menu settings are replaced only when the file has a [menu] section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .directory.base import DirectoryChange
from .policyfile import MENU_KEYS, STATION_KEYS
from .model import ImagingPolicy, PolicyDocument, Rule, Workstation
from .sessions import session_key



def rule_key(name: str) -> str:
    """How rule names compare (policyfile._unique_names, SQLite NOCASE, LDAP cn)."""
    return " ".join(name.split()).casefold()


def _rule_facts(rule: Rule) -> tuple:
    return (rule.name, rule.enabled, rule.filter.canonical(), rule.action, rule.force)


@dataclass
class KindReport:
    """One kind of entry (rules, workstations, sessions): the names added, replaced, removed."""

    kind: str                                  # "rule", "workstation", "session"
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    reordered: bool = False

    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.reordered)

    def summary(self, plural: str, with_removed: bool) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.replaced)} replaced"]
        if with_removed:
            parts.append(f"{len(self.removed)} removed")
        parts.append(f"{self.unchanged} unchanged")
        if self.reordered:
            parts.append("order changed")
        return f"{plural}: {', '.join(parts)}"

    def details(self) -> list[str]:
        lines = [f"  + {self.kind} {name}" for name in self.added]
        lines += [f"  ~ {self.kind} {name}" for name in self.replaced]
        lines += [f"  - {self.kind} {name}" for name in self.removed]
        if self.reordered:
            lines.append(f"  ~ the order of the {self.kind}s")
        return lines


@dataclass
class ImportReport:
    merge: bool
    rules: KindReport
    workstations: KindReport
    sessions: KindReport
    menu: str                   # "replaced", "unchanged", "kept" (merge, no [menu] in the file)
    identities: KindReport = field(default_factory=lambda: KindReport("identity policy"))

    def changed(self) -> bool:
        return (self.menu == "replaced" or self.rules.changed() or self.workstations.changed()
                or self.sessions.changed() or self.identities.changed())

    def summary_lines(self) -> list[str]:
        removed = not self.merge
        menu = {"replaced": "replaced", "unchanged": "unchanged",
                "kept": "not in the file, kept"}[self.menu]
        return [self.rules.summary("rules", removed),
                self.workstations.summary("workstations", removed),
                self.sessions.summary("sessions", removed),
                self.identities.summary("identity policies", removed),
                f"menu: {menu}"]

    def detail_lines(self) -> list[str]:
        lines = (self.rules.details() + self.workstations.details() + self.sessions.details()
                 + self.identities.details())
        if self.menu == "replaced":
            lines.append("  ~ menu settings")
        return lines


def _quoted(name: str) -> str:
    return f"'{name}'"


def _ordered(kind: str, current: list, incoming: list, key, facts, merge: bool
             ) -> tuple[list, KindReport]:
    """Rules or sessions: the resulting ordered list and what it changes."""
    report = KindReport(kind)
    by_key = {key(item.name): index for index, item in enumerate(current)}
    if merge:
        result = list(current)
        for item in incoming:
            index = by_key.get(key(item.name))
            if index is None:
                result.append(item)
                report.added.append(_quoted(item.name))
            elif facts(result[index]) != facts(item):
                result[index] = item
                report.replaced.append(_quoted(item.name))
            else:
                report.unchanged += 1
        return result, report
    result = list(incoming)
    wanted = {key(item.name) for item in incoming}
    for item in incoming:
        index = by_key.get(key(item.name))
        if index is None:
            report.added.append(_quoted(item.name))
        elif facts(current[index]) != facts(item):
            report.replaced.append(_quoted(item.name))
        else:
            report.unchanged += 1
    report.removed = [_quoted(item.name) for item in current if key(item.name) not in wanted]
    if not report.changed():
        report.reordered = [facts(i) for i in current] != [facts(i) for i in result]
    return result, report


def plan_import(current: PolicyDocument, incoming: PolicyDocument, merge: bool = False,
                menu_keys: frozenset[str] | None = MENU_KEYS,
                station_keys: dict[str, frozenset[str]] | None = None
                ) -> tuple[DirectoryChange, ImportReport]:
    """The writes that bring `current` (the store as read) to `incoming` replaced (merge=False)
    or merged in, and the report. `has_menu` and `station_keys` (the keys the file gives each
    workstation, by normalised MAC), as policyfile.file_shape reads them, matter only to a
    merge: a key the file leaves out keeps the store's value (no [menu]: menu_keys None)."""
    rules, rule_report = _ordered("rule", list(current.policy.rules),
                                  list(incoming.policy.rules), rule_key, _rule_facts, merge)
    sessions, session_report = _ordered("session", list(current.sessions),
                                        list(incoming.sessions), session_key,
                                        lambda s: s, merge)
    if merge and menu_keys is None:
        menu, menu_state = current.policy.menu, "kept"
    else:
        menu = incoming.policy.menu
        if merge:
            menu = dataclasses.replace(current.policy.menu, **{
                key: getattr(menu, key) for key in menu_keys if key in MENU_KEYS})
        menu_state = "unchanged" if menu == current.policy.menu else "replaced"

    stations = {station.mac: station for station in current.workstations}
    station_report = KindReport("workstation")
    put: list[Workstation] = []
    for station in incoming.workstations:
        old = stations.get(station.mac)
        new = station
        if old is not None and merge:
            keys = (station_keys or {}).get(station.mac, frozenset(STATION_KEYS))
            new = dataclasses.replace(old, **{key: getattr(station, key)
                                              for key in keys if key in STATION_KEYS})
        if old is None:
            station_report.added.append(station.mac)
            put.append(new)
        elif old != new:
            station_report.replaced.append(station.mac)
            put.append(new)
        else:
            station_report.unchanged += 1
    deleted: list[str] = []
    if not merge:
        wanted = {station.mac for station in incoming.workstations}
        deleted = [mac for mac in sorted(stations) if mac not in wanted]
        station_report.removed = list(deleted)

    # Identity policies by name, as rules: a merge keeps the store's that the file leaves out.
    identities, identity_report = _ordered("identity policy", list(current.policy.identities),
                                           list(incoming.policy.identities), rule_key,
                                           lambda i: i, merge)
    policy_changed = (rule_report.changed() or menu_state == "replaced"
                      or identity_report.changed())
    change = DirectoryChange(
        policy=ImagingPolicy(tuple(rules), menu, tuple(identities)) if policy_changed else None,
        put_workstations=tuple(put), delete_workstations=tuple(deleted),
        sessions=tuple(sessions) if session_report.changed() else None)
    return change, ImportReport(merge, rule_report, station_report, session_report, menu_state,
                                identity_report)

