"""The multicast control plane against a real imgsrvd (capabilities on): the work answer that
sends a machine into its session, sessions a workstation master registers (who may), receivers'
results (one entry each, Images Sent only when verified), the status reply and the control
commands zmgmcast sends. Each test, its daemon (with the real engine: its sessions announce
themselves on their groups), curl and img run in a network namespace of their own
(tests/support.py inside_new_netns), so multicast never leaves it. No receiver joins here: the data plane
has its own tests (test_multicast_netns.py, test_multicast_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from common.daemon.statussock import query_unix
from common.imaging.multicast import group_address
from common.machine import normalize_mac
from common.policy.capability import Capability, decode, encode
from common.policy.keyring import read_keys
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation)
from imgsrvd.multicast.images import read_image_facts
from tests.integration.test_imgsrvd_http import (  # noqa: F401 (fixtures)
    Imgsrvd, image, imgsrvd_factory, wait_for, workdir)
from tests.support import REPO, inside_new_netns

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")

MAC = "52:54:00:7a:00:01"
OTHER = "52:54:00:7a:00:02"
IMAGE = "lab/base.img"
NEVER = MenuSettings(MenuDisplay.NEVER, 5)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token(server: Imgsrvd, subject: str, operations: tuple[str, ...],
          images: tuple[str, ...] = ()) -> str:
    key_id, secret = read_keys(str(server.workdir / "imaging.key")).signing
    now = int(time.time())
    subject = normalize_mac(subject) or subject
    return encode(Capability(subject, frozenset(operations), images, now, now + 600), key_id,
                  secret)


def bearer(value: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {value}")


def post(server: Imgsrvd, path: str, body: dict[str, Any], auth: str = "",
         method: str = "POST") -> tuple[int, dict[str, Any]]:
    args = ["-X", method, "-H", "Content-Type: application/json", "--data-binary",
            json.dumps(body)]
    if auth:
        args += list(bearer(auth))
    code, text = server.curl(*args, path=path)
    return code, json.loads(text) if text else {}


def get(server: Imgsrvd, path: str, auth: str = "") -> tuple[int, dict[str, Any]]:
    code, text = server.curl(*(bearer(auth) if auth else ()), path=path)
    return code, json.loads(text)


@pytest.fixture
def netns() -> Any:
    """This test, its daemon, curl and img in a network namespace of their own."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with inside_new_netns("pbmcc") as name:
        yield name


@pytest.fixture
def server(netns, imgsrvd_factory, image) -> Imgsrvd:  # noqa: F811
    """imgsrvd with capabilities on and a free multicast control port, holding lab/base.img; a
    directory session room-101 naming MAC, and a rule with action multicast for OTHER. In its
    own network namespace, its groups sent on that namespace's loopback (TTL 1)."""
    port = free_udp_port()
    daemon = imgsrvd_factory(AllowAnonymous=False, MulticastPort=port,
                             MulticastInterface="127.0.0.1", MulticastTTL=1)
    daemon.multicast_port = port
    code, body = daemon.upload(image, IMAGE, *bearer(token(daemon, "operator:setup",
                                                           ("store",), ("lab/*",))))
    assert code == 201, body
    with daemon.directory() as directory:
        directory.replace_policy(ImagingPolicy((
            Rule.from_text("restore all", f"mac != {normalize_mac(OTHER)}",
                           Action(ActionKind.RESTORE, IMAGE)),
            Rule.from_text("room", f"mac = {normalize_mac(OTHER)}",
                           Action(ActionKind.MULTICAST, session="room-202")),
        ), NEVER))
        directory.replace_sessions([MulticastSession("room-101", IMAGE, 2, 15,
                                                     participants=(MAC,)),
                                    MulticastSession("room-202", IMAGE, 3, 0)])
    return daemon


def work(server: Imgsrvd, mac: str) -> tuple[int, dict[str, Any]]:
    return post(server, "/v1/work", {"mac": mac}, token(server, mac, ("work",)))


