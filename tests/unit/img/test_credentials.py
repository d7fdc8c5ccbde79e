"""img/credentials.py: a run's ServerAccess from its options and environment."""

from __future__ import annotations

import argparse
import ssl

import pytest

from img.credentials import ServerAccess, TlsTrust, access_arguments, server_access
from img.errors import Failure

PIN = "ab" * 32


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    access_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("PREBOOT_TOKEN", raising=False)
    monkeypatch.delenv("PREBOOT_SERVER_PIN", raising=False)


def test_nothing_given_is_plain_http_without_a_capability():
    assert server_access(parse()) == ServerAccess()


def test_options_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREBOOT_TOKEN", "from-env")
    monkeypatch.setenv("PREBOOT_SERVER_PIN", "cd" * 32)
    assert server_access(parse()) == ServerAccess("from-env", TlsTrust(pin="cd" * 32))
    assert server_access(parse("--token", "given", "--server-pin", f"sha256:{PIN}")) == \
        ServerAccess("given", TlsTrust(pin=PIN))
    (tmp_path / "t").write_text("from-file\nignored\n")
    assert server_access(parse("--token-file", str(tmp_path / "t"))).token == "from-file"


@pytest.mark.parametrize("argv, message", [
    (("--server-pin", "abc"), "--server-pin: 'abc' is not a SHA-256"),
    (("--server-pin", PIN, "--server-ca", "/etc/hostname"), "not both"),
    (("--server-ca", "/nonexistent/ca.pem"), "cannot read it"),
    (("--token-file", "/nonexistent/token"), "--token-file /nonexistent/token"),
])
def test_unusable_options_are_failures(argv, message):
    with pytest.raises(Failure, match=message):
        server_access(parse(*argv))


def test_a_work_answer_token_replaces_the_token_and_keeps_the_trust():
    access = ServerAccess("operator", TlsTrust(pin=PIN))
    assert access.with_token("work") == ServerAccess("work", TlsTrust(pin=PIN))
    assert access.with_token("") is access


def test_pinned_context_checks_nothing_but_the_pin_and_a_ca_context_checks_the_name():
    pinned = TlsTrust(pin=PIN).context()
    assert pinned.verify_mode == ssl.CERT_NONE and not pinned.check_hostname
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_2
    by_ca = TlsTrust(ca_file=None).context()
    assert by_ca.verify_mode == ssl.CERT_REQUIRED and by_ca.check_hostname
