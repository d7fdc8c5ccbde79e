"""Trust on the imaging server (docs/security.md), against real daemons on 127.0.0.1 with
capabilities on (the default): each attack of issue 13 is refused with a clear reason in the
answer and the log, and the machines' own work still goes through.

- A forged result (the issue's `curl --json '{"mac": ...}' .../v1/results`) no longer clears a
  machine's "image on next boot" flag; with the capability of the machine's work it does.
- Requests without a capability, with another machine's, with an expired one, with a forged
  one, or from outside AllowedClients are refused (curl, a real client).
- `img auto` with the capability policyd hands out (policyd's own /policy answer, decoded)
  restores its image; `img restore --server` needs an operator's capability (`preboot-dir
  token`); a key rotated while the server runs keeps the capabilities already handed out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from common.machine import normalize_mac
from common.policy.capability import Capability, decode, encode
from common.policy.directory import open_directory
from common.policy.keyring import read_keys
from common.policy.model import Action, ActionKind, Rule, Workstation
from tests.integration.test_img_server_modes import (  # noqa: F401 (fixtures)
    FILES, Imgsrvd, blank, check_restored, img, imgsrvd_factory, source_disk)
from tests.support import REPO, DaemonProcess, write_config

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="img reads disks via loop devices")]

MAC = "52:54:00:7a:00:01"
OTHER = "52:54:00:7a:00:02"
IMAGE = "lab/base.img"


def curl(url: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args, url],
                          capture_output=True, text=True, timeout=60)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def token(server: Imgsrvd, mac: str, operations: tuple[str, ...], images: tuple[str, ...] = (),
          lifetime_s: int = 600, now: float | None = None) -> str:
    """A capability signed with the server's own key, as policyd or imgsrvd would issue it."""
    key_id, secret = read_keys(str(server.workdir / "imaging.key")).signing
    now = time.time() if now is None else now
    return encode(Capability(normalize_mac(mac) or mac, frozenset(operations), images,
                             int(now), int(now + lifetime_s)), key_id, secret)


@pytest.fixture
def server(imgsrvd_factory, source_disk) -> Imgsrvd:  # noqa: F811
    """An imgsrvd with capabilities on, holding lab/base.img, a restore rule for every machine
    and MAC's 'image on next boot' flag set."""
    daemon = imgsrvd_factory(AllowAnonymous=False)
    operator = token(daemon, "operator:setup", ("store",), ("lab/*",))
    img("make", "--disk", str(source_disk), "--server", daemon.address, IMAGE,
        "--token", operator)
    daemon.set_policy(Rule.from_text("everyone", "", Action(ActionKind.RESTORE, IMAGE)))
    with open_directory(f"sqlite://{daemon.db}") as directory:
        directory.put_workstation(Workstation(normalize_mac(MAC), "pc1",
                                              image_on_next_boot=True))
    return daemon


def next_boot(server: Imgsrvd, mac: str = MAC) -> bool:
    with open_directory(f"sqlite://{server.db}") as directory:
        return directory.workstation(normalize_mac(mac)).image_on_next_boot


def test_a_forged_result_does_not_clear_the_flag(server):
    url = f"http://{server.address}/v1/results"
    forged = json.dumps({"mac": MAC.replace(":", ""), "operation": "download",
                         "status": "success"})
    status, body = curl(url, "--json", forged)
    assert status == 401 and "'result' needs a capability" in body, body
    # another machine's capability does not do either
    status, body = curl(url, "--json", forged, "-H",
                        f"Authorization: Bearer {token(server, OTHER, ('result',))}")
    assert status == 403 and "issued to machine 5254007A0002, not 5254007A0001" in body, body
    assert next_boot(server) is True
    status, body = curl(url, "--json", forged, "-H",
                        f"Authorization: Bearer {token(server, MAC, ('result',))}")
    assert status == 200 and json.loads(body)["cleared"] is True, body
    assert next_boot(server) is False
    log = server.log()
    assert "'result' needs a capability" in log and "issued to machine" in log


@pytest.mark.parametrize("case, header, status, reason", [
    ("none", None, 401, "'retrieve' needs a capability"),
    ("another machine's image", "OTHER", 403, "does not name the image lab/base.img"),
    ("expired", "EXPIRED", 401, "expired"),
    ("forged", "FORGED", 401, "signature does not match"),
    ("work only", "WORK", 403, "does not allow 'retrieve'"),
])
def test_image_reads_need_the_right_capability(server, case, header, status, reason):
    capabilities = {
        "OTHER": token(server, OTHER, ("retrieve",), ("lab/other.img",)),
        "EXPIRED": token(server, MAC, ("retrieve",), (IMAGE,), lifetime_s=60,
                         now=time.time() - 120),
        "FORGED": token(server, MAC, ("retrieve",), (IMAGE,))[:-4] + "AAAA",
        "WORK": token(server, MAC, ("work",), (IMAGE,)),
    }
    args = [] if header is None else ["-H", f"Authorization: Bearer {capabilities[header]}"]
    got, body = curl(f"http://{server.address}/v1/images/{IMAGE}", *args)
    assert got == status and reason in body, (case, body[:300])
    assert reason in server.log()