def test_the_work_answer_sends_a_machine_into_its_session(server):
    facts = read_image_facts(str(server.root), IMAGE)
    code, answer = work(server, MAC)
    assert code == 200, answer
    assert answer["work"] == "multicast" and answer["session"] == "room-101"
    assert answer["group"] == group_address("room-101")
    assert answer["data_port"] == server.multicast_port       # MulticastPort: data too
    assert answer["control_port"] == server.status()["multicast"]["control_port"]
    assert (answer["image"], answer["digest"]) == (IMAGE, facts.digest_hex)
    assert f"names this machine (MAC {normalize_mac(MAC)})" in answer["reason"]
    key_id, secret = read_keys(str(server.workdir / "imaging.key")).signing
    capability = decode(answer["token"], {key_id: secret}, time.time())
    assert capability.subject == normalize_mac(MAC)
    assert capability.operations == {"retrieve", "result"} and capability.images == (IMAGE,)
    # chosen by a rule with action multicast naming the session
    code, answer = work(server, OTHER)
    assert code == 200 and (answer["work"], answer["session"]) == ("multicast", "room-202")
    assert "rule 'room' matches and sends it to session 'room-202'" in answer["reason"]
    # the status reply lists both sessions, waiting
    sessions = server.status()["multicast"]["sessions"]
    assert [(s["name"], s["state"], s["origin"]) for s in sessions] == \
        [("room-101", "waiting", "directory"), ("room-202", "waiting", "directory")]


def test_a_session_whose_image_is_missing_is_no_work(server):
    with server.directory() as directory:
        directory.replace_sessions([MulticastSession("room-101", "lab/missing.img",
                                                     participants=(MAC,))])
    code, answer = work(server, MAC)
    assert code == 200 and answer["work"] == "none", answer
    assert "session 'room-101' cannot run: its image cannot be sent" in answer["reason"]
    assert "token" not in answer


def test_registering_a_session_needs_an_operator(server):
    body = {"name": "lab 7", "image": IMAGE, "clients": 4, "t": 5}
    operator = token(server, "operator:alice", ("retrieve",), ("lab/*",))
    refusals = [
        ("", 401, "needs a capability"),
        (token(server, MAC, ("retrieve", "result"), (IMAGE,)), 403, "operator's capability"),
        (token(server, "operator:bob", ("retrieve",), ("other/*",)), 403,
         "does not name the image"),
        (token(server, "operator:bob", ("store",), ("lab/*",)), 403, "does not allow"),
    ]
    for auth, status, fragment in refusals:
        code, answer = post(server, "/v1/sessions", body, auth)
        assert code == status and fragment in answer["error"], (auth, answer)
    code, answer = post(server, "/v1/sessions", body, operator)
    assert code == 201, answer
    assert answer["created"] and answer["group"] == group_address("lab 7")
    code, answer = post(server, "/v1/sessions", {"name": "lab 7", "image": IMAGE}, operator)
    assert code == 200 and answer["created"] is False
    code, answer = post(server, "/v1/sessions", {"name": "lab 7", "image": "lab/x.img"},
                        operator)
    assert code == 409 and "another image" in answer["error"]
    code, answer = post(server, "/v1/sessions", {"name": "room-101", "image": IMAGE}, operator)
    assert code == 409 and "a session of the directory" in answer["error"]
    code, answer = post(server, "/v1/sessions", {"name": "new", "image": "lab/none.img"},
                        operator)
    assert code == 404 and "stores its image first" in answer["error"]
    for bad in ({"name": "", "image": IMAGE}, {"name": "x", "image": IMAGE, "t": 3},
                {"name": "x", "image": IMAGE, "extra": 1}, ["not", "an", "object"]):
        code, answer = server.curl("-H", f"Authorization: Bearer {operator}", "--data-binary",
                                   json.dumps(bad), path="/v1/sessions")
        assert code == 400, (bad, answer)
    code, answer = post(server, "/v1/sessions", {"name": "up", "image": "../etc/passwd"},
                        operator)
    assert code == 403
    # its state, then the master's g, then it gives up
    code, answer = get(server, "/v1/sessions/lab%207", operator)
    assert code == 200 and answer["state"] == "waiting" and answer["receivers"] == 0
    code, _ = get(server, "/v1/sessions/lab%207")
    assert code == 401
    code, answer = post(server, "/v1/sessions/lab%207/start", {}, operator)
    assert code == 409 and "nobody has joined session 'lab 7' yet" in answer["error"], answer
    work(server, MAC)                                # the directory's sessions open
    code, answer = post(server, "/v1/sessions/room-101/start", {}, operator)
    assert code == 409 and "directory session" in answer["error"]
    code, answer = post(server, "/v1/sessions/lab%207", {}, operator, method="DELETE")
    assert code == 200
    assert wait_for(lambda: get(server, "/v1/sessions/lab%207", operator)[0] == 404)


