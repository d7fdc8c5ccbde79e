"""common.daemon.metrics: status counters in the Prometheus text format (0.0.4), checked by
hand and against prometheus_client's own parser, and fuzzed with hypothesis."""

from __future__ import annotations

import asyncio
import math
import re
import socket

import pytest
from hypothesis import given, settings, strategies as st

from common.daemon import services
from common.daemon.logsetup import escape_control
from common.daemon.metrics import (MAX_KINDS, MAX_LABEL_CHARS, NAME_RE, OTHER_KIND,
                                   escape_label_value, format_value, metric_name, render_metrics)
from common.daemon.statussock import StatusServer, bind_tcp
from imgsrvd.status import ImagingCounters
from prebootpolicyd.bootfiles import BootFileCounters
from prebootpolicyd.status import PolicyCounters
from proxydhcpd.status import ProxyCounters
from tftpd.status import TftpCounters

parser = pytest.importorskip("prometheus_client.parser")

SNAPSHOTS = [
    (services.PROXYDHCPD, ProxyCounters().snapshot()),
    (services.TFTPD, TftpCounters().snapshot(0)),
    (services.POLICYD, {**PolicyCounters().snapshot(), **BootFileCounters().snapshot()}),
    (services.IMGSRVD, ImagingCounters().snapshot()),
]
SAMPLE_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{kind="(?:[^"\\\n]|\\[\\"n])*"\})? '
                         r"(-?[0-9][0-9.e+-]*|NaN|[+-]Inf)$")


