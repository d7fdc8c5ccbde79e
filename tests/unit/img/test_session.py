"""img's multicast side (img/session.py) without a network: the original's words, the receiver's
result as img reports it (never a success unless the disk holds the session's image), a work
answer's join, img auto's ask-again on a session that began, and the console keys."""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Any

import pytest

from common.imaging.multicast import Refusal
from img import session
from img.credentials import ServerAccess
from img.session import (ASK_AGAIN, JoinPlan, Keys, Reception, SessionWords, master_image_path,
                         outcome, parse_session_words, plan_from, reception_of)

DIGEST = "0123456789abcdef0123456789abcdef"
ANSWER = {"work": "multicast", "session": "room-101", "group": "231.40.81.200",
          "data_port": 997, "control_port": 997, "image": "lab/base.img", "digest": DIGEST,
          "token": "tok"}


@pytest.mark.parametrize("words, parsed", [
    ([], SessionWords(None, 0, 0)),
    (["master"], SessionWords("master", 0, 0)),
    (["MASTER", "clients=12"], SessionWords("master", 12, 0)),
    (["master", "clients=3", "t=10"], SessionWords("master", 3, 10)),
    (["clients=3", "t=10"], SessionWords(None, 3, 10)),
    (["client"], SessionWords("client", 0, 0)),
])
def test_the_originals_words(words, parsed):
    assert parse_session_words(words) == parsed


@pytest.mark.parametrize("words, fragment", [
    (["master", "client"], "once"),
    (["boss"], "expected master, client"),
    (["clients=0"], "from 1 to 10000"),
    (["clients=x"], "whole number"),
    (["clients=²"], "whole number"),
    (["clients=3", "clients=4"], "once each"),
    (["t=5"], "goes with clients=N"),
    (["client", "clients=3"], "the master's"),
    (["master", "clients=3", "t=99999"], "from 1 to 10080"),
])
def test_bad_words_say_why(words, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_session_words(words)


def test_master_image_path():
    assert master_image_path("room-101") == "multicast/room-101.img"
    assert master_image_path("été") == "multicast/été.img"
    spaced, underscored = master_image_path("room 101"), master_image_path("room_101")
    assert spaced.startswith("multicast/room_101-") and underscored == "multicast/room_101.img"
    assert master_image_path("../../etc").startswith("multicast/etc-")
    assert master_image_path("...").startswith("multicast/session-")


def test_reception_of_reads_the_receivers_result_by_its_fields():
    result = SimpleNamespace(ok=True, digest=bytes.fromhex(DIGEST), chunks_verified=7,
                             bytes_written=1024, path="multicast+unicast", error="",
                             refusal=None)
    assert reception_of(result) == Reception(True, DIGEST, 7, 1024, "multicast+unicast")
    refused = reception_of(SimpleNamespace(ok=False, refusal=Refusal.STARTED,
                                           error="imaging began"))
    assert (refused.ok, refused.path, refused.refusal) == (False, "failed", 5)


@pytest.mark.parametrize("reception, succeeded, fragment", [
    (Reception(True, DIGEST, 7, 10, "multicast"), True, ""),
    (Reception(True, DIGEST.upper(), 7, 10, "multicast+unicast"), True, ""),
    (Reception(False, DIGEST, 3, 10, "failed", "the disk failed"), False, "the disk failed"),
    (Reception(False, "", 0, 0, "failed"), False, "the multicast restore failed"),
    (Reception(True, DIGEST, 7, 10, "failed"), False, "by path 'failed'"),
    (Reception(True, "ff" * 16, 7, 10, "multicast"), False, "is not the session's"),
])
def test_outcome_is_never_a_success_without_the_sessions_image(reception, succeeded, fragment):
    ok, error = outcome(reception, DIGEST)
    assert ok is succeeded and fragment in error


def test_plan_from_a_work_answer():
    plan = plan_from(ANSWER, "imgsrv.lab:998")
    assert plan == JoinPlan("room-101", "231.40.81.200", 997, ("imgsrv.lab", 997),
                            "lab/base.img", DIGEST)


@pytest.mark.parametrize("change", [
    {"digest": "xyz"}, {"control_port": 0}, {"data_port": "many"}, {"session": ""},
    {"session": "a" * 256}, {"group": None} and {}.fromkeys(["nothing"]),
])
def test_plan_from_refuses_what_it_cannot_join(change):
    answer = {**ANSWER, **change}
    if "nothing" in change:
        del answer["group"]
    with pytest.raises(session.Failure, match="cannot join"):
        plan_from(answer, "imgsrv.lab")


@pytest.fixture
def recorded(monkeypatch):
    """session.receive and session.report replaced: what was joined, what was reported."""
    calls: dict[str, Any] = {"receptions": []}

    def receive(**arguments: Any) -> Reception:
        calls.setdefault("joined", []).append(arguments)
        return calls["receptions"].pop(0)

    def report(server: str, facts: dict[str, Any], operation: str, image: str, error: str,
               image_type: str = "base", access: Any = None, multicast: Any = None,
               applied_identity: str = "") -> Any:
        calls.setdefault("reports", []).append((operation, image, error, multicast))
        calls.setdefault("identities", []).append(applied_identity)
        return {"logged": True, "verified": not error}
    monkeypatch.setattr(session, "receive", receive)
    monkeypatch.setattr(session, "report", report)
    return calls


def args() -> argparse.Namespace:
    return argparse.Namespace(disk="/dev/null", threads=2, sector_size=None, grow=False)


FACTS = {"mac": "00C04FDC2AB5", "hostname": "pc1"}


def test_img_auto_joins_restores_and_reports(recorded):
    recorded["receptions"].append(Reception(True, DIGEST, 7, 4096, "multicast"))
    status = session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess("tok"))
    assert status == 0
    (joined,) = recorded["joined"]
    assert (joined["session"], joined["control"], joined["group"], joined["data_port"]) == \
        ("room-101", ("imgsrv.lab", 997), "231.40.81.200", 997)
    assert (joined["digest"], joined["image"], joined["token"], joined["mac"]) == \
        (bytes.fromhex(DIGEST), "lab/base.img", "tok", "00C04FDC2AB5")
    assert joined["disk"] == "/dev/null" and joined["server"] == "imgsrv.lab"
    assert recorded["reports"] == [("download", "lab/base.img", "", {
        "multicast_session": "room-101", "digest": DIGEST, "chunks_verified": 7,
        "bytes_written": 4096, "path": "multicast"})]