def report(server: Imgsrvd, mac: str, auth: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    facts = read_image_facts(str(server.root), IMAGE)
    body = {"workstation": "pc1", "mac": mac, "operation": "download", "image_type": "base",
            "image_path": IMAGE, "status": "success", "error_message": "",
            "multicast_session": "room-101", "digest": facts.digest_hex,
            "chunks_verified": facts.chunks, "bytes_written": 524288, "path": "multicast"}
    body.update(fields)
    return post(server, "/v1/results", body, auth)


def test_receivers_results_are_judged_and_logged_one_each(server):
    with server.directory() as directory:
        directory.put_workstation(Workstation(normalize_mac(MAC), "pc1",
                                              image_on_next_boot=True))
    _, answer = work(server, MAC)
    mine = answer["token"]
    before = server.counters()
    # a success the report does not show on the disk is logged as a failure, not counted
    code, answer = report(server, MAC, mine, chunks_verified=1)
    assert code == 200 and answer["verified"] is False and answer["cleared"] is False
    code, answer = report(server, MAC, mine, digest="ab" * 16)
    assert code == 200 and answer["verified"] is False
    code, answer = report(server, MAC, mine, status="failure", path="failed",
                          error_message="the disk is too small")
    assert code == 200 and answer["verified"] is False
    counters = server.counters()
    assert counters["images_sent"] == before["images_sent"]
    # the real thing: verified, an Image Sent, the flag cleared
    code, answer = report(server, MAC, mine, path="multicast+unicast")
    assert code == 200 and answer == {"logged": True, "cleared": True, "verified": True}
    counters = server.counters()
    assert counters["images_sent"] == before["images_sent"] + 1
    assert (counters["multicast_receivers"], counters["multicast_verified"]) == (4, 1)
    entries = [e for e in server_results(server) if e.session == "room-101"]
    assert [(e.status, e.transfer) for e in entries] == [
        ("failure", "multicast"), ("failure", "multicast"), ("failure", "failed"),
        ("success", "multicast+unicast")]
    assert "1 of the image's" in entries[0].error_message
    assert "not the session's" in entries[1].error_message
    assert entries[2].error_message == "the disk is too small"
    last = entries[-1]
    assert (last.workstation, last.image_path, last.chunks_verified, last.bytes_written) == \
        ("pc1", IMAGE, read_image_facts(str(server.root), IMAGE).chunks, 524288)
    assert last.image_digest == read_image_facts(str(server.root), IMAGE).digest_hex
    # another machine's capability cannot report for this one; bad fields are 400
    code, _ = report(server, MAC, token(server, OTHER, ("result",)))
    assert code == 403
    for bad in ({"path": "carrier pigeon"}, {"chunks_verified": -1}, {"digest": "xyz"},
                {"operation": "upload"}, {"multicast_session": ""}):
        code, answer = report(server, MAC, mine, **bad)
        assert code == 400, (bad, answer)


def server_results(server: Imgsrvd) -> list[Any]:
    from imgsrvd.resultslog import read_entries
    path = server.workdir / "results.xml"
    assert wait_for(path.exists)
    return list(read_entries(path))


def control(server: Imgsrvd, verb: str, **fields: Any) -> dict[str, Any]:
    return query_unix(server.status_socket, verb, fields=fields)


def test_zmgmcast_control_commands(server):
    answer = control(server, "mcast-start", name="manual 1", image=IMAGE, clients=3, t=2)
    assert answer["ok"] and "session 'manual 1' opened" in answer["message"], answer
    sessions = {s["name"]: s for s in server.status()["multicast"]["sessions"]}
    assert sessions["manual 1"]["origin"] == "manual"
    assert sessions["manual 1"]["start_clients"] == 3
    # start it now: not while nobody has joined (nothing to send; it keeps waiting)
    early = control(server, "mcast-start", name="manual 1")
    assert not early["ok"] and "nobody has joined session 'manual 1' yet" in early["error"]
    assert not control(server, "mcast-start", name="nope")["ok"]
    bad = control(server, "mcast-start", name="x", image="../x", clients=0, t=0)
    assert not bad["ok"] and "'..'" in bad["error"]
    assert control(server, "mcast-stop", name="manual 1")["ok"]
    # delete a directory session: it stops and leaves the directory
    work(server, MAC)
    answer = control(server, "mcast-delete", name="room-101")
    assert answer["ok"], answer
    with server.directory() as directory:
        assert wait_for(lambda: [s.name for s in directory.sessions()] == ["room-202"])
    answer = control(server, "mcast-delete", name="room-101")
    assert not answer["ok"] and "no multicast session" in answer["error"]


# ---- img: the workstation's side (the receiver itself is replaced: the data plane's) ----------

def address(server: Imgsrvd) -> str:
    return f"127.0.0.1:{server.port}"


def img_session(server: Imgsrvd, *words: str, stdin: str, auth: str,
                expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "img", "session", *words, "--server", address(server),
         "--disk", "/dev/null", "--token", auth],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def test_img_session_master_opens_starts_and_leaves(server):
    operator = token(server, "operator:alice", ("retrieve", "result"), ("lab/*",))
    done = img_session(server, "lab 9", "master", "--image", IMAGE, stdin="g\nq\n",
                       auth=operator)
    assert f"session 'lab 9' is open on {address(server)}: {IMAGE} to " \
           f"{group_address('lab 9')}:{server.multicast_port}; press g to start it" \
        in done.stdout
    assert "nobody has joined session 'lab 9' yet" in done.stdout     # g with no receiver
    assert "press g again when the receivers have joined" in done.stdout
    assert "goes on without this console" in done.stdout
    sessions = {s["name"]: s for s in server.status()["multicast"]["sessions"]}
    assert sessions["lab 9"]["origin"] == "client" and sessions["lab 9"]["start_clients"] == 0
    # without master or client: m makes this one the master (clients=2: no g needed)
    done = img_session(server, "lab 10", "clients=2", "t=5", "--image", IMAGE,
                       stdin="m\nq\n", auth=operator)
    assert "press m to become its master" in done.stdout
    assert "it starts when 2 have joined or 5 min after the last join" in done.stdout
    # a machine's capability cannot open a session
    done = img_session(server, "lab 11", "master", "--image", IMAGE, stdin="q\n",
                       auth=token(server, MAC, ("retrieve", "result"), (IMAGE,)), expect=1)
    assert "operator's capability" in done.stderr


def fake_receiver(monkeypatch, server: Imgsrvd, joined: list[dict[str, Any]],
                  **changes: Any) -> None:
    from img import session
    facts = read_image_facts(str(server.root), IMAGE)

    def receive(**arguments: Any) -> Any:
        joined.append(arguments)
        fields = {"ok": True, "digest": facts.digest, "chunks_verified": facts.chunks,
                  "bytes_written": 65536, "path": "multicast", "error": "", "refusal": None}
        fields.update(changes)
        return session.reception_of(SimpleNamespace(**fields))
    monkeypatch.setattr(session, "receive", receive)


def test_img_session_client_joins_what_the_master_opened(server, monkeypatch):
    from img import session
    operator = token(server, "operator:alice", ("retrieve", "result"), ("lab/*",))
    code, _ = post(server, "/v1/sessions", {"name": "lab 12", "image": IMAGE}, operator)
    assert code == 201
    joined: list[dict[str, Any]] = []
    fake_receiver(monkeypatch, server, joined)
    args = img_args(session_words=["client"], name="lab 12", server=address(server),
                    token=operator)
    read, write = os.pipe()
    os.close(write)
    with open(read, "rb", buffering=0) as stream:
        assert session.run(args, session.Keys(stream)) == 0
    (arguments,) = joined
    assert arguments["session"] == "lab 12"
    assert arguments["control"] == ("127.0.0.1", server.status()["multicast"]["control_port"])
    assert arguments["digest"] == read_image_facts(str(server.root), IMAGE).digest
    entries = [e for e in server_results(server) if e.session == "lab 12"]
    assert [(e.status, e.transfer, e.workstation) for e in entries] == \
        [("success", "multicast", "pc-lab12")]


def test_img_auto_with_multicast_work(server, monkeypatch, tmp_path):
    from img import auto
    joined: list[dict[str, Any]] = []
    fake_receiver(monkeypatch, server, joined)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(1 << 20))
    args = img_args(disk=str(disk), server=address(server),
                    token=token(server, MAC, ("work",)), fact=[f"mac={MAC}",
                                                              "hostname=pc-auto"])
    before = server.counters()["images_sent"]
    assert auto.run(args) == 0
    assert [a["session"] for a in joined] == ["room-101"]
    assert joined[0]["mac"] == normalize_mac(MAC)
    assert server.counters()["images_sent"] == before + 1
    # the session began (the engine says so): the next machine is sent into no session now
    fake_receiver(monkeypatch, server, joined, ok=False, refusal=5, path="failed",
                  digest=b"", chunks_verified=0, bytes_written=0, error="imaging began")
    assert auto.run(img_args(disk=str(disk), server=address(server),
                             token=token(server, MAC, ("work",)),
                             fact=[f"mac={MAC}"])) == 1
    assert len(joined) == 1 + auto.MAX_WORK_ROUNDS


