"""The policy model and the work decision: what the directory stores and what a machine gets.

An imaging policy is an ordered list of work assignment rules plus the Preboot menu settings.
The first enabled rule whose filter matches the machine wins; the rest are ignored (the
original's documented behaviour). Registered workstations (records by MAC) carry the "put an image
on this workstation on next boot" flag, which imgsrvd clears after success.

assign_work() is pure: policy, workstation record and facts in, a WorkAssignment with its reason
out. prebootpolicyd, imgsrvd and `preboot-dir explain` all call it, so they cannot disagree.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum

from common.machine import MachineFacts, normalize_mac

from .identitypolicy import IdentityPolicy, overlapping_pools, pick_identity_policy
from .rulematch import Matcher, compile_matcher
from .rules import Filter, parse_filter


_UNSAFE = re.compile(r'["\x00-\x1f\x7f]')


# An image declares at most this many file sets (set 1, everything, included): the same bound
# as common.imaging.filesets.MAX_SETS, which this wing may not import (a unit test holds them
# together).
MAX_FILESETS = 10


class ActionKind(str, Enum):
    RESTORE = "restore"          # put a base image (and its add-on images) down on the disk
    MAKE = "make"                # take an image of the disk to a path on the server
    MULTICAST = "multicast"      # join a multicast session by name
    MAINTENANCE = "maintenance"  # the imaging environment's shell
    NONE = "none"                # no imaging work: boot the local disk


@dataclass(frozen=True)
class Action:
    kind: ActionKind = ActionKind.NONE
    image: str = ""                  # restore: the base image; make: the path to store to
    addons: tuple[str, ...] = ()     # restore: add-on images laid on after the base image
    session: str = ""                # multicast: the session name
    shrink: bool = False             # restore: onto a smaller disk, shrink filesystems to fit
    fileset: int = 1                 # restore: the image's file set (1: everything)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        if self.kind in (ActionKind.RESTORE, ActionKind.MAKE) and not self.image:
            return f"action {self.kind.value} needs an image path"
        if self.kind is ActionKind.MULTICAST and not self.session:
            return "action multicast needs a session name"
        if self.addons and self.kind is not ActionKind.RESTORE:
            return "add-on images go only with action restore"
        if self.shrink and self.kind is not ActionKind.RESTORE:
            return "shrink goes only with action restore"
        if isinstance(self.fileset, bool) or not isinstance(self.fileset, int) or \
                not 1 <= self.fileset <= MAX_FILESETS:
            return f"file set {self.fileset!r} is not a number from 1 to {MAX_FILESETS}"
        if self.fileset != 1 and self.kind is not ActionKind.RESTORE:
            return "fileset goes only with action restore"
        for value in (self.image, self.session, *self.addons):
            if _UNSAFE.search(value):
                # They travel in a kernel command line and in the policy file's lists.
                return f"'{value}' has a double quote or a control character"
        if any(not addon.strip() for addon in self.addons):
            return "an add-on image path is empty"
        return None

    def describe(self) -> str:
        if self.kind is ActionKind.RESTORE:
            extra = f" + add-ons {', '.join(self.addons)}" if self.addons else ""
            fit = " (shrunk to fit a smaller disk)" if self.shrink else ""
            subset = f" file set {self.fileset}" if self.fileset != 1 else ""
            return f"restore {self.image}{subset}{extra}{fit}"
        if self.kind is ActionKind.MAKE:
            return f"make an image to {self.image}"
        if self.kind is ActionKind.MULTICAST:
            return f"join multicast session {self.session}"
        if self.kind is ActionKind.MAINTENANCE:
            return "maintenance shell"
        return "no work (boot the local disk)"


NO_WORK = Action()


@dataclass(frozen=True)
class Rule:
    name: str
    filter: Filter
    action: Action
    enabled: bool = True
    force: bool = False              # send the base image even if the machine already has it
    identity: str = ""               # the identity policy its machines get; "": the default

    @classmethod
    def from_text(cls, name: str, filter_text: str, action: Action, enabled: bool = True,
                  force: bool = False, identity: str = "") -> "Rule":
        return cls(name, parse_filter(filter_text), action, enabled, force, identity)


class MenuDisplay(str, Enum):
    ALWAYS = "always"
    NEVER = "never"
    HOTKEY = "hotkey"                # shown only when the hot key is pressed (the default)


@dataclass(frozen=True)
class MenuSettings:
    display: MenuDisplay = MenuDisplay.HOTKEY
    timeout_s: int = 5               # the menu's (and the hot-key prompt's) wait

    def __post_init__(self) -> None:
        if not 0 <= self.timeout_s <= 3600:
            raise ValueError("menu timeout must be 0..3600 seconds")


@dataclass(frozen=True)
class Workstation:
    mac: str                         # normalised, machine.normalize_mac
    name: str = ""
    image_on_next_boot: bool = False
    image: str = ""                  # the image for next boot; empty: what the rules pick
    menu: MenuDisplay | None = None  # this machine's Preboot menu display; None: the policy's


MAX_SESSION_NAME_BYTES = 255         # the multicast wire's bound (common.imaging.multicast)
MAX_PARTICIPANTS = 10000             # named participants of one session
MAX_PARTICIPANT_CHARS = 255
DEFAULT_SESSION_CLIENTS = 5
DEFAULT_SESSION_TIMEOUT_MIN = 15


@dataclass(frozen=True)
class MulticastSession:
    """A server-initiated multicast session (DOMAIN.md, Multicast): imgsrvd sends `image` to
    the machines that qualify (named in `participants`, or chosen by rules with action multicast
    naming the session) once `clients` have joined, or `timeout_min` minutes after the last
    join (0: no timer; the clients count or an operator starts it)."""

    name: str
    image: str                       # the master image file on the server
    clients: int = DEFAULT_SESSION_CLIENTS       # start when this many have joined ...
    timeout_min: int = DEFAULT_SESSION_TIMEOUT_MIN   # ... or this long after the last join
    enabled: bool = True
    delete_after: bool = True        # delete the session when done, else keep it disabled
    participants: tuple[str, ...] = ()   # named machines: MACs (normalised) or names, sorted
    group: str = ""                  # the group address; "": from the name (231.x.y.z)
    data_port: int = 0               # the data port; 0: the imaging server's MulticastPort

    def __post_init__(self) -> None:
        # Sorted: LDAP keeps no order of values, and the order means nothing.
        cleaned = tuple(sorted((normalize_participant(p) for p in self.participants),
                               key=lambda p: (p.casefold(), p)))
        if cleaned != self.participants:
            object.__setattr__(self, "participants", cleaned)
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why this session cannot be stored or run; None when it can."""
        if len(self.name.encode("utf-8", "surrogatepass")) > MAX_SESSION_NAME_BYTES:
            return (f"session name '{self.name[:40]}...' is longer than "
                    f"{MAX_SESSION_NAME_BYTES} bytes of UTF-8")
        if _UNSAFE.search(self.image):
            return f"'{self.image}' has a double quote or a control character"
        if not 0 <= self.data_port <= 65535:
            return f"data port {self.data_port} is not 0..65535"
        if self.group:
            why = group_refusal(self.group)
            if why:
                return why
        if len(self.participants) > MAX_PARTICIPANTS:
            return f"more than {MAX_PARTICIPANTS} named participants"
        seen: set[str] = set()
        for participant in self.participants:
            if not participant or len(participant) > MAX_PARTICIPANT_CHARS or \
                    _UNSAFE.search(participant) or "," in participant:
                return (f"participant '{participant[:40]}' is empty, longer than "
                        f"{MAX_PARTICIPANT_CHARS} characters or has a comma, a double quote or "
                        "a control character")
            key = participant.casefold()
            if key in seen:
                return f"participant '{participant}' is named twice"
            seen.add(key)
        return None

    def names(self, station: "Workstation | None", facts: MachineFacts) -> str | None:
        """How this session names the machine (its MAC, its registered name or its host name),
        or None when it does not."""
        wanted = {p.casefold() for p in self.participants}
        if not wanted:
            return None
        if facts.mac and facts.mac.casefold() in wanted:
            return f"MAC {facts.mac}"
        for label, name in (("workstation", station.name if station else ""),
                            ("host name", facts.hostname or "")):
            if name and name.casefold() in wanted:
                return f"{label} {name}"
        return None