def families(text: str) -> dict:
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def check_lines(text: str) -> None:
    """Every line is a HELP, a TYPE (for a valid name) or a sample of the 0.0.4 grammar."""
    assert text.endswith("\n") or text == ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert NAME_RE.match(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split(" ")
            assert NAME_RE.match(name) and kind in ("counter", "gauge")
        else:
            assert SAMPLE_LINE.match(line), line


def test_tftpd_by_hand():
    counters = {"bytes_sent": 600, "active_transfers": 2,
                "errors": {"file_not_found": 1, "timeout": 3}}
    text = render_metrics(services.TFTPD, counters, 1764160000.5)
    assert text == (
        "# HELP preboot_tftpd_start_time_seconds Preboot TFTP Service: start time, seconds "
        "since the epoch\n"
        "# TYPE preboot_tftpd_start_time_seconds gauge\n"
        "preboot_tftpd_start_time_seconds 1764160000.5\n"
        "# HELP preboot_tftpd_bytes_sent_total Preboot TFTP Service: Bytes sent\n"
        "# TYPE preboot_tftpd_bytes_sent_total counter\n"
        "preboot_tftpd_bytes_sent_total 600\n"
        "# HELP preboot_tftpd_active_transfers Preboot TFTP Service: Active transfers\n"
        "# TYPE preboot_tftpd_active_transfers gauge\n"
        "preboot_tftpd_active_transfers 2\n"
        "# HELP preboot_tftpd_errors_total Preboot TFTP Service: Errors, by kind\n"
        "# TYPE preboot_tftpd_errors_total counter\n"
        'preboot_tftpd_errors_total{kind="file_not_found"} 1\n'
        'preboot_tftpd_errors_total{kind="timeout"} 3\n')
    parsed = families(text)
    assert parsed["preboot_tftpd_bytes_sent"].type == "counter"
    assert parsed["preboot_tftpd_active_transfers"].type == "gauge"
    assert {s.labels["kind"]: s.value for s in parsed["preboot_tftpd_errors"].samples} == {
        "file_not_found": 1, "timeout": 3}


@pytest.mark.parametrize("service,counters", SNAPSHOTS, ids=[s.name for s, _c in SNAPSHOTS])
def test_every_daemon_counter_is_a_family(service, counters):
    """Each counter of each daemon's status reply is one family, its gauges typed gauge, and
    the registry names no gauge the daemon does not have."""
    assert set(service.gauges) <= set(counters)
    text = render_metrics(service, counters, 1.0)
    check_lines(text)
    parsed = families(text)
    for key, value in counters.items():
        name = f"preboot_{service.name}_{key}"
        if key in service.gauges:
            assert parsed[name].type == "gauge"
        else:
            assert parsed[name].type == "counter"
            if not isinstance(value, dict):
                assert [s.name for s in parsed[name].samples] == [name + "_total"]
    assert len(parsed) == len(counters) + 1        # and the start time


def test_label_values_are_escaped():
    hostile = 'a"b\\c\nd\x1b[31m\u2028e'
    text = render_metrics(services.TFTPD, {"errors": {hostile: 1}})
    assert "\x1b" not in text and "\u2028" not in text and text.count("\n") == 3
    (sample,) = families(text)["preboot_tftpd_errors"].samples
    assert sample.labels["kind"] == escape_control(hostile)
    assert escape_label_value('"') == '\\"' and escape_label_value("\\") == "\\\\"


def test_label_values_and_kinds_are_bounded():
    many = {f"k{i:04d}": 1 for i in range(MAX_KINDS + 50)}
    many["x" * 1000] = 1
    text = render_metrics(services.TFTPD, {"errors": many})
    samples = families(text)["preboot_tftpd_errors"].samples
    assert len(samples) == MAX_KINDS
    assert sum(s.value for s in samples) == len(many)
    assert any(s.labels["kind"] == OTHER_KIND for s in samples)
    assert max(len(s.labels["kind"]) for s in samples) <= MAX_LABEL_CHARS


def test_names_are_made_valid_and_unique():
    assert metric_name("preboot", "tftpd", "a-b.c") == "preboot_tftpd_a_b_c"
    assert metric_name("9x") == "_9x"
    counters = {"a-b": 1, "a_b": 2, "x_total": 3, "x": 4, "ok": True, "text": "s"}
    parsed = families(render_metrics(services.TFTPD, counters))
    assert [s.value for s in parsed["preboot_tftpd_a_b"].samples] == [1]
    assert [s.value for s in parsed["preboot_tftpd_x"].samples] == [3]
    assert set(parsed) == {"preboot_tftpd_a_b", "preboot_tftpd_x"}


@pytest.mark.parametrize("value,text", [(0, "0"), (2 ** 60, "1.152921504606847e+18"),
                                        (1.5, "1.5"), (math.nan, "NaN"), (math.inf, "+Inf"),
                                        (-math.inf, "-Inf"), (10 ** 400, "+Inf")])
def test_format_value(value, text):
    assert format_value(value) == text


def test_nothing_to_say_is_empty():
    assert render_metrics(services.TFTPD, {}) == ""


counter_values = st.one_of(st.integers(min_value=0, max_value=2 ** 70),
                           st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                           st.text(max_size=5))
counter_dicts = st.dictionaries(
    st.text(max_size=30),
    st.one_of(counter_values, st.dictionaries(st.text(max_size=150), counter_values,
                                              max_size=8)),
    max_size=12)


@settings(max_examples=300, deadline=None)
@given(counters=counter_dicts, started=st.one_of(st.none(), st.floats(0, 2e9)),
       service=st.sampled_from(services.SERVICES))
def test_fuzz_whatever_the_counters_the_text_parses(counters, started, service):
    text = render_metrics(service, counters, started)
    check_lines(text)
    parsed = list(parser.text_string_to_metric_families(text))
    names = [sample.name for family in parsed for sample in family.samples
             if not sample.labels]
    assert len(names) == len(set(names)), "a sample name was repeated"
    for family in parsed:
        assert NAME_RE.match(family.name) and family.type in ("counter", "gauge")
        for sample in family.samples:
            assert set(sample.labels) <= {"kind"}
            assert len(sample.labels.get("kind", "")) <= MAX_LABEL_CHARS * 6


def test_the_tcp_status_port_answers_get_metrics():
    """An HTTP request line on the TCP status port: /metrics, 404, 405; JSON still works."""

    def http(port: int, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):     # HTTP: the port closes after its answer
                data += chunk
                if request.startswith(b"{") and data.endswith(b"\n"):
                    break                       # JSON: one line, the connection stays
        return data

    async def scenario():
        tcp_sock = bind_tcp("127.0.0.1", 0)
        port = tcp_sock.getsockname()[1]
        server = StatusServer(lambda: {"counters": {"x": 1}}, {}, metrics=lambda: render_metrics(
            services.TFTPD, {"bytes_sent": 5}))
        await server.start(None, tcp_sock)
        loop = asyncio.get_running_loop()
        answers = [await loop.run_in_executor(None, http, port, request) for request in (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            b"GET /metrics?x=1 HTTP/1.0\n\n",
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\n\r\n",
            b'{"cmd": "status"}\n')]
        await server.stop()
        return answers

    ok, query, head, missing, post, status = asyncio.run(scenario())
    for answer in (ok, query):
        head_part, body = answer.split(b"\r\n\r\n", 1)
        assert head_part.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head_part
        assert f"Content-Length: {len(body)}".encode() in head_part
        assert b"preboot_tftpd_bytes_sent_total 5\n" in body
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 ")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert status == b'{"counters": {"x": 1}, "ok": true}\n'


def test_status_line_for_systemd():
    from common.daemon.counters import STATUS_LINE_MAX_CHARS, status_line
    counters = {"a": 1, "by": {"x": 1}, "b": True, "images_sent": 3, "c": 2, "d": 4, "e": 5}
    assert status_line(counters, ("images_sent",), services.IMGSRVD.label) == \
        "Images Sent 3, A 1, C 2, D 4"
    assert status_line({}) == ""
    assert len(status_line({"x\n" * 300: 1})) <= STATUS_LINE_MAX_CHARS
    assert "\n" not in status_line({"x\n": 1})
