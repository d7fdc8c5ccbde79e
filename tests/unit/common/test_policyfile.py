"""The policy file (common/policy/policyfile.py): canonical round trips and located errors."""

import string

import pytest
from hypothesis import given, settings, strategies as st

from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, PolicyDocument, Rule, Workstation)
from common.policy.policyfile import PolicyFileError, check_name, dump_policy, load_policy

SAMPLE = """\
format = 1
[menu]
display = always
timeout_s = 7
[rules]
[[Dell lab]]
filter = "manufacturer = 'Dell Inc.' and ram_mb >= 4GB"
action = restore
image = dell/base.img
addons = dell/a.add, "dell/b,c.add"
[[HP # 2]]
filter = "manufacturer contains hp or serial startswith '#HP'"
action = make
image = uploads/hp.img
enabled = no
force = yes
[[rest]]
action = none
[workstations]
[[00:c0:4f:dc:2a:b5]]
name = lab-01
image_on_next_boot = yes
menu = Always
[sessions]
[[weekly]]
image = a.img
clients = 12
"""


def test_sample_reads_as_written():
    doc = load_policy(SAMPLE, "sample.conf")
    assert doc.policy.menu == MenuSettings(MenuDisplay.ALWAYS, 7)
    names = [r.name for r in doc.policy.rules]
    assert names == ["Dell lab", "HP # 2", "rest"]
    dell, hp, rest = doc.policy.rules
    assert dell.action == Action(ActionKind.RESTORE, "dell/base.img", ("dell/a.add", "dell/b,c.add"))
    assert dell.filter.canonical() == "manufacturer = 'Dell Inc.' and ram_mb >= 4GB"
    assert hp.enabled is False and hp.force is True and hp.action.kind is ActionKind.MAKE
    assert rest.filter.canonical() == "" and rest.action.kind is ActionKind.NONE
    assert doc.workstations == (Workstation("00C04FDC2AB5", "lab-01", True, "", MenuDisplay.ALWAYS),)
    assert doc.sessions == (MulticastSession("weekly", "a.img", 12, 15, True, True),)


def test_export_import_export_is_byte_identical():
    first = dump_policy(load_policy(SAMPLE))
    second = dump_policy(load_policy(first))
    assert first == second
    assert first.index("[[Dell lab]]") < first.index("[[\"HP # 2\"]]") < first.index("[[rest]]")


def test_defaults_when_sections_are_missing():
    doc = load_policy("")
    assert doc == PolicyDocument()
    assert doc.policy.menu.display is MenuDisplay.HOTKEY


@pytest.mark.parametrize("text, line, fragment", [
    ("[rules]\n[[a]]\nfilter = ram_mb >= lots\naction = none\n", 3, "[[a]] filter: at 10"),
    ("[rules]\n[[a]]\naction = image\n", 3, "'image' is not one of"),
    ("[rules]\n[[a]]\nfilter = ram_mb > 1\n", 2, "no action"),
    ("[rules]\n[[a]]\naction = restore\n", 3, "needs an image"),
    ("[rules]\n[[a]]\naction = none\nenabld = no\n", 4, "did you mean enabled"),
    ("[rules]\n[[a]]\naction = none\nforce = maybe\n", 4, "not yes or no"),
    ("[menu]\ndisplay = sometimes\n", 2, "not always, never or hotkey"),
    ("[menu]\ntimeout_s = -3\n", 2, "whole number"),
    ("format = 2\n", 1, "format 2 is not supported"),
    ("[workstations]\n[[not-a-mac]]\nname = x\n", 2, "not a MAC address"),
    ("[workstations]\n[[001122334455]]\nmenu = maybe\n", 3, "not always, never or hotkey"),
    ("[workstations]\n[[001122334455]]\n[[00:11:22:33:44:55]]\n", None, "more than once"),
    ("[sessions]\n[[s]]\nclients = 3\n", 2, "master image"),
    ("[rule]\n", None, "unknown key"),
    ("[rules]\nx = 1\n", 2, "one per entry"),
    ("[rules]\n[[a]]\naction = none, make\n", 3, "one value expected"),
    ("[rules\n", 1, "syntax error"),
    ("[rules]\n[[Lab]]\naction = none\n[[lab]]\naction = none\n", 4, "differ only in case"),
])
def test_errors_name_the_file_line_and_key(text, line, fragment):
    with pytest.raises(PolicyFileError) as caught:
        load_policy(text, "site.conf")
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("site.conf")
    if line is not None:
        assert caught.value.line == line, message


@pytest.mark.parametrize("name", ["", " lead", "trail ", 'a"b', "a[b", "a]b", "tab\there", "x" * 129])
def test_names_that_cannot_be_section_headers_or_rdns_are_refused(name):
    assert check_name("rule", name) is not None


