"""The work decision (common/policy/model.py): first match, registered workstations, forcing."""

import pytest

from common.machine import MachineFacts
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings, Rule,
                                 Workstation, assign_work, explain_rules, first_matching_rule,
                                 menu_for)

DELL = Action(ActionKind.RESTORE, "dell/base.img", ("dell/drivers.add",))
HP = Action(ActionKind.RESTORE, "hp/base.img")
UPLOAD = Action(ActionKind.MAKE, "uploads/new.img")

POLICY = ImagingPolicy((
    Rule.from_text("off", "", Action(ActionKind.MAINTENANCE), enabled=False),
    Rule.from_text("dell big", "manufacturer = 'Dell Inc.' and ram_mb >= 4096", DELL),
    Rule.from_text("dell any", "manufacturer = 'Dell Inc.'", UPLOAD),
    Rule.from_text("hp", "manufacturer startswith HP", HP, force=True),
))


def test_first_enabled_match_wins_and_later_matches_are_ignored():
    facts = MachineFacts(mac="001122334455", manufacturer="Dell Inc.", ram_mb=8192)
    work = assign_work(POLICY, None, facts)
    assert work.action == DELL and work.rule == "dell big" and work.has_work
    assert "rule 'dell big'" in work.reason


def test_a_disabled_rule_never_matches_even_when_its_filter_would():
    facts = MachineFacts(manufacturer="Acme")
    assert first_matching_rule(POLICY, facts) is None
    work = assign_work(POLICY, None, facts)
    assert not work.has_work and work.action.kind is ActionKind.NONE
    assert "no enabled rule" in work.reason


def test_the_next_rule_applies_when_an_earlier_one_does_not_match():
    facts = MachineFacts(manufacturer="dell inc.", ram_mb=2048)
    assert assign_work(POLICY, None, facts).rule == "dell any"


def test_the_same_base_image_is_not_sent_again_unless_forced():
    has_it = MachineFacts(manufacturer="Dell Inc.", ram_mb=8192, base_image="dell/base.img")
    work = assign_work(POLICY, None, has_it)
    assert not work.has_work and "already has" in work.reason and work.rule == "dell big"
    hp = MachineFacts(manufacturer="HP", base_image="hp/base.img")
    assert assign_work(POLICY, None, hp).action == HP          # the hp rule forces
    other = MachineFacts(manufacturer="Dell Inc.", ram_mb=8192, base_image="old.img")
    assert assign_work(POLICY, None, other).action == DELL


def test_a_registered_workstation_without_the_flag_gets_no_work_from_the_rules():
    station = Workstation("001122334455", "lab-01")
    facts = MachineFacts(mac="001122334455", manufacturer="Dell Inc.", ram_mb=8192)
    work = assign_work(POLICY, station, facts)
    assert not work.has_work and "not flagged" in work.reason and "lab-01" in work.reason


def test_a_flagged_workstation_gets_its_named_image_even_if_it_has_it():
    station = Workstation("001122334455", "lab-01", True, "special.img")
    facts = MachineFacts(mac="001122334455", base_image="special.img")
    work = assign_work(POLICY, station, facts)
    assert work.action == Action(ActionKind.RESTORE, "special.img")
    assert "flagged" in work.reason


def test_a_flagged_workstation_without_an_image_gets_what_the_rules_pick_forced():
    station = Workstation("001122334455", "", True)
    facts = MachineFacts(mac="001122334455", manufacturer="Dell Inc.", ram_mb=8192,
                         base_image="dell/base.img")
    work = assign_work(POLICY, station, facts)
    assert work.action == DELL and work.rule == "dell big"
    nothing = assign_work(POLICY, station, MachineFacts(manufacturer="Acme"))
    assert not nothing.has_work and "no rule matches" in nothing.reason


def test_explain_gives_every_rule_a_verdict():
    facts = MachineFacts(manufacturer="Dell Inc.", ram_mb=1024)
    verdicts = explain_rules(POLICY, facts)
    assert [v.name for v in verdicts] == ["off", "dell big", "dell any", "hp"]
    assert verdicts[0].reason == "disabled" and not verdicts[0].matched
    assert not verdicts[1].matched and "1024" in verdicts[1].reason
    assert verdicts[2].matched and not verdicts[3].matched


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": ActionKind.RESTORE}, "needs an image"),
    ({"kind": ActionKind.MAKE}, "needs an image"),
    ({"kind": ActionKind.MULTICAST}, "session name"),
    ({"kind": ActionKind.MAKE, "image": "x", "addons": ("a",)}, "add-on"),
    ({"kind": ActionKind.RESTORE, "image": 'a"b'}, "double quote"),
    ({"kind": ActionKind.RESTORE, "image": "a\nb"}, "control character"),
    ({"kind": ActionKind.RESTORE, "image": "a", "addons": (" ",)}, "empty"),
])
def test_incomplete_actions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Action(**kwargs)


def test_menu_timeout_is_bounded():
    assert MenuSettings(MenuDisplay.ALWAYS, 0).timeout_s == 0
    with pytest.raises(ValueError):
        MenuSettings(MenuDisplay.ALWAYS, -1)


def test_a_workstation_may_override_the_menu_display_but_not_the_timeout():
    policy = ImagingPolicy(menu=MenuSettings(MenuDisplay.HOTKEY, 9))
    assert menu_for(policy, None) == MenuSettings(MenuDisplay.HOTKEY, 9)
    assert menu_for(policy, Workstation("001122334455")) == MenuSettings(MenuDisplay.HOTKEY, 9)
    shown = Workstation("001122334455", menu=MenuDisplay.ALWAYS)
    assert menu_for(policy, shown) == MenuSettings(MenuDisplay.ALWAYS, 9)


def test_facts_from_text_accept_only_ascii_digits_and_hex():
    from common.machine import facts_from_strings, normalize_mac
    assert normalize_mac("\ufb00\ufb00\ufb00\ufb00\ufb00\ufb00") is None
    assert normalize_mac("00:c0:4f:dc:2a:b5") == "00C04FDC2AB5"
    facts, problems = facts_from_strings({"ram_mb": "²", "mac": "00c04fdc2ab5", "ip": "10.0.0.1"})
    assert problems == ["ram_mb: '²' is not a whole number"]
    assert facts.mac == "00C04FDC2AB5" and facts.ip == "10.0.0.1" and facts.ram_mb is None


def test_shrink_goes_only_with_a_restore_and_shows_in_the_description():
    action = Action(ActionKind.RESTORE, "lab/base.img", ("lab/a.add",), shrink=True)
    assert action.describe() == ("restore lab/base.img + add-ons lab/a.add "
                                 "(shrunk to fit a smaller disk)")
    for kind in (ActionKind.MAKE, ActionKind.NONE):
        with pytest.raises(ValueError, match="shrink goes only with action restore"):
            Action(kind, "x.img" if kind is ActionKind.MAKE else "", shrink=True)
