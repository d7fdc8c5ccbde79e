"""common.policy.rules: the rule-filter language (parse, evaluate, explain, canonical text)."""

from __future__ import annotations

import dataclasses
import ipaddress
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.machine import ATTRIBUTE_KINDS, AttributeKind, MachineFacts, normalize_mac
from common.policy.rules import (
    ALIASES, MAX_NESTING, Chain, Condition, Filter, FilterResult, FilterSyntaxError, Group, Not,
    parse_filter,
)

DELL = MachineFacts(
    mac="00C04FDC2AB5", uuid="4C4C4544-0033-3910-8052-B4C04F4E4C32", ip="10.1.2.3",
    hostname="LAB-PC01", manufacturer="Dell Inc.", product="Latitude 7420", serial="3X9R2N3",
    asset_tag="INV-0042", platform="efi", arch="x86_64", ram_mb=8192, disk_mb=244198,
    base_image="win10-base.zmg",
)
NOTHING = MachineFacts()


def check(text: str, facts: MachineFacts) -> bool:
    """Evaluate, and insist evaluate() and explain() agree (they are separate code paths)."""
    rule = parse_filter(text)
    result = rule.evaluate(facts)
    assert rule.explain(facts).matched is result
    assert isinstance(result, bool)
    return result


def syntax_error(text: str) -> FilterSyntaxError:
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text)
    assert 0 <= info.value.position <= len(text)
    return info.value


# --- text attributes --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("manufacturer = 'Dell Inc.'", True),
    ("manufacturer = 'DELL INC.'", True),            # case-insensitive
    ('manufacturer = "dell inc."', True),
    ("manufacturer = Dell", False),                  # = is the whole value
    ("manufacturer == 'Dell Inc.'", True),
    ("manufacturer is 'Dell Inc.'", True),
    ("manufacturer != 'Dell Inc.'", False),
    ("manufacturer != HP", True),
    ("manufacturer <> HP", True),
    ("manufacturer <> 'dell inc.'", False),
    ("manufacturer is not HP", True),
    ("manufacturer IS NOT 'dell INC.'", False),
    ("product contains latitude", True),
    ("product contains 74", True),
    ("product contains optiplex", False),
    ("product startswith LATI", True),
    ("product starts-with lati", True),
    ("product beginswith lati", True),
    ("product begins-with lati", True),
    ("product startswith 7420", False),
    ("product endswith 7420", True),
    ("product ends-with ' 7420'", True),
    ("product endswith latitude", False),
    ("hostname = lab-pc01", True),
    ("hostname startswith lab-", True),
    ("serial = 3x9r2n3", True),
    ("uuid startswith 4c4c4544", True),
    ("platform = EFI", True),
    ("arch = x86_64", True),
    ("asset_tag contains 0042", True),
    ("base_image = WIN10-BASE.ZMG", True),
    ("base_image endswith .zmg", True),
])
def test_string_operators(text, expected):
    assert check(text, DELL) is expected


def test_strings_compare_by_casefold():
    facts = MachineFacts(manufacturer="Fujitsu Straße GmbH")
    assert check("manufacturer contains STRASSE", facts)
    assert check("manufacturer = 'fujitsu strasse gmbh'", facts)


@pytest.mark.parametrize("keyword_case", ["contains", "CONTAINS", "Contains", "cOnTaInS"])
def test_operator_words_are_case_insensitive(keyword_case):
    assert check(f"product {keyword_case} latitude", DELL)


@pytest.mark.parametrize("text", [
    "Manufacturer = 'Dell Inc.'", "MANUFACTURER = 'Dell Inc.'", "RAM_MB > 4000",
    "product STARTSWITH lat", "product Ends-With 7420", "hostname IS lab-pc01",
    "hostname Is Not other", "ram > 1 AND disk > 1", "ram > 1 And disk > 1",
    "ram < 1 OR disk > 1", "NOT ram < 1", "Not ram < 1",
])
def test_names_and_keywords_are_case_insensitive(text):
    assert check(text, DELL)


@pytest.mark.parametrize("alias, canonical", sorted(ALIASES.items()))
def test_aliases(alias, canonical):
    kind = ATTRIBUTE_KINDS[canonical]
    value = "1" if kind is AttributeKind.NUMBER else "x"
    rule = parse_filter(f"{alias.upper()} != {value}")
    assert rule.attributes() == {canonical}
    assert rule.conditions()[0].attribute == canonical
    assert rule.canonical() == f"{canonical} != {value}"


def test_alias_evaluation():
    assert check("memory >= 8GB and disk > 200GB and model contains latitude", DELL)
    assert check("assettag = inv-0042 and asset = INV-0042 and buildarch = x86_64", DELL)


def test_values_may_hold_punctuation_bare():
    facts = MachineFacts(base_image="images/win10_v2-*.zmg", hostname="AT&T|1")
    assert check("base_image = images/win10_v2-*.zmg", facts)
    assert check("hostname = AT&T|1", facts)        # a lone & or | is part of the word