def restored_linux(tmp_path) -> bytes:
    """What the fake receiver puts on the disk: an MBR disk of 40 MiB with an ext4 at 1 MiB
    shaped like a Linux root (os-release, a host name, NetworkManager's folder)."""
    from tests.integration.test_identity_apply import disk_of, ext4_from, write_tree
    tree = tmp_path / "root"
    write_tree(tree, {"etc/os-release": "ID=debian\n", "etc/hostname": "golden\n",
                      "etc/NetworkManager/system-connections/wired.nmconnection":
                          "[connection]\nid=wired\ntype=ethernet\n"})
    return disk_of(tmp_path, [(ext4_from(tree, tmp_path / "p1"), "83")]).read_bytes()


def restoring_receiver(monkeypatch, server: Imgsrvd, content: bytes) -> None:
    """session.receive replaced by one that writes content onto the disk as a restore does
    (the table sector and the partitions, never the image-safe data below 1 MiB) and says it
    received the session's image."""
    from img import session
    facts = read_image_facts(str(server.root), IMAGE)

    def receive(**arguments: Any) -> Any:
        with open(arguments["disk"], "r+b") as disk:
            disk.write(content[:512])
            disk.seek(1 << 20)
            disk.write(content[1 << 20:])
        return session.Reception(True, facts.digest.hex(), facts.chunks, len(content),
                                 "multicast")
    monkeypatch.setattr(session, "receive", receive)


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("sfdisk", "mkfs.ext4", "debugfs")),
                    reason="needs sfdisk, mkfs.ext4 and debugfs")