def normalize_participant(text: str) -> str:
    """A participant as stored: a MAC in its normal form (00C04FDC2AB5), else the name with
    surrounding blanks removed."""
    text = text.strip()
    return normalize_mac(text) or text


def group_refusal(address: str) -> str:
    """Why `address` cannot be a session's group address; "" when it can. The same rules as
    common.imaging.multicast.group_address_refusal (which this wing may not import; a unit test
    holds the two together): IPv4 multicast, not 224.0.0.0/24, not 232.0.0.0/8 (SSM), not one
    sharing its Ethernet address with 224.0.0.x."""
    try:
        group = ipaddress.IPv4Address(address)
    except (ipaddress.AddressValueError, ValueError):
        return f"group '{str(address)[:40]}' is not an IPv4 address"
    if not group.is_multicast:
        return f"group {group} is not a multicast address (224.0.0.0/4)"
    if group in ipaddress.IPv4Network("224.0.0.0/24"):
        return f"group {group} is in 224.0.0.0/24, the local network control block"
    if group in ipaddress.IPv4Network("232.0.0.0/8"):
        return f"group {group} is in 232.0.0.0/8 (source-specific multicast)"
    packed = group.packed
    if packed[1] & 0x7F == 0 and packed[2] == 0:
        return (f"group {group} shares its Ethernet address with 224.0.0.{packed[3]}, which "
                "switches flood to every port")
    return ""