def test_quoted_values_and_escapes():
    facts = MachineFacts(manufacturer="O'Brien \"Systems\"", base_image="C:\\img\\")
    assert check("manufacturer = 'O\\'Brien \"Systems\"'", facts)
    assert check('manufacturer = "O\'Brien \\"Systems\\""', facts)
    assert check("base_image = 'C:\\\\img\\\\'", facts)
    assert check("base_image = 'C:\\img\\\\'", facts)   # a backslash before other text stays
    assert parse_filter("hostname = 'and'").conditions()[0].value == "and"


def test_quoted_empty_value():
    assert check("hostname contains ''", DELL)
    assert not check("hostname = ''", DELL)


# --- numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("ram_mb = 8192", True), ("ram_mb = 8191", False),
    ("ram_mb != 8192", False), ("ram_mb != 4096", True),
    ("ram_mb < 8193", True), ("ram_mb < 8192", False),
    ("ram_mb <= 8192", True), ("ram_mb <= 8191", False),
    ("ram_mb > 8191", True), ("ram_mb > 8192", False),
    ("ram_mb >= 8192", True), ("ram_mb >= 8193", False),
    ("ram_mb = 8GB", True), ("ram_mb = 8gb", True), ("ram_mb = 8192MB", True),
    ("ram_mb = 8192mb", True), ("ram_mb >= 9GB", False), ("ram_mb < 1TB", True),
    ("disk_mb > 200000", True), ("disk_mb >= 1tb", False), ("disk_mb < 250GB", True),
    ("disk_mb == 244198", True), ("disk_mb <> 244198", False),
    ("ram_mb='8 GB'", True),
])
def test_number_operators(text, expected):
    assert check(text, DELL) is expected


def test_units():
    assert parse_filter("ram = 4GB").evaluate(MachineFacts(ram_mb=4096))
    assert parse_filter("disk = 1TB").evaluate(MachineFacts(disk_mb=1048576))
    assert parse_filter("disk = 2Tb").evaluate(MachineFacts(disk_mb=2 * 1048576))
    assert parse_filter("ram = 4096MB").evaluate(MachineFacts(ram_mb=4096))


# --- MAC addresses ----------------------------------------------------------------------------

@pytest.mark.parametrize("written", [
    "00:C0:4F:DC:2A:B5", "00:c0:4f:dc:2a:b5", "00-C0-4F-DC-2A-B5", "00c0.4fdc.2ab5",
    "00C04FDC2AB5", "00c04fdc2ab5", "'00 c0 4f dc 2a b5'",
])
def test_mac_equality_in_any_spelling(written):
    assert check(f"mac = {written}", DELL)
    assert not check(f"mac != {written}", DELL)
    other = MachineFacts(mac="001122334455")
    assert not check(f"mac = {written}", other)
    assert check(f"mac != {written}", other)


@pytest.mark.parametrize("text, expected", [
    ("mac startswith 00:C0:4F", True),      # vendor (OUI) match
    ("mac startswith 00-c0-4f", True),
    ("mac startswith 00C04F", True),
    ("mac startswith 00:11:22", False),
    ("mac endswith 2a:b5", True),
    ("mac endswith 2a:b6", False),
    ("mac contains 4F:DC", True),
    ("mac contains 4fdc2a", True),
    ("mac contains 4f:dd", False),
])
def test_mac_partial_operators(text, expected):
    assert check(text, DELL) is expected


def test_mac_facts_in_another_spelling_are_tolerated():
    facts = MachineFacts(mac="00:c0:4f:dc:2a:b5")
    assert check("mac = 00C04FDC2AB5", facts)
    assert check("mac startswith 00:C0:4F", facts)


# --- IP addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("ip, text, expected", [
    ("10.1.2.3", "ip = 10.1.0.0/16", True),
    ("10.2.0.1", "ip = 10.1.0.0/16", False),
    ("10.1.2.3", "ip != 10.1.0.0/16", False),
    ("10.2.0.1", "ip != 10.1.0.0/16", True),
    ("10.1.2.3", "ip = 10.1.2.3/16", True),          # host bits allowed (strict=False)
    ("10.1.2.3", "ip = 10.1.2.3/32", True),
    ("10.1.2.4", "ip = 10.1.2.3/32", False),
    ("10.1.2.3", "ip = 0.0.0.0/0", True),
    ("10.1.2.3", "ip = 10.1.2.3", True),
    ("10.1.2.4", "ip = 10.1.2.3", False),
    ("10.1.2.3", "ip != 10.1.2.3", False),
    ("10.1.2.4", "ip != 10.1.2.3", True),
    ("10.1.2.3", "ip == '10.1.2.3'", True),
    ("10.1.2.3", "ip startswith 10.1.", True),
    ("10.10.2.3", "ip startswith 10.1.", False),      # a string prefix, dot included
    ("10.1.2.3", "ip endswith .3", True),
    ("10.1.2.3", "ip contains .2.", True),
    ("10.1.2.3", "ip contains .9.", False),
])
def test_ipv4(ip, text, expected):
    assert check(text, MachineFacts(ip=ip)) is expected


