"""The bounded JSON body reader of common/daemon/httpdaemon.py: every malformed body is a
BadJsonBody with a reason (the daemons answer 400), never another exception."""

from __future__ import annotations

import pytest

from common.daemon.httpdaemon import BadJsonBody, JsonLimits, parse_json_object

LIMITS = JsonLimits()


@pytest.mark.parametrize("text, reason", [
    ('{"n": ' + "9" * 5000 + "}", "longer than 64 characters"),
    ('{"n": 1.' + "5" * 5000 + "}", "longer than 64 characters"),
    ("[" * 100_000, "nested deeper than 32"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nested deeper than 32"),
    ("[1, 2]", "must be a JSON object, not list"),
    ('"x"', "must be a JSON object, not str"),
    ('{"n": NaN}', "NaN is not a JSON value"),
    ('{"n": Infinity}', "Infinity is not a JSON value"),
    ('{"n": ', "not JSON"),
    ("", "not JSON"),
])
def test_malformed_is_bad_json_body(text, reason):
    with pytest.raises(BadJsonBody, match=reason):
        parse_json_object(text, LIMITS)


def test_brackets_inside_strings_do_not_count_as_depth():
    text = '{"a": "' + "[" * 1000 + '\\"[[["}'
    assert parse_json_object(text, LIMITS) == {"a": "[" * 1000 + '"[[['}


def test_a_well_formed_object_within_the_limits():
    nested = '{"a": ' * 31 + "1" + "}" * 31
    assert parse_json_object(nested, LIMITS)["a"]
    assert parse_json_object('{"ram_mb": 8192, "x": -1.5e3}', LIMITS) == \
        {"ram_mb": 8192, "x": -1500.0}
