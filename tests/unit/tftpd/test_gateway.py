"""tftpd/gateway.py: which TFTP names tftpd asks the policy service for, and how."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tftpd.gateway import (MAX_FACTS, GatewayRequest, base_url, gateway_request)

NAMES = [
    ("grub/grub.cfg", GatewayRequest("/grub.cfg")),
    ("/grub/grub.cfg", GatewayRequest("/grub.cfg")),
    # GRUB reads this one first: an administrator's own file there still wins
    ("grub/x86_64-efi/grub.cfg", None),
    ("grub/grub.cfg.bak", None),
    ("undionly.kpxe", None),
    ("preboot/linux", None),
    ("preboot/policy.grub", None),                    # no facts: not the prefix with '/'
    ("preboot/policy.grub/", GatewayRequest("/policy.grub")),
    ("preboot/policy.grub/mac=52:54:00:01:02:03/ip=10.0.0.5",
     GatewayRequest("/policy.grub", (("mac", "52:54:00:01:02:03"), ("ip", "10.0.0.5")))),
    ("/preboot/policy.grub/mac=aa/product=Imaging E2E",
     GatewayRequest("/policy.grub", (("mac", "aa"), ("product", "Imaging E2E")))),
    # a value with '/' (an SMBIOS string) stays whole
    ("preboot/policy.grub/mac=aa/product=HP 800 G3/SFF/serial=X1",
     GatewayRequest("/policy.grub", (("mac", "aa"), ("product", "HP 800 G3/SFF"),
                                     ("serial", "X1")))),
    # empty values are sent (policyd takes them as not reported)
    ("preboot/policy.grub/mac=aa/serial=",
     GatewayRequest("/policy.grub", (("mac", "aa"), ("serial", "")))),
    # a segment before any fact, or with a name that is not one, is not a fact
    ("preboot/policy.grub/junk/mac=aa/=x/9a=b",
     GatewayRequest("/policy.grub", (("mac", "aa/=x/9a=b"),))),
]


@pytest.mark.parametrize("name,expected", NAMES)
def test_names(name, expected):
    assert gateway_request(name) == expected


def test_query_is_percent_encoded_and_order_kept():
    asked = gateway_request("preboot/policy.grub/mac=aa/product=A&B=C D/serial=#1")
    assert asked.url("http://10.0.0.2:8090/") == (
        "http://10.0.0.2:8090/policy.grub?mac=aa&product=A%26B%3DC+D&serial=%231")


def test_facts_are_bounded():
    name = "preboot/policy.grub/" + "/".join(f"k{n}=v" for n in range(MAX_FACTS + 10))
    assert len(gateway_request(name).query) == MAX_FACTS


def test_base_url_takes_the_address_asked():
    assert base_url("http://{server}:8090", "192.168.77.2") == "http://192.168.77.2:8090"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600))
def test_any_name_gives_none_or_a_bounded_request(name):
    asked = gateway_request(name)
    if asked is None:
        return
    assert asked.path in ("/grub.cfg", "/policy.grub")
    assert len(asked.query) <= MAX_FACTS
    assert all(key.isidentifier() for key, _ in asked.query)
    url = asked.url("http://127.0.0.1:8090")
    assert url.startswith("http://127.0.0.1:8090/") and " " not in url and "#" not in url
