"""common.daemon.config: the shared config syntax and its one-line errors."""

from pathlib import Path

import pytest

from common.daemon.config import Key, Schema, defaults, load_config, render_reference
from common.errors import ConfigError

SCHEMA = Schema((
    Key("Port", "integer(min=0, max=65535)", "69"),
    Key("AllowWrite", "boolean", "NO"),
    Key("Root", "path", "/srv/tftp"),
    Key("IPAddress", "ip_addr", "0.0.0.0"),
    Key("LogLevel", "loglevel", "INFO"),
    Key("MenuPrompt", "string", "Press F8"),
    Key("AllowedMACs", "strings", ""),
))


def load(tmp_path: Path, text: str):
    path = tmp_path / "d.conf"
    path.write_text(text)
    return load_config(str(path), SCHEMA)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_defaults_when_file_is_empty(tmp_path):
    assert load(tmp_path, "# only a comment\n") == defaults(SCHEMA)
    assert defaults(SCHEMA)["Port"] == 69 and defaults(SCHEMA)["AllowWrite"] is False


def test_values_are_converted(tmp_path):
    values = load(tmp_path, "Port = 6969\nAllowWrite = YES\nIPAddress = 10.0.0.1\n"
                            "LogLevel = debug  # inline comment\nAllowedMACs = aa, bb\n")
    assert values["Port"] == 6969
    assert values["AllowWrite"] is True
    assert values["IPAddress"] == "10.0.0.1"
    assert values["LogLevel"] == "DEBUG"
    assert values["AllowedMACs"] == ["aa", "bb"]


@pytest.mark.parametrize("word,expected", [("yes", True), ("NO", False), ("Yes", True),
                                           ("no", False)])
def test_booleans_are_yes_no_in_any_case(tmp_path, word, expected):
    assert load(tmp_path, f"AllowWrite = {word}\n")["AllowWrite"] is expected


def test_empty_value_takes_the_default(tmp_path):
    values = load(tmp_path, "Port =\nAllowWrite =\nRoot =\n")
    assert values["Port"] == 69 and values["AllowWrite"] is False and values["Root"] == "/srv/tftp"


def test_relative_paths_are_relative_to_the_config_folder(tmp_path):
    assert load(tmp_path, "Root = files/tftp\n")["Root"] == str(tmp_path / "files" / "tftp")


@pytest.mark.parametrize("text,expected", [
    ("Port = abc\n", "d.conf:1: Port: value 'abc' is not an integer"),
    ("\n\nPort = 70000\n", "d.conf:3: Port: value '70000' is out of range (min 0, max 65535)"),
    ("AllowWrite = maybe\n", "d.conf:1: AllowWrite: value 'maybe' is not YES or NO"),
    ("IPAddress = 1.2.3\n", "d.conf:1: IPAddress: value '1.2.3' is not an IP address"),
    ("LogLevel = LOUD\n", "d.conf:1: LogLevel: value 'LOUD' is not one of"),
    ("# x\nPrt = 1\n", "d.conf:2: Prt: unknown key (did you mean Port?)"),
    ("port = 1\n", "d.conf:1: port: unknown key (did you mean Port?)"),
    ("Port = 1\nPort = 2\n", "d.conf:2: Port: key given twice"),
    ("Port 69\n", "d.conf:1: not a 'Key = Value' line"),
    ("[section]\nPort = 1\n", "d.conf:1: [section]: sections are not supported"),
    ("MenuPrompt = a, b\n", "MenuPrompt: value 'a, b' is a list; quote values"),
])
def test_errors_are_one_line_naming_file_line_and_key(tmp_path, text, expected):
    message = error(tmp_path, text)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "d.conf"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.conf"), SCHEMA)
    assert str(info.value).endswith("absent.conf: file not found")


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "bin.conf"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), SCHEMA)
    assert "not a UTF-8 text file" in str(info.value)


def test_reference_lists_every_key_commented_with_its_default():
    text = render_reference(SCHEMA)
    for key in SCHEMA.keys:
        assert f"#{key.name} = {key.default}" in text
