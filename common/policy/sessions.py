"""Which server-initiated multicast session a machine joins, and the work that makes (pure).

The original's server-side sessions (DOMAIN.md, Multicast): several sessions in order, the first
enabled one a machine qualifies for wins; a machine qualifies when the session names it (its
MAC, its registered workstation name or its host name) or when an enabled rule with action
multicast naming the session matches it. A machine that boots after a session began imaging
is not sent into it: it goes on to the next session it qualifies for (a later run of the same
session, once that is enabled again, included).

work_for() puts that in front of assign_work(): a session a machine qualifies for is explicit,
short-lived work and wins over what the rules would otherwise give it. Rules choose only the
machines rules decide for (unregistered ones, and registered ones flagged for imaging without
an image named), as assign_work does; a session that names a machine takes it whatever its
record says. prebootpolicyd, imgsrvd and `preboot-dir explain` all call work_for, so they
cannot disagree (imgsrvd alone knows which sessions began: it passes them as `started`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from common.machine import MachineFacts

from .model import (NO_WORK, Action, ActionKind, ImagingPolicy, MulticastSession,
                    WorkAssignment, Workstation, assign_work)


def session_key(name: str) -> str:
    """How session names compare: ignoring case and repeated blanks, as the directory's
    backends (SQLite NOCASE, LDAP caseIgnoreMatch) and the policy file do."""
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class SessionChoice:
    session: MulticastSession | None
    reason: str
    rule: str | None = None            # the rule that chose the machine, if a rule did
    passed_over: tuple[str, ...] = ()  # sessions it qualified for that had begun imaging


def _rules_decide(station: Workstation | None) -> bool:
    """Whether the rules decide for this machine at all (assign_work's reading)."""
    return station is None or (station.image_on_next_boot and not station.image)


def qualification(session: MulticastSession, policy: ImagingPolicy,
                  station: Workstation | None, facts: MachineFacts
                  ) -> tuple[str, str | None] | None:
    """(why the machine qualifies for `session`, the rule that chose it or None), or None when
    it does not. The session's `enabled` is not looked at here."""
    named = session.names(station, facts)
    if named:
        return f"session '{session.name}' names this machine ({named})", None
    if not _rules_decide(station):
        return None
    key = session_key(session.name)
    for rule in policy.rules:
        if rule.enabled and rule.action.kind is ActionKind.MULTICAST and \
                session_key(rule.action.session) == key and rule.filter.evaluate(facts):
            return (f"rule '{rule.name}' matches and sends it to session '{session.name}'",
                    rule.name)
    return None


def session_for(facts: MachineFacts, station: Workstation | None,
                sessions: Iterable[MulticastSession], policy: ImagingPolicy,
                started: frozenset[str] = frozenset()) -> SessionChoice:
    """The first enabled session, in order, the machine qualifies for and that has not begun
    imaging (`started`: session_key()s of the sessions that have), with the reason; or none,
    with the reason."""
    passed_over: list[str] = []
    for session in sessions:
        if not session.enabled:
            continue
        found = qualification(session, policy, station, facts)
        if found is None:
            continue
        if session_key(session.name) in started:
            passed_over.append(session.name)
            continue
        why, rule = found
        if passed_over:
            why += f" ({_began(passed_over)}; this machine joins the next session)"
        return SessionChoice(session, why, rule, tuple(passed_over))
    if passed_over:
        return SessionChoice(None, f"{_began(passed_over)}; no later session takes this "
                                   "machine: it waits for the next one",
                             passed_over=tuple(passed_over))
    return SessionChoice(None, "no enabled multicast session names this machine or has a "
                               "rule that matches it")


def _began(names: list[str]) -> str:
    listed = ", ".join(f"'{name}'" for name in names)
    return f"session{'s' if len(names) > 1 else ''} {listed} began imaging before it joined"


def work_for(policy: ImagingPolicy, station: Workstation | None, facts: MachineFacts,
             sessions: Iterable[MulticastSession] = (),
             started: frozenset[str] = frozenset()) -> WorkAssignment:
    """The answer for one machine: its multicast session if it qualifies for one, else
    assign_work's; a rule's multicast work naming a session that is not there to join (none by
    that name, disabled, imaging begun) becomes no work, with the reason."""
    sessions = tuple(sessions)
    choice = session_for(facts, station, sessions, policy, started)
    if choice.session is not None:
        source = f"rule '{choice.rule}'" if choice.rule else f"session '{choice.session.name}'"
        action = Action(ActionKind.MULTICAST, choice.session.image, session=choice.session.name)
        return WorkAssignment(action, source, choice.reason, choice.rule)
    assignment = assign_work(policy, station, facts)
    action = assignment.action
    if action.kind is not ActionKind.MULTICAST:
        return assignment
    key = session_key(action.session)
    session = next((s for s in sessions if session_key(s.name) == key), None)
    if session is None:
        why = f"there is no multicast session '{action.session}'"
    elif not session.enabled:
        why = f"multicast session '{session.name}' is disabled"
    else:
        why = choice.reason
    return WorkAssignment(NO_WORK, assignment.source, f"{assignment.reason}, but {why}",
                          assignment.rule)
