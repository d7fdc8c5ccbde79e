"""zmgmcast's table: the service rows, and each daemon's counters in the registry's order and
under its labels (common.daemon.services)."""

from __future__ import annotations

import re

import zmgmcast.__main__ as zmg
from common.daemon import services


def running(service, counters, pid=101, uptime_s=3723.9, **extra):
    reply = {"ok": True, "daemon": service.name, "pid": pid, "version": "1.2.3",
             "uptime_s": uptime_s, "counters": counters, **extra}
    return zmg.DaemonReport(service, "running", reply)


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("    ")]


def test_header_and_one_row_per_service_in_registry_order():
    reports = [zmg.DaemonReport(services.PROXYDHCPD, "not running"),
               running(services.TFTPD, {}, pid=202, uptime_s=90061),
               zmg.DaemonReport(services.POLICYD, "not reachable", detail="host:9980 timed out"),
               running(services.IMGSRVD, {}, pid=404, uptime_s=59)]
    text = zmg.format_reports(reports, "imaging.example.org")
    lines = text.splitlines()
    assert lines[0] == "Preboot Services status on imaging.example.org"
    assert lines[1] == ""
    assert lines[2] == f"{'Service':<30}{'State':<15}{'PID':>8}  {'Uptime':>12}"
    assert lines[3] == f"{'Preboot Proxy DHCP Service':<30}{'not running':<15}{'':>8}  {'':>12}"
    assert lines[4] == f"{'Preboot TFTP Service':<30}{'running':<15}{'202':>8}  {'1d 1:01:01':>12}"
    assert lines[5].startswith("Preboot Policy Service        not reachable")
    assert lines[6] == f"{'Preboot Imaging Service':<30}{'running':<15}{'404':>8}  {'0:00:59':>12}"
    # a service that is not running gets its detail, a running one its heading
    assert "Preboot Policy Service: host:9980 timed out" in lines
    assert "Preboot TFTP Service (pid 202, version 1.2.3)" in lines
    assert "Preboot Imaging Service (pid 404, version 1.2.3)" in lines
    assert "Preboot Proxy DHCP Service:" not in text        # no detail, no paragraph


def test_imaging_statistics_come_first_under_the_original_names():
    counters = {name: 0 for name in ("active_transfers", "busy_refusals", "bytes_received",
                                     "bytes_sent", "client_referrals", "directory_errors",
                                     "failures", "images_received", "images_sent",
                                     "results_logged", "update_requests")}   # sorted, as replied
    counters.update(update_requests=7, images_sent=2, bytes_sent=1536, bytes_received=3 << 30)
    text = zmg.format_reports([running(services.IMGSRVD, counters)], "this host")
    labels = [re.split(r"\s{2,}", row.strip())[0] for row in rows(text)]
    assert labels == ["Update Requests", "Images Sent", "Images Received", "Client Referrals",
                      "Bytes sent", "Bytes received", "Active transfers", "Failures",
                      "Busy refusals", "Directory errors", "Results logged"]
    assert f"    {'Update Requests':<28}7" in text
    assert f"    {'Bytes sent':<28}1.5 KiB" in text
    assert f"    {'Bytes received':<28}3.0 GiB" in text
    assert f"    {'Failures':<28}0" in text


def test_policy_counters_in_order_and_counts_by_kind_on_one_line():
    counters = {"bad_requests": 1, "by_action": {"none": 3, "restore": 2}, "by_arch": {},
                "by_platform": {"efi": 5}, "directory_errors": 0, "fallback_answers": 0,
                "menus_shown": 1, "no_work": 3, "queries": 6, "script_requests": 4,
                "work_assigned": 2}
    text = zmg.format_reports([running(services.POLICYD, counters)], "this host")
    assert rows(text) == [
        f"    {'Queries':<28}6", f"    {'Script requests':<28}4", f"    {'Work assigned':<28}2",
        f"    {'No work':<28}3", f"    {'Menus shown':<28}1", f"    {'Fallback answers':<28}0",
        f"    {'Directory errors':<28}0", f"    {'Bad requests':<28}1",
        "    By action: none 3, restore 2", "    By platform: efi 5"]   # empty by_arch: no row


def test_listening_endpoints_are_listed():
    report = running(services.TFTPD, {"bytes_sent": 0},
                     listen=[{"proto": "udp", "address": "0.0.0.0", "port": 69}])
    text = zmg.format_reports([report], "this host")
    assert "    Listening on udp 0.0.0.0:69" in text
    assert f"    {'Bytes sent':<28}0 B" in text


def test_labels_belong_to_their_service():
    """The imaging statistics' names are imgsrvd's: another daemon's key is shown as words."""
    assert services.IMGSRVD.label("images_sent") == "Images Sent"
    assert services.TFTPD.label("images_sent") == "Images sent"
    assert services.TFTPD.label("transfers_completed") == "Transfers completed"
