"""The compiled first-match search (common/policy/rulematch.py) means what Filter.evaluate means."""

from hypothesis import HealthCheck, given, settings, strategies as st

from common.machine import MachineFacts
from common.policy.rulematch import compile_matcher
from common.policy.rules import parse_filter
from tests.unit.common.test_rules import expressions, machine_facts


def _first(filters, facts):
    return next((i for i, f in enumerate(filters) if f.evaluate(facts)), -1)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(expressions(), min_size=1, max_size=6), st.lists(machine_facts, min_size=1,
                                                                  max_size=4))
def test_compiled_first_match_equals_the_evaluator(expressions_, facts_list):
    filters = [parse_filter(text) for text, _ in expressions_]
    matcher = compile_matcher(filters)
    for facts in facts_list:
        assert matcher(facts) == _first(filters, facts), ([f.canonical() for f in filters], facts)


def test_empty_list_and_catch_all():
    assert compile_matcher([])(MachineFacts()) == -1
    assert compile_matcher([parse_filter("ram > 1"), parse_filter("")])(MachineFacts()) == 1


def test_values_cannot_inject_code():
    evil = parse_filter("hostname = \"') or __import__('os').system('false') or ('\"")
    matcher = compile_matcher([evil])
    assert matcher(MachineFacts(hostname="x")) == -1
    assert matcher(MachineFacts(hostname="') or __import__('os').system('false') or ('")) == 0


def test_long_chains_and_deep_nesting_fall_back_to_the_evaluator():
    long = parse_filter(" or ".join(f"hostname = h{i}" for i in range(200)))
    deep = parse_filter("not " * 20 + "(" * 20 + "ram > 1" + ")" * 20)
    matcher = compile_matcher([long, deep])
    assert matcher(MachineFacts(hostname="H199")) == 0
    assert matcher(MachineFacts(ram_mb=2)) == 1
    assert matcher(MachineFacts(ram_mb=1)) == -1


def test_ip_networks_and_mac_spellings():
    filters = [parse_filter("ip = 10.1.0.0/16 and mac startswith 00:c0:4f"),
               parse_filter("ip startswith 192.168. or mac = 00-11-22-33-44-55")]
    matcher = compile_matcher(filters)
    assert matcher(MachineFacts(ip="10.1.2.3", mac="00C04FDC2AB5")) == 0
    assert matcher(MachineFacts(ip="10.2.2.3", mac="00C04FDC2AB5")) == -1
    assert matcher(MachineFacts(ip="192.168.1.1")) == 1
    assert matcher(MachineFacts(mac="00:11:22:33:44:55")) == 1


def test_ipv4_networks_inline_agree_with_the_evaluator_on_odd_facts():
    filters = [parse_filter(t) for t in ("ip != 10.1.0.0/16", "ip = 10.1.0.0/16",
                                         "ip = 10.1.2.3", "ip != fe80::/10")]
    for ip in ("10.1.2.3", "10.2.0.1", "fe80::1", "not-an-ip", "010.1.2.3", None):
        facts = MachineFacts(ip=ip)
        for f in filters:
            assert compile_matcher([f])(facts) == (0 if f.evaluate(facts) else -1), (f, ip)
