"""Identity policies (common.policy.identitypolicy), their policy file form, the SQLite
assignment log, and the protocol's identity fields: names, pools, malformed input tables."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, strategies as st

from common.identity import MachineIdentity, identity_to_wire
from common.imaging import protocol
from common.imaging.protocol import BadRequest
from common.machine import MachineFacts
from common.policy.directory import open_directory
from common.policy.identityassign import identity_for
from common.policy.identitypolicy import (KIND_ADDRESS, AddressPool, IdentityPolicy,
                                          NameSource, NoIdentity, plan_identity,
                                          sanitize_name)
from common.policy.model import assign_work
from common.policy.policyfile import PolicyFileError, dump_policy, load_policy

GOOD = """
[rules]
[[lab]]
filter = ""
action = restore
image = a.zmg
identity = lab
[identities]
[[lab]]
naming = counter
prefix = lab-
ip = pool
addresses = 10.0.0.10-10.0.0.11, 10.0.0.20
netmask = 255.255.255.0
gateway = 10.0.0.1
dns_servers = 10.0.0.2, 10.0.0.3
dns_suffix = lab.example
workgroup = LAB
"""


@pytest.mark.parametrize("prefix, text, name", [
    ("pc-", "CZC1234XYZ", "pc-CZC1234XYZ"),
    ("pc-", " SN 12/34 ", "pc-SN-12-34"),
    ("", "--abc--", "abc"),
    ("lab-", "x" * 80, "lab-" + "x" * 59),
    ("", "Ab_c.d", "Ab-c-d"),
])
def test_sanitize_name(prefix, text, name) -> None:
    assert sanitize_name(prefix, text) == name
    MachineIdentity(name)


@pytest.mark.parametrize("prefix, text", [("", "---"), ("", "1234"), ("", "ÄÖÜ")])
def test_sanitize_name_refuses_what_leaves_no_name(prefix, text) -> None:
    with pytest.raises(NoIdentity):
        sanitize_name(prefix, text)


@given(st.text(max_size=100), st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True))
def test_sanitize_name_gives_a_valid_name_or_refuses(text, prefix) -> None:
    try:
        name = sanitize_name(prefix, text)
    except NoIdentity:
        return
    MachineIdentity(name)      # raises if not a host name


def test_plan_by_serial_asset_tag_mac() -> None:
    facts = MachineFacts(mac="00C04FDC2AB5", serial="S1", asset_tag="To Be Filled By O.E.M.")
    assert plan_identity(IdentityPolicy("a", NameSource.SERIAL, "pc-"), facts).name == "pc-S1"
    assert plan_identity(IdentityPolicy("a", NameSource.MAC, "m"), facts).name == \
        "m00C04FDC2AB5"
    with pytest.raises(NoIdentity, match="asset_tag"):       # a firmware placeholder
        plan_identity(IdentityPolicy("a", NameSource.ASSET_TAG), facts)


def test_policy_file_round_trip_and_identity() -> None:
    document = load_policy(GOOD)
    (lab,) = document.policy.identities
    assert lab.pool.prefix_len == 24 and lab.pool.size() == 3
    assert list(lab.pool.addresses()) == ["10.0.0.10", "10.0.0.11", "10.0.0.20"]
    assert load_policy(dump_policy(document)) == document
    assert dump_policy(load_policy(dump_policy(document))) == dump_policy(document)


@pytest.mark.parametrize("change, where", [
    (("naming = counter", "naming = bios"), "naming"),
    (("ip = pool", "ip = static"), "ip"),
    (("addresses = 10.0.0.10-10.0.0.11, 10.0.0.20", "addresses = 10.0.0.300"), "addresses"),
    (("addresses = 10.0.0.10-10.0.0.11, 10.0.0.20", "addresses = 10.0.0.9-10.0.0.1"),
     "addresses"),
    (("addresses = 10.0.0.10-10.0.0.11, 10.0.0.20", "addresses = 10.0.0.10-10.0.1.20"),
     "addresses"),
    (("addresses = 10.0.0.10-10.0.0.11, 10.0.0.20", "addresses = 10.0.0.200-10.0.0.255"),
     "addresses"),
    (("netmask = 255.255.255.0", "netmask = 255.0.255.0"), "netmask"),
    (("netmask = 255.255.255.0", "prefix_len = 33"), "prefix_len"),
    (("netmask = 255.255.255.0", ""), "prefix_len"),
    (("gateway = 10.0.0.1", "gateway = 10.9.0.1"), "gateway"),
    (("dns_servers = 10.0.0.2, 10.0.0.3", "dns_servers = a, b"), "dns_servers"),
    (("dns_suffix = lab.example", "dns_suffix = lab..example"), "dns_suffix"),
    (("workgroup = LAB", "workgroup = LAB WITH SPACES"), "workgroup"),
    (("prefix = lab-", "prefix = lab_"), "prefix"),
    (("prefix = lab-", "prefix = -"), "prefix"),
    (("workgroup = LAB", "colour = blue"), "colour"),
    (("identity = lab", "identity = nosuch"), "nosuch"),
])
def test_malformed_identity_policies_name_the_key(change, where) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(PolicyFileError) as caught:
        load_policy(text, "p.conf")
    assert where in str(caught.value) and "p.conf" in str(caught.value)


def test_dhcp_policies_refuse_pool_keys_and_two_defaults_are_refused() -> None:
    with pytest.raises(PolicyFileError, match="gateway: goes only with ip = pool"):
        load_policy("[identities]\n[[a]]\nip = dhcp\ngateway = 10.0.0.1\n")
    with pytest.raises(PolicyFileError, match="default"):
        load_policy("[identities]\n[[a]]\ndefault = yes\n[[b]]\ndefault = yes\n")
    with pytest.raises(PolicyFileError, match="both hand out 10.0.0.5"):
        load_policy("[identities]\n[[a]]\nip = pool\naddresses = 10.0.0.5\nprefix_len = 24\n"
                    "[[b]]\nip = pool\naddresses = 10.0.0.1-10.0.0.9\nprefix_len = 24\n")


def test_sqlite_assignment_log(tmp_path) -> None:
    document = load_policy(GOOD)
    url = f"sqlite://{tmp_path}/d.db"
    with open_directory(url, create=True) as directory:
        directory.import_document(document)
        policy = directory.policy()
        assert policy == document.policy
        names = []
        for number in range(4):
            facts = MachineFacts(mac=f"00000000000{number}")
            outcome = identity_for(directory, policy, assign_work(policy, None, facts), facts,
                                   None, time.time())
            names.append(outcome.identity.name if outcome.identity else outcome.reason)
        assert names[:3] == ["lab-001", "lab-002", "lab-003"]
        assert "no free address" in names[3]
        assert [a.value for a in directory.assignments("lab") if a.kind == KIND_ADDRESS] == \
            ["10.0.0.10", "10.0.0.11", "10.0.0.20"]
    with open_directory(url) as directory:          # after a restart: the same answers
        facts = MachineFacts(mac="000000000001")
        outcome = identity_for(directory, directory.policy(),
                               assign_work(directory.policy(), None, facts), facts, None, 1.0)
        assert outcome.identity.name == "lab-002" and outcome.assigned == ()


# -- the protocol -------------------------------------------------------------------------------

IDENTITY = MachineIdentity("pc-01", "lab.example", "LAB")


def test_work_request_carries_the_disk_identity() -> None:
    query = protocol.parse_work_request({"mac": "00C04FDC2AB5",
                                         "identity": identity_to_wire(IDENTITY)})
    assert query.identity == IDENTITY
    assert protocol.parse_work_request({"mac": "00C04FDC2AB5"}).identity is None


@pytest.mark.parametrize("identity, field", [
    ("pc-01", "identity"),
    ({"name": "bad name"}, "name"),
    ({"name": "pc", "colour": "x"}, "colour"),
    ({"name": "pc", "ip": {"address": "10.0.0.300", "prefix_len": 24}}, "ip.address"),
    ({"name": "pc", "ip": {"address": "10.0.0.3", "prefix_len": 40}}, "ip.prefix_len"),
    ({"name": "pc", "ip": "dhcp"}, "ip"),
    ({"name": "pc", "workgroup": 7}, "workgroup"),
])
def test_malformed_identity_in_a_work_query_is_400_naming_the_field(identity, field) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_work_request({"mac": "00C04FDC2AB5", "identity": identity})
    assert field in str(caught.value)


def test_answer_identity_round_trip_and_refusals() -> None:
    answer = protocol.identity_fields(IDENTITY, "policy")
    assert protocol.answer_identity(answer) == (IDENTITY, "policy")
    assert protocol.identity_fields(None, "") == {}
    assert protocol.answer_identity({"work": "none"}) == (None, "")
    with pytest.raises(BadRequest, match="identity_source"):
        protocol.answer_identity({"identity": identity_to_wire(IDENTITY),
                                  "identity_source": "guess"})


@pytest.mark.parametrize("identity", [7, ["x"], "x" * 4097])
def test_malformed_identity_in_a_result_is_refused(identity) -> None:
    body = {"mac": "00C04FDC2AB5", "operation": "download", "status": "success",
            "identity": identity}
    with pytest.raises(BadRequest, match="identity"):
        protocol.parse_result(body)


def test_result_identity_is_kept() -> None:
    report = protocol.parse_result({"mac": "00C04FDC2AB5", "operation": "download",
                                    "status": "success", "identity": IDENTITY.describe()})
    assert report.identity == IDENTITY.describe()


def test_pool_bounds() -> None:
    with pytest.raises(ValueError, match="more than"):
        AddressPool(("10.0.0.1-10.1.0.1",), 8)
    assert AddressPool(("10.0.0.1", "10.0.0.1-10.0.0.2"), 24).size() == 2
