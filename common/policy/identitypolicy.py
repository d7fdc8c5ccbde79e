"""Identity policies: how a machine without an identity on its disk gets one (docs/identity.md).

An identity policy is named and stored with the rules. It says how to make the computer name
(a prefix plus the machine's SMBIOS serial, its asset tag, its MAC, or a counter), the DNS
suffix, the workgroup or domain, and how the machine gets its IPv4 settings: DHCP, or an
address from the policy's own pool (ranges and single addresses, with the gateway, the prefix
length and the DNS servers every address of the pool shares).

A rule names the identity policy its machines get (`identity = NAME`); the one marked
`default = yes` serves machines whose rule names none, and registered workstations no rule
matches. The pool of a policy is the policy's name: each address (and each counter value) is
handed out once, by the directory, which records it with the MAC and the time in the
assignment log (common.policy.directory, Directory.assign).

Pure: no directory, no clock. `plan_identity` says what a machine needs from the directory (a
counter value, an address) or why it cannot get an identity; `build_identity` makes the
common.identity.MachineIdentity from the values the directory handed out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterator

from common.identity import BadIdentity, IpSettings, MachineIdentity, MAX_NAME
from common.machine import MachineFacts

MAX_POOL_ADDRESSES = 1 << 16       # one pool: at most a /16's worth, so a listing stays usable
MAX_PREFIX = 40                    # a name prefix, before the machine's part
MAX_COUNTER_DIGITS = 6
KIND_ADDRESS = "address"           # an assignment of an IPv4 address
KIND_COUNTER = "counter"           # an assignment of a naming counter value
KINDS = (KIND_ADDRESS, KIND_COUNTER)

_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9-]+")
_PREFIX = re.compile(r"[A-Za-z0-9-]*")


class NameSource(str, Enum):
    SERIAL = "serial"            # the SMBIOS system serial number
    ASSET_TAG = "asset_tag"      # the SMBIOS chassis asset tag
    MAC = "mac"                  # the MAC, 12 hex digits
    COUNTER = "counter"          # the lowest number not handed out yet, per policy


@dataclass(frozen=True)
class AddressPool:
    """Static addresses to hand out. `ranges`: '10.0.0.10-10.0.0.50' or '10.0.0.7', in the
    order they are handed out; every address shares the prefix length, gateway and DNS."""

    ranges: tuple[str, ...]
    prefix_len: int
    gateway: str = ""
    dns_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        if not self.ranges:
            return "addresses: at least one address or range"
        total = 0
        network = None
        for text in self.ranges:
            try:
                first, last = parse_range(text)
            except ValueError as exc:
                return f"addresses: {exc}"
            total += int(last) - int(first) + 1
            if not isinstance(self.prefix_len, int) or not 1 <= self.prefix_len <= 32:
                break                         # IpSettings below names prefix_len
            if network is None:
                network = ipaddress.IPv4Network(f"{first}/{self.prefix_len}", strict=False)
            if first not in network or last not in network:
                return f"addresses: '{text}' is not inside {network} (one network per pool)"
            if network.prefixlen < 31 and (first == network.network_address
                                           or last == network.broadcast_address):
                return (f"addresses: '{text}' holds {network}'s network or broadcast "
                        "address")
            try:
                IpSettings(str(first), self.prefix_len, self.gateway, self.dns_servers)
                IpSettings(str(last), self.prefix_len, self.gateway, self.dns_servers)
            except BadIdentity as exc:
                return str(exc)
        if total > MAX_POOL_ADDRESSES:
            return f"addresses: {total} addresses, more than {MAX_POOL_ADDRESSES} in one pool"
        return None

    def addresses(self) -> Iterator[str]:
        """Every address, in order, each once."""
        seen: set[int] = set()
        for text in self.ranges:
            first, last = parse_range(text)
            for number in range(int(first), int(last) + 1):
                if number not in seen:
                    seen.add(number)
                    yield str(ipaddress.IPv4Address(number))

    def contains(self, address: str) -> bool:
        try:
            wanted = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return any(first <= wanted <= last for first, last in map(parse_range, self.ranges))

    def size(self) -> int:
        return sum(1 for _ in self.addresses())

    def settings(self, address: str) -> IpSettings:
        return IpSettings(address, self.prefix_len, self.gateway, self.dns_servers)


def parse_range(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """'10.0.0.10-10.0.0.50' or '10.0.0.7' -> (first, last); ValueError naming the text."""
    first_text, dash, last_text = text.strip().partition("-")
    try:
        first = ipaddress.IPv4Address(first_text.strip())
        last = ipaddress.IPv4Address(last_text.strip()) if dash else first
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv4 address or a range FIRST-LAST") from None
    if last < first:
        raise ValueError(f"'{text}': the range ends before it begins")
    if first.is_multicast or first.is_unspecified or last.is_multicast or \
            int(last) == 0xFFFFFFFF:
        raise ValueError(f"'{text}': not a host address range")
    return first, last


@dataclass(frozen=True)
class IdentityPolicy:
    name: str
    naming: NameSource = NameSource.SERIAL
    prefix: str = ""
    counter_digits: int = 3               # counter naming: lab-001
    dns_suffix: str = ""
    workgroup: str = ""
    pool: AddressPool | None = None       # None: DHCP
    default: bool = False                 # for machines whose rule names no identity policy

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        if not _PREFIX.fullmatch(self.prefix) or len(self.prefix) > MAX_PREFIX:
            return (f"prefix: '{self.prefix}' is not letters, digits and hyphens "
                    f"(at most {MAX_PREFIX})")
        if not 1 <= self.counter_digits <= MAX_COUNTER_DIGITS:
            return f"counter_digits: a whole number from 1 to {MAX_COUNTER_DIGITS}"
        if self.naming is NameSource.COUNTER and not self.prefix.strip("-"):
            return "prefix: counter naming needs a prefix (a name is not all digits)"
        try:   # the suffix and workgroup as MachineIdentity will check them
            MachineIdentity("x", self.dns_suffix, self.workgroup)
        except BadIdentity as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        how = {NameSource.COUNTER: f"{self.prefix}{'N' * self.counter_digits}"}.get(
            self.naming, f"{self.prefix}<{self.naming.value}>")
        parts = [f"name {how}"]
        if self.dns_suffix:
            parts.append(f"DNS suffix {self.dns_suffix}")
        if self.workgroup:
            parts.append(f"workgroup {self.workgroup}")
        if self.pool is None:
            parts.append("DHCP")
        else:
            parts.append(f"addresses {', '.join(self.pool.ranges)}/{self.pool.prefix_len}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Assignment:
    """One line of the assignment log: `value` (an address, or a counter value) of pool
    `pool` (an identity policy's name) handed to `mac` at `assigned_at` (Unix seconds)."""

    pool: str
    kind: str                       # KIND_ADDRESS or KIND_COUNTER
    value: str
    mac: str
    assigned_at: float


def assignment_order(item: Assignment) -> tuple:
    """The assignment log's order: by pool, kind, then value in numeric order."""
    value = item.value
    if value.isdigit():
        key = (int(value), value)
    else:
        try:
            key = (int(ipaddress.IPv4Address(value)), value)
        except ValueError:
            key = (1 << 40, value)
    return (item.pool.casefold(), item.kind, key)


@dataclass(frozen=True)
class IdentityPlan:
    """What a machine needs from the directory: a counter value, an address (or neither);
    `name` is the finished name unless a counter value must complete it."""

    policy: IdentityPolicy
    name: str                       # "" when the counter decides it
    needs_counter: bool
    needs_address: bool


class NoIdentity(ValueError):
    """An identity policy cannot name this machine (no serial, a name that sanitises to
    nothing...); the text says why."""


def sanitize_name(prefix: str, text: str) -> str:
    """prefix + text as a host name: characters other than letters, digits and '-' become
    '-', runs of '-' one, no '-' at either end, at most MAX_NAME characters (the machine's
    part is cut from its start: serials differ at their end); NoIdentity if nothing usable
    is left."""
    part = _NOT_IN_NAME.sub("-", text.strip()).strip("-")
    part = re.sub(r"-{2,}", "-", part)
    room = MAX_NAME - len(prefix)
    if len(part) > room:
        part = part[len(part) - room:].lstrip("-")
    name = re.sub(r"-{2,}", "-", (prefix + part)).strip("-")
    if not name or name.isdigit():
        raise NoIdentity(f"'{prefix}{text}' leaves no usable host name")
    try:
        MachineIdentity(name)
    except BadIdentity as exc:
        raise NoIdentity(str(exc)) from None
    return name


def plan_identity(policy: IdentityPolicy, facts: MachineFacts) -> IdentityPlan:
    """What `facts`' machine needs for an identity under `policy`; NoIdentity with the reason
    when the machine lacks what the naming rule takes (no serial, no asset tag)."""
    needs_address = policy.pool is not None
    if policy.naming is NameSource.COUNTER:
        return IdentityPlan(policy, "", True, needs_address)
    source = {NameSource.SERIAL: facts.serial, NameSource.ASSET_TAG: facts.asset_tag,
              NameSource.MAC: facts.mac}[policy.naming]
    if not source or not source.strip() or _placeholder(source):
        raise NoIdentity(f"identity policy '{policy.name}' names machines by "
                         f"{policy.naming.value}, and this machine reports none")
    return IdentityPlan(policy, sanitize_name(policy.prefix, source), False, needs_address)


def _placeholder(value: str) -> bool:
    """Firmware fills empty SMBIOS strings with these; two machines would get one name."""
    return value.strip().lower() in {"to be filled by o.e.m.", "default string", "none",
                                     "not specified", "system serial number", "0", "n/a",
                                     "chassis serial number", "asset tag", "no asset tag"}


def counter_candidates(policy: IdentityPolicy) -> Iterator[str]:
    """Counter values in the order they are handed out: 1, 2, ... 10**digits - 1."""
    return (str(n) for n in range(1, 10 ** policy.counter_digits))


def build_identity(plan: IdentityPlan, counter: str | None = None,
                   address: str | None = None) -> MachineIdentity:
    """The identity from the plan and what the directory handed out."""
    policy = plan.policy
    name = plan.name
    if plan.needs_counter:
        if counter is None:
            raise ValueError("a counter value is needed")
        name = f"{policy.prefix}{int(counter):0{policy.counter_digits}d}"
    ip = None
    if plan.needs_address:
        if address is None or policy.pool is None:
            raise ValueError("an address is needed")
        ip = policy.pool.settings(address)
    return MachineIdentity(name, policy.dns_suffix, policy.workgroup, ip)


def overlapping_pools(policies: tuple[IdentityPolicy, ...]) -> str | None:
    """Why two identity policies' pools cannot both be used (they share an address: one
    address could go to two machines, each pool handing it out once), or None."""
    owner: dict[str, str] = {}
    for policy in policies:
        if policy.pool is None:
            continue
        for address in policy.pool.addresses():
            if address in owner and owner[address] != policy.name:
                return (f"identity policies '{owner[address]}' and '{policy.name}' both hand "
                        f"out {address}")
            owner[address] = policy.name
    return None


def pick_identity_policy(policies: tuple[IdentityPolicy, ...], rule_identity: str | None
                         ) -> tuple[IdentityPolicy | None, str]:
    """The identity policy for a machine and why: the one its rule names, else the default
    one, else none."""
    by_key = {p.name.casefold(): p for p in policies}
    if rule_identity:
        found = by_key.get(rule_identity.casefold())
        if found is not None:
            return found, f"the rule names identity policy '{found.name}'"
        return None, f"the rule names identity policy '{rule_identity}', which does not exist"
    for policy in policies:
        if policy.default:
            return policy, f"identity policy '{policy.name}' is the default"
    return None, "no identity policy applies (none named by the rule, none is the default)"
