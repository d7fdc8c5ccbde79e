"""One conformance suite for every directory backend, through the Directory interface only.

Each test runs against SQLite (a fresh file) and LDAP (a real slapd from tests/ldapserver.py,
one per module, a fresh subtree per test), so the two backends cannot drift apart.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.policy.directory import Directory, DirectoryChange, DirectoryError, open_directory
from common.machine import normalize_mac
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, PolicyDocument, Rule, Workstation)

import ldapserver

BACKENDS = ["sqlite", "ldap"]


class Store:
    """One store of one backend; open() gives a new, independent Directory object on it."""

    def __init__(self, kind: str, opener: Callable[[], Directory]):
        self.kind = kind
        self._opener = opener
        self.opened: list[Directory] = []

    def open(self) -> Directory:
        directory = self._opener()
        self.opened.append(directory)
        return directory

    def close(self) -> None:
        for directory in self.opened:
            directory.close()


@pytest.fixture(scope="module")
def slapd() -> Iterator[ldapserver.Slapd]:
    reason = ldapserver.missing()
    if reason:
        pytest.skip(reason)
    server = ldapserver.Slapd().start()
    yield server
    server.stop()


@pytest.fixture
def make_store(tmp_path: Path, request) -> Iterator[Callable[[str], Store]]:
    """make_store('sqlite' | 'ldap') -> a fresh, empty store of that kind."""
    stores: list[Store] = []
    subtrees: list[tuple[ldapserver.Slapd, str]] = []

    def make(kind: str) -> Store:
        n = len(stores)
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path}/dir{n}.db"
            store = Store(kind, lambda: open_directory(url, create=True))
        else:
            server: ldapserver.Slapd = request.getfixturevalue("slapd")
            base = f"ou=t{uuid.uuid4().hex[:12]},{server.suffix}"
            server.ldapadd(f"dn: {base}\nobjectClass: organizationalUnit\n"
                           f"ou: {base.split(',')[0][3:]}\n")
            subtrees.append((server, base))
            credentials = str(server.write_credentials(tmp_path / f"ldap{n}.cred"))
            store = Store(kind, lambda: open_directory(server.url_for(base), credentials,
                                                       timeout_s=5.0))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
    for server, base in subtrees:
        server.delete_subtree(base)


@pytest.fixture(params=BACKENDS)
def store(request, make_store) -> Store:
    return make_store(request.param)


@pytest.fixture
def directory(store: Store) -> Directory:
    return store.open()


# -- helpers ------------------------------------------------------------------------------------

def rule_facts(rule: Rule) -> tuple:
    return (rule.name, rule.enabled, rule.filter.canonical(), rule.action.kind,
            rule.action.image, rule.action.addons, rule.action.session, rule.force)


def policy_facts(policy: ImagingPolicy) -> tuple:
    return tuple(rule_facts(rule) for rule in policy.rules), policy.menu


SAMPLE_RULES = (
    Rule.from_text("Dell lab", "manufacturer = 'Dell Inc.' and ram >= 4GB",
                   Action(ActionKind.RESTORE, "images/dell.zmg", ("apps.zmg", "drivers.zmg"))),
    Rule.from_text("capture", "mac = 00:C0:4F:DC:2A:B5",
                   Action(ActionKind.MAKE, "images/captured.zmg"), force=True),
    Rule.from_text("classroom", "ip = 10.1.0.0/16 or hostname startswith class",
                   Action(ActionKind.MULTICAST, session="room-101")),
    Rule.from_text("repair", "not (product contains latitude) and disk_mb > 100000",
                   Action(ActionKind.MAINTENANCE), enabled=False),
    Rule.from_text("everything else", "", Action(ActionKind.NONE)),
)
SAMPLE_POLICY = ImagingPolicy(SAMPLE_RULES, MenuSettings(MenuDisplay.ALWAYS, 12))

STATIONS = (
    Workstation("00C04FDC2AB5", "lab-01", True, "images/dell.zmg", MenuDisplay.NEVER),
    Workstation("000C29ABCDEF", "lab-02", menu=MenuDisplay.ALWAYS),
    Workstation("A4BADB000001", "", True, ""),
)

SESSIONS = [
    MulticastSession("room-101", "images/room.zmg", 12, 5, True, False),
    MulticastSession("Aardvark", "images/a.zmg"),
    MulticastSession("zeta", "images/z.zmg", 1, 60, False, True),
    MulticastSession("named", "images/n.zmg", 3, 0, participants=("00:C0:4F:DC:2A:B5", "lab-02",
                                                                    "salle été"),
                     group="239.192.0.7", data_port=4000),
]


def document_facts(document: PolicyDocument) -> tuple:
    return (policy_facts(document.policy),
            tuple(sorted(document.workstations, key=lambda station: station.mac)),
            document.sessions)


def sample_document() -> PolicyDocument:
    return PolicyDocument(SAMPLE_POLICY, STATIONS, tuple(SESSIONS))


# -- the suite ----------------------------------------------------------------------------------

def test_empty_store_reads_as_empty_policy_and_default_menu(directory: Directory) -> None:
    policy = directory.policy()
    assert policy.rules == ()
    assert policy.menu == MenuSettings()
    assert directory.workstations() == []
    assert directory.workstation("00C04FDC2AB5") is None
    assert directory.sessions() == []
    assert directory.export_document() == PolicyDocument()


def test_replace_policy_reads_back_rules_in_order_and_menu(directory: Directory) -> None:
    directory.replace_policy(SAMPLE_POLICY)
    policy = directory.policy()
    assert policy_facts(policy) == policy_facts(SAMPLE_POLICY)

    # Reorder, drop, change and add: the store holds exactly the new set afterwards.
    changed = ImagingPolicy((
        SAMPLE_RULES[4],
        Rule.from_text("Dell lab", "manufacturer = Dell", Action(ActionKind.RESTORE, "d2.zmg"),
                       force=True),
        Rule.from_text("new one", "arch = x86_64", Action(ActionKind.MAINTENANCE)),
        SAMPLE_RULES[2],
    ), MenuSettings(MenuDisplay.NEVER, 0))
    directory.replace_policy(changed)
    assert policy_facts(directory.policy()) == policy_facts(changed)

    directory.replace_policy(ImagingPolicy())
    assert directory.policy() == ImagingPolicy()


def test_rule_name_case_change_is_kept(directory: Directory) -> None:
    directory.replace_policy(ImagingPolicy((Rule.from_text("lab", "", Action()),)))
    directory.replace_policy(ImagingPolicy((Rule.from_text("Lab", "", Action()),)))
    assert [rule.name for rule in directory.policy().rules] == ["Lab"]


def test_duplicate_rule_names_are_refused_and_nothing_changes(directory: Directory) -> None:
    directory.replace_policy(SAMPLE_POLICY)
    twice = ImagingPolicy((Rule.from_text("same", "", Action()),
                           Rule.from_text("same", "arch = i386", Action())))
    with pytest.raises(DirectoryError):
        directory.replace_policy(twice)
    assert policy_facts(directory.policy()) == policy_facts(SAMPLE_POLICY)


def test_apply_writes_every_part_or_on_a_refusal_none(directory: Directory) -> None:
    directory.import_document(sample_document())
    before = document_facts(directory.export_document())
    new_rule = Rule.from_text("added", "arch = i386", Action(ActionKind.MAINTENANCE))
    clash = (MulticastSession("twice", "a.zmg"), MulticastSession("TWICE", "b.zmg"))
    with pytest.raises(DirectoryError):
        directory.apply(DirectoryChange(
            ImagingPolicy(SAMPLE_RULES + (new_rule,)), (Workstation("525400000099", "new"),),
            ("00C04FDC2AB5",), clash))
    assert document_facts(directory.export_document()) == before
    directory.apply(DirectoryChange(
        ImagingPolicy((new_rule,), MenuSettings(MenuDisplay.NEVER, 1)),
        (Workstation("525400000099", "new"),), ("00C04FDC2AB5",), (clash[0],)))
    after = directory.export_document()
    assert [rule.name for rule in after.policy.rules] == ["added"]
    assert after.policy.menu == MenuSettings(MenuDisplay.NEVER, 1)
    assert {s.mac for s in after.workstations} == {"000C29ABCDEF", "A4BADB000001",
                                                   "525400000099"}
    assert after.sessions == (clash[0],)
    directory.apply(DirectoryChange())                       # nothing: nothing changes
    assert document_facts(directory.export_document()) == document_facts(after)


def test_unchanged_store_returns_the_cached_policy(directory: Directory) -> None:
    directory.replace_policy(SAMPLE_POLICY)
    first = directory.policy()
    assert directory.policy() is first      # the marker did not move: no re-parse


def test_workstations_put_get_replace_delete_and_list_order(directory: Directory) -> None:
    for station in reversed(STATIONS):
        directory.put_workstation(station)
    assert directory.workstations() == sorted(STATIONS, key=lambda s: s.mac)
    for station in STATIONS:
        assert directory.workstation(station.mac) == station

    replaced = Workstation("00C04FDC2AB5", "", False, "")     # name and image removed
    directory.put_workstation(replaced)
    assert directory.workstation("00C04FDC2AB5") == replaced
    renamed = Workstation("00C04FDC2AB5", "lab-01b", True, "other.zmg", MenuDisplay.HOTKEY)
    directory.put_workstation(renamed)
    assert directory.workstation("00C04FDC2AB5") == renamed
    assert len(directory.workstations()) == 3

    assert directory.delete_workstation("000C29ABCDEF") is True
    assert directory.delete_workstation("000C29ABCDEF") is False
    assert directory.workstation("000C29ABCDEF") is None
    assert [s.mac for s in directory.workstations()] == ["00C04FDC2AB5", "A4BADB000001"]


@pytest.mark.parametrize("spelling", ["00:c0:4f:dc:2a:b5", "00-C0-4F-DC-2A-B5",
                                      "00c0.4fdc.2ab5", "00C04FDC2AB5"])
def test_mac_lookup_after_normalising(directory: Directory, spelling: str) -> None:
    directory.put_workstation(Workstation(normalize_mac("00:C0:4F:DC:2A:B5"), "pc"))
    found = directory.workstation(normalize_mac(spelling))
    assert found is not None and found.mac == "00C04FDC2AB5"
    assert directory.workstation(normalize_mac("00:C0:4F:DC:2A:B6")) is None


def test_clear_next_boot(directory: Directory) -> None:
    directory.put_workstation(Workstation("00C04FDC2AB5", "pc", True, "a.zmg"))
    directory.put_workstation(Workstation("000C29ABCDEF", "idle"))
    assert directory.clear_next_boot("00C04FDC2AB5") is True
    assert directory.workstation("00C04FDC2AB5") == Workstation("00C04FDC2AB5", "pc", False,
                                                                "a.zmg")
    directory.put_workstation(Workstation("00C04FDC2AB5", "pc", True, "a.zmg", MenuDisplay.ALWAYS))
    assert directory.clear_next_boot("00C04FDC2AB5") is True
    assert directory.workstation("00C04FDC2AB5").menu is MenuDisplay.ALWAYS
    assert directory.clear_next_boot("00C04FDC2AB5") is False
    assert directory.clear_next_boot("000C29ABCDEF") is False
    assert directory.clear_next_boot("FFFFFFFFFFFF") is False


def test_sessions_replace_and_list_in_order(directory: Directory) -> None:
    directory.replace_sessions(SESSIONS)
    assert directory.sessions() == SESSIONS
    # participants, group and port changed, then taken away again
    changed = [SESSIONS[0], MulticastSession("named", "images/n.zmg", participants=("pc9",))]
    directory.replace_sessions(changed)
    assert directory.sessions() == changed
    again = [SESSIONS[2], MulticastSession("new", "n.zmg", 2, 3, True, True), SESSIONS[0]]
    directory.replace_sessions(again)
    assert directory.sessions() == again
    directory.replace_sessions([])
    assert directory.sessions() == []


def test_export_import_across_backends(store: Store, make_store) -> None:
    source = store.open()
    source.import_document(sample_document())
    exported = source.export_document()
    assert document_facts(exported) == document_facts(sample_document())

    other = make_store("ldap" if store.kind == "sqlite" else "sqlite").open()
    other.put_workstation(Workstation("FFFFFFFFFFFF", "to be removed"))
    other.import_document(exported)
    assert other.export_document() == exported

    # ... and back again, into a store that held something else.
    source.replace_policy(ImagingPolicy())
    source.import_document(other.export_document())
    assert source.export_document() == exported


UNICODE_NAME = 'Ünïcode lab 日本, "quoted" + <x>; a=b #1 \\ back'


def test_unicode_and_special_characters(directory: Directory) -> None:
    rules = (
        Rule.from_text(UNICODE_NAME, "manufacturer = 'Müller, \"GmbH\" (€)'",
                       Action(ActionKind.RESTORE, "images/bilder/ß.zmg", ("addon ä.zmg", "b,c.zmg"))),
        Rule.from_text("#leading hash", "hostname contains 'ö'",
                       Action(ActionKind.MULTICAST, session="salle 101 été")),
        Rule.from_text("=;+,<>", "", Action(ActionKind.MAKE, "x/'y'.zmg")),
    )
    policy = ImagingPolicy(rules, MenuSettings(MenuDisplay.HOTKEY, 3600))
    directory.replace_policy(policy)
    assert policy_facts(directory.policy()) == policy_facts(policy)

    station = Workstation("00C04FDC2AB5", "Jürgen's PC, \"Büro\"", True, "images/ß.zmg")
    directory.put_workstation(station)
    assert directory.workstation("00C04FDC2AB5") == station

    sessions = [MulticastSession("salle 101 été", "images/été.zmg"),
                MulticastSession(UNICODE_NAME, "images/日本.zmg")]
    directory.replace_sessions(sessions)
    assert directory.sessions() == sessions


def test_a_second_object_sees_changes_on_its_next_call(store: Store) -> None:
    reader, writer = store.open(), store.open()
    assert reader.policy() == ImagingPolicy()
    writer.replace_policy(SAMPLE_POLICY)
    assert policy_facts(reader.policy()) == policy_facts(SAMPLE_POLICY)

    smaller = ImagingPolicy(SAMPLE_RULES[:1], MenuSettings(MenuDisplay.NEVER, 1))
    writer.replace_policy(smaller)
    assert policy_facts(reader.policy()) == policy_facts(smaller)

    writer.put_workstation(STATIONS[0])
    assert reader.workstation(STATIONS[0].mac) == STATIONS[0]
    writer.replace_sessions(SESSIONS)
    assert reader.sessions() == SESSIONS


def test_concurrent_queries_from_threads(store: Store, request) -> None:
    """Readers on two threads while a third rewrites the policy: every answer is one of the
    policies written (rules and menu together), never a mixture or a half-written one."""
    directory = store.open()
    writer = store.open()
    first = ImagingPolicy(SAMPLE_RULES[:2])
    second = ImagingPolicy(SAMPLE_RULES[2:], MenuSettings(MenuDisplay.ALWAYS, 1))
    allowed = {policy_facts(first), policy_facts(second)}
    directory.replace_policy(first)
    directory.put_workstation(STATIONS[0])
    problems: list[str] = []
    start = threading.Barrier(3)

    def query() -> None:
        start.wait()
        try:
            for _ in range(100):
                if policy_facts(directory.policy()) not in allowed:
                    problems.append("a policy that was never written")
                if directory.workstation(STATIONS[0].mac) != STATIONS[0]:
                    problems.append("the workstation went missing")
        except Exception as exc:   # noqa: BLE001 - reported below
            problems.append(repr(exc))

    threads = [threading.Thread(target=query) for _ in range(2)]
    for thread in threads:
        thread.start()
    start.wait()
    for n in range(10):
        writer.replace_policy(second if n % 2 == 0 else first)
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert problems == []


def test_closed_directory_refuses_calls(directory: Directory) -> None:
    directory.policy()
    directory.close()
    with pytest.raises(DirectoryError):
        directory.policy()


@pytest.mark.slow
def test_thousand_rules_and_two_thousand_workstations(store: Store) -> None:
    directory = store.open()
    rules = tuple(
        Rule.from_text(f"rule {n:04d}", f"hostname = host-{n} and ram >= {n % 64 + 1}GB",
                       Action(ActionKind.RESTORE, f"images/{n}.zmg",
                              (f"addon-{n}.zmg",) if n % 3 == 0 else ()),
                       enabled=n % 7 != 0, force=n % 5 == 0)
        for n in range(1000))
    policy = ImagingPolicy(rules, MenuSettings(MenuDisplay.ALWAYS, 30))
    directory.replace_policy(policy)
    stations = [Workstation(f"{0x001122000000 + n:012X}", f"ws-{n}", n % 2 == 0,
                            f"images/{n}.zmg" if n % 4 == 0 else "")
                for n in range(2000)]
    for station in reversed(stations):
        directory.put_workstation(station)

    fresh = store.open()
    assert policy_facts(fresh.policy()) == policy_facts(policy)
    assert fresh.workstations() == stations
    assert fresh.workstation(stations[1234].mac) == stations[1234]
