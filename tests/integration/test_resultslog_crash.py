"""kill -9 a process appending to the results log, at random moments: nothing reported is lost.

The child appends entries in a tight loop and prints ``ok N`` after each ``append()`` returns. After
each SIGKILL the parent recovers the file with ``open()`` and checks that it parses (ElementTree and
``xmllint --noout`` when installed) and that every entry the child reported is there, in order,
with at most the one entry that was in flight in addition.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imgsrvd.resultslog import CLOSE, ResultsLog, read_entries

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys
    from imgsrvd.resultslog import ResultsLog, ResultEntry
    path, round_no, max_bytes, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if slow == "slow":  # a slow disk: each write lands in small pieces, so kills tear entries
        import os, time
        real_pwrite = os.pwrite
        def pwrite(fd, data, offset):
            time.sleep(0.0001)
            return real_pwrite(fd, bytes(data[:61]), offset)
        os.pwrite = pwrite
    log = ResultsLog(path, max_bytes=max_bytes, keep=1000)
    log.open()
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    n = 0
    while True:
        # sizes from one line to several pages, so kills land inside multi-page writes too
        message = ("e%d-%d " % (round_no, n)) * (1 + (n * 997) % 2500)
        log.append(ResultEntry(workstation="r%d-%d" % (round_no, n), operation="upload",
                               status="failure", image_type="base", image_path="/img/a.zmg",
                               error_message=message, bytes=n))
        sys.stdout.write("ok %d\\n" % n); sys.stdout.flush()
        n += 1
""")


def run_and_kill(path: Path, round_no: int, delay_s: float, max_bytes: int = 0,
                 disk: str = "real") -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(round_no),
                              str(max_bytes), disk], stdout=subprocess.PIPE, cwd=REPO, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(delay_s)
        child.send_signal(signal.SIGKILL)
        out = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    lines = out.split(b"\n")[:-1]  # the last piece is partial (or empty)
    reported = [int(line.split()[1]) for line in lines if line.startswith(b"ok ")]
    assert reported == list(range(len(reported)))
    return len(reported)


def check_well_formed(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "imaging-results"
    if shutil.which("xmllint"):
        subprocess.run(["xmllint", "--noout", str(path)], check=True)
    assert path.read_bytes().endswith(b"\n" + CLOSE)
    return list(root)


def round_entries(paths: list[Path], round_no: int) -> list[int]:
    prefix = f"r{round_no}-"
    return [e.bytes for p in paths for e in read_entries(p) if e.workstation.startswith(prefix)]


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["real", "slow"])
def test_sigkill_mid_append_never_loses_a_reported_entry(tmp_path: Path, disk: str):
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    path = tmp_path / "imglog.xml"
    total_reported = 0
    repaired = 0
    for round_no in range(20):
        reported = run_and_kill(path, round_no, rng.uniform(0.001, 0.050), disk=disk)
        total_reported += reported
        # a reader never sees a broken document, even before recovery
        assert round_entries([path], round_no)[:reported] == list(range(reported))
        log = ResultsLog(path)
        report = log.open()
        log.close()
        repaired += report.repaired
        elements = check_well_formed(path)
        assert report.entries == len(elements)
        mine = round_entries([path], round_no)
        assert mine == list(range(len(mine))), "entries are contiguous, in order, not duplicated"
        assert reported <= len(mine) <= reported + 1, (reported, len(mine), report)
    assert len(check_well_formed(path)) >= total_reported
    if disk == "slow":  # most kills land inside a write there: recovery really was exercised
        assert repaired >= 5, repaired


@pytest.mark.slow
def test_sigkill_with_rotation(tmp_path: Path):
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    path = tmp_path / "imglog.xml"
    for round_no in range(10):
        reported = run_and_kill(path, round_no, rng.uniform(0.001, 0.050), max_bytes=64 * 1024,
                                disk="slow" if round_no % 2 else "real")
        ResultsLog(path, max_bytes=64 * 1024, keep=1000).open()
        rotated = sorted(tmp_path.glob("imglog.xml.*"), key=lambda p: -int(p.suffix[1:]))
        paths = rotated + [path]
        for p in paths:
            check_well_formed(p)
        mine = round_entries(paths, round_no)
        assert mine == list(range(len(mine)))
        assert reported <= len(mine) <= reported + 1


WRITER = textwrap.dedent("""
    import sys
    from imgsrvd.resultslog import ResultsLog, ResultEntry
    path, who, count, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with ResultsLog(path, max_bytes=max_bytes, keep=10000) as log:
        for n in range(count):
            log.append(ResultEntry(workstation="%s-%d" % (who, n), operation="download",
                                   status="success", bytes=n))
""")


@pytest.mark.slow
@pytest.mark.parametrize("max_bytes", [0, 16 * 1024])
def test_processes_append_concurrently(tmp_path: Path, max_bytes: int):
    """Four processes share one log (flock; with rotation each follows the others' renames)."""
    path = tmp_path / "imglog.xml"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{i}", "200",
                                  str(max_bytes)], cwd=REPO, env=env) for i in range(4)]
    for child in children:
        assert child.wait(timeout=120) == 0
    rotated = sorted(tmp_path.glob("imglog.xml.*"), key=lambda p: -int(p.suffix[1:]))
    assert bool(rotated) == bool(max_bytes)
    names: list[str] = []
    for p in rotated + [path]:
        names += [el.get("workstation") for el in check_well_formed(p)]
    assert len(names) == 800 and len(set(names)) == 800
    for i in range(4):
        assert [n for n in names if n.startswith(f"p{i}-")] == [f"p{i}-{n}" for n in range(200)]
