"""The firewalld service files open exactly the ports the daemons listen on by default, are
well-formed firewalld XML, and the RPM installs each with its daemon."""

from __future__ import annotations

import importlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from common.daemon.config import defaults

REPO = Path(__file__).resolve().parents[2]
FIREWALLD = REPO / "packaging" / "firewalld"
SPEC = (REPO / "packaging" / "rpm" / "preboot.spec").read_text()


def _default(package: str, key: str) -> int:
    return defaults(importlib.import_module(f"{package}.config").SCHEMA)[key]


SERVICES = {
    "preboot-proxydhcp": {("udp", _default("proxydhcpd", "DHCPPort")),
                          ("udp", _default("proxydhcpd", "BootServerPort"))},
    "preboot-tftp": {("udp", _default("tftpd", "Port"))},
    "preboot-policy": {("tcp", _default("prebootpolicyd", "Port"))},
    "preboot-imaging": {("tcp", _default("imgsrvd", "Port")),
                        ("udp", _default("imgsrvd", "MulticastPort"))},
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_file_opens_the_default_ports(name):
    root = ET.parse(FIREWALLD / f"{name}.xml").getroot()
    assert root.tag == "service"
    assert root.findtext("short") and root.findtext("description")
    ports = {(p.get("protocol"), int(p.get("port"))) for p in root.findall("port")}
    assert ports == SERVICES[name]
    # nothing but what firewalld's service schema knows
    assert {child.tag for child in root} <= {"short", "description", "port", "helper",
                                             "module", "destination", "include"}


def test_every_file_is_installed_by_the_rpm():
    assert sorted(p.stem for p in FIREWALLD.glob("*.xml")) == sorted(SERVICES)
    for name in SERVICES:
        assert f"%{{_prefix}}/lib/firewalld/services/{name}.xml" in SPEC
    assert "packaging/firewalld/preboot-$svc.xml" in SPEC