@pytest.mark.parametrize("ip, text, expected", [
    ("fe80::1", "ip = fe80::/10", True),
    ("fe80::1", "ip = FE80:0:0::1", True),            # compared as addresses, not text
    ("fe80::1", "ip != fe80::2", True),
    ("2001:db8::5", "ip = 2001:db8::/32", True),
    ("2001:db9::5", "ip = 2001:db8::/32", False),
    ("fe80::1", "ip startswith FE80:", True),
    ("::1", "ip = 0.0.0.0/0", False),                 # an IPv6 address is in no IPv4 network
    ("10.1.2.3", "ip = ::/0", False),
    ("::1", "ip = 0.0.0.1", False),
])
def test_ipv6_is_supported(ip, text, expected):
    assert check(text, MachineFacts(ip=ip)) is expected


def test_ip_fact_that_is_not_an_address_is_like_unknown():
    facts = MachineFacts(ip="not-an-ip")
    for text in ("ip = 10.0.0.0/8", "ip != 10.0.0.0/8", "ip = 10.0.0.1", "ip != 10.0.0.1"):
        assert not check(text, facts), text


# --- unknown (unreported) attributes ----------------------------------------------------------

VALUE_FOR_KIND = {AttributeKind.STRING: "x", AttributeKind.NUMBER: "1",
                  AttributeKind.MAC: "00C04FDC2AB5", AttributeKind.IP: "10.0.0.0/8"}
OPERATORS_FOR_KIND = {
    AttributeKind.STRING: ["=", "!=", "contains", "startswith", "endswith"],
    AttributeKind.NUMBER: ["=", "!=", "<", "<=", ">", ">="],
    AttributeKind.MAC: ["=", "!=", "contains", "startswith", "endswith"],
    AttributeKind.IP: ["=", "!=", "contains", "startswith", "endswith"],
}
EVERY_CONDITION = [
    (name, op, VALUE_FOR_KIND[kind] if op in ("=", "!=") or kind is not AttributeKind.MAC
     else "00")
    for name, kind in ATTRIBUTE_KINDS.items() for op in OPERATORS_FOR_KIND[kind]
]


@pytest.mark.parametrize("name, op, value", EVERY_CONDITION)
def test_unknown_attribute_is_false_for_every_operator(name, op, value):
    assert not check(f"{name} {op} {value}", NOTHING)
    assert check(f"not ({name} {op} {value})", NOTHING)
    assert check(f"not {name} {op} {value}", NOTHING)


def test_unknown_is_not_different():
    assert not check("asset_tag != INV-1", NOTHING)
    assert check("not (asset_tag = INV-1)", NOTHING)
    assert check("asset_tag != INV-1 or not (asset_tag = INV-1)", NOTHING)


# --- combination: pairwise, left to right -----------------------------------------------------

A_TRUE, A_FALSE = "hostname = a", "hostname = z"     # evaluated on hostname 'a'
B_TRUE, B_FALSE = "ram > 1", "ram < 1"               # on ram 100
C_TRUE, C_FALSE = "disk > 1", "disk < 1"             # on disk 100
D_TRUE, D_FALSE = "serial = s", "serial = t"         # on serial 's'
ABCD = MachineFacts(hostname="a", ram_mb=100, disk_mb=100, serial="s")


def test_or_then_and_is_left_to_right_not_conventional():
    # Conventional precedence: A or (B and C) = True or ... = True.
    # Left to right: (A or B) and C = True and False = False.
    text = f"{A_TRUE} or {B_TRUE} and {C_FALSE}"
    assert check(text, ABCD) is False
    assert check(f"({A_TRUE} or {B_TRUE}) and {C_FALSE}", ABCD) is False
    assert check(f"{A_TRUE} or ({B_TRUE} and {C_FALSE})", ABCD) is True   # explicit grouping


def test_four_terms_left_to_right():
    # ((A or B) and C) and D, with D false: False. Conventional A or (B and C and D): True.
    assert check(f"{A_TRUE} or {B_FALSE} and {C_TRUE} and {D_FALSE}", ABCD) is False
    assert check(f"{A_TRUE} or ({B_FALSE} and {C_TRUE} and {D_FALSE})", ABCD) is True
    assert check(f"{A_TRUE} or {B_FALSE} and {C_TRUE} and {D_TRUE}", ABCD) is True
    # ((A and B) or C) and D: False and ... or True -> True, and D True.
    assert check(f"{A_FALSE} and {B_TRUE} or {C_TRUE} and {D_TRUE}", ABCD) is True
    # Conventional would give (A and B) or (C and D) = False or False; left to right agrees here.
    assert check(f"{A_FALSE} and {B_TRUE} or {C_TRUE} and {D_FALSE}", ABCD) is False


def test_and_then_or_left_to_right():
    # (A and B) or C: both readings agree; checked so the chain handles both connectors.
    assert check(f"{A_FALSE} and {B_TRUE} or {C_TRUE}", ABCD) is True
    assert check(f"{A_TRUE} and {B_FALSE} or {C_FALSE}", ABCD) is False


