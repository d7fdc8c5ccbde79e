"""The multicast control plane (imgsrvd/multicast/catalog.py) with a fake engine and a fake
directory: which sessions it opens, whom it admits (real capabilities, a real Gate), what it does
when a session ends (the directory, the results), sessions workstations and operators ask for."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from common.imaging.imagefile import ImageWriter
from common.imaging.multicast import NO_IMAGE, Refusal, group_address
from common.policy.capability import Capability, encode
from common.policy.keyring import read_keys
from common.policy.model import MulticastSession
from common.policy.trust import Gate, TrustSettings
from imgsrvd.multicast.catalog import (Catalog, CatalogSettings, NoEngine, ParticipantEntry,
                                       SYNC_S)
from imgsrvd.multicast.decisions import ReceiverReport, Registration
from imgsrvd.multicast.images import read_image_facts
from imgsrvd.multicast.model import (JoinRequest, ParticipantStatus, ReceiverState,
                                     SessionOrigin, SessionSpec, SessionState, SessionStatus)

MAC = "00C04FDC2AB5"
OTHER = "00C04FDC2AB6"
IMAGE = "lab/base.img"


def make_image(path: Path, chunks: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rand = random.Random(1)
    metadata = {"format": 1, "type": "base", "tool": "test", "streams": [
        {"number": 0, "role": "partition", "partition": 1, "size": chunks * 65536,
         "fill": "zero"}]}
    with open(path, "wb") as out:
        writer = ImageWriter(out, metadata, chunk_size=65536)
        for n in range(chunks):
            writer.add(0, n * 65536, rand.randbytes(65536))
        writer.close()
    return path


class FakeEngine:
    def __init__(self) -> None:
        self.on_outcome: Callable[[SessionStatus], None] | None = None
        self.specs: dict[str, SessionSpec] = {}
        self.states: dict[str, SessionState] = {}
        self.calls: list[tuple[str, ...]] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def open_session(self, spec: SessionSpec) -> None:
        self.calls.append(("open", spec.name))
        self.specs[spec.name] = spec
        self.states[spec.name] = SessionState.WAITING

    def start_now(self, name: str) -> None:
        self.calls.append(("start_now", name))

    def close(self, name: str, reason: str) -> None:
        self.calls.append(("close", name, reason))
        self.end(name, SessionState.ABORTED)

    def status(self) -> list[SessionStatus]:
        return [self._status(name, self.states[name]) for name in self.specs]

    def _status(self, name: str, state: SessionState,
                participants: tuple[ParticipantStatus, ...] = ()) -> SessionStatus:
        spec = self.specs[name]
        return SessionStatus(name, spec.image, spec.group, state, spec.origin,
                             spec.start_clients, None, 1000, 5000, 500, 9999, participants)

    def end(self, name: str, state: SessionState,
            participants: tuple[ParticipantStatus, ...] = ()) -> None:
        status = self._status(name, state, participants)
        del self.specs[name], self.states[name]
        assert self.on_outcome is not None
        self.on_outcome(status)


class FakeDirectory:
    def __init__(self, sessions: list[MulticastSession]):
        self.stored = list(sessions)
        self.fail = False

    async def sessions(self) -> list[MulticastSession]:
        if self.fail:
            raise OSError("directory down")
        return list(self.stored)

    async def change_sessions(self, change: Any) -> None:
        if self.fail:
            raise OSError("directory down")
        changed = change(list(self.stored))
        if changed is not None:
            self.stored = changed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class World:
    catalog: Catalog
    engine: FakeEngine
    directory: FakeDirectory
    entries: list[ParticipantEntry]
    gate: Gate
    clock: Clock
    root: Path

    def machine_token(self, mac: str = MAC, images: tuple[str, ...] = (IMAGE,),
                      operations: tuple[str, ...] = ("retrieve", "result")) -> str:
        token = self.gate.issue(mac, operations, images, __import__("time").time())
        assert token
        return token

    def operator_token(self, images: tuple[str, ...] = ("lab/*",)) -> str:
        key_id, secret = read_keys(self.gate.settings.key_file).signing
        now = int(__import__("time").time())
        return encode(Capability("operator:lab", frozenset({"retrieve"}), images, now,
                                 now + 600), key_id, secret)


def run(coroutine_fn: Callable[[World], Any], tmp_path: Path,
        sessions: list[MulticastSession] | None = None, anonymous: bool = False,
        max_sessions: int = 4, engine: Any = None) -> World:
    """Build a world, run coroutine_fn(world) on a loop, stop the catalog."""
    root = tmp_path / "images"
    make_image(root / IMAGE)
    gate = Gate(TrustSettings(str(tmp_path / "imaging.key"), 600, anonymous, ()))
    gate.prepare()
    directory = FakeDirectory(sessions or [])
    entries: list[ParticipantEntry] = []
    clock = Clock()
    catalog = Catalog(CatalogSettings(str(root), 997, 997, report_wait_s=60.0), gate,
                      directory, entries.append, clock)
    world = World(catalog, engine or FakeEngine(), directory, entries, gate, clock, root)

    async def main() -> None:
        await catalog.start(world.engine, max_sessions)
        try:
            await catalog.sync()
            await coroutine_fn(world)
        finally:
            await catalog.stop()
    asyncio.run(main())
    return world


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


ROOM = MulticastSession("room-101", IMAGE, 2, 15)


def test_the_directory_sessions_open_on_the_engine(tmp_path):
    async def check(world: World) -> None:
        spec = world.engine.specs["room-101"]
        facts = read_image_facts(str(world.root), IMAGE)
        assert spec == SessionSpec("room-101", facts.file_path, IMAGE, group_address("room-101"),
                                   997, 2, 900.0, SessionOrigin.DIRECTORY)
        assert "off" not in world.engine.specs and "gone" not in world.engine.specs
        assert world.catalog.unavailable("gone").startswith("its image cannot be sent")
        info = world.catalog.join_info("ROOM-101")
        assert info.answer() == {"session": "room-101", "group": group_address("room-101"),
                                 "data_port": 997, "control_port": 997, "image": IMAGE,
                                 "digest": facts.digest_hex, "state": "waiting"}
    world = run(check, tmp_path, [ROOM, MulticastSession("off", IMAGE, enabled=False),
                                  MulticastSession("gone", "lab/missing.img")])
    assert world.engine.started and world.engine.stopped


def test_at_most_max_sessions_run(tmp_path):
    async def check(world: World) -> None:
        assert list(world.engine.specs) == ["a", "b"]
    run(check, tmp_path, [MulticastSession(n, IMAGE) for n in "abc"], max_sessions=2)


def test_a_session_removed_while_waiting_closes_a_started_one_runs_on(tmp_path):
    async def check(world: World) -> None:
        world.engine.states["room-101"] = SessionState.SENDING
        world.catalog._poll()
        assert world.catalog.started_keys() == {"room-101"}
        world.directory.stored = []
        await world.catalog.sync()
        assert "room-101" in world.engine.specs and "other" not in world.engine.specs
        assert ("close", "other", "removed or disabled in the directory") in world.engine.calls
        await settle()
    world = run(check, tmp_path, [ROOM, MulticastSession("other", IMAGE)])
    # withdrawn: the directory is left as it was (here: without it)
    assert world.directory.stored == []


def join(world: World, token: str = "", mac: str = MAC, session: str = "room-101",
         digest: bytes = NO_IMAGE):
    return world.catalog.admit(JoinRequest(session, mac, token, ("10.0.0.9", 40000), digest))


def test_joins_need_a_capability_for_the_image_and_machine(tmp_path):
    async def check(world: World) -> None:
        assert join(world, world.machine_token()).admitted
        assert join(world, world.operator_token(), mac="").admitted
        cases = [
            (join(world), Refusal.NO_TOKEN, "a capability is needed"),
            (join(world, "pbcap1.x.y.z"), Refusal.BAD_TOKEN, "signed with key 'x'"),
            (join(world, world.machine_token(OTHER)), Refusal.NOT_ALLOWED,
             f"issued to machine {OTHER}, not {MAC}"),
            (join(world, world.machine_token(images=("lab/other.img",))), Refusal.NOT_ALLOWED,
             "does not name the image lab/base.img"),
            (join(world, world.machine_token(operations=("work",))), Refusal.NOT_ALLOWED,
             "does not allow 'retrieve'"),
            (join(world, world.machine_token(), mac=""), Refusal.NOT_ALLOWED,
             "needs the machine's MAC"),
            (join(world, world.operator_token(("other/*",))), Refusal.NOT_ALLOWED,
             "does not name the image"),
            (join(world, world.machine_token(), session="nope"), Refusal.UNKNOWN_SESSION,
             "no multicast session 'nope'"),
            (join(world, world.machine_token(), session="ROOM-101"), Refusal.UNKNOWN_SESSION,
             "no multicast session 'ROOM-101'"),
            (join(world, world.machine_token(), digest=b"\x07" * 16), Refusal.WRONG_IMAGE,
             "not the image the join names"),
        ]
        for answer, code, fragment in cases:
            assert not answer.admitted and answer.reason_code == code, answer
            assert fragment in answer.text, answer
        world.engine.states["room-101"] = SessionState.SENDING
        world.catalog._poll()
        world.clock.now += 30
        late = join(world, world.machine_token())
        assert (late.admitted, late.reason_code) == (False, Refusal.STARTED)
        assert late.text == "imaging began 30 s ago: wait for the next session"
    run(check, tmp_path, [ROOM])


def test_the_open_mode_admits_without_a_capability(tmp_path):
    async def check(world: World) -> None:
        assert join(world).admitted
        assert not join(world, session="nope").admitted
    run(check, tmp_path, [ROOM], anonymous=True)


def done(mac: str, state: ReceiverState = ReceiverState.DONE) -> ParticipantStatus:
    return ParticipantStatus(1, mac, "10.0.0.9", state, 9999, 9999, 3, 0.01, 0.4)


def good_report(world: World, mac: str = MAC, **changes: Any) -> ReceiverReport:
    facts = read_image_facts(str(world.root), IMAGE)
    return dataclasses.replace(ReceiverReport("room-101", mac, "success", facts.digest_hex, 3,
                                              9999, "multicast"), **changes)


@pytest.mark.parametrize("delete_after, stored", [(True, []), (False, [False])])
def test_a_completed_directory_session_is_deleted_or_disabled(tmp_path, delete_after, stored):
    session = dataclasses.replace(ROOM, delete_after=delete_after)

    async def check(world: World) -> None:
        world.engine.end("room-101", SessionState.CLOSED, (done(MAC),))
        await settle()
        # not sent into again while the directory is being changed, nor after
        assert "room-101" not in world.engine.specs
        await world.catalog.sync()
        assert "room-101" not in world.engine.specs
    world = run(check, tmp_path, [session])
    assert [s.enabled for s in world.directory.stored] == stored


def test_a_directory_change_that_fails_is_retried_and_blocks_reopening(tmp_path):
    async def check(world: World) -> None:
        world.directory.fail = True
        world.engine.end("room-101", SessionState.CLOSED)
        await settle()
        assert world.catalog.started_keys() == {"room-101"}
        world.directory.fail = False
        await world.catalog.sync()
        assert world.directory.stored == [] and world.catalog.started_keys() == frozenset()
        assert "room-101" not in world.engine.specs
    run(check, tmp_path, [ROOM])


@pytest.mark.parametrize("delete, stored", [(False, [False]), (True, [])])
def test_an_operator_stops_or_deletes_a_running_session(tmp_path, delete, stored):
    async def check(world: World) -> None:
        ok, message = await world.catalog.stop_session("ROOM-101", delete)
        assert ok and message == f"session 'room-101' {'deleted' if delete else 'stopped'}"
        await settle()
        await settle()
    world = run(check, tmp_path, [ROOM])
    assert [s.enabled for s in world.directory.stored] == stored


def test_delete_removes_a_directory_session_that_does_not_run(tmp_path):
    async def check(world: World) -> None:
        ok, message = await world.catalog.stop_session("off", True)
        assert ok and "deleted from the directory" in message
        ok, message = await world.catalog.stop_session("nothing", True)
        assert not ok and "no multicast session 'nothing'" in message
        ok, message = await world.catalog.stop_session("off", False)
        assert not ok
    world = run(check, tmp_path, [MulticastSession("off", IMAGE, enabled=False)])
    assert world.directory.stored == []


def test_shutdown_leaves_the_directory_alone(tmp_path):
    async def check(world: World) -> None:
        pass

    class Ending(FakeEngine):
        def stop(self) -> None:
            for name in list(self.specs):
                self.end(name, SessionState.ABORTED)
    world = run(check, tmp_path, [ROOM], engine=Ending())
    assert world.directory.stored == [ROOM]


def test_one_entry_per_receiver_reported_or_not(tmp_path):
    async def check(world: World) -> None:
        verdict = world.catalog.report(good_report(world))
        assert (verdict.status, verdict.verified) == ("success", True)
        world.engine.end("room-101", SessionState.CLOSED,
                         (done(MAC), done(OTHER, ReceiverState.LOST), done("")))
        await settle()
        assert world.entries == []          # the others' reports may still come
        world.clock.now += 61
        world.catalog._flush_waiting()
        assert [(e.mac, e.verdict.status) for e in world.entries] == \
            [(OTHER, "failure"), ("", "failure")]
        assert "lost" in world.entries[0].verdict.error
        assert world.entries[0].image == IMAGE and world.entries[0].session == "room-101"
    run(check, tmp_path, [ROOM])


def test_a_report_after_the_session_ended_replaces_the_senders_entry(tmp_path):
    async def check(world: World) -> None:
        world.engine.end("room-101", SessionState.CLOSED, (done(MAC),))
        await settle()
        verdict = world.catalog.report(good_report(world, chunks_verified=2))
        assert (verdict.status, verdict.verified) == ("failure", False)
        assert "2 of the image's 3 chunks" in verdict.error
        world.clock.now += 61
        world.catalog._flush_waiting()
        assert world.entries == []
    run(check, tmp_path, [ROOM])


def test_stopping_writes_the_entries_still_waiting(tmp_path):
    async def check(world: World) -> None:
        world.engine.end("room-101", SessionState.CLOSED, (done(OTHER),))
        await settle()
    world = run(check, tmp_path, [ROOM])
    assert [e.mac for e in world.entries] == [OTHER]


def test_sessions_workstations_ask_for(tmp_path):
    async def check(world: World) -> None:
        catalog = world.catalog
        status, answer = await catalog.register(Registration("lab", IMAGE, 3, 10))
        assert status == 201 and answer["created"] and answer["group"] == group_address("lab")
        spec = world.engine.specs["lab"]
        assert (spec.origin, spec.start_clients, spec.start_after_last_join_s) == \
            (SessionOrigin.CLIENT, 3, 600.0)
        again = await catalog.register(Registration("LAB", IMAGE))
        assert again[0] == 200 and again[1]["created"] is False
        assert (await catalog.register(Registration("lab", "lab/x.img")))[0] == 409
        assert (await catalog.register(Registration("room-101", IMAGE)))[0] == 409
        missing = await catalog.register(Registration("new", "lab/missing.img"))
        assert missing[0] == 404 and "stores its image first" in missing[1]["error"]
        full = await catalog.register(Registration("new", IMAGE))
        assert full == (503, {"error": "MaxSessions sessions are running; try again later"})
        assert catalog.start_now("lab", (SessionOrigin.CLIENT,)) == \
            (True, "session 'lab' starts now")
        assert ("start_now", "lab") in world.engine.calls
        assert catalog.start_now("room-101", (SessionOrigin.CLIENT,))[0] is False
        ok, _ = await catalog.stop_session("room-101", False, (SessionOrigin.CLIENT,))
        assert not ok
        ok, _ = await catalog.stop_session("lab", False, (SessionOrigin.CLIENT,))
        assert ok
        await settle()
        assert catalog.join_info("lab") is None
    world = run(check, tmp_path, [ROOM], max_sessions=2)
    assert world.directory.stored == [ROOM]     # a client session never touches the directory


def test_without_an_engine_nothing_opens(tmp_path):
    root = tmp_path / "images"
    make_image(root / IMAGE)
    gate = Gate(TrustSettings(str(tmp_path / "k"), 600, True, ()))
    catalog = Catalog(CatalogSettings(str(root), 997, 997), gate, FakeDirectory([ROOM]),
                      lambda e: None)

    async def main() -> None:
        await catalog.start(None, 0)
        await catalog.sync()
        assert not catalog.enabled and catalog.join_info("room-101") is None
        status, answer = await catalog.register(Registration("lab", IMAGE))
        assert status == 503 and "multicast is off" in answer["error"]
        await catalog.stop()
    asyncio.run(main())


def test_the_stand_in_engine_lists_and_closes(tmp_path):
    async def check(world: World) -> None:
        assert [s.state for s in world.catalog.statuses()] == [SessionState.WAITING]
        assert world.catalog.statuses()[0].image_bytes > 0
        ok, _ = await world.catalog.stop_session("room-101", False)
        await settle()
        assert ok and world.catalog.statuses() == []
    world = run(check, tmp_path, [ROOM], engine=NoEngine())
    assert [s.enabled for s in world.directory.stored] == [False]


def test_the_control_plane_ticks(tmp_path, monkeypatch):
    monkeypatch.setattr("imgsrvd.multicast.catalog.TICK_S", 0.01)

    async def check(world: World) -> None:
        world.directory.stored.append(MulticastSession("later", IMAGE))
        world.clock.now += SYNC_S
        await asyncio.sleep(0.1)
        assert "later" in world.engine.specs
    run(check, tmp_path, [ROOM])