@dataclass(frozen=True)
class ImagingPolicy:
    """What every query reads: the ordered rules, the menu settings and the identity
    policies (docs/identity.md), which rules name."""

    rules: tuple[Rule, ...] = ()
    menu: MenuSettings = field(default_factory=MenuSettings)
    identities: tuple[IdentityPolicy, ...] = ()

    def identity_problem(self) -> str | None:
        """Why the identity policies cannot be stored: two with one name, two defaults, pools
        sharing an address, a rule naming one that does not exist. None when they can."""
        seen: dict[str, str] = {}
        for policy in self.identities:
            key = policy.name.casefold()
            if key in seen:
                return f"identity policies '{seen[key]}' and '{policy.name}' differ only in case"
            seen[key] = policy.name
        defaults = [p.name for p in self.identities if p.default]
        if len(defaults) > 1:
            return f"identity policies {', '.join(defaults)} are all marked default (one may be)"
        for rule in self.rules:
            if rule.identity and rule.identity.casefold() not in seen:
                return f"rule '{rule.name}' names identity policy '{rule.identity}', which " \
                       "does not exist"
        return overlapping_pools(self.identities)

    @cached_property
    def _enabled(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)

    @cached_property
    def _matcher(self) -> Matcher:
        # Built on first use and kept with this (immutable) policy; the directory's cache hands
        # out the same object until the store changes. See rulematch.py for why.
        return compile_matcher([rule.filter for rule in self._enabled])

    def prepare(self) -> "ImagingPolicy":
        """Compile the rules now rather than on the first query (which may run on an event
        loop that must not stall for the ~0.1 s a thousand rules take)."""
        self._matcher  # noqa: B018 - the cached_property does the work
        return self

    def first_match(self, facts: MachineFacts) -> "Rule | None":
        index = self._matcher(facts)
        return None if index < 0 else self._enabled[index]


@dataclass(frozen=True)
class PolicyDocument:
    """The whole store, for import and export (policyfile.py) and backend round trips."""

    policy: ImagingPolicy = field(default_factory=ImagingPolicy)
    workstations: tuple[Workstation, ...] = ()
    sessions: tuple[MulticastSession, ...] = ()


