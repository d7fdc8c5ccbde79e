"""The multicast control plane's pure decisions (imgsrvd/multicast/decisions.py), as tables."""

from __future__ import annotations

import pytest

from common.imaging.multicast import NO_IMAGE, Refusal, group_address
from common.policy.model import MulticastSession
from common.policy.trust import Refused
from imgsrvd.multicast.decisions import (Ending, OpenSession, ReceiverReport, Registration,
                                         after_session, directory_spec, ending_of,
                                         join_refusal, participant_verdict, plan_sync,
                                         registration_problem, registration_refusal,
                                         session_spec, token_admission)
from imgsrvd.multicast.images import ImageFacts
from imgsrvd.multicast.model import (JoinRequest, ParticipantStatus, ReceiverState,
                                     SessionOrigin, SessionState)

IMAGE = ImageFacts("lab/base.img", "/images/lab/base.img", 123456, bytes(range(16)), 42)
A = MulticastSession("room A", "lab/base.img")
B = MulticastSession("room B", "lab/b.img", 3, 0, group="239.192.0.7", data_port=4000)


def view(session: MulticastSession, state: SessionState = SessionState.WAITING,
         origin: SessionOrigin = SessionOrigin.DIRECTORY, started_at: float | None = None
         ) -> OpenSession:
    return OpenSession(session.name, origin, session.image, IMAGE.digest, session, state,
                       started_at)


def test_directory_spec():
    spec = directory_spec(A, IMAGE, 997)
    assert (spec.name, spec.image_path, spec.image) == ("room A", IMAGE.file_path, IMAGE.image)
    assert (spec.group, spec.data_port) == (group_address("room A"), 997)
    assert (spec.start_clients, spec.start_after_last_join_s) == (5, 900.0)
    assert spec.origin is SessionOrigin.DIRECTORY
    other = directory_spec(B, IMAGE, 997)
    assert (other.group, other.data_port, other.start_clients, other.start_after_last_join_s) \
        == ("239.192.0.7", 4000, 3, None)


def test_a_client_session_without_triggers_waits_for_its_master():
    spec = session_spec("lab", IMAGE, 0, 0, SessionOrigin.CLIENT, 997)
    assert (spec.start_clients, spec.start_after_last_join_s) == (0, None)


@pytest.mark.parametrize("wanted, opened, free, finished, opens, closes, waits", [
    # enabled sessions open, in order, disabled ones do not
    ([A, B], {}, 5, (), ["room A", "room B"], [], []),
    ([A, MulticastSession("off", "x", enabled=False)], {}, 5, (), ["room A"], [], []),
    # MaxSessions: the rest wait
    ([A, B], {}, 1, (), ["room A"], [], ["room B"]),
    # open already: nothing to do
    ([A], {"room a": view(A)}, 5, (), [], [], []),
    # removed or disabled while waiting: closed; changed: closed (opened again later)
    ([], {"room a": view(A)}, 5, (), [], ["room A"], []),
    ([MulticastSession("room A", "lab/other.img")], {"room a": view(A)}, 5, (), [],
     ["room A"], []),
    # once begun, a session runs to its end whatever the directory says
    ([], {"room a": view(A, SessionState.SENDING)}, 5, (), [], [], []),
    # one that ended and is being deleted or disabled is not opened again
    ([A], {}, 5, ("room a",), [], [], []),
    # a client session of that name runs: the directory's waits
    ([A], {"room a": view(A, origin=SessionOrigin.CLIENT)}, 5, (), [], [], ["room A"]),
])
def test_plan_sync(wanted, opened, free, finished, opens, closes, waits):
    plan = plan_sync(wanted, opened, free, finished)
    assert [s.name for s in plan.open] == opens
    assert [name for name, _ in plan.close] == closes
    assert [name for name, _ in plan.waiting] == waits


def join(session: str = "room A", digest: bytes = NO_IMAGE) -> JoinRequest:
    return JoinRequest(session, "00C04FDC2AB5", "tok", ("10.0.0.9", 40000), digest)


@pytest.mark.parametrize("opened, request_, code, fragment", [
    (None, join(), Refusal.UNKNOWN_SESSION, "no multicast session 'room A'"),
    (view(A, SessionState.SENDING, started_at=60.0), join(), Refusal.STARTED,
     "imaging began 40 s ago: wait for the next session"),
    (view(A, SessionState.FINISHING), join(), Refusal.STARTED, "wait for the next session"),
    (view(A), join(digest=b"\x01" * 16), Refusal.WRONG_IMAGE, "sends lab/base.img"),
])
def test_join_refusal(opened, request_, code, fragment):
    refusal = join_refusal(opened, request_, 100.0)
    assert not refusal.admitted and refusal.reason_code == code and fragment in refusal.text


@pytest.mark.parametrize("digest", [NO_IMAGE, IMAGE.digest])
def test_a_join_the_session_can_take(digest):
    assert join_refusal(view(A), join(digest=digest), 100.0) is None


@pytest.mark.parametrize("refused, admitted, code", [
    (None, True, 0),
    (Refused(401, "'retrieve' needs a capability (Authorization: Bearer ...)"), False,
     Refusal.NO_TOKEN),
    (Refused(401, "capability refused: the token expired 12 s ago"), False, Refusal.BAD_TOKEN),
    (Refused(403, "capability refused: the token does not name the image x"), False,
     Refusal.NOT_ALLOWED),
    (Refused(403, "10.0.0.9 is not in AllowedClients"), False, Refusal.NOT_ALLOWED),
    (Refused(503, "this server cannot check capabilities"), False, Refusal.BUSY),
])
def test_token_admission(refused, admitted, code):
    answer = token_admission(refused)
    assert (answer.admitted, answer.reason_code) == (admitted, code)
    assert len(answer.text.encode()) <= 255


