"""proxydhcpd.fastpath and packet.scan: the per-packet fast path answers exactly as the full path
(packet.parse + decide.decide + reply.ReplyBuilder.build) does, byte for byte, on the golden
captures, the malformed table and generated packets; and the server's two request paths count
and send the same."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.daemon.config import defaults
from common.daemon.runner import CommonSettings
from proxydhcpd import decide, fastpath, packet, reply, server
from proxydhcpd.secureboot import SecureBootClients
from proxydhcpd.config import SCHEMA, make_settings

from .test_golden import EXPECTED, NEXT_SERVER, SERVER, _client, policies
from .test_packet import COOKIE, MALFORMED, discover, header

MAC = bytes.fromhex("00c04fdc2ab5")


def reference(datagram: bytes, port: int, policy: decide.Policy, srv: str,
              next_server: str = "0.0.0.0") -> tuple:
    """What the full path does: ("malformed", reason) or (kind, outcome, reply bytes)."""
    try:
        request = packet.parse(datagram)
    except packet.MalformedPacket as exc:
        return "malformed", str(exc)
    kind = packet.MESSAGE_NAMES.get(request.message_type or 0, "other")
    plan = decide.decide(request, port, policy, srv)
    if isinstance(plan, decide.Ignore):
        return kind, f"ignore {plan.counter}", None
    nxt = next_server if next_server != "0.0.0.0" else srv
    if plan.to_boot_server:
        nxt = srv
    return kind, f"reply {plan.firmware}", reply.ReplyBuilder().build(plan, request, srv, nxt)


def fast(fp: fastpath.FastPath, datagram: bytes, port: int, srv: str) -> tuple:
    try:
        scanned = fp.scan(datagram)
    except packet.MalformedPacket as exc:
        return "malformed", str(exc)
    if scanned is None:
        return reference(datagram, port, fp.policy, srv, fp.next_server)
    outcome, data = fp.answer(datagram, scanned, port, srv)
    if data is None:
        return outcome.kind, f"ignore {outcome.ignore.counter}", None
    return outcome.kind, f"reply {outcome.plan.firmware}", data


# ---- golden captures ------------------------------------------------------------------------


@pytest.mark.parametrize("case", EXPECTED, ids=[c.id for c in EXPECTED])
def test_fast_path_matches_golden(case) -> None:
    client = _client(case)
    fp = fastpath.FastPath(policies()[case.policy], "0.0.0.0")
    for _ in range(2):                       # the second time from the caches
        kind, outcome, data = fast(fp, client.payload, client.port, SERVER)
        assert kind == case.message
        assert outcome.split()[0] == case.outcome.split()[0]
        assert data == case.data
    assert (fp.misses, fp.hits) == (1, 1)
    assert packet.scan(client.payload) is not None


def test_golden_in_one_fast_path_all_interleaved() -> None:
    """All golden requests through one FastPath per policy, twice, interleaved."""
    fps = {name: fastpath.FastPath(p, "0.0.0.0") for name, p in policies().items()}
    for _ in range(2):
        for case in EXPECTED:
            client = _client(case)
            assert fast(fps[case.policy], client.payload, client.port, SERVER)[2] == case.data


# ---- malformed ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,reason", MALFORMED, ids=[f"{n}-{r}" for n, (_, r) in
                                                      enumerate(MALFORMED)])
def test_scan_rejects_the_malformed_table_as_parse_does(raw, reason) -> None:
    with pytest.raises(packet.MalformedPacket) as parsed:
        packet.parse(raw)
    fp = fastpath.FastPath(policies()["default"], "0.0.0.0")
    for scanner in (packet.scan, fp.scan):
        try:
            result = scanner(raw)
        except packet.MalformedPacket as exc:
            assert str(exc) == str(parsed.value)
        else:  # overloaded areas: only parse() reads those, and it rejects them
            assert result is None and ("in file" in reason or "in sname" in reason)


def test_scan_sends_overload_and_pieces_to_the_full_parser() -> None:
    assert packet.scan(header() + COOKIE + b"\x35\x01\x01\x34\x01\x01\xff") is None
    assert packet.scan(header() + COOKIE + b"\x3c\x03PXE\x3c\x06Client\xff") is None
    # a repeated option the decision does not read stays on the fast path
    assert packet.scan(header() + COOKIE + b"\x37\x01\x01\x37\x01\x02\xff") is not None


# ---- the layout memo ------------------------------------------------------------------------


def test_layout_memo_takes_only_requests_equal_but_for_option_97(monkeypatch) -> None:
    fp = fastpath.FastPath(policies()["default"], "0.0.0.0")
    first = discover()
    other_guid = discover().replace(bytes(range(1, 17)), bytes(range(17, 33)))
    uefi = discover().replace(b"Arch:00000", b"Arch:00007")  # same length, other option 60
    assert len(first) == len(other_guid) == len(uefi) and first != other_guid
    expected = [packet.scan(raw) for raw in (first, other_guid, uefi)]
    calls = []
    real = packet.scan_at
    monkeypatch.setattr(packet, "scan_at", lambda d: calls.append(1) or real(d))
    assert fp.scan(first) == expected[0]
    assert fp.scan(other_guid) == expected[1]
    assert len(calls) == 1, "same layout, another GUID: no second walk"
    assert fp.scan(uefi) == expected[2] and len(calls) == 2
    # same length, but option 97 ends where another option starts: a different layout
    no_guid = header() + COOKIE + b"\x35\x01\x01\x3c\x09PXEClient\xff"
    with_guid = header() + COOKIE + b"\x35\x01\x01\x61\x09PXEClient\xff"
    for raw in (no_guid, with_guid, no_guid, with_guid):
        assert fp.scan(raw) == packet.scan(raw)
    empty_guid = header() + COOKIE + b"\x61\x00\xff"
    assert fp.scan(empty_guid) == fp.scan(empty_guid) == ((1, None, None, None, None, None,
                                                           False), b"\x61\x00")
    with pytest.raises(packet.MalformedPacket):   # header checks still apply after a match
        fp.scan(bytes((1, 1, 17)) + empty_guid[3:])


# ---- generated packets ----------------------------------------------------------------------

VENDORS = [b"PXEClient:Arch:00000:UNDI:002001", b"PXEClient:Arch:00007:UNDI:003016",
           b"PXEClient", b"HTTPClient:Arch:00016:UNDI:003001", b"HTTPClient", b"MSFT 5.0",
           b"PXEClient:Arch:0001", b""]
OTHER_MAC = bytes.fromhex("525400123456")

_values = {
    53: st.sampled_from([b"\x01", b"\x03", b"\x08", b"\x05", b"", b"\x01\x01"]),
    60: st.sampled_from(VENDORS),
    93: st.sampled_from([b"\x00\x00", b"\x00\x07", b"\x00\x09", b"\x00\x06", b"\x00\x0b",
                         b"\x00\x10", b"\x00\x13", b"\x00", b"", b"\x00\x07\x00\x00"]),
    77: st.sampled_from([b"iPXE", b"\x04iPXE", b"\x03abc\x04iPXE", b"\x00", b"other"]),
    175: st.binary(max_size=6),
    97: st.binary(max_size=20),
    43: st.sampled_from([b"\x47\x04\x80\x00\x00\x00\xff", b"\x47\x04\x00\x00\x00\x00\xff",
                         b"\x47\x02\x80\x00", b"\x47", b"\x06\x01\x08\xff"]),
    55: st.binary(max_size=40),
    52: st.sampled_from([b"\x01", b"\x02", b"\x03"]),
}
_option = st.sampled_from(sorted(_values)).flatmap(
    lambda code: st.tuples(st.just(code), _values[code]))


@st.composite
def requests(draw) -> bytes:
    raw = bytearray(header(op=draw(st.sampled_from([1, 1, 1, 1, 1, 2])),
                           hlen=draw(st.sampled_from([6, 6, 0, 16]))))
    raw[1] = draw(st.sampled_from([1, 6]))
    raw[4:8] = draw(st.binary(min_size=4, max_size=4))
    raw[10:12] = draw(st.sampled_from([b"\x80\x00", b"\x00\x00", b"\xff\xff"]))
    raw[12:16] = draw(st.sampled_from([bytes(4), bytes((10, 0, 0, 50))]))
    raw[24:28] = draw(st.sampled_from([bytes(4), bytes((10, 1, 2, 1))]))
    raw[28:44] = draw(st.sampled_from([MAC, OTHER_MAC])) + draw(st.binary(min_size=10,
                                                                          max_size=10))
    raw[44:236] = draw(st.sampled_from([bytes(192), b"\x3c\x04PXEC\xff" + bytes(185)]))
    likely = st.sampled_from([True, True, True, True, False])
    options = [(53, draw(st.sampled_from([b"\x01", b"\x03", b"\x01", b"\x03"]) | _values[53]))
               if draw(likely) else None,
               (60, draw(st.sampled_from(VENDORS[:5]) | _values[60])) if draw(likely) else None,
               (93, draw(_values[93])) if draw(likely) else None,
               (97, draw(_values[97])) if draw(likely) else None]
    options = [o for o in options if o is not None] + draw(st.lists(_option, max_size=4))
    options = draw(st.permutations(options))
    area = b"".join(bytes((code, len(value))) + value for code, value in options)
    area = draw(st.sampled_from([b"", b"\x00"])) + area + draw(st.sampled_from(
        [b"\xff", b"\xff", b"\xff", b"\xff\x35\x01\x01", b"", b"\x35"]))
    return bytes(raw) + COOKIE + area


_POLICIES = {
    "default": policies()["default"],
    "no-4011": policies()["uefi-via-4011-no"],
    "deny": dataclasses.replace(policies()["default"], denied_macs=frozenset({MAC})),
    "allow": dataclasses.replace(policies()["default"], allowed_macs=frozenset({OTHER_MAC})),
    "menu": dataclasses.replace(policies()["default"],
                                menu=decide.BootMenu(True, "Press F8", 3)),
    "no-ipxe": dataclasses.replace(policies()["default"], files=dataclasses.replace(
        policies()["default"].files, ipxe_script="", http="http://{server}/boot.efi")),
    # the Secure Boot chain by MAC, by the relay's network, by our interface's: the cache key
    # must tell those clients apart although the template leaves MAC and giaddr out
    "secure-mac": dataclasses.replace(policies()["default"], secure_boot=SecureBootClients(
        macs=frozenset({MAC}))),
    "secure-relay": dataclasses.replace(policies()["default"], secure_boot=SecureBootClients(
        networks=(ipaddress.IPv4Network("10.1.2.0/24"),))),
    "secure-local": dataclasses.replace(policies()["default"], secure_boot=SecureBootClients(
        networks=(ipaddress.IPv4Network("10.0.0.0/30"),))),
}
# One FastPath per (policy, next server) shared by all examples: later examples hit what
# earlier ones cached, which is what the cache keys must get right.
_SHARED = {(name, nxt): fastpath.FastPath(p, nxt)
           for name, p in _POLICIES.items() for nxt in ("0.0.0.0", "10.9.9.9")}


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=requests(), port=st.sampled_from([67, 4011]),
       which=st.sampled_from(sorted(_SHARED)), srv=st.sampled_from([SERVER, "10.0.0.1", "10.0.0.9"]))
def test_fast_path_agrees_with_the_full_path_on_generated_requests(raw, port, which, srv):
    fp = _SHARED[which]
    want = reference(raw, port, fp.policy, srv, fp.next_server)
    assert fast(fp, raw, port, srv) == want
    assert fast(fp, raw, port, srv) == want
    try:
        scanned = packet.scan(raw)
    except packet.MalformedPacket:
        return
    if scanned is None:
        return
    (op, v53, v60, v93, v77, v43, has175), guid = scanned
    request = packet.parse(raw)
    options = request.options
    assert op == request.op
    for code, value in ((53, v53), (60, v60), (93, v93), (77, v77), (43, v43)):
        assert options.get(code) == value
    assert has175 == (175 in options)
    expected_guid = options.get(97)
    assert guid == (None if expected_guid is None else
                    packet.encode_option(97, expected_guid))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=240, max_size=600))
def test_scan_and_parse_reject_the_same_random_bytes(raw):
    raw = raw[:236] + COOKIE + raw[240:] if raw[0:1] in (b"\x01", b"\x02") else raw
    try:
        packet.parse(raw)
        parsed = None
    except packet.MalformedPacket as exc:
        parsed = str(exc)
    try:
        scanned = packet.scan(raw)
    except packet.MalformedPacket as exc:
        assert str(exc) == parsed
        return
    assert scanned is None or parsed is None


# ---- the server's two request paths ---------------------------------------------------------


class RecordingSocket:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple] = []
        self.fail = fail

    def sendmsg(self, buffers, ancillary, flags, destination):
        if self.fail:
            raise OSError(101, "Network is unreachable")
        self.sent.append((b"".join(buffers), list(ancillary), destination))
        return 300


def _server(**changes) -> server.ProxyDhcpServer:
    values = defaults(SCHEMA)
    values.update({"IPAddress": SERVER, **changes})
    return server.ProxyDhcpServer(make_settings(values, CommonSettings.from_values(values)))


def _run_both(packets_in, **changes):
    results = []
    for path in ("_on_request", "_on_request_full"):
        srv = _server(**changes)
        sock = RecordingSocket()
        for raw, port, source in packets_in:
            getattr(srv, path)(sock, port, raw, source, None)
        results.append((srv.counters(), sock.sent))
    return results


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(requests(), st.sampled_from([67, 4011]),
                          st.sampled_from([("0.0.0.0", 68), ("10.0.0.50", 4011)])),
                max_size=12))
def test_server_fast_and_full_paths_count_and_send_the_same(batch):
    fast_result, full_result = _run_both(batch)
    assert fast_result == full_result


def test_server_paths_agree_on_golden_and_malformed() -> None:
    batch = [(_client(c).payload, c.port, (_client(c).source, 68)) for c in EXPECTED]
    batch += [(raw, 67, ("0.0.0.0", 68)) for raw, _ in MALFORMED]
    fast_result, full_result = _run_both(batch * 2)
    assert fast_result == full_result
    counters = fast_result[0]
    assert counters["malformed"] == 2 * len(MALFORMED)
    assert counters["offers_sent"] + counters["acks_sent"] == len(fast_result[1]) > 0


def test_server_paths_agree_on_interfaces_and_send_errors(caplog) -> None:
    raw = discover()
    for path in ("_on_request", "_on_request_full"):
        srv = _server(Interfaces=["eth9"])
        getattr(srv, path)(RecordingSocket(), 67, raw, ("0.0.0.0", 68),
                           socket.if_nametoindex("lo"))
        assert srv.stats.ignored_other == 1 and srv.stats.offers_sent == 0
        srv = _server()
        with caplog.at_level(logging.WARNING, logger="preboot.proxydhcpd"):
            getattr(srv, path)(RecordingSocket(fail=True), 67, raw, ("0.0.0.0", 68), None)
        assert srv.stats.send_errors == 1 and srv.stats.offers_sent == 0
        assert "cannot send to 255.255.255.255:68 for 00:c0:4f:dc:2a:b5" in caplog.text
        caplog.clear()


def test_server_fast_path_logs_no_boot_file_at_info(caplog) -> None:
    ipxe = discover((77, b"iPXE"))
    for path in ("_on_request", "_on_request_full"):
        srv = _server(IPXEScriptURL="")
        with caplog.at_level(logging.INFO, logger="preboot.proxydhcpd"):
            getattr(srv, path)(RecordingSocket(), 67, ipxe, ("0.0.0.0", 68), None)
        assert srv.stats.no_boot_file == 1
        assert ("ignored DISCOVER from 00:c0:4f:dc:2a:b5 (0.0.0.0:68): iPXE asked, but "
                "IPXEScriptURL is not set") in caplog.text
        caplog.clear()


def test_server_uses_the_full_path_at_debug(monkeypatch) -> None:
    srv = _server()
    used = []
    monkeypatch.setattr(srv, "_on_request_full", lambda *a: used.append("full"))
    monkeypatch.setattr(srv, "_on_request", lambda *a: used.append("fast"))

    class OneDatagram:
        def __init__(self):
            self.left = 1

        def recvmsg(self, *_):
            if not self.left:
                raise BlockingIOError
            self.left -= 1
            return discover(), [], 0, ("0.0.0.0", 68)

    logger = logging.getLogger("preboot.proxydhcpd")
    old = logger.level
    try:
        for level in (logging.WARNING, logging.DEBUG):
            logger.setLevel(level)
            srv._on_readable(OneDatagram(), 67)
    finally:
        logger.setLevel(old)
    assert used == ["fast", "full"]


def test_settings_reload_gets_a_new_fast_path() -> None:
    import asyncio

    srv = _server()
    raw = discover()
    sock = RecordingSocket()
    srv._on_request(sock, 67, raw, ("0.0.0.0", 68), None)
    values = defaults(SCHEMA)
    values.update({"IPAddress": SERVER, "DeniedMACs": [MAC.hex()]})
    asyncio.run(srv.apply(make_settings(values, CommonSettings.from_values(values))))
    srv._on_request(sock, 67, raw, ("0.0.0.0", 68), None)
    assert srv.stats.offers_sent == 1 and srv.stats.denied_mac == 1


def test_next_server_is_kept_in_the_template() -> None:
    fp = fastpath.FastPath(policies()["default"], "10.9.9.9")
    _, _, data = fast(fp, discover(), 67, SERVER)
    assert data[20:24] == socket.inet_aton("10.9.9.9")
    _, _, data = fast(fastpath.FastPath(policies()["default"], "0.0.0.0"), discover(), 67, SERVER)
    assert data[20:24] == socket.inet_aton(NEXT_SERVER)
