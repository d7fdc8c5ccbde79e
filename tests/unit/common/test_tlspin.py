"""common/tlspin.py: pins as people and programs write them, malformed ones refused with the
reason, and the fingerprint of a real certificate as openssl computes it."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, strategies as st

from common.tlspin import PinError, fingerprint, parse_pin, pem_fingerprint

HEX = "773cb7973710b94b188984793b987f1220af4d5c5fc9f5bf6fd204a3c4f5127d"


@pytest.mark.parametrize("text", [
    HEX, HEX.upper(), f"sha256:{HEX}", f"SHA256:{HEX}", f"  {HEX}\n",
    ":".join(HEX[i:i + 2] for i in range(0, 64, 2)).upper(),
])
def test_written_forms_of_one_pin(text):
    assert parse_pin(text) == HEX


@pytest.mark.parametrize("text", [
    "", "sha256:", HEX[:-1], HEX + "0", HEX[:-1] + "g", f"sha1:{HEX}", f"md5:{HEX}",
    HEX.replace("7", " "), "\x1b[31m" + HEX,
])
def test_malformed_pins_are_refused(text):
    with pytest.raises(PinError, match="is not a SHA-256 certificate fingerprint"):
        parse_pin(text)


@given(st.text(max_size=200))
def test_parse_pin_raises_only_pin_error(text):
    try:
        assert len(parse_pin(text)) == 64
    except PinError as exc:
        assert len(str(exc)) < 300           # the echoed text is bounded


def test_fingerprint_of_a_real_certificate_matches_openssl(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=test"], check=True,
                   capture_output=True, timeout=60)
    printed = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint",
                              "-sha256"], check=True, capture_output=True, text=True,
                             timeout=60).stdout
    assert pem_fingerprint(str(cert)) == parse_pin(printed.split("=", 1)[1])
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True,
                         capture_output=True, timeout=60).stdout
    assert fingerprint(der) == pem_fingerprint(str(cert))


def test_a_file_without_a_certificate(tmp_path):
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PinError, match="holds no PEM certificate"):
        pem_fingerprint(str(tmp_path / "key.pem"))
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(PinError):
        pem_fingerprint(str(tmp_path / "bad.pem"))
