"""The pure parts of applying an identity: registry value codecs (img/regvalue.py), the Linux
files' rendering (img/identity_linux.py) and `img identity apply`'s arguments, with tables of
malformed input and hypothesis where it is cheap."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.identity import BadIdentity, IpSettings, MachineIdentity
from img import regvalue
from img.identity_cmd import identity_from_args
from img.identity_linux import (render_hosts, render_networkd, render_nm_connection,
                                render_wicked_routes, set_sysconfig)

STATIC = MachineIdentity("pc-1", "lab.example", "", IpSettings("10.0.0.5", 24, "10.0.0.1",
                                                                ("10.0.0.2",)))
DHCP = MachineIdentity("pc-2")

texts = st.text(alphabet=st.characters(blacklist_characters="\0",
                                       blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(texts)
def test_sz_round_trip(text: str) -> None:
    assert regvalue.decode(regvalue.REG_SZ, regvalue.encode_sz(text)) == text


@given(st.lists(texts, max_size=5))
def test_multi_sz_round_trip(items: list[str]) -> None:
    assert regvalue.decode(regvalue.REG_MULTI_SZ, regvalue.encode_multi_sz(items)) == items


@given(st.integers(0, 0xFFFFFFFF))
def test_dword_round_trip(number: int) -> None:
    assert regvalue.decode(regvalue.REG_DWORD, regvalue.encode_dword(number)) == number


def test_windows_forms() -> None:
    assert regvalue.encode_sz("A") == b"A\0\0\0"
    assert regvalue.encode_multi_sz([]) == b"\0\0"
    assert regvalue.encode_multi_sz(["a", "b"]) == b"a\0\0\0b\0\0\0\0\0"
    assert regvalue.decode(regvalue.REG_SZ, b"A\0") == "A"                  # NUL missing
    assert regvalue.decode(regvalue.REG_MULTI_SZ, b"a\0\0\0\0\0x\0") == ["a"]  # past the end


@pytest.mark.parametrize("call, message", [
    (lambda: regvalue.encode_sz("a\0b"), "REG_SZ: text with a NUL"),
    (lambda: regvalue.encode_dword(-1), "REG_DWORD: -1 is outside"),
    (lambda: regvalue.encode_dword(1 << 32), "REG_DWORD: 4294967296 is outside"),
    (lambda: regvalue.encode_multi_sz([""]), "REG_MULTI_SZ: an empty string"),
    (lambda: regvalue.decode(regvalue.REG_DWORD, b"\1\0\0"), "REG_DWORD: 3 bytes, not 4"),
    (lambda: regvalue.decode(regvalue.REG_SZ, b"abc"), "REG_SZ: 3 bytes, not whole"),
    (lambda: regvalue.decode(regvalue.REG_MULTI_SZ, b"\0\xd8"), "REG_MULTI_SZ: not UTF-16LE"),
])
def test_malformed_values(call, message: str) -> None:
    with pytest.raises(regvalue.BadRegValue, match=message):
        call()


@given(st.binary(max_size=64), st.sampled_from([1, 2, 3, 4, 7, 11]))
def test_decode_never_crashes(data: bytes, kind: int) -> None:
    try:
        regvalue.decode(kind, data)
    except regvalue.BadRegValue:
        pass


@pytest.mark.parametrize("before, after", [
    ("127.0.0.1 localhost\n127.0.1.1 old\n", "127.0.0.1 localhost\n127.0.1.1\tpc-1.lab.example pc-1\n"),
    ("127.0.0.1 localhost\n::1 localhost\n",
     "127.0.0.1 localhost\n127.0.1.1\tpc-1.lab.example pc-1\n::1 localhost\n"),
    ("", "127.0.1.1\tpc-1.lab.example pc-1\n"),
    ("# only a comment", "# only a comment\n127.0.1.1\tpc-1.lab.example pc-1\n"),
    ("\n\n127.0.1.1\n", "\n\n127.0.1.1\tpc-1.lab.example pc-1\n"),
])
def test_hosts(before: str, after: str) -> None:
    assert render_hosts(before, STATIC) == after
    assert render_hosts(after, STATIC) == after                 # applying twice changes nothing


def test_hosts_without_suffix() -> None:
    assert render_hosts("127.0.1.1 x\n", DHCP) == "127.0.1.1\tpc-2\n"


@pytest.mark.parametrize("before, after", [
    ("A='1'\nBOOTPROTO='dhcp'\n", "A='1'\nBOOTPROTO='static'\nIPADDR='x'\n"),
    ("export BOOTPROTO=dhcp\nBOOTPROTO=again\n", "BOOTPROTO='static'\nIPADDR='x'\n"),
    ("# BOOTPROTO='dhcp'\n", "# BOOTPROTO='dhcp'\nBOOTPROTO='static'\nIPADDR='x'\n"),
    ("", "BOOTPROTO='static'\nIPADDR='x'\n"),
    ("not an assignment\n", "not an assignment\nBOOTPROTO='static'\nIPADDR='x'\n"),
])
def test_sysconfig(before: str, after: str) -> None:
    assert set_sysconfig(before, {"BOOTPROTO": "static", "IPADDR": "x"}) == after


@given(st.text(alphabet="ABC=' #\n\tx", max_size=60))
def test_sysconfig_sets_each_key_once(text: str) -> None:
    out = set_sysconfig(text, {"A": "1", "B": "2"})
    lines = out.splitlines()
    assert lines.count("A='1'") == 1 and lines.count("B='2'") == 1


def test_network_files() -> None:
    assert "method=manual\naddress1=10.0.0.5/24,10.0.0.1\ndns=10.0.0.2;\n" \
           "dns-search=lab.example;\n" in render_nm_connection(STATIC)
    assert "[ipv4]\nmethod=auto\n\n" in render_nm_connection(DHCP)
    assert render_networkd(STATIC).endswith(
        "[Network]\nAddress=10.0.0.5/24\nGateway=10.0.0.1\nDNS=10.0.0.2\nDomains=lab.example\n")
    assert render_networkd(DHCP).endswith("[Network]\nDHCP=ipv4\n")
    assert render_wicked_routes("default 1.2.3.4 - -\n", DHCP) == ""
    assert render_wicked_routes("", STATIC) == "default 10.0.0.1 - -\n"


def _args(**values: str | None) -> argparse.Namespace:
    base = {"name": "pc-1", "dns_suffix": "", "workgroup": "", "ip": None, "gateway": "",
            "dns": ""}
    return argparse.Namespace(**{**base, **values})


def test_arguments() -> None:
    assert identity_from_args(_args(ip="10.0.0.5/24", gateway="10.0.0.1",
                                    dns="10.0.0.2, 10.0.0.3")).ip == IpSettings(
        "10.0.0.5", 24, "10.0.0.1", ("10.0.0.2", "10.0.0.3"))
    assert identity_from_args(_args()).ip is None


@pytest.mark.parametrize("values, message", [
    ({"name": "a_b"}, "name:"),
    ({"ip": "10.0.0.5"}, "--ip 10.0.0.5: expected ADDRESS/PREFIX"),
    ({"ip": "10.0.0.5/x"}, "expected ADDRESS/PREFIX"),
    ({"ip": "10.0.0.500/24"}, "ip.address"),
    ({"ip": "10.0.0.5/33"}, "ip.prefix_len"),
    ({"ip": "10.0.0.5/24", "gateway": "10.9.0.1"}, "ip.gateway"),
    ({"ip": "10.0.0.5/24", "dns": "1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4"}, "ip.dns_servers"),
    ({"gateway": "10.0.0.1"}, "--gateway and --dns go with --ip"),
    ({"dns_suffix": "bad..suffix"}, "dns_suffix:"),
    ({"workgroup": "a" * 16}, "workgroup:"),
])
def test_bad_arguments(values: dict[str, str], message: str) -> None:
    with pytest.raises(BadIdentity, match=message):
        identity_from_args(_args(**values))
