"""common.identity: the one shape of a machine's identity, and its JSON form."""

import pytest

from common.identity import (BadIdentity, IpSettings, MachineIdentity, identity_from_wire,
                             identity_to_wire)

GOOD = MachineIdentity("lab-pc-07", "lab.example.com", "LAB",
                       IpSettings("10.1.2.7", 24, "10.1.2.1", ("10.1.2.2", "10.1.2.3")))


def test_round_trip_static_and_dhcp():
    assert identity_from_wire(identity_to_wire(GOOD)) == GOOD
    dhcp = MachineIdentity("pc1")
    assert identity_from_wire(identity_to_wire(dhcp)) == dhcp
    assert identity_to_wire(dhcp)["ip"] is None


def test_derived_values():
    assert GOOD.ip.netmask == "255.255.255.0"
    assert MachineIdentity("a-very-long-host-name-01").netbios_name == "A-VERY-LONG-HOS"
    assert GOOD.describe() == ("name=lab-pc-07 dns_suffix=lab.example.com workgroup=LAB "
                               "ip=10.1.2.7/24 gateway=10.1.2.1 dns=10.1.2.2,10.1.2.3")


@pytest.mark.parametrize("wire, field", [
    ([], "identity"),
    ({"name": "pc1", "colour": "red"}, "colour"),
    ({"name": ""}, "name"),
    ({"name": "-pc"}, "name"),
    ({"name": "pc_1"}, "name"),
    ({"name": "123"}, "name"),
    ({"name": "x" * 64}, "name"),
    ({"name": "pc\n1"}, "name"),
    ({"name": 7}, "name"),
    ({"name": "pc1", "dns_suffix": "a..b"}, "dns_suffix"),
    ({"name": "pc1", "workgroup": "a/b"}, "workgroup"),
    ({"name": "pc1", "workgroup": "W" * 16}, "workgroup"),
    ({"name": "pc1", "ip": "dhcp"}, "ip"),
    ({"name": "pc1", "ip": {"address": "10.0.0.300", "prefix_len": 24}}, "ip.address"),
    ({"name": "pc1", "ip": {"address": "10.0.0.3", "prefix_len": 33}}, "ip.prefix_len"),
    ({"name": "pc1", "ip": {"address": "10.0.0.3", "prefix_len": True}}, "ip.prefix_len"),
    ({"name": "pc1", "ip": {"address": "10.0.0.3", "prefix_len": 24,
                            "gateway": "10.0.1.1"}}, "ip.gateway"),
    ({"name": "pc1", "ip": {"address": "10.0.0.3", "prefix_len": 24,
                            "dns_servers": ["1.1.1.1"] * 4}}, "ip.dns_servers"),
    ({"name": "pc1", "ip": {"address": "10.0.0.3", "prefix_len": 24, "mtu": 9000}}, "ip.mtu"),
])
def test_malformed_identities_name_their_field(wire, field):
    with pytest.raises(BadIdentity) as caught:
        identity_from_wire(wire)
    assert str(caught.value).startswith(field)
