"""zmgmcast and the imaging server's multicast sessions: how -status shows sessions and
receivers (hostile remote text escaped, misshapen replies refused), and the control commands
-start, -stop and -delete (their options, and what reaches the status socket)."""

from __future__ import annotations

import copy
import json
import os

import pytest

import zmgmcast.__main__ as zmg
from common.daemon import services

SESSION = {"name": "room-101", "image": "lab/base.img", "group": "231.40.81.200",
           "origin": "directory", "state": "waiting", "start_clients": 5, "start_in_s": 750.2,
           "rate_kbit_s": 0, "bytes_sent": 0, "repair_bytes": 0, "repair_share": 0.0,
           "image_bytes": 1000, "receivers": 1, "participants_omitted": 0,
           "participants": [{"mac": "00C04FDC2AB5", "address": "10.0.0.9", "state": "waiting",
                             "progress": 0.25, "loss": 0.004, "srtt_ms": 0.41,
                             "bytes_received": 250, "bytes_written": 0,
                             "chunks_verified": 0}]}
MULTICAST = {"enabled": True, "control_port": 997, "sessions": [SESSION],
             "sessions_omitted": 0}


def imaging(multicast) -> zmg.DaemonReport:
    reply = {"ok": True, "daemon": "imgsrvd", "uptime_s": 5.0, "counters": {},
             "multicast": multicast}
    return zmg._report(services.IMGSRVD, reply, "imgsrv.example:9998")


def shown(multicast) -> list[str]:
    return zmg.format_reports([imaging(multicast)], "there").splitlines()


def test_sessions_and_receivers():
    lines = shown(MULTICAST)
    at = lines.index("    Multicast sessions (control port 997/udp): 1")
    assert lines[at + 1] == ("      room-101: waiting (directory), lab/base.img to "
                             "231.40.81.200, 1 receiver")
    assert lines[at + 2] == ("        starts when 5 have joined (1 now) or in 12:30; rate -; "
                             "0 B sent, repairs 0.0 %")
    assert lines[at + 3].split() == ["00C04FDC2AB5", "10.0.0.9", "waiting", "25.0", "%",
                                     "loss", "0.4", "%", "rtt", "0.4", "ms"]


def test_a_sending_session_shows_its_rate_and_repairs_and_what_was_left_out():
    sending = {**SESSION, "state": "sending", "start_in_s": None, "rate_kbit_s": 250000,
               "bytes_sent": 1 << 30, "repair_share": 0.0125, "participants_omitted": 7}
    text = "\n".join(shown({**MULTICAST, "sessions": [sending], "sessions_omitted": 2}))
    assert "        250.0 Mbit/s; 1.0 GiB sent, repairs 1.2 %" in text
    assert "        ... and 7 more receivers" in text
    assert "      ... and 2 more sessions" in text
    assert "starts" not in text


@pytest.mark.parametrize("multicast, line", [
    ({"enabled": False, "sessions": []}, "    Multicast: off"),
    ({"enabled": True, "control_port": 997, "sessions": []},
     "    Multicast sessions (control port 997/udp): none"),
    ({**MULTICAST, "sessions": [{**SESSION, "start_clients": 0, "start_in_s": None}]},
     "        starts when told to (zmgmcast -start); rate -; 0 B sent, repairs 0.0 %"),
])
def test_states(multicast, line):
    assert line in shown(multicast)


def test_hostile_text_from_a_remote_is_escaped():
    evil = copy.deepcopy(MULTICAST)
    evil["sessions"][0]["name"] = "room\x1b[2J\x1b]0;owned\x07"
    evil["sessions"][0]["participants"][0]["address"] = "10.0.0.9\r\nFAKE LINE"
    evil["sessions"][0]["image"] = "x" * 5000
    text = zmg.format_reports([imaging(evil)], "there")
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "10.0.0.9\\x0d\\x0aFAKE LINE" in text
    assert max(len(line) for line in text.splitlines()) < 400


