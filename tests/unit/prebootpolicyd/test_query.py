"""prebootpolicyd.query: query parameters -> MachineFacts or a one-line 400 reason; Host header."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.machine import ATTRIBUTE_KINDS, MachineFacts
from prebootpolicyd.query import (MAX_VALUE_CHARS, BadQuery, authority, host_of,
                                  parse_query, port_of)

# What boot.ipxe makes a real iPXE send (a BIOS VM in qemu).
IPXE_QUERY = ("mac=52-54-00-12-34-56&uuid=8c3d5a9e-1b2f-4c6d-9e8f-0a1b2c3d4e5f&ip=10.0.2.15"
              "&platform=pcbios&arch=i386&ram_mb=&manufacturer=QEMU"
              "&product=Standard%20PC%20%28i440FX%20%2B%20PIIX%2C%201996%29&serial=&asset_tag="
              "&hostname=")


def parse(query: str) -> MachineFacts | BadQuery:
    return parse_query(parse_qsl(query, keep_blank_values=True))


def test_what_ipxe_sends():
    facts = parse(IPXE_QUERY)
    assert facts == MachineFacts(mac="525400123456", uuid="8c3d5a9e-1b2f-4c6d-9e8f-0a1b2c3d4e5f",
                                 ip="10.0.2.15", platform="pcbios", arch="i386",
                                 manufacturer="QEMU",
                                 product="Standard PC (i440FX + PIIX, 1996)")


def test_everything_reported():
    facts = parse("mac=00:C0:4F:DC:2A:B5&ram_mb=8192&disk_mb=512000&ip=fd00::5"
                  "&asset_tag=A-1&serial=SN1&hostname=lab-1&base_image=win.zmg&platform=efi"
                  "&arch=x86_64")
    assert isinstance(facts, MachineFacts)
    assert (facts.mac, facts.ram_mb, facts.disk_mb, facts.ip) == \
        ("00C04FDC2AB5", 8192, 512000, "fd00::5")
    assert (facts.asset_tag, facts.serial, facts.hostname, facts.base_image) == \
        ("A-1", "SN1", "lab-1", "win.zmg")


@pytest.mark.parametrize("mac", ["00c04fdc2ab5", "00:c0:4f:dc:2a:b5", "00-C0-4F-DC-2A-B5",
                                 "00c0.4fdc.2ab5", " 00C04FDC2AB5 "])
def test_mac_spellings(mac):
    facts = parse("mac=" + quote(mac))
    assert isinstance(facts, MachineFacts) and facts.mac == "00C04FDC2AB5"


def test_unknown_names_are_ignored():
    facts = parse("mac=00c04fdc2ab5&color=blue&ram=lots&MAC=zz&x=")
    assert facts == MachineFacts(mac="00C04FDC2AB5")


def test_a_name_given_twice_counts_the_first_time():
    # iPXE passes '&' through: a host name "x&mac=..." must not replace the real MAC
    facts = parse("mac=00c04fdc2ab5&hostname=x&mac=02c04fdc2ab5&ram_mb=1024&ram_mb=bad")
    assert isinstance(facts, MachineFacts)
    assert (facts.mac, facts.hostname, facts.ram_mb) == ("00C04FDC2AB5", "x", 1024)


def test_empty_values_are_unknown():
    facts = parse("mac=00c04fdc2ab5&ram_mb=&ip=&uuid=%20&platform=")
    assert facts == MachineFacts(mac="00C04FDC2AB5")


LONG = "x" * (MAX_VALUE_CHARS + 1)


@pytest.mark.parametrize("query, reason", [
    ("", "mac: required (the client's MAC address)"),
    ("platform=efi", "mac: required (the client's MAC address)"),
    ("mac=", "mac: required (the client's MAC address)"),
    ("mac=%20%20", "mac: required (the client's MAC address)"),
    ("mac=zz", "mac: 'zz' is not a MAC address"),
    ("mac=00c04fdc2ab", "mac: '00c04fdc2ab' is not a MAC address"),
    ("mac=00c04fdc2ab5aa", "mac: '00c04fdc2ab5aa' is not a MAC address"),
    ("mac=00_c0_4f_dc_2a_b5", "mac: '00_c0_4f_dc_2a_b5' is not a MAC address"),
    ("mac=%EF%AC%80%EF%AC%80%EF%AC%80%EF%AC%80%EF%AC%80%EF%AC%80",   # 'ﬀ' upper-cases to 'FF'
     "mac: '\\ufb00\\ufb00\\ufb00\\ufb00\\ufb00\\ufb00' is not a MAC address"),
    ("mac=00c04fdc2ab5&ram_mb=lots", "ram_mb: 'lots' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=-1", "ram_mb: '-1' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=4GB", "ram_mb: '4GB' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=1.5", "ram_mb: '1.5' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=%C2%B2", "ram_mb: '\\xb2' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=%D9%A3", "ram_mb: '\\u0663' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ram_mb=12345678901",
     "ram_mb: '12345678901' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&disk_mb=big", "disk_mb: 'big' is not a whole number of megabytes"),
    ("mac=00c04fdc2ab5&ip=10.0.0", "ip: '10.0.0' is not an IP address"),
    ("mac=00c04fdc2ab5&ip=10.0.0.256", "ip: '10.0.0.256' is not an IP address"),
    ("mac=00c04fdc2ab5&ip=example.com", "ip: 'example.com' is not an IP address"),
    ("mac=00c04fdc2ab5&hostname=a%0Ab", "hostname: 'a\\nb' holds control characters"),
    ("mac=00c04fdc2ab5&serial=%00", "serial: '\\x00' holds control characters"),
    ("mac=00c04fdc2ab5&product=%C2%85", "product: '\\x85' holds control characters"),
    ("mac=00c04fdc2ab5&hostname=" + LONG, f"hostname: longer than {MAX_VALUE_CHARS} characters"),
    ("mac=" + LONG, f"mac: longer than {MAX_VALUE_CHARS} characters"),
])
def test_bad_requests(query, reason):
    result = parse(query)
    assert result == BadQuery(reason)


def test_bad_utf8_is_a_bad_request():
    # what a server that decodes with surrogateescape would hand over
    result = parse_query([("mac", "00c04fdc2ab5"), ("hostname", "caf\udce9")])
    assert result == BadQuery("hostname: 'caf\\udce9' is not valid UTF-8")


def test_a_long_value_is_shown_shortened():
    result = parse("mac=00c04fdc2ab5&ram_mb=" + "9" * 20 + "x")
    assert isinstance(result, BadQuery)
    assert result.reason == "ram_mb: '" + "9" * 20 + "x' is not a whole number of megabytes"
    result = parse("mac=" + "z" * 100)
    assert isinstance(result, BadQuery) and result.reason == f"mac: '{'z' * 40}...' is not a " \
        "MAC address"


# ---- fuzzing: anything a client sends gives facts or a clean one-line reason ----------------

NAMES = st.one_of(st.sampled_from(sorted(ATTRIBUTE_KINDS)), st.text(max_size=12))
VALUES = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"[0-9A-Fa-f:\-. ]{0,20}", fullmatch=True),
    st.from_regex(r"[0-9]{0,12}", fullmatch=True),
    st.from_regex(r"[0-9.:a-f%]{0,40}", fullmatch=True),
    st.sampled_from(["", " ", "00c04fdc2ab5", "1.2.3.4", "::1", "0", "²", "٣", "\x00", "\udce9",
                     "ﬀﬀﬀﬀﬀﬀ", "1e3", "0x10", "+5", "NaN", "∞"]),
)


def _check_result(result: object) -> None:
    assert isinstance(result, (MachineFacts, BadQuery))
    if isinstance(result, BadQuery):
        assert result.reason and "\n" not in result.reason and "\r" not in result.reason
        result.reason.encode("ascii")                    # fits any log and any 400 body
        assert len(result.reason) < 400
    else:
        assert result.mac is not None and len(result.mac) == 12


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=14))
def test_arbitrary_parameters_never_raise(items):
    _check_result(parse_query(items))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=10))
def test_arbitrary_parameters_after_a_good_mac(items):
    _check_result(parse_query([("mac", "00:c0:4f:dc:2a:b5")] + items))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_query_strings(text):
    _check_result(parse_query(parse_qsl(text, keep_blank_values=True)))


# ---- the authority for URLs back to us ------------------------------------------------------

@pytest.mark.parametrize("host, expected", [
    ("10.0.0.1:8090", "10.0.0.1:8090"),
    ("10.0.0.1", "10.0.0.1"),
    ("imaging.example.org:8090", "imaging.example.org:8090"),
    ("imaging", "imaging"),
    ("[fd00::1]:8090", "[fd00::1]:8090"),
    ("[::1]", "[::1]"),
])
def test_authority_from_a_plain_host_header(host, expected):
    assert authority(host, "192.0.2.1", 8090) == expected


@pytest.mark.parametrize("host", [None, "", "a b", "evil\n#!ipxe", "x${net0/ip}", "h:port",
                                  "h:123456", "-bad", "a..b", "user@host", "h/x", "[::1",
                                  "a;b", "h:80 || shell", "[fd00::1]x"])
def test_authority_falls_back_to_the_local_address(host):
    assert authority(host, "192.0.2.1", 8090) == "192.0.2.1:8090"
    assert authority(host, "fd00::2", 8090) == "[fd00::2]:8090"


@pytest.mark.parametrize("text, host", [
    ("10.0.0.1:8090", "10.0.0.1"), ("10.0.0.1", "10.0.0.1"), ("[fd00::1]:8090", "[fd00::1]"),
    ("[fd00::1]", "[fd00::1]"), ("name.example:1", "name.example"),
])
def test_host_of(text, host):
    assert host_of(text) == host


@pytest.mark.parametrize("text, port", [
    ("10.0.0.1:8090", 8090), ("10.0.0.1", 80), ("[fd00::1]:8090", 8090), ("[fd00::1]", 80),
    ("name.example:1", 1), ("name.example", 80), ("name:99999", 80),
])
def test_port_of(text, port):
    assert port_of(text, 80) == port
