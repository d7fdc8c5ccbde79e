"""The LDAP backend against a real slapd: changes made with the real ldapmodify, outages,
reconnects, refused credentials, a missing base DN and malformed entries; and lookup_async, the
event loop's thread-free lookup, against the same.

Each test gets its own slapd (start-up takes about 0.1 s), so stopping or freezing it cannot
disturb another test. The backend-neutral behaviour is in test_directory_backends.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.policy.directory import DirectoryError, WouldBlock, open_directory
from common.policy.directory.ldap import LdapDirectory
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation)
from common.policy.rules import parse_filter

import ldapserver

TIMEOUT_S = 1.0

pytestmark = pytest.mark.skipif(ldapserver.missing() is not None,
                                reason=ldapserver.missing() or "")

POLICY = ImagingPolicy((
    Rule.from_text("first", "arch = i386", Action(ActionKind.RESTORE, "a.zmg")),
    Rule.from_text("second", "manufacturer = Dell", Action(ActionKind.MAINTENANCE)),
    Rule.from_text("last", "", Action(ActionKind.NONE)),
), MenuSettings(MenuDisplay.HOTKEY, 5))


@pytest.fixture
def server() -> Iterator[ldapserver.Slapd]:
    slapd = ldapserver.Slapd().start()
    yield slapd
    if slapd.proc is not None:
        try:
            os.kill(slapd.proc.pid, signal.SIGCONT)    # in case a test froze it
        except ProcessLookupError:
            pass
    slapd.stop()


@pytest.fixture
def credentials(server: ldapserver.Slapd, tmp_path: Path) -> str:
    return str(server.write_credentials(tmp_path / "directory.cred"))


@pytest.fixture
def directory(server: ldapserver.Slapd, credentials: str) -> Iterator[LdapDirectory]:
    with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as opened:
        assert isinstance(opened, LdapDirectory)
        yield opened


def names(policy: ImagingPolicy) -> list[str]:
    return [rule.name for rule in policy.rules]


def rules_dn(server: ldapserver.Slapd) -> str:
    return f"ou=rules,{server.base_dn}"


# -- changes by other programs ------------------------------------------------------------------

def test_ldapmodify_changes_show_on_the_next_call(server, directory) -> None:
    directory.replace_policy(POLICY)
    assert names(directory.policy()) == ["first", "second", "last"]
    cached = directory.policy()

    server.ldapmodify(f"dn: cn=first,{rules_dn(server)}\nchangetype: modify\n"
                      "replace: prebootFilter\nprebootFilter: arch = x86_64\n")
    policy = directory.policy()
    assert policy is not cached
    assert policy.rules[0].filter.canonical() == "arch = x86_64"

    # A rule written by hand: no prebootEnabled (defaults to TRUE), add-ons in {N} order,
    # slotted between first (10) and second (20).
    server.ldapadd(f"dn: cn=by hand,{rules_dn(server)}\nobjectClass: prebootRule\n"
                   "cn: by hand\nprebootRuleOrder: 15\nprebootFilter: ram >= 8GB\n"
                   "prebootAction: restore\nprebootImage: base.zmg\n"
                   "prebootAddonImage: {1}second.zmg\nprebootAddonImage: {0}first.zmg\n")
    policy = directory.policy()
    assert names(policy) == ["first", "by hand", "second", "last"]
    by_hand = policy.rules[1]
    assert by_hand.enabled and not by_hand.force
    assert by_hand.action == Action(ActionKind.RESTORE, "base.zmg", ("first.zmg", "second.zmg"))

    server.ldapmodify(f"dn: cn=first,{rules_dn(server)}\nchangetype: delete\n")
    assert names(directory.policy()) == ["by hand", "second", "last"]

    server.ldapmodify(f"dn: cn=policy,{server.base_dn}\nchangetype: modify\n"
                      "replace: prebootMenuDisplay\nprebootMenuDisplay: always\n")
    assert directory.policy().menu == MenuSettings(MenuDisplay.ALWAYS, 5)

    assert directory.workstation("00C04FDC2AB5") is None
    server.ldapadd(f"dn: prebootMAC=00C04FDC2AB5,ou=workstations,{server.base_dn}\n"
                   "objectClass: prebootWorkstation\nprebootMAC: 00C04FDC2AB5\ncn: lab-07\n"
                   "prebootImageOnNextBoot: TRUE\nprebootImage: images/lab.zmg\n")
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5", "lab-07", True,
                                                                "images/lab.zmg")


def test_hand_registered_workstations_in_other_shapes(server, directory) -> None:
    directory.put_workstation(Workstation("000000000001"))      # creates the containers
    server.ldapadd(f"dn: cn=lab pc,ou=workstations,{server.base_dn}\n"
                   "objectClass: prebootWorkstation\ncn: lab pc\n"
                   "prebootMAC: 00:c0:4f:dc:2a:b5\n\n"
                   f"dn: ou=lab2,ou=workstations,{server.base_dn}\n"
                   "objectClass: organizationalUnit\nou: lab2\n\n"
                   f"dn: prebootMAC=A4BADB000001,ou=lab2,ou=workstations,{server.base_dn}\n"
                   "objectClass: prebootWorkstation\nprebootMAC: A4BADB000001\n"
                   "prebootMenuDisplay: never\n")
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5", "lab pc")
    assert directory.workstation("A4BADB000001") == Workstation("A4BADB000001",
                                                                menu=MenuDisplay.NEVER)
    assert [s.mac for s in directory.workstations()] == ["000000000001", "00C04FDC2AB5",
                                                         "A4BADB000001"]

    # Writing it back gives the entry our RDN; it stays one entry.
    directory.put_workstation(Workstation("00C04FDC2AB5", "renamed", True))
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5", "renamed", True)
    conn = server.connect()
    found = conn.search_s(f"ou=workstations,{server.base_dn}", 2, "(prebootMAC=*)", ["1.1"])
    assert sorted(dn for dn, _ in found) == sorted([
        f"prebootMAC=000000000001,ou=workstations,{server.base_dn}",
        f"prebootMAC=00C04FDC2AB5,ou=workstations,{server.base_dn}",
        f"prebootMAC=A4BADB000001,ou=lab2,ou=workstations,{server.base_dn}"])
    conn.unbind_s()
    assert directory.delete_workstation("A4BADB000001") is True


def test_no_context_csn_rereads_every_call(tmp_path, caplog) -> None:
    with ldapserver.Slapd(syncprov=False) as server:
        credentials = str(server.write_credentials(tmp_path / "c"))
        caplog.set_level(logging.INFO, logger="preboot.directory")
        with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as directory:
            directory.replace_policy(POLICY)
            assert names(directory.policy()) == ["first", "second", "last"]
            server.ldapmodify(f"dn: cn=second,{rules_dn(server)}\nchangetype: delete\n")
            assert names(directory.policy()) == ["first", "last"]
            directory.policy()
        notes = [r.getMessage() for r in caplog.records if "contextCSN" in r.getMessage()]
        assert len(notes) == 1 and "re-read on every query" in notes[0]


# -- outages ------------------------------------------------------------------------------------

def test_stopped_server_is_an_error_then_the_same_object_reconnects(server, directory) -> None:
    directory.replace_policy(POLICY)
    directory.policy()
    server.stop_process()
    started = time.monotonic()
    with pytest.raises(DirectoryError, match="unreachable") as caught:
        directory.policy()
    assert time.monotonic() - started < TIMEOUT_S * 3
    assert server.uri in str(caught.value)
    with pytest.raises(DirectoryError, match="unreachable"):
        directory.workstation("00C04FDC2AB5")

    server.start_again()
    assert names(directory.policy()) == ["first", "second", "last"]
    directory.put_workstation(Workstation("00C04FDC2AB5", "back"))
    assert directory.workstation("00C04FDC2AB5").name == "back"


def test_restarted_server_is_picked_up_without_an_error(server, directory) -> None:
    directory.replace_policy(POLICY)
    directory.workstations()
    server.restart()          # every connection the object holds is now dead
    assert names(directory.policy()) == ["first", "second", "last"]
    assert directory.workstations() == []


def test_closed_port_fails_fast(tmp_path) -> None:
    url = f"ldap://127.0.0.1:{ldapserver.free_port()}/dc=preboot,dc=test"
    with open_directory(url, timeout_s=TIMEOUT_S) as directory:
        started = time.monotonic()
        with pytest.raises(DirectoryError, match="unreachable"):
            directory.policy()
        assert time.monotonic() - started < TIMEOUT_S * 3


def test_frozen_server_times_out(server, directory) -> None:
    """A server that accepts the connection and never answers (SIGSTOP): the call returns
    with DirectoryError after about timeout_s instead of hanging."""
    directory.replace_policy(POLICY)
    fresh = open_directory(server.url, timeout_s=TIMEOUT_S)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for call in (directory.policy, lambda: directory.workstation("00C04FDC2AB5"),
                     fresh.policy):
            started = time.monotonic()
            with pytest.raises(DirectoryError, match="did not answer"):
                call()
            assert time.monotonic() - started < TIMEOUT_S * 3
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert names(directory.policy()) == ["first", "second", "last"]
    fresh.close()


def test_ldaps_to_a_plain_port_is_an_error(server) -> None:
    url = server.url.replace("ldap://", "ldaps://")
    with open_directory(url, timeout_s=TIMEOUT_S) as directory:
        started = time.monotonic()
        with pytest.raises(DirectoryError):
            directory.policy()
        assert time.monotonic() - started < TIMEOUT_S * 3


# -- credentials and base DN --------------------------------------------------------------------

def test_wrong_password_is_a_clear_error(server, tmp_path) -> None:
    wrong = server.write_credentials(tmp_path / "wrong.cred", password="not the password")
    with open_directory(server.url, str(wrong), timeout_s=TIMEOUT_S) as directory:
        with pytest.raises(DirectoryError, match="invalid credentials") as caught:
            directory.policy()
    assert server.root_dn in str(caught.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_credentials_file_readable_by_others_is_refused(server, tmp_path, mode) -> None:
    loose = server.write_credentials(tmp_path / "loose.cred", mode=mode)
    with pytest.raises(ValueError, match="readable by others"):
        open_directory(server.url, str(loose))


def test_missing_base_dn_is_named(server, credentials) -> None:
    base = f"ou=missing,{server.suffix}"
    with open_directory(server.url_for(base), credentials, timeout_s=TIMEOUT_S) as directory:
        for call in (directory.policy, directory.workstations, directory.sessions,
                     lambda: directory.workstation("00C04FDC2AB5"),
                     lambda: directory.replace_policy(POLICY),
                     lambda: directory.put_workstation(Workstation("00C04FDC2AB5"))):
            with pytest.raises(DirectoryError, match=f"base DN '{base}' does not exist"):
                call()


def test_base_without_containers_reads_empty_and_first_write_creates_them(server,
                                                                          credentials) -> None:
    base = f"ou=empty,{server.suffix}"
    server.ldapadd(f"dn: {base}\nobjectClass: organizationalUnit\nou: empty\n")
    with open_directory(server.url_for(base), credentials, timeout_s=TIMEOUT_S) as directory:
        assert directory.policy() == ImagingPolicy()
        assert directory.workstations() == [] and directory.sessions() == []
        directory.replace_policy(POLICY)
    conn = server.connect()
    found = conn.search_s(base, 1, "(objectClass=*)", ["1.1"])
    conn.unbind_s()
    assert sorted(dn.split(",")[0] for dn, _ in found) == [
        "cn=policy", "ou=assignments", "ou=identities", "ou=rules", "ou=sessions",
        "ou=workstations"]


def test_size_limit_is_an_error_never_a_short_policy(server, tmp_path) -> None:
    """slapd's default size limit (500) cuts anonymous searches short: that must fail, not
    yield the first 500 rules. The reader account has unlimited results and gets them all."""
    with open_directory(server.url, server.write_credentials(tmp_path / "root.cred").as_posix(),
                        timeout_s=10) as writer:
        writer.replace_policy(ImagingPolicy(tuple(
            Rule.from_text(f"r{n:03d}", f"hostname = h{n}", Action()) for n in range(501))))
    with open_directory(server.url, timeout_s=10) as anonymous:
        with pytest.raises(DirectoryError, match="size limit"):
            anonymous.policy()
    reader = server.write_credentials(tmp_path / "reader.cred", server.reader_dn,
                                      server.reader_password)
    with open_directory(server.url, str(reader), timeout_s=10) as directory:
        assert len(directory.policy().rules) == 501
        with pytest.raises(DirectoryError, match="access denied|Insufficient"):
            directory.replace_policy(POLICY)


# -- malformed entries --------------------------------------------------------------------------

@pytest.mark.parametrize("attribute,value,expected", [
    ("prebootFilter", "ram >= lots", "'lots' is not a whole number"),
    ("prebootFilter", "colour = blue", "unknown attribute"),
    ("prebootAction", "reimage", "unknown prebootAction 'reimage'"),
    ("prebootImage", "has\"quote.zmg", "double quote"),
])
def test_malformed_rule_fails_the_policy_naming_the_rule(server, directory, attribute, value,
                                                         expected) -> None:
    directory.replace_policy(POLICY)
    directory.policy()
    server.ldapmodify(f"dn: cn=second,{rules_dn(server)}\nchangetype: modify\n"
                      f"replace: {attribute}\n{attribute}: {value}\n")
    with pytest.raises(DirectoryError) as caught:
        directory.policy()
    message = str(caught.value)
    assert f"cn=second,{rules_dn(server)}" in message
    assert expected in message
    # Fixed by hand: the next call works again.
    server.ldapmodify(f"dn: cn=second,{rules_dn(server)}\nchangetype: modify\n"
                      "replace: prebootFilter\nprebootFilter: manufacturer = Dell\n"
                      "-\nreplace: prebootAction\nprebootAction: maintenance\n"
                      "-\nreplace: prebootImage\n")
    assert names(directory.policy()) == ["first", "second", "last"]


def test_other_malformed_entries_are_named(server, directory) -> None:
    directory.replace_policy(POLICY)
    server.ldapmodify(f"dn: cn=first,{rules_dn(server)}\nchangetype: modify\n"
                      "replace: prebootAddonImage\nprebootAddonImage: x.zmg\n"
                      "prebootAddonImage: y.zmg\n")
    with pytest.raises(DirectoryError, match=r"cn=first,.*\{N\} order prefix"):
        directory.policy()
    server.ldapmodify(f"dn: cn=first,{rules_dn(server)}\nchangetype: modify\n"
                      "delete: prebootAddonImage\n\n"
                      f"dn: cn=policy,{server.base_dn}\nchangetype: modify\n"
                      "replace: prebootMenuDisplay\nprebootMenuDisplay: sometimes\n")
    with pytest.raises(DirectoryError, match=r"cn=policy,.*unknown prebootMenuDisplay"):
        directory.policy()

    directory.put_workstation(Workstation("00C04FDC2AB5"))
    server.ldapadd(f"dn: cn=broken,ou=workstations,{server.base_dn}\n"
                   "objectClass: prebootWorkstation\ncn: broken\nprebootMAC: not-a-mac\n")
    with pytest.raises(DirectoryError, match=r"cn=broken,ou=workstations.*not a MAC"):
        directory.workstations()
    # A lookup of a good MAC is not disturbed by the broken entry.
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5")


def test_interrupted_policy_write(server, directory, credentials) -> None:
    """A writer that died half-way leaves prebootPolicySerial odd: an object that read the
    policy before keeps that one, a new one refuses, and writing the policy again repairs."""
    directory.replace_policy(POLICY)
    before = directory.policy()
    server.ldapmodify(f"dn: cn=policy,{server.base_dn}\nchangetype: modify\n"
                      "replace: prebootPolicySerial\nprebootPolicySerial: 7\n\n"
                      f"dn: cn=first,{rules_dn(server)}\nchangetype: delete\n")
    assert directory.policy() == before
    with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as newcomer:
        started = time.monotonic()
        with pytest.raises(DirectoryError, match="write the policy again"):
            newcomer.policy()
        assert time.monotonic() - started < TIMEOUT_S * 3
        newcomer.replace_policy(POLICY)
        assert names(newcomer.policy()) == ["first", "second", "last"]
    assert names(directory.policy()) == ["first", "second", "last"]


def test_rule_names_equal_to_the_server_are_refused_before_writing(directory) -> None:
    directory.replace_policy(POLICY)
    clash = ImagingPolicy((Rule.from_text("Lab  One", "", Action()),
                           Rule.from_text("lab one", "arch = i386", Action())))
    with pytest.raises(DirectoryError, match="names must differ"):
        directory.replace_policy(clash)
    assert names(directory.policy()) == ["first", "second", "last"]


# -- connections --------------------------------------------------------------------------------

def test_one_connection_per_thread_and_close_unbinds_them(directory) -> None:
    directory.replace_policy(POLICY)
    barrier = threading.Barrier(3)

    def work() -> None:
        directory.policy()
        barrier.wait(timeout=10)   # keep the threads alive until all have connected
        barrier.wait(timeout=10)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=10)
    assert len(directory._connections) == 3        # this thread and the two workers
    barrier.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=10)
    directory.close()
    assert directory._connections == {}
    with pytest.raises(DirectoryError, match="closed"):
        directory.policy()


def test_schema_file_loads_into_a_running_server_over_ldapi(tmp_path) -> None:
    """packaging/ldap/preboot.ldif as the admin guide says: ldapadd -Y EXTERNAL -H ldapi:///."""
    with ldapserver.Slapd(schema=False) as server:
        server.ldapadd_config(ldapserver.PREBOOT_SCHEMA)
        credentials = str(server.write_credentials(tmp_path / "c"))
        with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as directory:
            directory.replace_policy(POLICY)
            directory.put_workstation(Workstation("00C04FDC2AB5", "pc", True, "x.zmg",
                                                  MenuDisplay.ALWAYS))
            assert names(directory.policy()) == ["first", "second", "last"]
            assert directory.workstation("00C04FDC2AB5").menu is MenuDisplay.ALWAYS


