"""common.daemon.services: the registry the daemons and zmgmcast both read."""

from __future__ import annotations

import pytest

from common.daemon import services
from common.daemon.config import defaults
from imgsrvd.__main__ import SPEC as IMGSRVD_SPEC
from imgsrvd.status import ImagingCounters
from prebootpolicyd.__main__ import SPEC as POLICYD_SPEC
from prebootpolicyd.status import PolicyCounters
from proxydhcpd.__main__ import SPEC as PROXYDHCPD_SPEC
from proxydhcpd.status import ProxyCounters
from tftpd.__main__ import SPEC as TFTPD_SPEC
from tftpd.status import TftpCounters

DAEMONS = [  # registry entry, the daemon's spec, a snapshot of its counters
    (services.PROXYDHCPD, PROXYDHCPD_SPEC, ProxyCounters().snapshot()),
    (services.TFTPD, TFTPD_SPEC, TftpCounters().snapshot(0)),
    (services.POLICYD, POLICYD_SPEC, PolicyCounters().snapshot()),
    (services.IMGSRVD, IMGSRVD_SPEC, ImagingCounters().snapshot()),
]


def test_the_registry_holds_the_four_daemons_in_zmgmcast_order():
    assert [s.name for s in services.SERVICES] == ["proxydhcpd", "tftpd", "policyd", "imgsrvd"]
    assert [s.status_port for s in services.SERVICES] == [9967, 9969, 9980, 9998]
    assert services.by_name("tftpd") is services.TFTPD and services.by_name("x") is None
    assert services.by_status_port(9998) is services.IMGSRVD
    assert services.by_status_port(1) is None
    assert services.TFTPD.status_socket() == "/run/preboot/tftpd.sock"
    assert services.TFTPD.status_socket("/tmp/run") == "/tmp/run/tftpd.sock"


@pytest.mark.parametrize("service,spec,counters", DAEMONS, ids=[d[0].name for d in DAEMONS])
def test_each_daemon_reads_its_entry(service, spec, counters):
    assert spec.service is service
    assert (spec.name, spec.program, spec.service_name) == (
        service.name, service.program, service.display_name)
    assert spec.default_config == f"/etc/preboot/{service.name}.conf"
    values = defaults(spec.schema)
    assert values["StatusPort"] == service.status_port
    assert values["StatusSocket"] == service.status_socket()
    assert values["PidFile"] == service.pid_file()
    # zmgmcast's order and labels name counters the daemon has
    assert set(service.counter_order) <= set(counters)
    assert {key for key, _label in service.counter_labels} <= set(counters)