@pytest.mark.parametrize("fields, fragment", [
    (("", "a.img", 0, 0), "name: empty session name"),
    (("x" * 256, "a.img", 0, 0), "more than 255"),
    (("lab\n", "a.img", 0, 0), "control characters"),
    ((5, "a.img", 0, 0), "name: not text"),
    (("lab", "", 0, 0), "image: the image path"),
    (("lab", "a.img", -1, 0), "clients: a whole number"),
    (("lab", "a.img", True, 0), "clients: a whole number"),
    (("lab", "a.img", 0, 5), "t: goes only with clients"),
    (("lab", "a.img", 3, 99999), "t: a whole number"),
])
def test_registration_problem(fields, fragment):
    assert fragment in registration_problem(*fields)


def test_registrations_are_fine_and_idempotent():
    assert registration_problem("lab", "a.img", 3, 10) is None
    ask = Registration("Lab", "lab/base.img")
    client = view(MulticastSession("lab", "lab/base.img"), origin=SessionOrigin.CLIENT)
    assert registration_refusal(ask, {}, [], 1, IMAGE.digest) is None
    assert registration_refusal(ask, {"lab": client}, [], 0, IMAGE.digest) is None


@pytest.mark.parametrize("opened, directory, free, digest, status, fragment", [
    ({"lab": view(MulticastSession("lab", "lab/base.img"))}, [], 1, IMAGE.digest, 409,
     "a session of the directory"),
    ({"lab": view(MulticastSession("lab", "lab/other.img"), origin=SessionOrigin.CLIENT)}, [],
     1, IMAGE.digest, 409, "with another image (lab/other.img)"),
    ({}, ["LAB"], 1, IMAGE.digest, 409, "preboot-dir sessions"),
    ({}, [], 1, None, 404, "no such image"),
    ({}, [], 0, IMAGE.digest, 503, "MaxSessions"),
])
def test_registration_refusal(opened, directory, free, digest, status, fragment):
    refused = registration_refusal(Registration("lab", "lab/base.img"), opened, directory, free,
                                   digest)
    assert refused[0] == status and fragment in refused[1]


@pytest.mark.parametrize("session, ending, action, fragment", [
    (A, Ending.COMPLETED, "delete", "delete after completion"),
    (MulticastSession("k", "i", delete_after=False), Ending.COMPLETED, "disable", "kept"),
    (A, Ending.STOPPED, "disable", "stopped by an operator"),
    (A, Ending.DELETED, "delete", "deleted by an operator"),
    (A, Ending.FAILED, "disable", "failed"),
    (A, Ending.SHUTDOWN, "keep", "shutdown"),
    (A, Ending.WITHDRAWN, "keep", "withdrawn"),
])
def test_after_session(session, ending, action, fragment):
    decided, why = after_session(session, ending)
    assert decided == action and fragment in why


def test_ending_of():
    assert ending_of(SessionState.CLOSED, None) is Ending.COMPLETED
    assert ending_of(SessionState.ABORTED, None) is Ending.FAILED
    assert ending_of(SessionState.ABORTED, Ending.STOPPED) is Ending.STOPPED


def participant(state: ReceiverState) -> ParticipantStatus:
    return ParticipantStatus(7, "00C04FDC2AB5", "10.0.0.9", state, 100, 100, 3, 0.0, 1.0)


def report(status: str = "success", digest: str = IMAGE.digest_hex, chunks: int = 42,
           path: str = "multicast", error: str = "") -> ReceiverReport:
    return ReceiverReport("room A", "00C04FDC2AB5", status, digest, chunks, 1000, path, error)


@pytest.mark.parametrize("got, seen, facts, status, verified, fragment", [
    (report(), None, IMAGE, "success", True, ""),
    (report(digest=IMAGE.digest_hex.upper()), None, IMAGE, "success", True, ""),
    (report(path="multicast+unicast"), None, IMAGE, "success", True, ""),
    (report(digest="00" * 16), None, IMAGE, "failure", False, "not the session's"),
    (report(digest=""), None, IMAGE, "failure", False, "(none)"),
    (report(chunks=41), None, IMAGE, "failure", False, "41 of the image's 42"),
    (report(path="failed"), None, IMAGE, "failure", False, "by path 'failed'"),
    (report(), None, None, "failure", False, "does not know"),
    (report("failure", path="failed", error="disk write error"), None, IMAGE, "failure", False,
     "disk write error"),
    (None, participant(ReceiverState.DONE), IMAGE, "failure", False,
     "reported no result (the sender saw it finish)"),
    (None, participant(ReceiverState.LOST), IMAGE, "failure", False, "lost"),
    (None, participant(ReceiverState.DROPPED), IMAGE, "failure", False, "unicast catch-up"),
    (None, participant(ReceiverState.WAITING), IMAGE, "failure", False, "before it began"),
    (None, None, IMAGE, "failure", False, "lost"),
])
def test_participant_verdict(got, seen, facts, status, verified, fragment):
    """Nobody is reported successful unless its report shows the session's image on its disk."""
    verdict = participant_verdict(got, seen, facts)
    assert (verdict.status, verdict.verified) == (status, verified)
    assert fragment in verdict.error
