"""The identity a machine gets with its work (docs/identity.md): the one on its disk if it
sent one, else a new one from its identity policy, with the counter value and the address
handed out by the directory's assignment log (Directory.assign, atomic in both backends).

imgsrvd calls identity_for() for every work query (on a worker thread: it writes to the
directory); `preboot-dir explain` calls it with allocate=False, which reads the log and says
what the machine would get without handing anything out.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.identity import MachineIdentity
from common.machine import MachineFacts

from .directory.base import Directory
from .identitypolicy import (KIND_ADDRESS, KIND_COUNTER, Assignment, IdentityPolicy,
                             NoIdentity, build_identity, counter_candidates, plan_identity)
from .model import ImagingPolicy, WorkAssignment, identity_policy_for

SOURCE_DISK = "disk"
SOURCE_POLICY = "policy"


@dataclass(frozen=True)
class IdentityOutcome:
    """What the work answer carries: `identity` and its `source` ("disk", "policy", or ""
    when no identity policy applies), and why. `refused`: an identity policy applies but
    could not give one (`exhausted`: its pool is dry)."""

    identity: MachineIdentity | None
    source: str
    reason: str
    policy: IdentityPolicy | None = None
    assigned: tuple[Assignment, ...] = ()     # newly handed out by this call
    refused: bool = False
    exhausted: bool = False


def identity_for(directory: Directory | None, policy: ImagingPolicy, work: WorkAssignment,
                 facts: MachineFacts, disk: MachineIdentity | None, now_s: float,
                 allocate: bool = True) -> IdentityOutcome:
    """The identity for one machine; DirectoryError when the log cannot be read or written."""
    chosen, why = identity_policy_for(policy, work)
    if disk is not None:
        return _from_disk(directory, chosen, disk, facts.mac or "", now_s, allocate)
    if chosen is None:
        return IdentityOutcome(None, "", why)
    assert directory is not None, "an identity policy applies: the directory hands out values"
    try:
        plan = plan_identity(chosen, facts)
    except NoIdentity as exc:
        return IdentityOutcome(None, "", str(exc), chosen, refused=True)
    mac = facts.mac or ""
    handed: list[Assignment] = []
    values: dict[str, str] = {}
    for kind, needed, candidates in (
            # the address first: a dry pool then costs no counter value
            (KIND_ADDRESS, plan.needs_address,
             chosen.pool.addresses() if chosen.pool is not None else iter(())),
            (KIND_COUNTER, plan.needs_counter, counter_candidates(chosen))):
        if not needed:
            continue
        got, new = _value(directory, chosen.name, kind, mac, candidates, now_s, allocate)
        if got is None:
            what = "address" if kind == KIND_ADDRESS else "counter value"
            return IdentityOutcome(None, "", f"identity policy '{chosen.name}': its pool has "
                                   f"no free {what} left ({why})", chosen, tuple(handed),
                                   refused=True, exhausted=True)
        if new:
            handed.append(got)
        values[kind] = got.value
    identity = build_identity(plan, values.get(KIND_COUNTER), values.get(KIND_ADDRESS))
    verb = "gets" if allocate else "would get"
    return IdentityOutcome(identity, SOURCE_POLICY, f"{why}; the machine {verb} "
                           f"{identity.describe()}", chosen, tuple(handed))


def _value(directory: Directory, pool: str, kind: str, mac: str, candidates, now_s: float,
           allocate: bool) -> tuple[Assignment | None, bool]:
    """(the assignment, whether it is new)."""
    held = directory.assignment_of(pool, kind, mac)
    if held is not None:
        return held, False
    if not allocate:
        taken = {item.value for item in directory.assignments(pool) if item.kind == kind}
        free = next((value for value in candidates if value not in taken), None)
        return (None if free is None else Assignment(pool, kind, free, mac, now_s)), False
    got = directory.assign(pool, kind, mac, candidates, now_s)
    return got, got is not None and got.assigned_at == now_s and got.mac == mac


def _from_disk(directory: Directory | None, chosen: IdentityPolicy | None,
               disk: MachineIdentity, mac: str, now_s: float,
               allocate: bool) -> IdentityOutcome:
    """The disk's identity, as it is. When its address lies in the pool of the machine's
    identity policy, the log records it for this MAC (if free), so the pool never hands it to
    another machine; a conflict is reported in the reason, the disk still wins."""
    reason = "the machine's disk holds its identity"
    pool = chosen.pool if chosen is not None else None
    if pool is None or disk.ip is None or not allocate or directory is None \
            or not pool.contains(disk.ip.address):
        return IdentityOutcome(disk, SOURCE_DISK, reason, chosen)
    assert chosen is not None
    got = directory.assign(chosen.name, KIND_ADDRESS, mac, iter((disk.ip.address,)), now_s)
    if got is None:
        reason += (f"; its address {disk.ip.address} is assigned to another machine in pool "
                   f"'{chosen.name}' (preboot-dir identities log)")
    elif got.value != disk.ip.address:
        reason += (f"; pool '{chosen.name}' assigned this machine {got.value}, its disk says "
                   f"{disk.ip.address}")
    new = (got,) if got is not None and got.assigned_at == now_s else ()
    return IdentityOutcome(disk, SOURCE_DISK, reason, chosen, new)