def test_img_auto_applies_the_identity_after_a_multicast_restore(server, monkeypatch,
                                                                   tmp_path):
    """The multicast rule names an identity policy: the first restore gets a name and an
    address from its pool, applied to the restored Linux, kept on the disk and reported; the
    next one (a reimage) sends the disk's identity and gets it back (identity_source disk)."""
    from img import auto
    from img.isdstore import read_identity
    from common.policy.identitypolicy import AddressPool, IdentityPolicy, NameSource
    from tests.integration.test_identity_apply import ext4_cat, partition_file
    lab = IdentityPolicy("lab", NameSource.COUNTER, "lab-", dns_suffix="lab.example",
                         pool=AddressPool(("10.9.0.20-10.9.0.29",), 24, "10.9.0.1"))
    with server.directory() as directory:
        directory.replace_policy(ImagingPolicy((
            Rule.from_text("room", f"mac = {normalize_mac(OTHER)}",
                           Action(ActionKind.MULTICAST, session="room-202"), identity="lab"),
        ), NEVER, (lab,)))
    restoring_receiver(monkeypatch, server, restored_linux(tmp_path))
    disk = tmp_path / "target.disk"
    disk.write_bytes(bytes(40 << 20))
    args = img_args(disk=str(disk), server=address(server),
                    token=token(server, OTHER, ("work",)), fact=[f"mac={OTHER}"])
    assert auto.run(args) == 0
    kept = read_identity(str(disk))
    assert kept is not None and (kept.name, kept.ip.address if kept.ip else None) == \
        ("lab-001", "10.9.0.20")
    part = partition_file(disk, 1, tmp_path / "p1.read")
    assert ext4_cat(part, "/etc/hostname") == "lab-001\n"
    keyfile = ext4_cat(part, "/etc/NetworkManager/system-connections/"
                             "preboot-identity.nmconnection")
    assert "address1=10.9.0.20/24,10.9.0.1" in keyfile
    (entry,) = [e for e in server_results(server) if e.session == "room-202"]
    assert (entry.status, entry.transfer) == ("success", "multicast")
    assert entry.identity.startswith("name=lab-001 dns_suffix=lab.example ip=10.9.0.20/24")
    assert "identity stored in the disk's image-safe data" in entry.identity
    with server.directory() as directory:
        log = sorted((a.kind, a.value, a.mac) for a in directory.assignments("lab"))
    assert log == sorted([("address", "10.9.0.20", normalize_mac(OTHER)),
                          ("counter", "1", normalize_mac(OTHER))]), log

    # the reimage: the disk's identity goes with the work query and comes back, applied again
    # over the image's host name; nothing new is handed out
    assert auto.run(args) == 0
    part = partition_file(disk, 1, tmp_path / "p1.again")
    assert ext4_cat(part, "/etc/hostname") == "lab-001\n"
    assert wait_for(lambda: "identities_from_disk" in server.counters() and
                    server.counters()["identities_from_disk"] == 1)
    assert server.counters()["identities_assigned"] == 1
    with server.directory() as directory:
        assert len(directory.assignments("lab")) == 2