def _schema_before(number: int) -> str:
    """The schema as a release had it before attribute type .1.<number> (and those after it)."""
    old = ldapserver.PREBOOT_SCHEMA.read_text()
    start = old.index("olcAttributeTypes: ( 2.25.234366858605174732241861539369627074419.1."
                      f"{number}\n")
    end = old.index("olcObjectClasses:", start)
    removed = re.findall(r"NAME '(\w+)'", old[start:end])
    old = old[:start] + old[end:]
    # Object classes that must have a removed attribute came with it: drop them whole.
    blocks = re.split(r"(?m)^(?=olcObjectClasses:)", old)
    old = "".join(block for block in blocks if not re.search(
        r"MUST[^)]*\b(" + "|".join(removed) + r")\b", block.split("MAY")[0]))
    for name in removed:
        old = re.sub(rf"\s*\$\s*{name}\b", "", old)
        old = re.sub(rf"\(\s*{name}\s*\$\s*", "( ", old)
    assert not any(name in old for name in removed)
    return old


def test_a_server_with_the_schema_before_session_participants_still_takes_sessions(
        tmp_path) -> None:
    """prebootSessionParticipant, ...Group, ...DataPort are written only when set."""
    (tmp_path / "old.ldif").write_text(_schema_before(19))
    sessions = [MulticastSession("room-101", "lab/base.img", 12, 5)]
    with ldapserver.Slapd(schema=False) as server:
        server.ldapadd_config(tmp_path / "old.ldif")
        credentials = str(server.write_credentials(tmp_path / "c"))
        with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as directory:
            directory.replace_sessions(sessions)
            assert directory.sessions() == sessions
            with pytest.raises(DirectoryError, match="prebootSession"):
                directory.replace_sessions(
                    [MulticastSession("room-101", "lab/base.img", participants=("pc1",))])
            assert directory.sessions() == sessions