def test_img_auto_reports_a_failure_with_path_failed(recorded):
    recorded["receptions"].append(Reception(False, DIGEST, 3, 4096, "failed", "disk I/O error"))
    assert session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess("tok")) == 1
    ((_, _, error, fields),) = recorded["reports"]
    assert error == "disk I/O error" and fields["path"] == "failed"


def test_a_session_that_began_is_asked_about_again_without_a_report(recorded):
    recorded["receptions"].append(Reception(False, "", 0, 0, "failed", "imaging began 3 s ago",
                                            Refusal.STARTED))
    assert session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess()) == ASK_AGAIN
    assert "reports" not in recorded


def test_img_auto_applies_the_identity_after_the_reception_and_reports_it(recorded):
    recorded["receptions"].append(Reception(True, DIGEST, 7, 4096, "multicast+unicast"))
    steps: list[str] = []

    def after_restore() -> str:
        steps.append("applied")
        return "name=lab-001 ip=10.0.0.10/24\nidentity stored in the disk's image-safe data"
    assert session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess("tok"),
                             after_restore) == 0
    assert steps == ["applied"]
    ((_, _, error, fields),) = recorded["reports"]
    assert error == "" and fields["path"] == "multicast+unicast"
    assert recorded["identities"] == ["name=lab-001 ip=10.0.0.10/24\nidentity stored in the "
                                      "disk's image-safe data"]


def test_an_identity_that_fails_fails_the_operation_with_its_reason(recorded, capsys):
    recorded["receptions"].append(Reception(True, DIGEST, 7, 4096, "multicast"))

    def after_restore() -> str:
        raise session.Failure("identity lab-001 not applied: no system found; the disk was "
                              "restored")
    assert session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess("tok"),
                             after_restore) == 1
    ((_, _, error, fields),) = recorded["reports"]
    # a failure, with why; the transfer fields still say what the reception did
    assert error.startswith("identity lab-001 not applied: no system found")
    assert fields["path"] == "multicast" and fields["chunks_verified"] == 7
    assert recorded["identities"] == [""]
    assert "identity lab-001 not applied" in capsys.readouterr().err


@pytest.mark.parametrize("reception", [
    Reception(False, DIGEST, 3, 4096, "failed", "disk I/O error"),
    Reception(True, "ff" * 16, 7, 4096, "multicast"),             # another image
    Reception(False, "", 0, 0, "failed", "imaging began", Refusal.STARTED),
])
def test_no_identity_is_applied_without_the_sessions_image_on_the_disk(recorded, reception):
    recorded["receptions"].append(reception)
    steps: list[str] = []
    status = session.from_work(args(), "imgsrv.lab", ANSWER, FACTS, ServerAccess("tok"),
                               lambda: steps.append("applied") or "text")
    assert status in (1, ASK_AGAIN) and steps == []
    assert recorded.get("identities", [""]) == [""]


def test_img_auto_asks_again_at_most_a_few_times(monkeypatch, tmp_path, capsys):
    from img import auto
    answers = iter([ANSWER, ANSWER, ANSWER, ANSWER])
    monkeypatch.setattr(auto, "server_facts", lambda disk, facts: dict(FACTS))
    monkeypatch.setattr(auto, "print_disk", lambda disk, size: None)

    class Client:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __enter__(self) -> "Client":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def work(self, facts: Any, mode: str, identity: Any = None) -> dict[str, Any]:
            return next(answers)
    monkeypatch.setattr(auto, "ImagingClient", Client)
    rounds = []
    monkeypatch.setattr(session, "from_work", lambda *a: rounds.append(1) or ASK_AGAIN)
    namespace = argparse.Namespace(server="imgsrv.lab", disk=str(tmp_path / "d"), fact=[],
                                   sector_size=None, token=None, token_file=None,
                                   server_pin=None, server_ca=None)
    assert auto.run(namespace) == 1
    assert len(rounds) == auto.MAX_WORK_ROUNDS
    assert "kept sending this machine into sessions that had begun" in capsys.readouterr().err


def test_without_the_receiver_a_join_fails_cleanly(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_receiver(name: str, *a: Any, **k: Any) -> Any:
        if name == "mcreceive" or name.endswith(".mcreceive"):
            raise ModuleNotFoundError("no img.mcreceive", name="img.mcreceive")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_receiver)
    reception = session.receive(disk="/dev/null")
    assert (reception.ok, reception.path) == (False, "failed")
    assert "no multicast receiver" in reception.error


def test_keys_from_a_pipe():
    read, write = os.pipe()
    os.write(write, b"m\nG \n")
    os.close(write)
    with open(read, "rb", buffering=0) as stream, Keys(stream) as keys:
        assert keys.poll(1.0) == "m"
        assert keys.poll(1.0) == "g"
        assert keys.poll(0.01) is None       # the end of the input: no more keys
        assert keys.poll(0.01) is None
