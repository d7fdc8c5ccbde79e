"""prebootpolicyd.config: defaults, the hot key, and one-line errors naming file, line and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.daemon.config import defaults
from common.errors import ConfigError
from common.daemon.runner import CommonSettings, _load
from prebootpolicyd.__main__ import SPEC
from prebootpolicyd.config import SCHEMA, STATUS_PORT, Settings, make_settings, parse_hot_key

REPO = Path(__file__).resolve().parents[3]


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "policyd.conf"
    path.write_text(text)
    settings, _common = _load(SPEC, str(path))
    return settings


def error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = tmp_path / "policyd.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        _load(SPEC, str(path))
    message = str(info.value)
    assert "\n" not in message
    return message, path


def test_defaults(tmp_path):
    settings = load(tmp_path, "# nothing set\n")
    assert (settings.ip_address, settings.port) == ("0.0.0.0", 8090)
    assert settings.directory.url.scheme == "sqlite"
    assert settings.directory.url.path == "/var/lib/preboot/directory.db"
    assert settings.directory.credentials == ""
    assert settings.directory.timeout_s == 3.0
    assert settings.fallback == "local"
    assert settings.imaging_server == ""
    assert settings.imaging_kernel == "http://{server}:{port}/boot/preboot/linux"
    assert settings.imaging_initrd == "http://{server}:{port}/boot/preboot/initrd"
    assert settings.boot_files.root == "/srv/tftp"
    assert (settings.boot_files.max_transfers, settings.boot_files.idle_timeout_s) == (1000, 30)
    assert settings.kernel_args == "console=ttyS0 console=tty0 quiet"
    assert (settings.hot_key.label, settings.hot_key.code, settings.hot_key.ipxe) == \
        ("Ctrl-A", 1, "0x01")
    assert settings.workers == 8
    common = settings.common
    assert common.status_port == STATUS_PORT == 9980
    assert common.pid_file == "/run/preboot/policyd.pid"
    assert common.status_socket == "/run/preboot/policyd.sock"


def test_defaults_match_the_schema_defaults():
    values = defaults(SCHEMA)
    settings = make_settings(values, CommonSettings.from_values(values))
    assert settings.port == 8090 and settings.fallback == "local"


def test_values_are_converted(tmp_path):
    settings = load(tmp_path, "\n".join([
        "IPAddress = 10.0.0.5", "Port = 8080", "Directory = sqlite:///srv/policy/dir.db",
        "DirectoryTimeout = 1", "FallbackAnswer = Maintenance",
        "ImagingServer = imaging.example.org", "ImagingKernel = http://{server}/k",
        "ImagingInitrd = http://{server}/i", 'KernelArgs = "console=ttyS0,115200n8   quiet"',
        "MenuHotKey = esc", "Workers = 2", ""]))
    assert (settings.ip_address, settings.port) == ("10.0.0.5", 8080)
    assert settings.directory.url.path == "/srv/policy/dir.db"
    assert settings.directory.timeout_s == 1.0
    assert settings.fallback == "maintenance"
    assert settings.imaging_server == "imaging.example.org"
    assert (settings.imaging_kernel, settings.imaging_initrd) == \
        ("http://{server}/k", "http://{server}/i")
    assert settings.kernel_args == "console=ttyS0,115200n8 quiet"
    assert (settings.hot_key.label, settings.hot_key.code) == ("Esc", 0x1B)
    assert settings.workers == 2


@pytest.mark.parametrize("line", ["Directory = ldap://db.example.com:389/dc=example,dc=com",
                                  "Directory = ldap://db.example.com:389/dc=example, dc=com",
                                  'Directory = "ldap://db.example.com:389/dc=example,dc=com"'])
def test_ldap_base_dn_commas_need_no_quotes(tmp_path, line):
    settings = load(tmp_path, line + "\n")
    assert settings.directory.url.scheme == "ldap"
    assert settings.directory.url.host == "db.example.com:389"
    assert settings.directory.url.base_dn == "dc=example,dc=com"


def test_ipv6_address(tmp_path):
    assert load(tmp_path, "IPAddress = ::1\n").ip_address == "::1"


def test_directory_key_follows_what_opening_depends_on(tmp_path):
    a = load(tmp_path, "Directory = sqlite:///tmp/a.db\n")
    b = load(tmp_path, "Directory = sqlite:///tmp/a.db\nWorkers = 3\n")
    c = load(tmp_path, "Directory = sqlite:///tmp/b.db\n")
    d = load(tmp_path, "Directory = sqlite:///tmp/a.db\nDirectoryTimeout = 7\n")
    assert a.directory == b.directory
    assert a.directory != c.directory and a.directory != d.directory


@pytest.mark.parametrize("text, label, code", [
    ("Ctrl-A", "Ctrl-A", 1), ("ctrl-b", "Ctrl-B", 2), ("CTRL+Z", "Ctrl-Z", 26),
    ("^P", "Ctrl-P", 16), ("Control-E", "Ctrl-E", 5), ("Esc", "Esc", 27),
    ("escape", "Esc", 27), (" Ctrl-C ", "Ctrl-C", 3),
])
def test_hot_keys(text, label, code):
    key = parse_hot_key(text)
    assert key is not None and (key.label, key.code) == (label, code)
    assert key.ipxe == f"0x{code:02x}"


@pytest.mark.parametrize("text", ["", "A", "Ctrl-1", "Ctrl-AA", "Alt-A", "F8", "Ctrl-", "Ctrl+Alt"])
def test_bad_hot_keys(text):
    assert parse_hot_key(text) is None


@pytest.mark.parametrize("line, key, fragment", [
    ("Directory = mysql://db/x", "Directory", "unknown directory scheme"),
    ("Directory = sqlite://relative.db", "Directory", "must be absolute"),
    ("Directory = ldap:///dc=example", "Directory", "no LDAP host"),
    ("Directory = ldap://host", "Directory", "no base DN"),
    ("FallbackAnswer = reboot", "FallbackAnswer", "'reboot' is not local or maintenance"),
    ("MenuHotKey = F8", "MenuHotKey", "'F8' is not Ctrl-A ... Ctrl-Z or Esc"),
    ('ImagingKernel = "tftp://{server}/a b"', "ImagingKernel", "must be one word"),
    ('ImagingInitrd = "#initrd"', "ImagingInitrd", "comment"),
    ("ImagingServer = '10.0.0.1 10.0.0.2'", "ImagingServer", "must be one word"),
    ("KernelArgs = quiet || reboot", "KernelArgs", "'||' would end the iPXE kernel command"),
    ("KernelArgs = quiet ; echo", "KernelArgs", "';' would end"),
    ('KernelArgs = "quiet #x"', "KernelArgs", "'#x' would end"),
    ("Workers = 0", "Workers", "out of range"),
    ("Workers = 65", "Workers", "out of range"),
    ("DirectoryTimeout = 0", "DirectoryTimeout", "out of range"),
    ("Port = 70000", "Port", "out of range"),
    ("IPAddress = 10.0.0", "IPAddress", "not an IP address"),
    ("DirectoryCredentials = creds", "DirectoryCredentials", "only LDAP directories"),
])
def test_bad_value_is_one_line_error_naming_file_line_and_key(tmp_path, line, key, fragment):
    message, path = error(tmp_path, f"# policyd\nLogLevel = INFO\n{line}\n")
    assert message.startswith(f"{path}:3: {key}: "), message
    assert fragment in message


def test_empty_image_kernel_takes_the_default(tmp_path):
    assert load(tmp_path, "ImagingKernel =\n").imaging_kernel == \
        "http://{server}:{port}/boot/preboot/linux"


def test_ldap_credentials_file_is_checked(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("BindDN = cn=policyd,dc=example,dc=com\nPassword = secret\n")
    creds.chmod(0o644)
    message, _path = error(tmp_path, "Directory = ldap://127.0.0.1/dc=example,dc=com\n"
                                     f"DirectoryCredentials = {creds}\n")
    assert "DirectoryCredentials" in message and "chmod 600" in message
    creds.chmod(0o600)
    settings = load(tmp_path, "Directory = ldap://127.0.0.1/dc=example,dc=com\n"
                              "DirectoryCredentials = creds\n")     # relative to the file
    assert settings.directory.credentials == str(creds)
    assert settings.directory.url.scheme == "ldap"


def test_missing_credentials_file(tmp_path):
    message, _path = error(tmp_path, "Directory = ldap://127.0.0.1/dc=example,dc=com\n"
                                     "DirectoryCredentials = /nonexistent/creds\n")
    assert "cannot read the credentials file" in message


def test_check_from_the_command_line(tmp_path):
    path = tmp_path / "policyd.conf"
    path.write_text("FallbackAnswer = nope\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "prebootpolicyd", "--config", str(path),
                             "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 78
    assert result.stderr == \
        f"preboot-policyd: {path}:1: FallbackAnswer: value 'nope' is not local or maintenance\n"
    path.write_text("Port = 8091\n")
    result = subprocess.run([sys.executable, "-m", "prebootpolicyd", "--config", str(path),
                             "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"OK: {path}\n")