def test_a_server_with_the_schema_before_prebootshrink_still_takes_rules(tmp_path) -> None:
    """prebootShrink is written only when a rule sets it, so a server that loaded the schema
    of an earlier release keeps working; a shrink rule there is a clear error, nothing half
    written."""
    (tmp_path / "old.ldif").write_text(_schema_before(18))
    shrinking = Rule("shrinking", parse_filter(""),
                     Action(ActionKind.RESTORE, "lab/base.img", shrink=True))
    with ldapserver.Slapd(schema=False) as server:
        server.ldapadd_config(tmp_path / "old.ldif")
        credentials = str(server.write_credentials(tmp_path / "c"))
        with open_directory(server.url, credentials, timeout_s=TIMEOUT_S) as directory:
            directory.replace_policy(POLICY)
            assert directory.policy() == POLICY
            with pytest.raises(DirectoryError, match="prebootShrink"):
                directory.replace_policy(ImagingPolicy((*POLICY.rules, shrinking)))
            assert directory.policy() == POLICY


def test_shrink_rule_round_trips(directory) -> None:
    shrinking = Rule("shrinking", parse_filter("disk_mb < 100000"),
                     Action(ActionKind.RESTORE, "lab/base.img", ("lab/a.add",), shrink=True))
    policy = ImagingPolicy((*POLICY.rules, shrinking))
    directory.replace_policy(policy)
    assert directory.policy() == policy
    directory.replace_policy(POLICY)          # unset again: the attribute goes
    assert directory.policy() == POLICY


