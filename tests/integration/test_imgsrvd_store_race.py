"""imgsrvd, concurrent uploads into folders that do not exist yet (issue 13): every sound image
is stored (201), never a 500, while refused uploads into the same fresh folders remove only the
folders that no image and no other upload holds. The real daemon; curl --parallel sends each
round's uploads at once, over as many connections, two into each fresh nested folder: two
sound images, or a sound one next to a refused one (not an image: 422), the company that made
the race likely (that case failed in every run before the fix, within its first 30 rounds).

Old: a refused upload removed "its" empty folders between another upload making them and
creating its temporary file there, which then failed with ENOENT: 500 "cannot store the image".
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.test_imgsrvd_http import Imgsrvd, imgsrvd_factory, make_image, workdir  # noqa: F401

ROUNDS = 40
FOLDERS = 12                     # fresh nested folders per round, two uploads into each
PER_ROUND = 2 * FOLDERS          # uploads at once
DEPTH = "a/b/c"
REFUSED = "refused.img"


def _put_all(daemon: Imgsrvd, uploads: list[tuple[Path, str]]) -> dict[str, int]:
    """PUT every (file, name) at once with one curl --parallel; {name: HTTP status}."""
    command = ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max",
               str(len(uploads)), "--max-time", "60", "-w", "%{http_code} %{url_effective}\n"]
    for local, name in uploads:
        command += ["-T", str(local), "-o", "/dev/null", f"{daemon.url}/v1/images/{name}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    statuses = {}
    for line in result.stdout.splitlines():
        code, _, url = line.partition(" ")
        statuses[url.split("/v1/images/", 1)[1]] = int(code)
    assert len(statuses) == len(uploads), (result.stdout, result.stderr)
    return statuses


@pytest.mark.parametrize("names", [("a.img", "b.img"), (REFUSED, "a.img")],
                         ids=["two-sound", "refused-and-sound"])
def test_concurrent_uploads_into_new_folders_all_succeed(imgsrvd_factory, workdir, names):
    daemon = imgsrvd_factory(MaxClients=PER_ROUND, MaxTransfersPerClient=PER_ROUND,
                             LogLevel="INFO")
    good = make_image(workdir / "good.img", chunks=2)
    bad = workdir / "bad.img"
    bad.write_bytes(b"not an image" * 8)          # refused (422) after its folders were made
    for round_ in range(ROUNDS):
        uploads = [(bad if name == REFUSED else good, f"r{round_}/f{f}/{DEPTH}/{name}")
                   for f in range(FOLDERS) for name in names]
        statuses = _put_all(daemon, uploads)
        wrong = {name: code for (local, name) in uploads
                 if (code := statuses[name]) != (422 if local is bad else 201)}
        assert not wrong, f"round {round_}: {wrong}"
    # every sound image is there, nothing else (no temporary file, no refused name)
    stored = sorted(str(p.relative_to(daemon.root)) for p in daemon.root.rglob("*.img"))
    assert stored == sorted(f"r{r}/f{f}/{DEPTH}/{name}" for r in range(ROUNDS)
                            for f in range(FOLDERS) for name in names if name != REFUSED)
    assert daemon.leftovers() == []
    log = daemon.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_refused_uploads_into_new_folders_leave_none(imgsrvd_factory, workdir):
    """Only refused uploads, at once, into the same fresh folders: whichever of them made a
    folder, the last one out removes it."""
    daemon = imgsrvd_factory(MaxClients=PER_ROUND, MaxTransfersPerClient=PER_ROUND,
                             LogLevel="INFO")
    bad = workdir / "bad.img"
    bad.write_bytes(b"not an image" * 8)
    (daemon.root / "kept").mkdir()                 # an operator's folder, empty: never removed
    for round_ in range(ROUNDS // 4):
        uploads = [(bad, f"kept/r{round_}/{DEPTH}/i{n}.img") for n in range(PER_ROUND)]
        assert set(_put_all(daemon, uploads).values()) == {422}
    assert [p.name for p in daemon.root.rglob("*")] == ["kept"]
    assert "Traceback" not in daemon.log()