def test_stores_need_a_store_capability(server, tmp_path):
    payload = tmp_path / "x.img"
    payload.write_bytes(b"not an image")
    url = f"http://{server.address}/v1/images/lab/x.img"
    status, body = curl(url, "-T", str(payload))
    assert status == 401 and "'store' needs a capability" in body
    restore_only = token(server, MAC, ("retrieve", "result"), ("lab/x.img",))
    status, body = curl(url, "-T", str(payload), "-H", f"Authorization: Bearer {restore_only}")
    assert status == 403 and "does not allow 'store'" in body
    assert not (server.root / "lab" / "x.img").exists()


def test_clients_outside_allowed_clients_are_refused(imgsrvd_factory):  # noqa: F811
    daemon = imgsrvd_factory(AllowAnonymous=True, AllowedClients="10.0.0.0/8")
    status, body = curl(f"http://{daemon.address}/v1/images/{IMAGE}")
    assert status == 403 and "127.0.0.1 is not in AllowedClients" in body, body


def test_open_mode_is_logged_as_a_warning(imgsrvd_factory):  # noqa: F811
    daemon = imgsrvd_factory(AllowAnonymous=True)
    assert "AllowAnonymous = YES" in daemon.log()


@pytest.fixture
def policyd(server) -> DaemonProcess:
    """policyd on the same directory and key file as the imaging server."""
    workdir = server.workdir
    config = write_config(workdir / "policyd.conf", {
        "IPAddress": "127.0.0.1", "Port": 0, "Directory": f"sqlite://{server.db}",
        "StatusPort": 0, "StatusSocket": str(workdir / "p.sock"),
        "PidFile": str(workdir / "p.pid"), "LogLevel": "DEBUG",
        "LogFile": str(workdir / "p.log"), "TokenKeyFile": str(workdir / "imaging.key")})
    daemon = DaemonProcess("prebootpolicyd", config, str(workdir / "p.sock"),
                           workdir / "p.log").start(timeout_s=20)
    yield daemon
    daemon.stop()


def test_img_auto_works_with_the_capability_policyd_hands_out(server, policyd, tmp_path):
    query = urllib.parse.urlencode({"mac": MAC, "platform": "pcbios", "arch": "x86_64"})
    status, script = curl(f"http://127.0.0.1:{policyd.port}/policy?{query}")
    assert status == 200, script
    found = re.search(r"preboot\.token=(\S+)", script)
    assert found, script
    work_token = urllib.parse.unquote(found.group(1))
    keys = read_keys(str(server.workdir / "imaging.key")).accepted
    capability = decode(work_token, keys, time.time())
    assert capability.subject == normalize_mac(MAC) and capability.operations == {"work"}

    target = blank(tmp_path / "target.disk")
    done = subprocess.run(
        [sys.executable, "-m", "img", "auto", "--disk", str(target), "--server",
         server.address, "--fact", f"mac={MAC}"], capture_output=True, text=True,
        timeout=600, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PREBOOT_TOKEN=work_token))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the workstation's 'image on next boot' flag was cleared" in done.stdout
    check_restored(target, tmp_path)
    assert next_boot(server) is False
    # the work capability alone reads no image
    status, body = curl(f"http://{server.address}/v1/images/{IMAGE}", "-H",
                        f"Authorization: Bearer {work_token}")
    assert status == 403 and "does not allow 'retrieve'" in body


def test_operators_need_a_capability_and_keys_rotate_without_a_restart(server, tmp_path):
    target = blank(tmp_path / "target.disk")
    refused = img("restore", "--disk", str(target), "--server", server.address, IMAGE,
                  expect=1)
    assert "needs a capability" in refused.stderr and "preboot-dir token" in refused.stderr
    key_file = str(server.workdir / "imaging.key")
    made = subprocess.run(
        [sys.executable, "-m", "common.dircli", "token", "--operator", "alice", "--allow",
         "retrieve,result", "--image", "lab/*", "--key-file", key_file],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert made.returncode == 0, made.stderr
    operator = made.stdout.strip()
    time.sleep(1.1)                      # a new key id (it carries the second it was made)
    rotated = subprocess.run(
        [sys.executable, "-m", "common.dircli", "key", "rotate", "--key-file", key_file],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert rotated.returncode == 0, rotated.stderr
    time.sleep(1.5)                      # the server looks at the file at most once a second
    img("restore", "--disk", str(target), "--server", server.address, IMAGE,
        "--token", operator)
    check_restored(target, tmp_path)
    # a capability signed with a key the file does not hold is refused
    stranger = encode(Capability("operator:mallory", frozenset({"retrieve"}), ("*",),
                                 int(time.time()), int(time.time()) + 600), "k9", b"z" * 32)
    refused = img("restore", "--disk", str(target), "--server", server.address, IMAGE,
                  "--token", stranger, expect=1)
    assert "signed with key 'k9', which this server does not hold" in refused.stderr
