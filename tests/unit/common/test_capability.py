"""Work capabilities (common/policy/capability.py): round trips, and a table of tokens that
must be refused with their reason; random text never raises anything but CapabilityError."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, strategies as st

from common.policy.capability import (Capability, CapabilityError, bearer, decode, encode,
                                      machine_capability)

KEY = b"k" * 32
KEYS = {"k1": KEY, "k0": b"o" * 32}
NOW = 1_800_000_000
MAC = "00C04FDC2AB5"


def token(capability: Capability | None = None, key_id: str = "k1", secret: bytes = KEY) -> str:
    capability = capability or machine_capability(MAC, ("retrieve", "result"),
                                                  ("lab/base.img", "lab/drivers.add"), NOW, 600)
    return encode(capability, key_id, secret)


def test_round_trip_and_what_it_allows():
    capability = decode(token(), KEYS, NOW + 10)
    assert capability.subject == MAC and capability.expires_at == NOW + 600
    assert capability.refusal("retrieve", "lab/base.img") == ""
    assert capability.refusal("result", mac=MAC) == ""
    assert "does not allow 'store'" in capability.refusal("store", "lab/base.img")
    assert "does not name the image lab/other.img" in capability.refusal("retrieve",
                                                                         "lab/other.img")
    assert f"issued to machine {MAC}, not 525400000001" in capability.refusal(
        "result", mac="525400000001")


def test_an_older_key_still_checks_and_an_operator_matches_patterns():
    operator = Capability("operator:alice", frozenset({"store"}), ("lab/*",), NOW, NOW + 60)
    capability = decode(token(operator, "k0", b"o" * 32), KEYS, NOW)
    assert capability.is_operator
    assert capability.refusal("store", "lab/new.img", mac="525400000001") == ""
    assert "does not name" in capability.refusal("store", "prod/new.img")


def _altered_payload(text: str) -> str:
    prefix, key_id, payload, signature = text.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["i"] = ["*"]
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return ".".join((prefix, key_id, forged, signature))


REFUSED = {
    "empty": ("", "not a pbcap1 token"),
    "other scheme": ("abc.def", "not a pbcap1 token"),
    "unknown key": (token(key_id="k9"), "signed with key 'k9', which this server does not hold"),
    "wrong secret": (token(secret=b"x" * 32), "signature does not match"),
    "altered payload": (_altered_payload(token()), "signature does not match"),
    "too long": ("pbcap1." + "a" * 5000, "at most 4096 bytes"),
    "bad base64": ("pbcap1.k1.!!!.???", "signature does not match"),
}


@pytest.mark.parametrize("text, reason", REFUSED.values(), ids=REFUSED.keys())
def test_refused_tokens(text, reason):
    with pytest.raises(CapabilityError, match=reason):
        decode(text, KEYS, NOW)


def test_expired_and_future_tokens():
    with pytest.raises(CapabilityError, match="expired 5 s ago"):
        decode(token(), KEYS, NOW + 605)
    with pytest.raises(CapabilityError, match="issued in the future"):
        decode(token(), KEYS, NOW - 3600)


@pytest.mark.parametrize("capability, reason", [
    (Capability("not-a-mac", frozenset({"work"}), (), NOW, NOW + 1), "neither a MAC"),
    (Capability(MAC, frozenset({"delete"}), (), NOW, NOW + 1), "unknown operation"),
    (Capability(MAC, frozenset({"work"}), ("x",) * 65, NOW, NOW + 1), "more than 64 images"),
    (Capability(MAC, frozenset({"work"}), (), NOW, NOW), "expires before it was issued"),
])
def test_bad_capabilities_are_not_signed(capability, reason):
    with pytest.raises(CapabilityError, match=reason):
        encode(capability, "k1", KEY)


@pytest.mark.parametrize("header, expected", [
    (None, None), ("", None), ("Bearer abc", "abc"), ("bearer  abc ", "abc"),
    ("Basic abc", None), ("Bearer", None)])
def test_bearer(header, expected):
    assert bearer(header) == expected


@given(st.text(max_size=300))
def test_random_text_raises_only_capability_error(text):
    with pytest.raises(CapabilityError):
        decode("pbcap1.k1." + text, KEYS, NOW)