def test_symbolic_connectors():
    assert check(f"{A_TRUE} || {B_TRUE} && {C_FALSE}", ABCD) is False
    assert check(f"{A_TRUE}||({B_TRUE}&&{C_FALSE})", ABCD) is True
    assert check("hostname=a&&ram>1", ABCD) is True


def test_not_binds_to_the_next_operand_only():
    # (not A) and B with A False, B False: False. not (A and B) would be True.
    assert check(f"not {A_FALSE} and {B_FALSE}", ABCD) is False
    assert check(f"not ({A_FALSE} and {B_FALSE})", ABCD) is True
    assert check(f"! {A_FALSE} and {B_TRUE}", ABCD) is True
    assert check(f"!({A_TRUE} or {B_TRUE})", ABCD) is False
    assert check(f"{A_FALSE} or not {B_FALSE}", ABCD) is True


def test_double_not():
    assert check(f"not not {A_TRUE}", ABCD) is True
    assert check(f"not not {A_FALSE}", ABCD) is False
    assert check(f"!!{A_TRUE}", ABCD) is True
    assert check(f"not !({A_TRUE})", ABCD) is True
    assert check(f"not (not ({A_FALSE}))", ABCD) is False


def test_nested_parentheses():
    text = f"(({A_TRUE} or {B_FALSE}) and ({C_FALSE} or ({D_TRUE})))"
    assert check(text, ABCD) is True


def test_empty_filter_matches_everything():
    for text in ("", "   ", "\t\n"):
        rule = parse_filter(text)
        assert rule.evaluate(NOTHING) and rule.evaluate(DELL)
        assert rule.explain(NOTHING) == FilterResult(True, "empty filter matches every machine")
        assert rule.canonical() == "" and rule.attributes() == frozenset()
        assert rule.root is None and rule.source == text


class RecordingFacts:
    """Duck-typed facts that remember which attributes were read."""

    def __init__(self, **values):
        self.values = values
        self.read: list[str] = []

    def __getattr__(self, name):
        self.read.append(name)
        return self.values.get(name)


def test_evaluate_short_circuits_but_explain_does_not():
    rule = parse_filter("hostname = z and ram > 1 or serial = s")
    facts = RecordingFacts(hostname="a", ram_mb=5, serial="s")
    assert rule.evaluate(facts) is True
    assert facts.read == ["hostname", "serial"]   # False and X: X skipped
    facts.read.clear()
    assert rule.explain(facts).matched is True
    assert facts.read.count("ram_mb") >= 1
    rule = parse_filter("hostname = a or ram > 1")
    facts = RecordingFacts(hostname="a")
    assert rule.evaluate(facts) is True and facts.read == ["hostname"]  # True or X


# --- syntax errors ----------------------------------------------------------------------------

MALFORMED = [
    # (text, fragment of the message, position or None for "somewhere inside")
    ("ram_mb foo 3", "expected an operator after 'ram_mb', found 'foo'", 7),
    ("ram_mb", "expected an operator after 'ram_mb', found the end of the filter", 6),
    ("ramm > 3", "unknown attribute 'ramm' (did you mean ram_mb?)", 0),
    ("manufactuer = Dell", "did you mean manufacturer?", 0),
    ("ram > 1 and hostnme = x", "did you mean hostname?", 12),
    ("colour = red", "unknown attribute 'colour' (attributes: mac,", 0),
    ("(ram > 3", "unbalanced parenthesis", 0),
    ("ram > 3)", "unbalanced parenthesis", 7),
    ("((ram > 3)", "unbalanced parenthesis", 0),
    ("ram > 1 and (disk > 1 or (serial = x)", "unbalanced parenthesis", 12),
    (")", "unbalanced parenthesis", 0),
    ("ram > 3 and", "expected a condition, 'not' or '(' after 'and', found the end", 11),
    ("ram > 3 or", "after 'or', found the end of the filter", 10),
    ("ram > 3 &&", "after '&&'", 10),
    ("or ram > 3", "expected a condition, 'not' or '(', found 'or'", 0),
    ("ram > 3 or or disk > 1", "found 'or'", 11),
    ("ram > 3 and and disk > 1", "found 'and'", 12),
    ("()", "expected a condition, 'not' or '(' after '(', found ')'", 1),
    ("not", "after 'not', found the end of the filter", 3),
    ("!", "after '!', found the end of the filter", 1),
    ("= 3", "expected a condition, 'not' or '(', found '='", 0),
    ("'hostname' = x", "expected a condition, 'not' or '(', found 'hostname'", 0),
    ('hostname = "a" b', "after \"a\", found 'b'", 15),
    ("hostname contains", "missing value after 'contains'", 17),
    ("hostname = and ram > 1", "missing value after '=', found 'and'", 11),
    ("hostname = ", "missing value after '=', found the end of the filter", 11),
    ("hostname is not", "missing value after 'is not'", 15),
    ("hostname = )", "missing value after '='", 11),
    ("hostname = not", "missing value after '=', found 'not'", 11),
    ("hostname !== x", "missing value after '!=', found '='", 11),
    ("ram > lots", "'lots' is not a whole number of MB", 6),
    ("ram > 4.5GB", "not a whole number", 6),
    ("ram > -1", "not a whole number", 6),
    ("ram > 4KB", "not a whole number", 6),
    ("ram > ''", "not a whole number", 6),
    ("mac = 00:C0:4F", "'00:C0:4F' is not a MAC address", 6),
    ("mac != 00C04FDC2AB5FF", "not a MAC address", 7),
    ("mac = zz:zz:zz:zz:zz:zz", "not a MAC address", 6),
    ("mac startswith zz", "'zz' is not part of a MAC address", 15),
    ("mac contains 00C04FDC2AB5FF", "not part of a MAC address", 13),
    ("ip = 10.1.0.0/33", "'10.1.0.0/33' is not an IP address or network", 5),
    ("ip = 300.1.1.1", "not an IP address", 5),
    ("ip != somewhere", "not an IP address", 6),
    ("ip = 10.1/16/2", "not an IP address", 5),
    ("manufacturer < 3", "'<' compares numbers; manufacturer is a string", 13),
    ("hostname >= a", "'>=' compares numbers; hostname is a string", 9),
    ("mac > 1", "'>' compares numbers; mac is a MAC address", 4),
    ("ip <= 10.0.0.1", "'<=' compares numbers; ip is an IP address", 3),
    ("ram contains 4", "'contains' compares text; ram_mb is a number", 4),
    ("disk starts-with 1", "'startswith' compares text; disk_mb is a number", 5),
    ("hostname = 'abc", "unterminated quoted value", 11),
    ('hostname = "abc\\"', "unterminated quoted value", 11),
    ("hostname = 'abc\\", "unterminated quoted value", 11),
    ("hostname = a b", "expected 'and', 'or' or the end of the filter after 'a', found 'b'", 13),
    ("ram > 3 foo = 1", "found 'foo'", 8),
    ("(ram > 3 foo)", "expected 'and', 'or', ')' or the end", 9),
    ("hostname = x &", "found '&'", 13),
    ("hostname = x (ram > 1)", "found '('", 13),
    ("hostname = x not ram > 1", "found 'not'", 13),
    ("ram > 1 and (", "after '(', found the end of the filter", 13),
    ("hostname equals x", "expected an operator after 'hostname', found 'equals'", 9),
    ("hostname => x", "missing value after '=', found '>'", 10),
]