@pytest.mark.parametrize("rule, value, expected", [
    ("first", "11", "file set 11 is not a number from 1 to 10"),
    ("first", "0", "file set 0 is not a number from 1 to 10"),
    ("second", "2", "fileset goes only with action restore"),     # a maintenance rule
])
def test_a_bad_prebootfileset_fails_the_policy_naming_the_rule(server, directory, rule, value,
                                                               expected) -> None:
    directory.replace_policy(POLICY)
    server.ldapmodify(f"dn: cn={rule},{rules_dn(server)}\nchangetype: modify\n"
                      f"replace: prebootFileset\nprebootFileset: {value}\n")
    with pytest.raises(DirectoryError) as caught:
        directory.policy()
    assert f"cn={rule},{rules_dn(server)}" in str(caught.value)
    assert expected in str(caught.value)


def test_fileset_rule_round_trips(directory) -> None:
    subset = Rule("subset", parse_filter(""), Action(ActionKind.RESTORE, "lab/base.img",
                                                     fileset=4))
    policy = ImagingPolicy((*POLICY.rules, subset))
    directory.replace_policy(policy)
    assert directory.policy() == policy
    directory.replace_policy(POLICY)          # back to 1: the attribute goes
    assert directory.policy() == POLICY


def test_example_base_ldif_loads(server) -> None:
    base_ldif = ldapserver.REPO / "packaging" / "ldap" / "preboot-base.ldif"
    text = base_ldif.read_text().replace("dc=example,dc=com", server.suffix)
    server.ldapadd(text)
    base = f"ou=preboot,{server.suffix}"
    with open_directory(server.url_for(base), timeout_s=TIMEOUT_S) as directory:
        policy = directory.policy()
        assert policy.menu == MenuSettings()
        assert directory.workstations() == [] and directory.sessions() == []