def test_ordinary_names_are_fine():
    assert check_name("rule", "Bob's lab #2, 2nd floor = é") is None


_name = st.text(string.ascii_letters + string.digits + " #,'=-_.é", min_size=1,
                max_size=20).map(str.strip).filter(bool)
_path = st.text(string.ascii_letters + string.digits + "/._-# ,'", min_size=1,
                max_size=24).map(str.strip).filter(bool)
_filter_text = st.sampled_from([
    "", "ram_mb >= 4096", "manufacturer = 'A, B # C'", "not (mac startswith 00C04F)",
    "serial contains \"x'y\" or ip = 10.0.0.0/8 and disk_mb < 1TB",
    "product endswith '\\\\' or hostname != lab",
])


@st.composite
def _documents(draw):
    names = draw(st.lists(_name, max_size=5, unique_by=lambda n: " ".join(n.casefold().split())))
    rules = []
    for name in names:
        kind = draw(st.sampled_from(list(ActionKind)))
        image = draw(_path) if kind in (ActionKind.RESTORE, ActionKind.MAKE) else ""
        addons = tuple(draw(st.lists(_path, max_size=3))) if kind is ActionKind.RESTORE else ()
        session = draw(_name) if kind is ActionKind.MULTICAST else ""
        shrink = kind is ActionKind.RESTORE and draw(st.booleans())
        fileset = draw(st.integers(1, 10)) if kind is ActionKind.RESTORE else 1
        rules.append(Rule.from_text(name, draw(_filter_text),
                                    Action(kind, image, addons, session, shrink, fileset),
                                    draw(st.booleans()), draw(st.booleans())))
    macs = draw(st.lists(st.text("0123456789ABCDEF", min_size=12, max_size=12), max_size=4,
                         unique=True))
    stations = tuple(Workstation(mac, draw(st.text(string.printable.strip(), max_size=10)).strip(),
                                 draw(st.booleans()), draw(st.one_of(st.just(""), _path)),
                                 draw(st.one_of(st.none(), st.sampled_from(list(MenuDisplay)))))
                     for mac in sorted(macs))
    participant = st.one_of(st.text("0123456789ABCDEF", min_size=12, max_size=12),
                            st.text(string.ascii_letters + string.digits + "-. ", min_size=1,
                                    max_size=12).map(str.strip).filter(bool))
    sessions = tuple(MulticastSession(name, draw(_path), draw(st.integers(1, 50)),
                                      draw(st.integers(0, 600)), draw(st.booleans()),
                                      draw(st.booleans()),
                                      tuple(draw(st.lists(participant, max_size=3,
                                                          unique_by=str.casefold))),
                                      draw(st.sampled_from(["", "239.192.0.7", "231.1.2.3"])),
                                      draw(st.sampled_from([0, 997, 4000])))
                     for name in draw(st.lists(_name, max_size=3,
                                               unique_by=lambda n: " ".join(n.casefold().split()))))
    menu = MenuSettings(draw(st.sampled_from(list(MenuDisplay))), draw(st.integers(0, 3600)))
    return PolicyDocument(ImagingPolicy(tuple(rules), menu), stations, sessions)


def _comparable(doc):
    rules = [(r.name, r.enabled, r.force, r.action, r.filter.canonical()) for r in doc.policy.rules]
    return rules, doc.policy.menu, doc.workstations, doc.sessions


@settings(max_examples=150, deadline=None)
@given(_documents())
def test_any_document_round_trips(doc):
    text = dump_policy(doc)
    back = load_policy(text)
    assert _comparable(back) == _comparable(doc)
    assert dump_policy(back) == text


def test_shrink_is_read_and_written_only_when_set():
    text = SAMPLE.replace("addons = dell/a.add", "shrink = yes\naddons = dell/a.add")
    doc = load_policy(text)
    dell, hp, _rest = doc.policy.rules
    assert dell.action.shrink is True and hp.action.shrink is False
    out = dump_policy(doc)
    assert out.count("shrink = yes") == 1 and "shrink = no" not in out
    assert dump_policy(load_policy(SAMPLE)).count("shrink") == 0     # older files unchanged


def test_shrink_on_a_rule_that_does_not_restore_names_the_rule():
    text = SAMPLE.replace("force = yes", "force = yes\nshrink = yes")
    with pytest.raises(PolicyFileError, match="shrink goes only with action restore"):
        load_policy(text, "site.conf")