@pytest.mark.parametrize("text, fragment, position", MALFORMED)
def test_malformed_filters(text, fragment, position):
    error = syntax_error(text)
    assert fragment in error.message
    assert error.position == position
    assert str(error) == f"at {position}: {error.message}"
    assert isinstance(error, ValueError)


def test_error_attributes_survive_pickling():
    error = syntax_error("ramm > 1")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.position, copy.message, str(copy)) == (error.position, error.message,
                                                         str(error))


def test_deep_nesting_is_a_syntax_error_not_a_crash():
    for text in ("(" * 1000 + "ram > 1" + ")" * 1000, "not " * 1000 + "ram > 1",
                 "!" * 1000 + "ram > 1", "(" * 5000):
        error = syntax_error(text)
        assert "nested too deeply" in error.message
    ok = "(" * MAX_NESTING + "ram > 1" + ")" * MAX_NESTING
    assert check(ok, DELL)


def test_long_chains_cost_no_recursion():
    text = " and ".join(["ram > 1"] * 3000) + " or hostname = x"
    rule = parse_filter(text)
    assert rule.evaluate(DELL) and rule.explain(DELL).matched
    assert parse_filter(rule.canonical()).canonical() == rule.canonical()


# --- explain ----------------------------------------------------------------------------------

def test_explain_names_each_condition_and_the_value_it_saw():
    facts = MachineFacts(manufacturer="Dell Inc.", ram_mb=2048)
    result = parse_filter("manufacturer = 'Dell Inc.' and ram_mb >= 4096").explain(facts)
    assert result == FilterResult(
        False, "manufacturer = 'Dell Inc.' is true (manufacturer is 'Dell Inc.'); "
               "ram_mb >= 4096 is false (ram_mb is 2048)")


def test_explain_unknown_value():
    result = parse_filter("ram >= 4GB").explain(NOTHING)
    assert not result.matched
    assert result.reason == "ram_mb >= 4GB is false (ram_mb is unknown)"
    assert "ram_mb is unknown" in result.reason


def test_explain_reports_conditions_evaluate_would_skip():
    result = parse_filter("hostname = z and product contains latitude").explain(DELL)
    assert not result.matched
    assert "hostname = z is false (hostname is 'LAB-PC01')" in result.reason
    assert "product contains latitude is true (product is 'Latitude 7420')" in result.reason


def test_explain_with_not_and_groups():
    rule = parse_filter("not (mac startswith 00:C0:4F or ip = 10.9.0.0/16)")
    result = rule.explain(DELL)
    assert result.matched is False is rule.evaluate(DELL)
    assert "mac startswith 00:C0:4F is true (mac is '00C04FDC2AB5')" in result.reason
    assert "ip = 10.9.0.0/16 is false (ip is '10.1.2.3')" in result.reason


