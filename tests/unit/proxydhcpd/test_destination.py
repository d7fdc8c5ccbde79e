"""proxydhcpd.destination: where a reply goes (RFC 2131 section 4.1, PXE 2.1 port 4011).

The table is what the daemon did before the rule became one function (server.py had it twice,
once per request path); the fast/full equivalence tests in test_fastpath.py check that both
paths still send there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxydhcpd.destination import BROADCAST, reply_destination

from .test_packet import discover

RELAY, CLIENT = "10.1.2.1", "10.0.0.50"
NOBODY = ("0.0.0.0", 68)                # a client without an address yet
FLAG_ON, FLAG_OFF = 0x8000, 0


def request(*, flags=FLAG_ON, ciaddr="0.0.0.0", giaddr="0.0.0.0") -> bytes:
    return discover(flags=flags, ciaddr=ciaddr, giaddr=giaddr)


# (id, request fields, port role, source, expected destination) with ports 67/68
CASES = [
    ("broadcast-flag-set", {}, 67, NOBODY, (BROADCAST, 68)),
    # a proxyDHCP gives no yiaddr to unicast to, so a clear flag broadcasts too
    ("broadcast-flag-clear", {"flags": FLAG_OFF}, 67, NOBODY, (BROADCAST, 68)),
    ("ciaddr", {"ciaddr": CLIENT, "flags": FLAG_OFF}, 67, NOBODY, (CLIENT, 68)),
    ("ciaddr-beats-broadcast-flag", {"ciaddr": CLIENT}, 67, NOBODY, (CLIENT, 68)),
    ("ciaddr-from-its-address", {"ciaddr": CLIENT}, 67, (CLIENT, 68), (CLIENT, 68)),
    # on 67 the source address is not where the reply goes: the client port is
    ("67-source-set-no-ciaddr", {}, 67, (CLIENT, 68), (BROADCAST, 68)),
    ("67-source-other-port", {"ciaddr": CLIENT}, 67, (CLIENT, 4011), (CLIENT, 68)),
    ("relayed", {"giaddr": RELAY}, 67, (RELAY, 67), (RELAY, 67)),
    ("relayed-flag-clear", {"giaddr": RELAY, "flags": FLAG_OFF}, 67, (RELAY, 67), (RELAY, 67)),
    ("relayed-beats-ciaddr", {"giaddr": RELAY, "ciaddr": CLIENT}, 67, (RELAY, 67),
     (RELAY, 67)),
    ("4011-from-4011", {"ciaddr": CLIENT}, 4011, (CLIENT, 4011), (CLIENT, 4011)),
    ("4011-from-68", {"ciaddr": CLIENT}, 4011, (CLIENT, 68), (CLIENT, 68)),
    # the source wins over ciaddr on 4011 (the port the client waits on is the one it sent from)
    ("4011-source-beats-ciaddr", {"ciaddr": "10.0.0.99"}, 4011, (CLIENT, 4011),
     (CLIENT, 4011)),
    ("4011-source-no-ciaddr", {}, 4011, (CLIENT, 4011), (CLIENT, 4011)),
    ("4011-relayed", {"giaddr": RELAY, "ciaddr": CLIENT}, 4011, (RELAY, 4011), (RELAY, 67)),
    ("4011-no-source-ciaddr", {"ciaddr": CLIENT}, 4011, NOBODY, (CLIENT, 68)),
    ("4011-no-source-broadcast", {}, 4011, NOBODY, (BROADCAST, 68)),
]


@pytest.mark.parametrize("fields,role,source,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_destination_table(fields, role, source, expected) -> None:
    assert reply_destination(request(**fields), role, source, 67, 68) == expected


@pytest.mark.parametrize("fields,role,source,expected", [
    ({"giaddr": RELAY}, 67, (RELAY, 1067), (RELAY, 1067)),
    ({"ciaddr": CLIENT}, 67, NOBODY, (CLIENT, 1068)),
    ({}, 67, NOBODY, (BROADCAST, 1068)),
    ({}, 4011, (CLIENT, 4011), (CLIENT, 4011)),      # the source port, not ClientPort
], ids=["relay", "ciaddr", "broadcast", "4011-source"])
def test_destination_uses_the_configured_ports(fields, role, source, expected) -> None:
    """DHCPPort = 1067, ClientPort = 1068: the relay gets the server port, clients the client
    port."""
    assert reply_destination(request(**fields), role, source, 1067, 1068) == expected


@given(flags=st.integers(0, 0xFFFF), role=st.sampled_from([67, 4011]),
       ciaddr=st.sampled_from(["0.0.0.0", CLIENT]), giaddr=st.sampled_from(["0.0.0.0", RELAY]),
       source=st.sampled_from([NOBODY, (CLIENT, 68), (CLIENT, 4011)]))
def test_flags_never_change_the_destination(flags, role, ciaddr, giaddr, source) -> None:
    raw = request(flags=flags, ciaddr=ciaddr, giaddr=giaddr)
    reference = request(flags=0, ciaddr=ciaddr, giaddr=giaddr)
    assert (reply_destination(raw, role, source, 67, 68)
            == reply_destination(reference, role, source, 67, 68))


def test_destination_reads_only_the_header() -> None:
    """A bare 240-byte header (no options) is enough: the rule needs ciaddr and giaddr only."""
    raw = bytearray(240)
    raw[24:28] = bytes((10, 1, 2, 1))
    assert reply_destination(bytes(raw), 67, NOBODY, 67, 68) == (RELAY, 67)
