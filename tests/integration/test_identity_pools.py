"""Identity policies and the assignment log against both real backends: an SQLite file and a
real slapd (tests/ldapserver.py). Each address goes out once, under concurrency (threads with
their own connections, and for SQLite separate processes) and across a reopen (a daemon
restart); the same MAC gets its own value back; a dry pool is None, not an exception.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.machine import MachineFacts
from common.policy.directory import Directory, open_directory
from common.policy.identityassign import identity_for
from common.policy.identitypolicy import (KIND_ADDRESS, KIND_COUNTER, AddressPool,
                                          IdentityPolicy, NameSource)
from common.policy.model import Action, ActionKind, ImagingPolicy, Rule, assign_work

import ldapserver

POOL = AddressPool(("10.1.0.10-10.1.0.29",), 24, "10.1.0.1", ("10.1.0.2",))   # 20 addresses
LAB = IdentityPolicy("lab", NameSource.COUNTER, "lab-", 3, "lab.example", "LAB", POOL)
DHCP = IdentityPolicy("dhcp by serial", NameSource.SERIAL, "pc-", default=True)
POLICY = ImagingPolicy((
    Rule.from_text("lab", "manufacturer = Lab", Action(ActionKind.RESTORE, "a.zmg"),
                   identity="lab"),
    Rule.from_text("rest", "", Action(ActionKind.RESTORE, "b.zmg")),
), identities=(LAB, DHCP))


def _mac(number: int) -> str:
    return f"00C0FF{number:06X}"


@pytest.fixture(params=["sqlite", "ldap"])
def store(request, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, credentials file) of a fresh store of each backend."""
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/directory.db"
        with open_directory(url, create=True) as directory:
            directory.replace_policy(POLICY)
        yield url, ""
        return
    if ldapserver.missing() is not None:
        pytest.skip(ldapserver.missing() or "")
    with ldapserver.Slapd() as server:
        credentials = str(server.write_credentials(tmp_path / "directory.cred"))
        with open_directory(server.url, credentials) as directory:
            directory.replace_policy(POLICY)
        yield server.url, credentials


def _open(store: tuple[str, str]) -> Directory:
    return open_directory(store[0], store[1], timeout_s=10.0)


def test_policy_with_identities_round_trips(store) -> None:
    with _open(store) as directory:
        assert directory.policy() == POLICY


def test_each_address_once_same_mac_same_value_dry_pool_refused(store) -> None:
    with _open(store) as directory:
        values = []
        for number in range(20):
            got = directory.assign("lab", KIND_ADDRESS, _mac(number), POOL.addresses(), 100.0)
            assert got is not None and got.mac == _mac(number)
            values.append(got.value)
        assert values == list(POOL.addresses())
        again = directory.assign("lab", KIND_ADDRESS, _mac(3), POOL.addresses(), 200.0)
        assert again is not None and again.value == "10.1.0.13" and again.assigned_at == 100.0
        assert directory.assign("lab", KIND_ADDRESS, _mac(99), POOL.addresses(), 1.0) is None
        log = directory.assignments("lab")
        assert [(a.value, a.mac) for a in log] == list(zip(POOL.addresses(),
                                                            map(_mac, range(20))))
        released = directory.release("lab", mac=_mac(5))
        assert [a.value for a in released] == ["10.1.0.15"]
        got = directory.assign("lab", KIND_ADDRESS, _mac(99), POOL.addresses(), 1.0)
        assert got is not None and got.value == "10.1.0.15"
        assert directory.release("lab", value="10.1.0.15")[0].mac == _mac(99)
        assert directory.assignment_of("lab", KIND_ADDRESS, _mac(99)) is None


def test_assignments_survive_a_restart(store) -> None:
    with _open(store) as directory:
        first = directory.assign("lab", KIND_ADDRESS, _mac(1), POOL.addresses(), 1.0)
    with _open(store) as directory:               # a new process would see the same
        assert directory.assign("lab", KIND_ADDRESS, _mac(1), POOL.addresses(), 2.0) == first
        other = directory.assign("lab", KIND_ADDRESS, _mac(2), POOL.addresses(), 2.0)
        assert other is not None and other.value != first.value