@pytest.mark.parametrize("multicast, fragment", [
    ("yes", "multicast is not an object"),
    ({"sessions": {"a": 1}}, "sessions is not a list"),
    ({"sessions": [{**SESSION, "name": 5}]}, "session name is not text"),
    ({"sessions": [{**SESSION, "bytes_sent": "lots"}]}, "bytes_sent is not a number"),
    ({"sessions": [{**SESSION, "start_in_s": "soon"}]}, "start_in_s"),
    ({"sessions": [{**SESSION, "participants": ["x"]}]}, "participants is not a list"),
    ({"sessions": [{**SESSION, "participants": [{"mac": ["a"]}]}]}, "participant mac"),
    ({"sessions": [{**SESSION, "participants": [{"loss": True}]}]}, "participant loss"),
    ({"sessions": [{**SESSION, "participants": [{"srtt_ms": {}}]}]}, "srtt_ms"),
    ({"control_port": "997"}, "control_port"),
])
def test_misshapen_multicast_replies_are_bad_replies(multicast, fragment):
    report = imaging(multicast)
    assert report.state == "error"
    assert report.detail.startswith("bad reply from imgsrv.example:9998: ")
    assert fragment in report.detail


@pytest.mark.parametrize("argv, wanted", [
    (["-status"], None),
    (["-start", "lab"], ("mcast-start", {"name": "lab"})),
    (["-start", "lab", "-image", "a.img"],
     ("mcast-start", {"name": "lab", "image": "a.img", "clients": 0, "t": 0})),
    (["-start", "lab", "-image", "a.img", "-clients", "5", "-t", "10"],
     ("mcast-start", {"name": "lab", "image": "a.img", "clients": 5, "t": 10})),
    (["-stop", "lab"], ("mcast-stop", {"name": "lab"})),
    (["-delete", "room 101"], ("mcast-delete", {"name": "room 101"})),
    (["-stop", "lab", "-i", "host"], "read-only"),
    (["-image", "a.img"], "go with -start NAME"),
    (["-start", "lab", "-clients", "3"], "go with -image"),
    (["-start", "lab", "-image", "a.img", "-t", "3"], "-t goes with -clients"),
])
def test_control_options(argv, wanted):
    request = zmg.control_request(zmg._parse_args(argv))
    if isinstance(wanted, str):
        assert isinstance(request, str) and wanted in request
    else:
        assert request == wanted


def test_stop_and_start_together_is_a_usage_error():
    with pytest.raises(SystemExit):
        zmg._parse_args(["-start", "a", "-stop", "b"])


@pytest.mark.skipif(os.geteuid() != 0, reason="control verbs need root (SO_PEERCRED)")
def test_control_commands_reach_the_imaging_server(fake_daemon, tmp_path, capsys):
    path = str(tmp_path / "imgsrvd.sock")
    daemon = fake_daemon("imgsrvd", {}, unix_path=path, tcp=False)
    assert zmg.main(["--socket", path, "-start", "lab", "-image", "a.img", "-clients", "4"]) == 0
    assert capsys.readouterr().out == "mcast-start lab: done\n"
    assert zmg.main(["--socket", path, "-delete", "nope"]) == 1
    err = capsys.readouterr().err
    assert "no multicast session 'nope'" in err and "\x1b" not in err
    assert daemon.controls == [("mcast-start", {"name": "lab", "image": "a.img", "clients": 4,
                                                "t": 0}),
                               ("mcast-delete", {"name": "nope"})]
    assert zmg.main(["--socket", str(tmp_path / "none.sock"), "-stop", "x"]) == 3


def test_the_json_output_keeps_the_sessions(fake_daemon, tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "imgsrvd.sock")
    daemon = fake_daemon("imgsrvd", {}, unix_path=path, tcp=False)
    daemon.reply["multicast"] = MULTICAST
    assert zmg.main(["-status", "--socket", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["imgsrvd"]["status"]["multicast"]["sessions"][0]["name"] == "room-101"
