"""`preboot-dir images --server HOST[:PORT]` against a real imgsrvd on 127.0.0.1
(`GET /v1/images`, imgsrvd/listing.py, docs/security.md): an operator's capability allowing
`retrieve` lists what its image patterns name (size, type, date, from the headers), a machine's
capability and no capability are refused with the reason on one line, the open mode lists
everything, and partial uploads never show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.imaging.imagefile import ImageWriter
from common.machine import normalize_mac
from common.policy.capability import Capability, encode
from common.policy.keyring import read_keys
from tests.integration.test_img_server_modes import Imgsrvd, imgsrvd_factory  # noqa: F401
from tests.support import REPO

MAC = "52:54:00:7a:00:09"


def _image(path: Path, kind: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        writer = ImageWriter(out, {"format": 1, "type": kind, "streams": []}, chunk_size=65536)
        for offset in range(0, size, 65536):
            writer.add(0, offset, os.urandom(min(65536, size - offset)))
        writer.close()


def _fill(root: Path) -> None:
    _image(root / "lab" / "base.img", "base", 150_000)
    _image(root / "lab" / "drivers.add", "addon", 1000)
    _image(root / "other" / "secret.img", "base", 1000)
    (root / "lab" / ".base.img.part-0123456789abcdef").write_bytes(b"uploading")
    os.utime(root / "lab" / "base.img", (1_700_000_000, 1_700_000_000))


def _token(server: Imgsrvd, subject: str, operations: tuple[str, ...],
           images: tuple[str, ...]) -> str:
    key_id, secret = read_keys(str(server.workdir / "imaging.key")).signing
    now = int(time.time())
    return encode(Capability(subject, frozenset(operations), images, now, now + 600),
                  key_id, secret)


def images(server: Imgsrvd, *args: str, expect: int = 0, token: str | None = None):
    env = dict(os.environ, PYTHONPATH=str(REPO), TZ="UTC")
    env.pop("PREBOOT_TOKEN", None)
    if token:
        env["PREBOOT_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "common.dircli", "images", "--server",
                           server.address, *args], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def trusted(imgsrvd_factory):  # noqa: F811
    server = imgsrvd_factory(AllowAnonymous=False)
    _fill(server.root)
    return server


def test_an_operator_lists_what_its_patterns_name(trusted):
    operator = _token(trusted, "operator:alice", ("retrieve",), ("lab/*",))
    lines = images(trusted, token=operator).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["lab/base.img", "lab/drivers.add"]
    size = (trusted.root / "lab" / "base.img").stat().st_size
    assert lines[0].split()[1:] == [*f"{size / 1024:.1f} KiB ({size} bytes)".split(), "base",
                                    "2023-11-14", "22:13"], lines[0]
    assert " add-on " in lines[1]
    listing = json.loads(images(trusted, "--json", "--token", operator).stdout)
    assert [(item["path"], item["type"], item["problem"]) for item in listing] == [
        ("lab/base.img", "base", ""), ("lab/drivers.add", "add-on", "")]
    assert listing[0]["size"] == size


@pytest.mark.parametrize("case, reason", [
    ("machine", "needs an operator's capability"),
    ("store-only", "does not allow 'retrieve'"),
    ("none", "needs a capability"),
])
def test_others_are_refused_with_the_reason(trusted, case, reason):
    token = {"machine": _token(trusted, normalize_mac(MAC), ("retrieve",), ("lab/base.img",)),
             "store-only": _token(trusted, "operator:bob", ("store",), ("*",)),
             "none": None}[case]
    proc = images(trusted, token=token, expect=65)
    assert proc.stdout == ""
    line, = proc.stderr.splitlines()
    assert trusted.address in line and reason in line, line
    assert ("403" if case != "none" else "401") in line


def test_the_open_mode_lists_everything(imgsrvd_factory):  # noqa: F811
    server = imgsrvd_factory(AllowAnonymous=True)
    _fill(server.root)
    paths = [line.split()[0] for line in images(server).stdout.splitlines()]
    assert paths == ["lab/base.img", "lab/drivers.add", "other/secret.img"]


def test_an_unreachable_server_is_one_line(tmp_path):
    class Nowhere:
        address = "127.0.0.1:1"
    proc = images(Nowhere(), expect=65)
    line, = proc.stderr.splitlines()
    assert "127.0.0.1:1: cannot list images" in line


def test_over_tls_with_the_pin_and_refused_with_another(imgsrvd_factory, tmp_path):  # noqa: F811
    from tests.integration.test_tls import make_pair
    cert, key, pin = make_pair(tmp_path)
    server = imgsrvd_factory(AllowAnonymous=False, TLSCertificate=str(cert), TLSKey=str(key))
    _fill(server.root)
    operator = _token(server, "operator:alice", ("retrieve",), ("lab/*",))
    lines = images(server, "--server-pin", f"sha256:{pin}", token=operator).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["lab/base.img", "lab/drivers.add"]
    other = "ab" * 32
    proc = images(server, "--server-pin", other, token=operator, expect=65)
    line, = proc.stderr.splitlines()
    assert f"is not the pinned one (sha256:{other}); nothing was sent" in line
    ca = images(server, "--server-ca", str(cert), token=operator).stdout
    assert "lab/base.img" in ca