@pytest.mark.parametrize("text", [
    f"{A_TRUE} or {B_TRUE} and {C_FALSE}", f"{A_TRUE} or {B_FALSE} and {C_TRUE} and {D_FALSE}",
    f"not {A_FALSE} and {B_FALSE}", f"not ({A_FALSE} and {B_FALSE})", f"not not {A_TRUE}",
    "asset_tag != x", "not asset_tag = x",
])
def test_explain_matches_evaluate(text):
    rule = parse_filter(text)
    for facts in (ABCD, NOTHING, DELL):
        assert rule.explain(facts).matched is rule.evaluate(facts)


# --- canonical text ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, canonical", [
    ("MANUFACTURER == 'Dell Inc.' AND Ram >= 4gb",
     "manufacturer = 'Dell Inc.' and ram_mb >= 4gb"),
    ("hostname is not lab", "hostname != lab"),
    ("hostname IS lab", "hostname = lab"),
    ("model <> x", "product != x"),
    ("product Begins-With lat", "product startswith lat"),
    ("product ends-with 20", "product endswith 20"),
    ('hostname = "lab"', "hostname = lab"),
    ('hostname = "O\'Brien"', "hostname = 'O\\'Brien'"),
    ("hostname = 'back\\\\slash'", "hostname = 'back\\\\slash'"),
    ("hostname = 'and'", "hostname = 'and'"),
    ("hostname = 'NOT'", "hostname = 'NOT'"),
    ("hostname = 'a b'", "hostname = 'a b'"),
    ("hostname = 'a=b'", "hostname = 'a=b'"),
    ("hostname = '(x)'", "hostname = '(x)'"),
    ("hostname = ''", "hostname = ''"),
    ("hostname = x&&ram>1||!disk<5", "hostname = x and ram_mb > 1 or not disk_mb < 5"),
    ("not not hostname = x", "not not hostname = x"),
    ("((hostname = x))", "((hostname = x))"),
    ("  ram > 1   or   ( disk<2 and not(serial=s) )  ",
     "ram_mb > 1 or (disk_mb < 2 and not (serial = s))"),
    ("mac = 00-c0-4f-dc-2a-b5", "mac = 00-c0-4f-dc-2a-b5"),
    ("ip = 10.1.0.0/16", "ip = 10.1.0.0/16"),
    ("   ", ""),
])
def test_canonical(text, canonical):
    rule = parse_filter(text)
    assert rule.canonical() == canonical == str(rule)
    again = parse_filter(canonical)
    assert again.canonical() == canonical
    for facts in (DELL, NOTHING, ABCD):
        assert again.evaluate(facts) is rule.evaluate(facts)


def test_canonical_of_hand_built_trees_keeps_meaning():
    a, b, c = (Condition("hostname", "=", "a"), Condition("ram_mb", ">", "1"),
               Condition("disk_mb", "<", "1"))
    right_nested = Filter("", Chain(a, (("or", Chain(b, (("and", c),))),)))
    assert right_nested.canonical() == "hostname = a or (ram_mb > 1 and disk_mb < 1)"
    negated_chain = Filter("", Not(Chain(a, (("and", b),))))
    assert negated_chain.canonical() == "not (hostname = a and ram_mb > 1)"
    for rule in (right_nested, negated_chain):
        assert parse_filter(rule.canonical()).evaluate(ABCD) is rule.evaluate(ABCD)


# --- the public objects -----------------------------------------------------------------------

def test_tree_shape():
    rule = parse_filter("hostname = a or not (ram > 1) and disk < 2")
    assert isinstance(rule.root, Chain)
    assert rule.root.first == Condition("hostname", "=", "a")
    (c1, not_node), (c2, last) = rule.root.rest
    assert (c1, c2) == ("or", "and")
    assert not_node == Not(Group(Condition("ram_mb", ">", "1")))
    assert last == Condition("disk_mb", "<", "2")
    assert rule.attributes() == frozenset({"hostname", "ram_mb", "disk_mb"})
    assert [c.describe() for c in rule.conditions()] == [
        "hostname = a", "ram_mb > 1", "disk_mb < 2"]


def test_condition_on_its_own():
    condition = Condition("ram_mb", ">=", "4GB")
    assert condition.evaluate(MachineFacts(ram_mb=4096))
    assert not condition.evaluate(MachineFacts(ram_mb=4095))
    assert not condition.evaluate(NOTHING)
    assert condition.describe() == "ram_mb >= 4GB"
    assert Condition("manufacturer", "=", "Dell Inc.").describe() == "manufacturer = 'Dell Inc.'"
    assert condition == Condition("ram_mb", ">=", "4GB") and hash(condition)
    for bad in (("ram_mb", "contains", "4"), ("colour", "=", "x"), ("ram_mb", "~", "1"),
                ("mac", "=", "nope")):
        with pytest.raises(FilterSyntaxError):
            Condition(*bad)


