"""The capability key file (common/policy/keyring.py): its syntax, its safety checks, creation,
rotation, and the Keyring noticing a new file by itself."""

from __future__ import annotations

import os
import time

import pytest

from common.policy import keyring
from common.policy.keyring import KeyFileError, Keyring, ensure, parse_keys, read_keys, rotate

SECRET = "ab" * 32


def test_parse_keys_first_signs_all_accepted():
    keys = parse_keys(f"# comment\nnew {SECRET}\n\nold {'cd' * 32}\n", "f")
    assert keys.signing == ("new", bytes.fromhex(SECRET))
    assert set(keys.accepted) == {"new", "old"}


@pytest.mark.parametrize("text, reason", [
    ("", "no key in it"),
    ("k1\n", "f:1: expected 'KEY-ID HEX-SECRET'"),
    (f"k1 {SECRET}z\n", "f:1: expected"),
    ("k1 abcd\n", "shorter than 32 bytes"),
    (f"k1 {SECRET}\nk1 {SECRET}\n", "f:2: key 'k1' is listed twice"),
    ("".join(f"k{n} {SECRET}\n" for n in range(9)), "more than 8 keys"),
])
def test_malformed_key_files(text, reason):
    with pytest.raises(KeyFileError, match=reason):
        parse_keys(text, "f")


def test_ensure_creates_a_private_file_once(tmp_path):
    path = str(tmp_path / "etc" / "imaging.key")
    assert ensure(path) is True
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = read_keys(path)
    assert ensure(path) is False and read_keys(path) == first
    assert not [p for p in os.listdir(tmp_path / "etc") if p.startswith(".")]


def test_a_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "imaging.key"
    path.write_text(f"k1 {SECRET}\n")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable or writable by others.*chmod 600"):
        read_keys(str(path))
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(KeyFileError, match="cannot open"):
        read_keys(str(link))


def test_rotate_keeps_the_previous_key(tmp_path):
    path = str(tmp_path / "imaging.key")
    ensure(path)
    old_id = read_keys(path).signing_id
    time.sleep(1.1)                        # key ids carry the second they were made
    new_id = rotate(path)
    keys = read_keys(path)
    assert keys.signing_id == new_id != old_id and set(keys.accepted) == {new_id, old_id}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_keyring_reads_a_changed_file_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    monkeypatch.setattr(keyring, "RECHECK_S", 0.0)
    path = tmp_path / "imaging.key"
    with pytest.raises(KeyFileError, match="No such file"):
        Keyring(str(path)).keys()
    ensure(str(path))
    ring = Keyring(str(path))
    first = ring.keys().signing_id
    time.sleep(1.1)
    rotate(str(path))
    assert ring.keys().signing_id != first
    good = ring.keys()
    path.chmod(0o644)                      # a broken update: the last good keys stay
    os.utime(path, None)
    assert ring.keys() == good and "readable or writable by others" in ring.last_error