def test_containers_removed_by_hand_are_created_again(server, directory) -> None:
    directory.put_workstation(Workstation("00C04FDC2AB5"))
    server.delete_subtree(f"ou=workstations,{server.base_dn}")
    assert directory.workstations() == []
    directory.put_workstation(Workstation("00C04FDC2AB5", "again"))
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5", "again")


# -- lookup_async: the event loop's lookup --------------------------------------------------------

async def settled(directory: LdapDirectory, mac: str, within_s: float = 5.0
                  ) -> tuple[ImagingPolicy, Workstation | None]:
    """lookup_async once its connection is made (it says WouldBlock until then). On
    WouldBlock the policy is read the blocking way, as the daemons' holder does: the cached
    policy also ages out every POLICY_MAX_AGE_S, and only a blocking read loads it again (a
    test that crossed that boundary used to wait here in vain)."""
    give_up = time.monotonic() + within_s
    while True:
        try:
            return await directory.lookup_async(mac, TIMEOUT_S)
        except WouldBlock:
            if time.monotonic() > give_up:
                raise
            directory.policy()
            await asyncio.sleep(0.02)


def freeze(pid: int) -> None:
    """SIGSTOP, and wait until every thread has stopped (a busy one may finish a request
    first)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append(task.joinpath("stat").read_text().rpartition(")")[2].split()[0])
            except OSError:
                continue
        if states and all(state in "tT" for state in states):
            return
        time.sleep(0.01)


async def timed_lookup(directory: LdapDirectory, mac: str) -> tuple[type | None, float]:
    started = time.monotonic()
    try:
        await directory.lookup_async(mac, TIMEOUT_S)
        outcome = None
    except (WouldBlock, DirectoryError) as exc:
        outcome = type(exc)
    return outcome, time.monotonic() - started


def test_lookup_async_answers_as_the_blocking_reads_do(directory) -> None:
    directory.replace_policy(POLICY)
    stations = [Workstation(f"00C04FDC2A{n:02X}", f"lab-{n}", n % 2 == 0, f"i{n}.zmg")
                for n in range(20)]
    for station in stations:
        directory.put_workstation(station)

    async def main() -> None:
        with pytest.raises(WouldBlock):          # nothing loaded yet: a reload blocks
            await directory.lookup_async("00C04FDC2A00", TIMEOUT_S)
        policy = directory.policy()
        assert await settled(directory, "00:c0:4f:dc:2a:01") == (policy, stations[1])
        assert (await directory.lookup_async("00C04FDC2AFF", TIMEOUT_S))[1] is None
        # many at once, pipelined on the one connection, each with its own answer
        answers = await asyncio.gather(*(directory.lookup_async(s.mac, TIMEOUT_S)
                                         for s in stations))
        assert [station for _, station in answers] == stations
        assert all(answer is policy for answer, _ in answers)
        until = time.monotonic() + 2             # the connecting thread is done with
        while any(t.name == "ldap-loop-connect" for t in threading.enumerate()):
            assert time.monotonic() < until
            await asyncio.sleep(0.01)
        directory.close()
        with pytest.raises(WouldBlock):          # the blocking path reports "closed"
            await directory.lookup_async("00C04FDC2A01", TIMEOUT_S)
    asyncio.run(main())


def test_lookup_async_leaves_a_changed_policy_to_the_blocking_reload(server, directory) -> None:
    directory.replace_policy(POLICY)

    async def main() -> None:
        directory.policy()
        await settled(directory, "00C04FDC2AB5")
        server.ldapmodify(f"dn: cn=first,{rules_dn(server)}\nchangetype: modify\n"
                          "replace: prebootFilter\nprebootFilter: arch = x86_64\n")
        with pytest.raises(WouldBlock):
            await directory.lookup_async("00C04FDC2AB5", TIMEOUT_S)
        reloaded = directory.policy()
        assert str(reloaded.rules[0].filter) != str(POLICY.rules[0].filter)
        assert (await directory.lookup_async("00C04FDC2AB5", TIMEOUT_S))[0] is reloaded
    asyncio.run(main())


def test_lookup_async_sees_a_workstation_changed_by_ldapmodify(server, directory) -> None:
    directory.put_workstation(Workstation("00C04FDC2AB5", "lab-07"))
    dn = f"prebootMAC=00C04FDC2AB5,ou=workstations,{server.base_dn}"

    async def main() -> None:
        directory.policy()
        assert (await settled(directory, "00C04FDC2AB5"))[1] == Workstation("00C04FDC2AB5",
                                                                            "lab-07")
        server.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: prebootImageOnNextBoot\n"
                          "prebootImageOnNextBoot: TRUE\n")
        # Any write moves contextCSN: the next lookup never answers with what was before.
        try:
            station = (await directory.lookup_async("00C04FDC2AB5", TIMEOUT_S))[1]
        except WouldBlock:
            directory.policy()
            station = (await directory.lookup_async("00C04FDC2AB5", TIMEOUT_S))[1]
        assert station == Workstation("00C04FDC2AB5", "lab-07", True)
    asyncio.run(main())


def test_lookup_async_stopped_then_restarted_server(server, directory) -> None:
    directory.replace_policy(POLICY)

    async def main() -> None:
        directory.policy()
        await settled(directory, "00C04FDC2AB5")
        server.stop_process()
        for _ in range(3):
            outcome, took = await timed_lookup(directory, "00C04FDC2AB5")
            assert outcome in (WouldBlock, DirectoryError) and took < TIMEOUT_S * 3
        with pytest.raises(DirectoryError, match="unreachable"):
            directory.policy()                   # what the caller then does
        server.start_again()
        assert names(directory.policy()) == ["first", "second", "last"]
        assert names((await settled(directory, "00C04FDC2AB5"))[0]) == names(POLICY)
    asyncio.run(main())


def test_lookup_async_frozen_server_times_out_then_recovers(server, directory) -> None:
    directory.replace_policy(POLICY)

    async def main() -> None:
        directory.policy()
        await settled(directory, "00C04FDC2AB5")
        freeze(server.proc.pid)
        try:
            outcomes = await asyncio.gather(*(timed_lookup(directory, "00C04FDC2AB5")
                                              for _ in range(5)))
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        for outcome, took in outcomes:
            # waited its timeout, and did not hang (the bound leaves room for a loaded machine)
            assert outcome is DirectoryError and TIMEOUT_S * 0.9 < took < TIMEOUT_S * 2.5
        assert names((await settled(directory, "00C04FDC2AB5"))[0]) == names(POLICY)
    asyncio.run(main())


def test_lookup_async_burst_beyond_its_share_and_cancelled_calls(server, directory) -> None:
    directory.replace_policy(POLICY)

    async def main() -> None:
        directory.policy()
        await settled(directory, "00C04FDC2AB5")
        link = directory._link
        assert link is not None
        link.max_in_flight = 6                   # three calls' searches
        outcomes = await asyncio.gather(*(timed_lookup(directory, "00C04FDC2AB5")
                                          for _ in range(10)))
        assert [outcome for outcome, _ in outcomes].count(None) == 3
        assert {outcome for outcome, _ in outcomes[3:]} == {WouldBlock}   # not waiting
        # A call given up (its client went away) abandons its searches; the rest go on.
        freeze(server.proc.pid)
        try:
            task = asyncio.ensure_future(directory.lookup_async("00C04FDC2AB5", TIMEOUT_S))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert link._waiting == {}
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert await directory.lookup_async("00C04FDC2AB5", TIMEOUT_S)
        assert directory._link is link
    asyncio.run(main())


def test_lookup_async_silent_server_never_holds_the_loop() -> None:
    """A server that accepts connections and never answers: the bind hangs, on a thread of its
    own; lookup_async keeps saying WouldBlock at once, one connect attempt at a time."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                            # the kernel accepts; nobody ever reads
    url = f"ldap://127.0.0.1:{silent.getsockname()[1]}/dc=preboot,dc=test"
    try:
        with open_directory(url, timeout_s=TIMEOUT_S) as directory:
            assert isinstance(directory, LdapDirectory)
            directory._suffix, directory._suffix_known = "dc=preboot,dc=test", True

            async def main() -> None:
                until = time.monotonic() + TIMEOUT_S * 2.5
                while time.monotonic() < until:
                    outcome, took = await timed_lookup(directory, "00C04FDC2AB5")
                    # at once: well under the connect timeout it would otherwise wait
                    assert outcome is WouldBlock and took < TIMEOUT_S / 4
                    connecting = [t for t in threading.enumerate()
                                  if t.name == "ldap-loop-connect"]
                    assert len(connecting) <= 1
                    await asyncio.sleep(0.05)
            asyncio.run(main())
    finally:
        silent.close()