def test_filters_are_immutable():
    rule = parse_filter("ram > 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.source = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.root.value = "2"  # type: ignore[union-attr]
    assert rule.source == "ram > 1"


def test_parsing_is_deterministic():
    text = "mac startswith 00:C0:4F or ip = 10.1.0.0/16 and ram >= 4GB"
    assert parse_filter(text) == parse_filter(text)


# --- property tests ---------------------------------------------------------------------------

TOKENS = ["ram", "ram_mb", "mac", "ip", "hostname", "model", "and", "or", "not", "AND", "Or",
          "is", "not", "contains", "startswith", "ends-with", "=", "==", "!=", "<>", "<", "<=",
          ">", ">=", "!", "&&", "||", "&", "|", "(", ")", "'", '"', "\\", "'a b'", '"x\\"y"',
          "4GB", "1TB", "-1", "00:C0:4F", "00C04FDC2AB5", "10.1.0.0/16", "10.1.2.3", "::1",
          "fe80::/10", "10.1.0.0/99", "x", "lab-01", " ", "\t", "ramm", "", "\x00", "ß", "é"]


def assert_parses_sanely_or_raises_syntax_error(text: str) -> None:
    try:
        rule = parse_filter(text)
    except FilterSyntaxError as error:
        assert 0 <= error.position <= len(text)
        assert str(error).startswith(f"at {error.position}: ")
        return
    canonical = rule.canonical()
    again = parse_filter(canonical)
    assert again.canonical() == canonical
    for facts in (DELL, NOTHING, ABCD, MachineFacts(ip="fe80::1", mac="001122334455")):
        assert rule.evaluate(facts) is rule.explain(facts).matched is again.evaluate(facts)


@given(st.text())
def test_arbitrary_text_only_raises_syntax_errors(text):
    assert_parses_sanely_or_raises_syntax_error(text)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(TOKENS), max_size=14), st.sampled_from([" ", ""]))
def test_token_soup_only_raises_syntax_errors(tokens, separator):
    assert_parses_sanely_or_raises_syntax_error(separator.join(tokens))


# Generated valid filters: each generator returns (text, reference) where reference is an
# independent evaluator over the generated structure (not over the parser's tree).

ATTRIBUTE_SPELLINGS = {name: [name] for name in ATTRIBUTE_KINDS}
for _alias, _name in ALIASES.items():
    ATTRIBUTE_SPELLINGS[_name].append(_alias)

OPERATOR_SPELLINGS = {
    "=": ["=", "==", "is"], "!=": ["!=", "<>", "is not"], "contains": ["contains"],
    "startswith": ["startswith", "starts-with", "beginswith", "begins-with"],
    "endswith": ["endswith", "ends-with"], "<": ["<"], "<=": ["<="], ">": [">"], ">=": [">="],
}

STRING_VALUES = ["dell inc.", "Dell", "INC.", "lab", "lab-01", "01", "straSSe", "x'y", 'a"b',
                 "back\\slash", "and", "Or", "a b", "", "(", "ß"]
STRING_FACTS = ["Dell Inc.", "DELL INC.", "lab-01", "LAB-02", "Straße", "x'y", "back\\slash"]
NUMBER_VALUES = [0, 1024, 2048, 3000, 4096, 8192, 1048576]
NUMBER_FACTS = [0, 1024, 2048, 4096, 8192, 1048576]
MAC_FACTS = ["00C04FDC2AB5", "001122334455"]
MAC_PARTS = ["00:C0:4F", "00c04f", "2a-b5", "4FDC", "11:22", "55"]
IP_FACTS = ["10.1.2.3", "10.2.0.1", "192.168.0.5", "fe80::1"]
IP_VALUES = ["10.1.0.0/16", "10.1.2.3", "10.2.0.1/32", "192.168.0.0/24", "fe80::/10", "fe80::1",
             "0.0.0.0/0"]
IP_PARTS = ["10.1.", "10.", ".5", "168", "fe80:", "::1"]


def written_value(draw, value: str) -> str:
    plain = (value and all(ch.isalnum() or ch in "._:/-" for ch in value)
             and value.lower() not in ("and", "or", "not"))
    quote = draw(st.sampled_from(["", "'", '"'] if plain else ["'", '"']))
    if not quote:
        return value
    return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def random_case(draw, word: str) -> str:
    return draw(st.sampled_from([word, word.upper(), word.title()]))


def reference_condition(name, op, want):
    kind = ATTRIBUTE_KINDS[name]

    def test(facts):
        actual = getattr(facts, name)
        if actual is None:
            return False
        if kind is AttributeKind.NUMBER:
            return {"=": actual == want, "!=": actual != want, "<": actual < want,
                    "<=": actual <= want, ">": actual > want, ">=": actual >= want}[op]
        if kind is AttributeKind.IP and op in ("=", "!="):
            address = ipaddress.ip_address(actual)
            network = ipaddress.ip_network(want, strict=False)
            same = address.version == network.version and address in network
            return same if op == "=" else not same
        if kind is AttributeKind.STRING:
            actual, wanted = actual.casefold(), want.casefold()
        elif kind is AttributeKind.MAC:
            wanted = normalize_mac(want) if op in ("=", "!=") else (
                want.replace(":", "").replace("-", "").upper())
        else:
            actual, wanted = actual.lower(), want.lower()
        return {"=": actual == wanted, "!=": actual != wanted, "contains": wanted in actual,
                "startswith": actual.startswith(wanted),
                "endswith": actual.endswith(wanted)}[op]
    return test


