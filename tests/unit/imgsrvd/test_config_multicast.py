"""imgsrvd's multicast keys: defaults into EngineSettings, an empty value is the default, and
one-line errors naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.daemon.runner import _load
from common.errors import ConfigError
from imgsrvd.__main__ import SPEC
from imgsrvd.config import Settings
from imgsrvd.multicast.model import EngineSettings


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "imgsrvd.conf"
    path.write_text(text)
    settings, _common = _load(SPEC, str(path))
    return settings


def test_defaults(tmp_path):
    settings = load(tmp_path, "# nothing\nMulticastTTL =\n")
    assert settings.multicast == EngineSettings(
        control_address="0.0.0.0", control_port=997, interface_address="", ttl=1,
        max_bitrate_kbit_s=0, min_receiver_rate_kbit_s=1000, max_receiver_loss=0.2,
        finish_timeout_s=300.0, max_sessions=16, max_receivers=256)
    assert settings.data_port == 997


def test_values(tmp_path):
    settings = load(tmp_path, "IPAddress = 10.1.2.3\nMulticastPort = 0\nMulticastTTL = 4\n"
                              "MaxBitrate = 500000\nMinReceiverRate = 0\nMaxReceiverLoss = 100\n"
                              "MulticastFinishTimeout = 60\nMaxSessions = 2\n"
                              "MaxSessionReceivers = 40\n")
    engine = settings.multicast
    assert (engine.control_address, engine.control_port, engine.interface_address) == \
        ("10.1.2.3", 0, "10.1.2.3")
    assert (engine.ttl, engine.max_bitrate_kbit_s, engine.min_receiver_rate_kbit_s) == \
        (4, 500000, 0)
    assert (engine.max_receiver_loss, engine.finish_timeout_s) == (1.0, 60.0)
    assert (engine.max_sessions, engine.max_receivers) == (2, 40)
    assert settings.data_port == 997          # a free control port; data still to 997


def test_an_interface_address_and_an_ipv6_service_address(tmp_path):
    settings = load(tmp_path, "IPAddress = ::\nMulticastInterface = 192.168.7.1\n")
    assert settings.multicast.control_address == "0.0.0.0"
    assert settings.multicast.interface_address == "192.168.7.1"


def test_no_sessions_no_multicast(tmp_path):
    assert load(tmp_path, "MaxSessions = 0\n").multicast is None


@pytest.mark.parametrize("text, line, key, fragment", [
    ("MulticastPort = 70000\n", 1, "MulticastPort", "out of range"),
    ("# x\nMulticastTTL = 0\n", 2, "MulticastTTL", "out of range"),
    ("MaxReceiverLoss = 0\n", 1, "MaxReceiverLoss", "out of range"),
    ("MaxSessionReceivers = many\n", 1, "MaxSessionReceivers", "not an integer"),
    ("Port = 998\nMulticastInterface = eth0\n", 2, "MulticastInterface",
     "not an IPv4 address"),
    ("MulticastInterface = fe80::1\n", 1, "MulticastInterface", "multicast is IPv4 only"),
    ("MulticastFinishTimeout = 5\n", 1, "MulticastFinishTimeout", "out of range"),
])
def test_errors_name_file_line_and_key(tmp_path, text, line, key, fragment):
    path = tmp_path / "imgsrvd.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        _load(SPEC, str(path))
    message = str(info.value)
    assert "\n" not in message
    assert f"{path}:{line}" in message and key in message and fragment in message