def test_fileset_is_read_and_written_only_when_not_1():
    text = SAMPLE.replace("addons = dell/a.add", "fileset = 3\naddons = dell/a.add")
    doc = load_policy(text)
    dell, hp, _rest = doc.policy.rules
    assert dell.action.fileset == 3 and hp.action.fileset == 1
    assert "file set 3" in dell.action.describe()
    out = dump_policy(doc)
    assert out.count("fileset = 3") == 1 and dump_policy(load_policy(out)) == out
    assert "fileset" not in dump_policy(load_policy(SAMPLE))        # older files unchanged
    explicit_1 = SAMPLE.replace("addons = dell/a.add", "fileset = 1\naddons = dell/a.add")
    assert load_policy(explicit_1).policy.rules[0].action.fileset == 1


@pytest.mark.parametrize("line, message", [
    ("fileset = 11", "'11' is not a whole number from 1 to 10"),
    ("fileset = 0", "'0' is not a whole number from 1 to 10"),
    ("fileset = -2", "'-2' is not a whole number from 1 to 10"),
    ("fileset = two", "'two' is not a whole number from 1 to 10"),
    ("fileset = 2, 3", "one value expected"),
    ("fileset = ''", "'' is not a whole number from 1 to 10"),
    ("filesets = 2", "unknown key (did you mean fileset?)"),
])
def test_a_bad_fileset_names_the_file_rule_and_key(line, message):
    text = SAMPLE.replace("addons = dell/a.add", f"{line}\naddons = dell/a.add")
    with pytest.raises(PolicyFileError) as caught:
        load_policy(text, "site.conf")
    text = str(caught.value)
    assert "site.conf" in text and "Dell lab" in text and message in text


def test_fileset_on_a_rule_that_does_not_restore_names_the_rule():
    text = SAMPLE.replace("force = yes", "force = yes\nfileset = 2")
    with pytest.raises(PolicyFileError, match="HP # 2.*a file set goes only with action "
                                              "restore"):
        load_policy(text, "site.conf")


def test_the_action_refuses_a_fileset_out_of_range_or_off_restore():
    for bad in (0, 11, True, "2"):
        with pytest.raises(ValueError, match="is not a number from 1 to 10"):
            Action(ActionKind.RESTORE, "a.img", fileset=bad)
    with pytest.raises(ValueError, match="fileset goes only with action restore"):
        Action(ActionKind.MAKE, "a.img", fileset=2)


# -- multicast sessions ---------------------------------------------------------------------------

def test_a_session_of_an_earlier_release_reads_with_the_new_keys_at_their_defaults():
    (session,) = load_policy(SAMPLE).sessions
    assert (session.participants, session.group, session.data_port) == ((), "", 0)
    text = dump_policy(load_policy(SAMPLE))
    assert "participants" not in text and "group" not in text and "data_port" not in text


def test_session_participants_group_and_port_round_trip():
    text = ("[sessions]\n[[lab]]\nimage = a.img\nparticipants = 00:c0:4f:dc:2a:b5, lab-07, "
            "\"pc 3\"\ngroup = 239.192.0.7\ndata_port = 4000\n")
    (session,) = load_policy(text).sessions
    assert session.participants == ("00C04FDC2AB5", "lab-07", "pc 3")
    assert (session.group, session.data_port) == ("239.192.0.7", 4000)
    again = dump_policy(load_policy(text))
    assert load_policy(again).sessions == (session,)
    assert dump_policy(load_policy(again)) == again


@pytest.mark.parametrize("lines, key, fragment", [
    ("participants = pc1, PC1", "participants", "named twice"),
    ("participants = 00:c0:4f:dc:2a:b5, 00C04FDC2AB5", "participants", "named twice"),
    ("group = 10.0.0.1", "group", "not a multicast address"),
    ("group = 224.0.0.9", "group", "local network control block"),
    ("group = 232.1.1.1", "group", "source-specific"),
    ("group = 231.128.0.4", "group", "Ethernet address"),
    ("group = lab", "group", "not an IPv4 address"),
    ("data_port = 65536", "data_port", "0 to 65535"),
    ("timeout_min = -1", "timeout_min", "whole number"),
])
def test_bad_session_values_name_the_key(lines, key, fragment):
    with pytest.raises(PolicyFileError) as caught:
        load_policy(f"[sessions]\n[[s]]\nimage = a.img\n{lines}\n", "p.conf")
    assert caught.value.where == f"[sessions] [[s]] {key}"
    assert caught.value.line == 4
    assert fragment in caught.value.message


def test_session_names_are_bounded_by_the_wire_255_bytes():
    fits = "é" * 127                       # 254 bytes, 127 characters
    assert load_policy(f"[sessions]\n[[{fits}]]\nimage = a\n").sessions[0].name == fits
    for name in ("é" * 128, "日" * 86):     # 256 and 258 bytes, within 128 characters
        with pytest.raises(PolicyFileError, match="more than 255"):
            load_policy(f"[sessions]\n[[{name}]]\nimage = a\n")
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        MulticastSession("日" * 86, "a.img")
