"""The trust settings and the Gate (common/policy/trust.py): AllowedClients, and the refusal
each request without the right capability gets."""

from __future__ import annotations

import ipaddress

import pytest

from common.errors import SettingError
from common.policy.capability import decode
from common.policy.keyring import ensure, read_keys
from common.policy.trust import (Gate, Refused, TrustSettings, client_allowed, trust_settings)

MAC = "00C04FDC2AB5"
NOW = 1_800_000_000
LAB = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("address, allowed", [
    ("10.1.2.3", True), ("10.2.0.1", False), ("::ffff:10.1.0.9", True), ("fd00::1", True),
    ("fe80::1%eth0", False), ("", False), (None, False), ("not-an-address", False)])
def test_client_allowed(address, allowed):
    assert client_allowed(address, LAB) is allowed
    assert client_allowed(address, ()) is True


def test_allowed_clients_setting_names_the_key():
    values = {"TokenKeyFile": "/k", "TokenLifetime": 60, "AllowAnonymous": False,
              "AllowedClients": ["10.1.0.0/16", " 192.168.7.0/24"]}
    assert len(trust_settings(values).allowed_clients) == 2
    with pytest.raises(SettingError, match="AllowedClients.*'10.1.0.300/16'"):
        trust_settings({**values, "AllowedClients": ["10.1.0.300/16"]})


@pytest.fixture
def gate(tmp_path) -> Gate:
    settings = TrustSettings(str(tmp_path / "imaging.key"), 600, False, ())
    gate = Gate(settings)
    assert gate.prepare() == []           # creates the key file
    return gate


def test_gate_issues_and_checks(gate):
    token = gate.issue(MAC, ("retrieve", "result"), ("lab/base.img",), NOW)
    capability = gate.authorize(f"Bearer {token}", "retrieve", NOW, image="lab/base.img")
    assert capability is not None and capability.subject == MAC
    assert decode(token, read_keys(gate.settings.key_file).accepted, NOW).expires_at == NOW + 600


@pytest.mark.parametrize("authorization, operation, kwargs, status, reason", [
    (None, "retrieve", {"image": "lab/base.img"}, 401, "'retrieve' needs a capability"),
    ("Bearer pbcap1.x.y.z", "retrieve", {}, 401, "capability refused: the token was signed"),
    ("TOKEN", "store", {"image": "lab/base.img"}, 403, "does not allow 'store'"),
    ("TOKEN", "retrieve", {"image": "lab/x.img"}, 403, "does not name the image lab/x.img"),
    ("TOKEN", "result", {"mac": "525400000001"}, 403, "issued to machine 00C04FDC2AB5"),
])
def test_gate_refusals(gate, authorization, operation, kwargs, status, reason):
    if authorization == "TOKEN":
        token = gate.issue(MAC, ("retrieve", "result"), ("lab/base.img",), NOW)
        authorization = f"Bearer {token}"
    with pytest.raises(Refused, match=reason) as caught:
        gate.authorize(authorization, operation, NOW, **kwargs)
    assert caught.value.status == status


def test_open_mode_serves_without_a_capability_and_warns(tmp_path):
    gate = Gate(TrustSettings(str(tmp_path / "k"), 600, True, ()))
    assert any("AllowAnonymous = YES" in w for w in gate.prepare())
    assert gate.authorize(None, "store", NOW, image="any.img") is None


def test_unreadable_keys_refuse_with_503_and_issue_nothing(tmp_path):
    path = tmp_path / "imaging.key"
    path.write_text("k1 " + "ab" * 32 + "\n")
    path.chmod(0o644)
    gate = Gate(TrustSettings(str(path), 600, False, ()))
    assert any("readable or writable by others" in w for w in gate.prepare())
    with pytest.raises(Refused, match="cannot check capabilities") as caught:
        gate.authorize("Bearer pbcap1.k1.a.b", "work", NOW, mac=MAC)
    assert caught.value.status == 503
    assert gate.issue(MAC, ("work",), (), NOW) is None
    with pytest.raises(Refused, match="not in AllowedClients"):
        Gate(TrustSettings(str(path), 600, False, LAB)).check_client("192.0.2.1")
