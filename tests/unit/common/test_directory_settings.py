"""common.policy.directory.settings: the directory keys every directory-reading daemon shares."""

from __future__ import annotations

import pytest

from common.policy.directory.settings import DirectorySettings, directory_keys, directory_settings
from common.policy.directory import DirectoryError, open_directory
from common.errors import SettingError
from imgsrvd.config import SCHEMA as IMGSRVD_SCHEMA
from prebootpolicyd.config import SCHEMA as POLICYD_SCHEMA

NAMES = ("Directory", "DirectoryCredentials", "DirectoryTimeout")


def values(url: str = "sqlite:///tmp/d.db", credentials: str = "", timeout: int = 3) -> dict:
    # configobj's "strings" check splits an unquoted LDAP base DN at its commas
    return {"Directory": url.split(","), "DirectoryCredentials": credentials,
            "DirectoryTimeout": timeout}


def keys_of(schema) -> dict:
    return {key.name: key for key in schema.keys if key.name in NAMES}


def test_both_daemons_take_the_same_keys_with_the_same_checks_and_defaults():
    policyd, imgsrvd = keys_of(POLICYD_SCHEMA), keys_of(IMGSRVD_SCHEMA)
    assert set(policyd) == set(imgsrvd) == set(NAMES)
    for name in NAMES:
        assert (policyd[name].check, policyd[name].default) == \
            (imgsrvd[name].check, imgsrvd[name].default)
    # what a slow query means differs per daemon, and each says it
    assert "FallbackAnswer" in policyd["DirectoryTimeout"].doc
    assert "503" in imgsrvd["DirectoryTimeout"].doc


def test_an_ldap_base_dn_is_joined_back_at_its_commas():
    settings = directory_settings(values("ldap://db.example.com/dc=example,dc=com"))
    assert settings.url.base_dn == "dc=example,dc=com"
    assert settings.text == "ldap://db.example.com/dc=example,dc=com"


@pytest.mark.parametrize("given, key, words", [
    (values("http://x/"), "Directory", "sqlite"),
    (values("sqlite:///tmp/d.db", credentials="/etc/passwd"), "DirectoryCredentials",
     "only LDAP"),
    (values("ldap://h/dc=x", credentials="/nonexistent/creds"), "DirectoryCredentials", ""),
])
def test_bad_values_name_their_key(given, key, words):
    with pytest.raises(SettingError) as caught:
        directory_settings(given)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_equal_settings_keep_the_directory_open_and_any_change_reopens_it():
    a = directory_settings(values())
    assert a == directory_settings(values())
    assert a != directory_settings(values("sqlite:///tmp/other.db"))
    assert a != directory_settings(values(timeout=7))
    assert isinstance(a, DirectorySettings) and a.timeout_s == 3.0


def test_open_never_creates_a_sqlite_store(tmp_path):
    """The daemons' way in: a missing file is an error (preboot-dir creates it)."""
    settings = directory_settings(values(f"sqlite://{tmp_path}/dir.db"))
    with pytest.raises(DirectoryError, match="no such database file"):
        settings.open()
    assert not (tmp_path / "dir.db").exists()
    open_directory(f"sqlite://{tmp_path}/dir.db", create=True).close()
    directory = settings.open()
    try:
        assert directory.policy().rules == ()
    finally:
        directory.close()


def test_keys_document_themselves():
    for key in directory_keys("slower queries do X."):
        assert key.doc, key.name
