"""preboot-dir's identity commands (identities list/log/release, rules --identity, explain),
run as a real process against a real SQLite store whose pool imgsrvd's code path filled."""

import os
import subprocess
import sys
import time

import pytest

from common.machine import MachineFacts
from common.policy.directory import open_directory
from common.policy.identityassign import identity_for
from common.policy.model import assign_work
from tests.support import REPO

POLICY = """\
[rules]
[[lab]]
filter = "manufacturer = Lab"
action = restore
image = lab.img
[identities]
[[lab]]
naming = counter
prefix = lab-
ip = pool
addresses = 10.2.0.10-10.2.0.11
prefix_len = 24
gateway = 10.2.0.1
"""


@pytest.fixture
def cli(tmp_path):
    url = f"sqlite:///{tmp_path}/dir.db"

    def run(*args, stdin=None, expect=0):
        proc = subprocess.run(
            [sys.executable, "-m", "common.dircli", "--config", str(tmp_path / "none.conf"),
             "--directory", url, *args],
            input=stdin, capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == expect, (proc.stdout, proc.stderr)
        return proc
    run.url = url
    return run


def test_identity_commands(cli):
    cli("import", "-", stdin=POLICY)
    # a rule can name only an identity policy that exists
    assert "does not exist" in cli("rules", "set", "lab", "--identity", "nosuch",
                                   expect=65).stderr
    cli("rules", "set", "lab", "--identity", "lab")
    assert "[identity lab]" in cli("rules", "list").stdout
    explained = cli("explain", "--mac", "00C0FF000001", "--manufacturer", "Lab").stdout
    assert "identity: name=lab-001 ip=10.2.0.10/24 gateway=10.2.0.1" in explained
    assert "would get" in explained
    assert "the assignment log is empty" in cli("identities", "log").stdout  # nothing handed out
    with open_directory(cli.url) as directory:                           # what imgsrvd does
        policy = directory.policy()
        for number in (1, 2, 3):
            facts = MachineFacts(mac=f"00C0FF00000{number}", manufacturer="Lab")
            identity_for(directory, policy, assign_work(policy, None, facts), facts, None,
                         time.time())
    listed = cli("identities", "list").stdout
    assert "2 of 2 addresses handed out, 0 free" in listed and "named by rules: lab" in listed
    log = cli("identities", "log", "lab").stdout.splitlines()
    assert [line.split("\t")[:4] for line in log if "address" in line] == [
        ["lab", "address", "10.2.0.10", "00C0FF000001"],
        ["lab", "address", "10.2.0.11", "00C0FF000002"]]
    explained = cli("explain", "--mac", "00C0FF000003", "--manufacturer", "Lab").stdout
    assert "no free address" in explained
    released = cli("identities", "release", "lab", "00:c0:ff:00:00:02").stdout
    assert "released address 10.2.0.11" in released
    assert "released counter 2" in released
    assert "no assignment" in cli("identities", "release", "lab", "10.2.0.99",
                                  expect=65).stderr
    explained = cli("explain", "--mac", "00C0FF000003", "--manufacturer", "Lab").stdout
    assert "ip=10.2.0.11/24" in explained
