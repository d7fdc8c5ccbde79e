"""Which server-initiated multicast session a machine joins (common/policy/sessions.py), and the
session model's checks: tables of machines, sessions and rules with the decision and its reason."""

from __future__ import annotations

import pytest

from common.imaging.multicast import group_address_refusal
from common.machine import MachineFacts
from common.policy.model import (Action, ActionKind, ImagingPolicy, MulticastSession, Rule,
                                 Workstation, group_refusal)
from common.policy.sessions import session_for, session_key, work_for

PC1 = MachineFacts(mac="00C04FDC2AB5", hostname="pc1", manufacturer="Dell Inc.")
PC2 = MachineFacts(mac="00C04FDC2AB6", hostname="Lab-02", manufacturer="HP")
PC3 = MachineFacts(mac="00C04FDC2AB7", manufacturer="Dell Inc.")


def multicast(name: str, filter_text: str, session: str, enabled: bool = True) -> Rule:
    return Rule.from_text(name, filter_text, Action(ActionKind.MULTICAST, session=session),
                          enabled)


RESTORE_ALL = Rule.from_text("everyone", "", Action(ActionKind.RESTORE, "base.img"))
DELL_TO_A = multicast("dell", "manufacturer = 'Dell Inc.'", "room A")
POLICY = ImagingPolicy((RESTORE_ALL, DELL_TO_A))

A = MulticastSession("room A", "a.img")
B = MulticastSession("room B", "b.img", participants=("00:c0:4f:dc:2a:b5", "lab-02"))
B_OFF = MulticastSession("room B", "b.img", enabled=False, participants=("pc1",))
C = MulticastSession("room C", "c.img", participants=("00C04FDC2AB7",))


@pytest.mark.parametrize("facts, station, sessions, started, wanted, fragment", [
    # named by MAC (any spelling), by host name or registered name (case ignored)
    (PC1, None, [B, A], (), "room B", "names this machine (MAC 00C04FDC2AB5)"),
    (PC2, None, [A, B], (), "room B", "names this machine (host name Lab-02)"),
    (PC3, Workstation("00C04FDC2AB7", "LAB-02"), [B], (), "room B",
     "names this machine (workstation LAB-02)"),
    # chosen by an enabled multicast rule naming the session, even behind another rule
    (PC3, None, [A], (), "room A", "rule 'dell' matches and sends it to session 'room A'"),
    # in order: the first enabled session it qualifies for wins
    (PC1, None, [A, B], (), "room A", "rule 'dell'"),
    (PC1, None, [B_OFF, A], (), "room A", "rule 'dell'"),
    # a started session passes the machine on to the next one it qualifies for
    (PC1, None, [A, B], ("room a",), "room B", "'room A' began imaging before it joined"),
    (PC1, None, [A, B], ("room a", "room b"), None, "sessions 'room A', 'room B' began"),
    # no session for it
    (PC2, None, [A], (), None, "no enabled multicast session"),
    (PC1, None, [B_OFF], (), None, "no enabled multicast session"),
    # registered and not flagged: rules do not choose it, a session naming it still does
    (PC3, Workstation("00C04FDC2AB7"), [A], (), None, "no enabled multicast session"),
    (PC3, Workstation("00C04FDC2AB7"), [A, C], (), "room C", "MAC 00C04FDC2AB7"),
    (PC3, Workstation("00C04FDC2AB7", image_on_next_boot=True), [A], (), "room A", "rule"),
    (PC3, Workstation("00C04FDC2AB7", image_on_next_boot=True, image="x.img"), [A], (), None,
     "no enabled"),
])
def test_session_for(facts, station, sessions, started, wanted, fragment):
    choice = session_for(facts, station, sessions, POLICY,
                         frozenset(session_key(s) for s in started))
    assert (choice.session.name if choice.session else None) == wanted
    assert fragment in choice.reason


def test_a_disabled_rule_chooses_nobody():
    policy = ImagingPolicy((multicast("dell", "", "room A", enabled=False),))
    assert session_for(PC1, None, [A], policy).session is None


def test_session_names_compare_ignoring_case_and_spacing():
    policy = ImagingPolicy((multicast("dell", "", "ROOM   a"),))
    assert session_for(PC1, None, [A], policy).session == A


@pytest.mark.parametrize("policy, sessions, started, kind, fragment", [
    # a session wins over the rules' other work
    (POLICY, [A], (), ActionKind.MULTICAST, "rule 'dell' matches"),
    (ImagingPolicy((RESTORE_ALL,)), [B], (), ActionKind.MULTICAST, "names this machine"),
    # no session: the rules decide
    (ImagingPolicy((RESTORE_ALL,)), [A], (), ActionKind.RESTORE, "rule 'everyone' matches"),
    # a rule's multicast work whose session is not there to join is no work, and says why
    (ImagingPolicy((multicast("m", "", "gone"),)), [A], (), ActionKind.NONE,
     "there is no multicast session 'gone'"),
    (ImagingPolicy((multicast("m", "", "room A"),)), [MulticastSession("room A", "a", enabled=False)],
     (), ActionKind.NONE, "multicast session 'room A' is disabled"),
    (ImagingPolicy((multicast("m", "", "room A"),)), [A], ("room a",), ActionKind.NONE,
     "began imaging before it joined"),
])
def test_work_for(policy, sessions, started, kind, fragment):
    assignment = work_for(policy, None, PC1, sessions, frozenset(started))
    assert assignment.action.kind is kind
    assert fragment in assignment.reason


def test_multicast_work_names_the_session_and_its_image():
    assignment = work_for(POLICY, None, PC3, [A])
    assert assignment.action == Action(ActionKind.MULTICAST, "a.img", session="room A")
    assert assignment.rule == "dell" and assignment.source == "rule 'dell'"
    named = work_for(POLICY, None, PC1, [B])
    assert named.source == "session 'room B'" and named.rule is None


# -- the session model --------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "231.40.81.200", "239.192.0.7", "224.0.1.1", "231.128.1.253", "10.0.0.1", "224.0.0.9",
    "232.1.2.3", "231.0.0.4", "231.128.0.4", "224.128.0.1", "239.255.255.255", "255.255.255.255",
    "lab", "", "::1", "231.1.2",
])
def test_the_policy_wing_checks_group_overrides_as_the_codec_does(address):
    """common.policy may not import common.imaging: its copy of the rule must agree."""
    assert bool(group_refusal(address)) == bool(group_address_refusal(address))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"participants": ("pc", "PC")}, "named twice"),
    ({"participants": ("a,b",)}, "comma"),
    ({"participants": ("",)}, "empty"),
    ({"participants": ("x" * 256,)}, "longer than 255"),
    ({"data_port": 65536}, "not 0..65535"),
    ({"group": "10.1.1.1"}, "not a multicast address"),
])
def test_bad_sessions_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MulticastSession("s", "a.img", **kwargs)


def test_participants_are_normalised_and_sorted():
    session = MulticastSession("s", "a.img", participants=(" lab-2 ", "00-c0-4f-dc-2a-b5", "Alpha"))
    assert session.participants == ("00C04FDC2AB5", "Alpha", "lab-2")
