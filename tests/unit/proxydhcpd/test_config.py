"""proxydhcpd.config: defaults, MAC lists, and one-line errors naming file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.daemon.config import defaults, load_config
from common.errors import ConfigError, SettingError
from common.daemon.runner import CommonSettings, _load
from proxydhcpd.__main__ import SPEC
from proxydhcpd.config import SCHEMA, STATUS_PORT, Settings, make_settings, parse_mac

REPO = Path(__file__).resolve().parents[3]


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "proxydhcpd.conf"
    path.write_text(text)
    settings, _common = _load(SPEC, str(path))
    return settings


def error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = tmp_path / "proxydhcpd.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        _load(SPEC, str(path))
    message = str(info.value)
    assert "\n" not in message
    return message, path


def test_defaults(tmp_path):
    settings = load(tmp_path, "# nothing set\n")
    assert settings.ip_address == "0.0.0.0"
    assert settings.interfaces == ()
    assert settings.listen_67 is True and settings.listen_4011 is True
    assert (settings.dhcp_port, settings.boot_server_port, settings.client_port) == (67, 4011, 68)
    assert settings.next_server == "0.0.0.0"
    files = settings.policy.files
    assert (files.bios, files.uefi32, files.uefi64, files.arm64, files.http, files.ipxe_script) \
        == ("undionly.kpxe", "", "ipxe.efi", "", "", "boot.ipxe")
    assert settings.policy.uefi_via_4011 is True
    menu = settings.policy.menu
    assert (menu.enabled, menu.prompt, menu.timeout_s) == (False, "Press F8 for the boot menu", 3)
    assert settings.policy.allowed_macs == frozenset() == settings.policy.denied_macs
    common = settings.common
    assert common.status_port == STATUS_PORT == 9967
    assert common.pid_file == "/run/preboot/proxydhcpd.pid"
    assert common.status_socket == "/run/preboot/proxydhcpd.sock"
    assert (common.log_level, common.log_file) == ("INFO", "")


def test_empty_values_take_defaults(tmp_path):
    settings = load(tmp_path, "BootFileBIOS =\nDHCPPort =\nAllowedMACs =\nUEFIVia4011 =\n")
    assert settings.policy.files.bios == "undionly.kpxe"
    assert settings.dhcp_port == 67 and settings.policy.uefi_via_4011 is True
    assert settings.policy.allowed_macs == frozenset()


def test_defaults_match_the_schema_defaults():
    values = defaults(SCHEMA)
    settings = make_settings(values, CommonSettings.from_values(values))
    assert settings.policy.files.uefi64 == "ipxe.efi"


def test_values_are_converted(tmp_path):
    settings = load(tmp_path, "\n".join([
        "IPAddress = 10.0.0.1", "Interfaces = eth0, eth1", "ListenPort67 = NO",
        "DHCPPort = 1067", "BootServerPort = 14011", "ClientPort = 1068",
        "NextServer = 10.0.0.2", "BootFileBIOS = pxe/undionly.kpxe", "BootFileUEFI32 = i32.efi",
        "BootFileARM64 = arm.efi", "BootFileHTTP = http://{server}/ipxe.efi",
        "IPXEScriptURL = http://{server}:8080/boot.ipxe", "UEFIVia4011 = no", "BootMenu = yes",
        "MenuPrompt = Press F8", "MenuTimeout = 10", ""]))
    assert settings.ip_address == "10.0.0.1" and settings.interfaces == ("eth0", "eth1")
    assert settings.listen_67 is False and settings.listen_4011 is True
    assert (settings.dhcp_port, settings.boot_server_port, settings.client_port) == \
        (1067, 14011, 1068)
    assert settings.next_server == "10.0.0.2"
    files = settings.policy.files
    assert (files.bios, files.uefi32, files.arm64, files.http, files.ipxe_script) == \
        ("pxe/undionly.kpxe", "i32.efi", "arm.efi", "http://{server}/ipxe.efi",
         "http://{server}:8080/boot.ipxe")
    assert settings.policy.uefi_via_4011 is False
    assert settings.policy.menu.enabled and settings.policy.menu.prompt == "Press F8"
    assert settings.policy.menu.timeout_s == 10


# ---- MAC lists ------------------------------------------------------------------------------

MAC = bytes.fromhex("00c04fdc2ab5")


@pytest.mark.parametrize("text", ["00C04FDC2AB5", "00:c0:4f:dc:2a:b5", "00-C0-4F-DC-2A-B5",
                                  "00:C0:4F:DC:2A:B5", "00c0.4fdc.2ab5"])
def test_parse_mac_forms(text):
    assert parse_mac(text) == MAC


@pytest.mark.parametrize("text", ["", "00C04FDC2AB", "00C04FDC2AB5AA", "00:c0:4f:dc:2a:zz",
                                  "g0c04fdc2ab5", "00_c0_4f_dc_2a_b5", "0xc04fdc2ab5"])
def test_parse_mac_rejects(text):
    assert parse_mac(text) is None


def test_mac_lists_with_and_without_separators(tmp_path):
    settings = load(tmp_path,
                    "AllowedMACs = 00C04FDC2AB5, 00:c0:4f:dc:2a:b6, 00-C0-4F-DC-2A-B7\n"
                    "DeniedMACs = 02:00:00:00:00:01\n")
    assert settings.policy.allowed_macs == frozenset(
        {MAC, bytes.fromhex("00c04fdc2ab6"), bytes.fromhex("00c04fdc2ab7")})
    assert settings.policy.denied_macs == frozenset({bytes.fromhex("020000000001")})


def test_single_mac_and_duplicates(tmp_path):
    settings = load(tmp_path, "DeniedMACs = 00C04FDC2AB5, 00:C0:4F:DC:2A:B5\n")
    assert settings.policy.denied_macs == frozenset({MAC})


@pytest.mark.parametrize("key", ["AllowedMACs", "DeniedMACs"])
@pytest.mark.parametrize("bad", ["00:c0:4f:dc:2a", "nonsense", "00:c0:4f:dc:2a:b5:01"])
def test_bad_mac_is_one_line_error_naming_file_line_and_key(tmp_path, key, bad):
    message, path = error(tmp_path, f"# proxy\nBootMenu = NO\n{key} = 00C04FDC2AB5, {bad}\n")
    assert message == f"{path}:3: {key}: '{bad}' is not a MAC address"


def test_bad_mac_from_make_settings_is_a_setting_error(tmp_path):
    path = tmp_path / "p.conf"
    path.write_text("DeniedMACs = 01:02\n")
    values = load_config(str(path), SCHEMA)
    with pytest.raises(SettingError) as info:
        make_settings(values, CommonSettings.from_values(values))
    assert info.value.key == "DeniedMACs" and "'01:02' is not a MAC address" in info.value.message


# ---- values that cannot work ----------------------------------------------------------------


def test_both_listen_ports_no_is_an_error(tmp_path):
    message, path = error(tmp_path, "ListenPort67 = NO\nLogLevel = INFO\nListenPort4011 = NO\n")
    assert message.startswith(f"{path}:3: ListenPort4011: ")
    assert "both ListenPort67 and ListenPort4011 are NO" in message


@pytest.mark.parametrize("listen67,listen4011", [("YES", "NO"), ("NO", "YES")])
def test_one_listen_port_is_fine(tmp_path, listen67, listen4011):
    settings = load(tmp_path, f"ListenPort67 = {listen67}\nListenPort4011 = {listen4011}\n")
    assert (settings.listen_67, settings.listen_4011) == (listen67 == "YES", listen4011 == "YES")


@pytest.mark.parametrize("key", ["BootFileBIOS", "BootFileUEFI32", "BootFileUEFI64",
                                 "BootFileARM64", "BootFileHTTP", "IPXEScriptURL"])
def test_over_long_boot_file_is_an_error(tmp_path, key):
    message, path = error(tmp_path, f"LogLevel = DEBUG\n{key} = {'a' * 128}\n")
    assert message == f"{path}:2: {key}: longer than the 127 bytes the DHCP file field holds"
    settings = load(tmp_path, f"{key} = {'a' * 127}\n")
    assert "a" * 127 in (settings.policy.files.bios, settings.policy.files.uefi32,
                         settings.policy.files.uefi64, settings.policy.files.arm64,
                         settings.policy.files.http, settings.policy.files.ipxe_script)


@pytest.mark.parametrize("text,key,fragment", [
    ("DHCPPort = 0\n", "DHCPPort", "out of range"),
    ("BootServerPort = 65536\n", "BootServerPort", "out of range"),
    ("ClientPort = abc\n", "ClientPort", "not an integer"),
    ("MenuTimeout = 256\n", "MenuTimeout", "out of range"),
    ("UEFIVia4011 = maybe\n", "UEFIVia4011", "is not YES or NO"),
    ("NextServer = 10.0.0.300\n", "NextServer", "is not an IPv4 address"),
    ("BootFileBios = x\n", "BootFileBios", "unknown key (did you mean BootFileBIOS?)"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, key, fragment):
    message, path = error(tmp_path, text)
    assert message.startswith(f"{path}:1: {key}: ") and fragment in message


@pytest.mark.parametrize("key", ["IPAddress", "NextServer"])
def test_ipv6_address_is_a_config_error(tmp_path, key):
    error(tmp_path, f"{key} = ::1\n")


def test_same_dhcp_and_boot_server_port_is_an_error(tmp_path):
    error(tmp_path, "DHCPPort = 4011\nBootServerPort = 4011\n")


def test_check_exits_78_with_one_line(tmp_path):
    path = tmp_path / "proxydhcpd.conf"
    path.write_text("AllowedMACs = 00:11\n")
    done = subprocess.run([sys.executable, "-m", "proxydhcpd", "--check", "--config", str(path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert done.stderr == (f"preboot-proxydhcpd: {path}:1: AllowedMACs: "
                           f"'00:11' is not a MAC address\n")
    path.write_text("AllowedMACs = 00:11:22:33:44:55\n")
    done = subprocess.run([sys.executable, "-m", "proxydhcpd", "--check", "--config", str(path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"OK: {path}\n"


@pytest.mark.parametrize("value,problem", [
    ("bogus", "'bogus' is not all, a MAC address or an IPv4 network"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not all"),
])
def test_secure_boot_clients_errors(value, problem):
    values = defaults(SCHEMA)
    values["SecureBootClients"] = [value]
    with pytest.raises(SettingError) as caught:
        make_settings(values, CommonSettings.from_values(values))
    assert caught.value.key == "SecureBootClients" and problem in str(caught.value)


def test_secure_boot_clients_parse():
    values = defaults(SCHEMA)
    values["SecureBootClients"] = ["ALL", "00-C0-4F-DC-2A-B5", "10.1.0.0/16"]
    secure = make_settings(values, CommonSettings.from_values(values)).policy.secure_boot
    assert secure.everyone and bytes.fromhex("00c04fdc2ab5") in secure.macs
    assert str(secure.networks[0]) == "10.1.0.0/16"