def test_threads_racing_never_share_a_value(store) -> None:
    """30 machines, 20 addresses, each machine asking twice, all at once: 20 distinct
    addresses to 20 distinct MACs, the rest refused, each MAC's two answers the same."""
    with _open(store) as directory:
        barrier = threading.Barrier(30)
        answers: dict[str, list] = {}
        errors: list[BaseException] = []

        def machine(number: int) -> None:
            try:
                barrier.wait()
                got = [directory.assign("lab", KIND_ADDRESS, _mac(number), POOL.addresses(),
                                        time.time()) for _ in range(2)]
                answers[_mac(number)] = got
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=machine, args=(n,)) for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        given = {mac: got[0].value for mac, got in answers.items() if got[0] is not None}
        assert len(given) == 20 and sorted(given.values()) == sorted(POOL.addresses())
        for mac, (one, two) in answers.items():
            assert (one is None) == (two is None) or one is None   # a late one may find a free
            if one is not None:
                assert two is not None and two.value == one.value
        log = directory.assignments("lab")
        assert len(log) == 20 and len({a.value for a in log}) == 20
        assert len({a.mac for a in log}) == 20


def _process(url: str, credentials: str, start: float, first: int, queue) -> None:
    with open_directory(url, credentials, timeout_s=30.0) as directory:
        while time.time() < start:
            time.sleep(0.001)
        for number in range(first, first + 10):
            got = directory.assign("lab", KIND_COUNTER, _mac(number),
                                   (str(n) for n in range(1, 1000)), time.time())
            queue.put((number, got.value if got else None))


def test_processes_racing_never_share_a_value(store) -> None:
    """Four processes, ten machines each: forty distinct counter values."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.time() + 1.5
    procs = [context.Process(target=_process, args=(*store, start, 10 * i, queue))
             for i in range(4)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=60) for _ in range(40)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    values = [value for _, value in results]
    assert None not in values and len(set(values)) == 40
    assert sorted(map(int, values)) == list(range(1, 41))


def test_identity_for_hands_out_and_explains(store) -> None:
    with _open(store) as directory:
        policy = directory.policy()
        facts = MachineFacts(mac=_mac(7), manufacturer="Lab")
        work = assign_work(policy, None, facts)
        preview = identity_for(directory, policy, work, facts, None, 1.0, allocate=False)
        assert preview.identity.name == "lab-001" and "would get" in preview.reason
        assert directory.assignments() == []
        outcome = identity_for(directory, policy, work, facts, None, 1.0)
        assert outcome.source == "policy" and outcome.identity.ip.address == "10.1.0.10"
        assert outcome.identity.name == "lab-001" and len(outcome.assigned) == 2
        again = identity_for(directory, policy, work, facts, None, 2.0)
        assert again.identity == outcome.identity and again.assigned == ()
        # the default identity policy: DHCP, named by serial; nothing handed out
        other = MachineFacts(mac=_mac(8), serial=" SN 12/34 ")
        result = identity_for(directory, policy, assign_work(policy, None, other), other,
                              None, 3.0)
        assert result.identity.name == "pc-SN-12-34" and result.identity.ip is None
        assert {a.mac for a in directory.assignments()} == {_mac(7)}
        # a machine with neither: refused with the reason
        bare = MachineFacts(mac=_mac(9))
        refused = identity_for(directory, policy, assign_work(policy, None, bare), bare,
                               None, 3.0)
        assert refused.refused and "serial" in refused.reason


def test_a_disk_address_in_the_pool_is_recorded_for_its_machine(store) -> None:
    """A machine whose disk holds an address of its pool keeps it, and the pool never hands
    it to another machine; an address another machine holds is reported, the disk still
    wins."""
    from common.identity import IpSettings, MachineIdentity
    with _open(store) as directory:
        policy = directory.policy()
        facts = MachineFacts(mac=_mac(1), manufacturer="Lab")
        work = assign_work(policy, None, facts)
        disk = MachineIdentity("kept", ip=IpSettings("10.1.0.10", 24))
        outcome = identity_for(directory, policy, work, facts, disk, 5.0)
        assert outcome.identity == disk and outcome.source == "disk"
        assert [(a.value, a.mac) for a in outcome.assigned] == [("10.1.0.10", _mac(1))]
        other = MachineFacts(mac=_mac(2), manufacturer="Lab")
        given = identity_for(directory, policy, work, other, None, 6.0)
        assert given.identity.ip.address == "10.1.0.11"
        clash = identity_for(directory, policy, work, other, disk, 7.0)
        assert clash.identity == disk and "assigned this machine 10.1.0.11" in clash.reason