@st.composite
def conditions(draw):
    name = draw(st.sampled_from(sorted(ATTRIBUTE_KINDS)))
    kind = ATTRIBUTE_KINDS[name]
    op = draw(st.sampled_from(OPERATORS_FOR_KIND[kind]))
    if kind is AttributeKind.NUMBER:
        want = draw(st.sampled_from(NUMBER_VALUES))
        units = [str(want), f"{want}MB"] + ([f"{want // 1024}GB"] if want % 1024 == 0 else [])
        value = draw(st.sampled_from(units + ([f"{want // 1048576}tb"]
                                              if want and want % 1048576 == 0 else [])))
    elif kind is AttributeKind.MAC and op in ("=", "!="):
        digits = draw(st.sampled_from(MAC_FACTS))
        pairs = [digits[i:i + 2] for i in range(0, 12, 2)]
        want = value = draw(st.sampled_from(
            [digits, digits.lower(), ":".join(pairs), "-".join(pairs).lower()]))
    elif kind is AttributeKind.MAC:
        want = value = draw(st.sampled_from(MAC_PARTS))
    elif kind is AttributeKind.IP:
        want = value = draw(st.sampled_from(IP_VALUES if op in ("=", "!=") else IP_PARTS))
    else:
        want = value = draw(st.sampled_from(STRING_VALUES))
    text = " ".join([random_case(draw, draw(st.sampled_from(ATTRIBUTE_SPELLINGS[name]))),
                     random_case(draw, draw(st.sampled_from(OPERATOR_SPELLINGS[op]))),
                     written_value(draw, value)])
    return text, reference_condition(name, op, want)


@st.composite
def operands(draw, depth):
    choice = draw(st.integers(0, 5)) if depth > 0 else 0
    if choice <= 3:
        return draw(conditions())
    if choice == 4:
        text, inner = draw(operands(depth - 1))
        word = draw(st.sampled_from(["not ", "NOT ", "!", "! "]))
        return word + text, lambda facts: not inner(facts)
    text, inner = draw(expressions(depth - 1))
    return f"({text})", inner


@st.composite
def expressions(draw, depth=3):
    first_text, first = draw(operands(depth))
    rest = draw(st.lists(st.tuples(st.sampled_from(["and", "or", "AND", "Or", "&&", "||"]),
                                   operands(depth)), max_size=3))
    text = first_text
    steps = []
    for connector, (operand_text, operand) in rest:
        text += f" {connector} {operand_text}"
        steps.append((connector.lower() in ("and", "&&"), operand))

    def reference(facts):
        result = first(facts)             # pairwise, strictly left to right, no short cut
        for is_and, operand in steps:
            value = operand(facts)
            result = (result and value) if is_and else (result or value)
        return result
    return text, reference


machine_facts = st.builds(
    MachineFacts,
    mac=st.none() | st.sampled_from(MAC_FACTS),
    uuid=st.none() | st.sampled_from(STRING_FACTS),
    ip=st.none() | st.sampled_from(IP_FACTS),
    hostname=st.none() | st.sampled_from(STRING_FACTS),
    manufacturer=st.none() | st.sampled_from(STRING_FACTS),
    product=st.none() | st.sampled_from(STRING_FACTS),
    serial=st.none() | st.sampled_from(STRING_FACTS),
    asset_tag=st.none() | st.sampled_from(STRING_FACTS),
    platform=st.none() | st.sampled_from(STRING_FACTS),
    arch=st.none() | st.sampled_from(STRING_FACTS),
    ram_mb=st.none() | st.sampled_from(NUMBER_FACTS),
    disk_mb=st.none() | st.sampled_from(NUMBER_FACTS),
    base_image=st.none() | st.sampled_from(STRING_FACTS),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(expressions(), st.lists(machine_facts, min_size=1, max_size=4))
def test_generated_filters_match_the_reference(expression, facts_list):
    text, reference = expression
    rule = parse_filter(text)
    canonical = rule.canonical()
    again = parse_filter(canonical)
    assert again.canonical() == canonical
    for facts in facts_list:
        expected = reference(facts)
        assert rule.evaluate(facts) is expected, (text, facts)
        assert rule.explain(facts).matched is expected
        assert again.evaluate(facts) is expected


@given(conditions(), machine_facts)
def test_generated_conditions_explain_their_outcome(condition, facts):
    text, reference = condition
    rule = parse_filter(text)
    (only,) = rule.conditions()
    result = rule.explain(facts)
    outcome = "true" if reference(facts) else "false"
    actual = getattr(facts, only.attribute)
    shown = "unknown" if actual is None else str(actual).replace("\\", "\\\\")
    assert result.reason.startswith(f"{only.describe()} is {outcome} ({only.attribute} is ")
    assert shown.replace("'", "\\'") in result.reason