def img_args(session_words: list[str] | None = None, **values: Any) -> argparse.Namespace:
    defaults = {"name": "", "words": session_words or [], "disk": "/dev/null", "image": None,
                "sector_size": None, "grow": False, "level": 3, "threads": 2,
                "fact": ["hostname=pc-lab12"], "token": None, "token_file": None,
                "server_pin": None, "server_ca": None}
    return argparse.Namespace(**{**defaults, **values})


def zmgmcast(*argv: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "zmgmcast", *argv], capture_output=True,
                            text=True, timeout=60, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == expect, result.stdout + result.stderr
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="control verbs need root (SO_PEERCRED)")
def test_zmgmcast_shows_and_controls_the_sessions(server):
    sock = server.status_socket
    done = zmgmcast("--socket", sock, "-start", "lab 20", "-image", IMAGE, "-clients", "3")
    assert done.stdout.startswith("session 'lab 20' opened: lab/base.img to ")
    work(server, MAC)
    shown = zmgmcast("-status", "--socket", sock).stdout
    assert f"    Multicast sessions (control port {server.multicast_port}/udp): 3" in shown
    assert "      lab 20: waiting (manual), lab/base.img to " in shown
    assert "        starts when 3 have joined (0 now); rate -; 0 B sent, repairs 0.0 %" in shown
    assert "      room-101: waiting (directory)" in shown
    assert zmgmcast("--socket", sock, "-stop", "lab 20").stdout == "session 'lab 20' stopped\n"
    refused = zmgmcast("--socket", sock, "-stop", "lab 20", expect=1)
    assert "no multicast session 'lab 20' is running" in refused.stderr
    assert wait_for(lambda: "lab 20" not in zmgmcast("-status", "--socket", sock).stdout)


def test_a_report_of_a_session_from_before_a_restart_is_judged_by_its_image(server):
    mine = token(server, MAC, ("result",))
    code, answer = report(server, MAC, mine, multicast_session="before the restart")
    assert code == 200 and answer["verified"] is True
    code, answer = report(server, MAC, mine, multicast_session="before the restart",
                          image_path="lab/missing.img")
    assert code == 200 and answer["verified"] is False


def test_the_status_lists_the_multicast_port(server):
    listen = server.status()["listen"]
    assert listen[0]["proto"] == "tcp"
    assert {"proto": "udp", "address": "127.0.0.1", "port": server.multicast_port} in listen