@dataclass(frozen=True)
class WorkAssignment:
    action: Action
    source: str                      # "workstation 00C04FDC2AB5", "rule 'Dell lab'", "policy"
    reason: str
    rule: str | None = None          # the matching rule's name, if a rule decided

    @property
    def has_work(self) -> bool:
        return self.action.kind is not ActionKind.NONE

    def describe(self) -> str:
        return f"{self.action.describe()} ({self.reason})"


def menu_for(policy: ImagingPolicy, workstation: Workstation | None) -> MenuSettings:
    """The menu settings one machine gets: the policy's, with the display overridden where its
    workstation record says so (the original set Preboot menu options per device too)."""
    if workstation is None or workstation.menu is None:
        return policy.menu
    return MenuSettings(workstation.menu, policy.menu.timeout_s)


@dataclass(frozen=True)
class RuleVerdict:
    """One rule's outcome for `preboot-dir explain`."""

    position: int
    name: str
    enabled: bool
    matched: bool
    reason: str


def explain_rules(policy: ImagingPolicy, facts: MachineFacts) -> list[RuleVerdict]:
    """Every rule's verdict, first to last, even after the first match (explain shows why the
    others did not apply)."""
    verdicts = []
    for position, rule in enumerate(policy.rules, 1):
        if not rule.enabled:
            verdicts.append(RuleVerdict(position, rule.name, False, False, "disabled"))
            continue
        result = rule.filter.explain(facts)
        verdicts.append(RuleVerdict(position, rule.name, True, result.matched, result.reason))
    return verdicts


def first_matching_rule(policy: ImagingPolicy, facts: MachineFacts) -> Rule | None:
    return policy.first_match(facts)


def assign_work(policy: ImagingPolicy, workstation: Workstation | None,
                facts: MachineFacts) -> WorkAssignment:
    """The answer for one machine, as DOMAIN.md's auto-imaging section describes it."""
    if workstation is not None:
        return _registered(policy, workstation, facts)
    rule = first_matching_rule(policy, facts)
    if rule is None:
        return WorkAssignment(NO_WORK, "policy", "no enabled rule matches this machine")
    return _from_rule(rule, facts)


def _registered(policy: ImagingPolicy, station: Workstation,
                facts: MachineFacts) -> WorkAssignment:
    who = f"workstation {station.name or station.mac}"
    if not station.image_on_next_boot:
        # Registered machines are imaged only when flagged; the server rules are for the rest.
        return WorkAssignment(NO_WORK, who, f"{who} is registered and not flagged for imaging")
    if station.image:
        # The administrator flagged this machine by hand: send the image even if it has it.
        return WorkAssignment(Action(ActionKind.RESTORE, station.image), who,
                              f"{who} is flagged to get {station.image} on next boot")
    rule = first_matching_rule(policy, facts)
    if rule is None:
        return WorkAssignment(NO_WORK, who,
                              f"{who} is flagged for imaging with no image named, "
                              "and no rule matches it")
    picked = _from_rule(rule, facts, force=True)
    return WorkAssignment(picked.action, who,
                          f"{who} is flagged for imaging; {picked.reason}", rule.name)


def _from_rule(rule: Rule, facts: MachineFacts, force: bool = False) -> WorkAssignment:
    source = f"rule '{rule.name}'"
    action = rule.action
    if (action.kind is ActionKind.RESTORE and not (rule.force or force)
            and facts.base_image is not None and facts.base_image == action.image):
        return WorkAssignment(NO_WORK, source,
                              f"{source} picks {action.image}, which this machine already has "
                              "(the rule does not force it)", rule.name)
    return WorkAssignment(action, source, f"{source} matches: {action.describe()}", rule.name)


def identity_policy_for(policy: ImagingPolicy, assignment: WorkAssignment
                        ) -> tuple[IdentityPolicy | None, str]:
    """The identity policy a machine's identity comes from, and why (docs/identity.md): the
    one its deciding rule names, else the default one, else none."""
    named = ""
    if assignment.rule is not None:
        for rule in policy.rules:
            if rule.name == assignment.rule:
                named = rule.identity
                break
    return pick_identity_policy(policy.identities, named)
