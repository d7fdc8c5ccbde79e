"""preboot-dir, the administrator's CLI, run as a real process against a real SQLite store."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO

POLICY = """\
format = 1
[menu]
display = hotkey
timeout_s = 4
[rules]
[[Dell lab]]
filter = "manufacturer = 'Dell Inc.' and ram_mb >= 4096"
action = restore
image = dell/base.img
addons = dell/drivers.add
[[Small disks]]
filter = "disk_mb < 100GB or serial startswith TEST"
action = make
image = uploads/small.img
[[Everyone else]]
action = none
[workstations]
[[52:54:00:00:00:01]]
name = lab-01
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
    return run


def test_import_export_import_export_is_identical(cli, tmp_path):
    source = tmp_path / "site.conf"
    source.write_text(POLICY)
    assert "3 rules, 1 workstations" in cli("import", str(source)).stdout
    first = cli("export").stdout
    (tmp_path / "exported.conf").write_text(first)
    cli("import", str(tmp_path / "exported.conf"))
    cli("export", str(tmp_path / "again.conf"))
    assert (tmp_path / "again.conf").read_text() == first
    assert "[[52:54:00:00:00:01]]" not in first and "[[525400000001]]" in first


def test_a_bad_file_is_refused_with_file_and_line_and_the_store_is_untouched(cli, tmp_path):
    good = tmp_path / "good.conf"
    good.write_text(POLICY)
    cli("import", str(good))
    before = cli("export").stdout
    bad = tmp_path / "bad.conf"
    bad.write_text(POLICY.replace("ram_mb >= 4096", "ram_mb >= four"))
    proc = cli("import", str(bad), expect=65)
    assert f"{bad}:7: [rules] [[Dell lab]] filter:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert cli("export").stdout == before
    assert "OK" in cli("import", "--check", str(good)).stdout


def _import_policy(cli, tmp_path) -> None:
    (tmp_path / "p.conf").write_text(POLICY)
    cli("import", str(tmp_path / "p.conf"))


def test_rules_are_listed_added_changed_moved_disabled_and_removed(cli, tmp_path):
    _import_policy(cli, tmp_path)
    cli("rules", "add", "HP", "--filter", "manufacturer startswith HP", "--action", "restore",
        "--image", "hp.img", "--position", "1", "--force")
    cli("rules", "set", "Dell lab", "--filter", "manufacturer contains dell")
    cli("rules", "move", "Everyone else", "2")
    cli("rules", "disable", "Small disks")
    listing = cli("rules", "list").stdout
    lines = [line for line in listing.splitlines() if line[:4].strip().rstrip(".").isdigit()]
    assert [line.split(". ", 1)[1].split(":")[0] for line in lines] == [
        "HP", "Everyone else", "Dell lab", "Small disks (disabled)"]
    assert "[force]" in lines[0] and "manufacturer contains dell" in listing
    cli("rules", "remove", "HP")
    assert "HP" not in cli("rules", "list").stdout
    assert "no rule named" in cli("rules", "remove", "HP", expect=65).stderr
    assert "filter:" in cli("rules", "add", "x", "--action", "none", "--filter", "ram >",
                            expect=65).stderr
    assert "exists" in cli("rules", "add", "Dell lab", "--action", "none", expect=65).stderr


def test_a_restore_rule_is_told_to_shrink_and_back(cli, tmp_path):
    _import_policy(cli, tmp_path)
    cli("rules", "add", "Thin clients", "--filter", "disk_mb < 64GB", "--action", "restore",
        "--image", "thin.img", "--position", "1", "--shrink")
    cli("rules", "set", "Dell lab", "--shrink", "yes")
    exported = cli("export").stdout
    assert exported.count("shrink = yes") == 2, exported
    assert "(shrunk to fit a smaller disk)" in cli("rules", "list").stdout
    cli("rules", "set", "Thin clients", "--shrink", "no")
    cli("rules", "set", "Dell lab", "--action", "make", "--image", "up.img")  # drops shrink
    assert "shrink" not in cli("export").stdout
    assert "shrink goes only with action restore" in cli(
        "rules", "set", "Small disks", "--shrink", "yes", expect=65).stderr


def test_a_restore_rule_names_a_file_set_and_back(cli, tmp_path):
    _import_policy(cli, tmp_path)
    cli("rules", "add", "Lean", "--action", "restore", "--image", "base.img", "--fileset", "3")
    assert "restore base.img file set 3" in cli("rules", "list").stdout
    assert cli("export").stdout.count("fileset = 3") == 1
    cli("rules", "set", "Lean", "--fileset", "1")
    assert "fileset" not in cli("export").stdout
    assert "file set 11 is not a number from 1 to 10" in cli(
        "rules", "set", "Lean", "--fileset", "11", expect=65).stderr
    cli("rules", "set", "Lean", "--fileset", "2")
    cli("rules", "set", "Lean", "--action", "make", "--image", "up.img")     # drops the set
    assert "fileset" not in cli("export").stdout
    assert "fileset goes only with action restore" in cli(
        "rules", "set", "Lean", "--fileset", "2", expect=65).stderr


def test_next_boot_flag_and_explain(cli, tmp_path):
    _import_policy(cli, tmp_path)
    dell = ["--mac", "52-54-00-00-00-02", "--manufacturer", "Dell Inc.", "--ram-mb", "8192",
            "--disk-mb", "512000", "--serial", "SN1"]
    out = cli("explain", *dell).stdout
    assert "[WINS ] Dell lab" in out and "[later] Everyone else" in out
    assert "answer: restore dell/base.img + add-ons dell/drivers.add" in out
    small = cli("explain", "--mac", "525400000003", "--disk-mb", "51200", "--ram-mb", "2048",
                "--manufacturer", "Dell Inc.").stdout
    assert "ram_mb >= 4096 is false (ram_mb is 2048)" in small
    assert "answer: make an image to uploads/small.img" in small
    registered = ["--mac", "52:54:00:00:00:01", "--manufacturer", "Dell Inc.", "--ram-mb", "8192"]
    assert "not flagged" in cli("explain", *registered).stdout
    cli("nextboot", "set", "525400000001", "--image", "special.img")
    assert "answer: restore special.img" in cli("explain", *registered).stdout
    assert "image on next boot: special.img" in cli("workstations", "list").stdout
    assert "cleared" in cli("nextboot", "clear", "52:54:00:00:00:01").stdout
    assert "was not flagged" in cli("nextboot", "clear", "52:54:00:00:00:01").stdout
    assert "not a MAC" in cli("nextboot", "set", "nope", expect=65).stderr
    assert "not a whole number" in cli("explain", "--mac", "525400000001", "--ram-mb", "x",
                                       expect=65).stderr


def test_menu_settings_and_a_workstation_override(cli):
    cli("menu", "set", "--display", "always", "--timeout-s", "9")
    assert "display = always, timeout_s = 9" in cli("menu", "show").stdout
    cli("workstations", "add", "52:54:00:00:00:09", "--name", "kiosk", "--menu", "never")
    assert "menu: never" in cli("workstations", "list").stdout
    assert "menu: never" in cli("explain", "--mac", "525400000009").stdout
    assert "menu: always" in cli("explain", "--mac", "525400000008").stdout
    cli("workstations", "add", "52:54:00:00:00:09", "--menu", "policy")
    assert "kiosk" in cli("workstations", "list").stdout
    assert "menu:" not in cli("workstations", "list").stdout


def test_reading_a_store_that_does_not_exist_fails_cleanly(cli, tmp_path):
    proc = cli("export", expect=1)
    assert "no such database file" in proc.stderr and not (tmp_path / "dir.db").exists()


def test_the_directory_comes_from_the_policy_service_config(tmp_path):
    conf = tmp_path / "policyd.conf"
    conf.write_text(f"Directory = sqlite:///{tmp_path}/from-config.db\n")
    proc = subprocess.run([sys.executable, "-m", "common.dircli", "--config", str(conf),
                           "menu", "set", "--display", "never"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "from-config.db").exists()


def test_init_creates_an_empty_directory_once_and_readers_never_create(cli, tmp_path):
    result = cli("rules", "list", expect=1)
    assert "no such database file" in result.stderr
    assert not (tmp_path / "dir.db").exists()
    assert "ready" in cli("init").stdout
    assert "no rules" in cli("rules", "list").stdout
    cli("workstations", "add", "00:c0:4f:dc:2a:b5")
    cli("init")                                        # again: the store is kept as it is
    assert "00C04FDC2AB5" in cli("workstations", "list").stdout


def test_multicast_sessions_are_listed_added_changed_moved_and_removed(cli, tmp_path):
    _import_policy(cli, tmp_path)
    cli("sessions", "add", "room 101", "--image", "dell/base.img", "--clients", "12",
        "--timeout-min", "5", "--participant", "52:54:00:00:00:02", "--participant", "lab-01")
    cli("sessions", "add", "weekly", "--image", "hp.img", "--keep", "--disabled",
        "--group", "239.192.0.7", "--data-port", "4000")
    cli("sessions", "add", "first", "--image", "a.img", "--position", "1")
    listing = cli("sessions", "list").stdout
    assert "  1. first: a.img" in listing
    assert "  2. room 101: dell/base.img" in listing
    assert "starts when 12 have joined or 5 min after the last join; when done: deleted" \
        in listing
    assert "participants: 525400000002, lab-01" in listing
    assert "  3. weekly (disabled): hp.img" in listing
    assert "when done: kept, disabled" in listing and "group 239.192.0.7, data port 4000" \
        in listing
    cli("sessions", "set", "ROOM 101", "--add", "lab-09", "--drop", "52-54-00-00-00-02",
        "--delete-after", "no", "--timeout-min", "0")
    cli("sessions", "move", "first", "3")
    cli("sessions", "enable", "weekly")
    cli("sessions", "set", "weekly", "--group", "")
    listing = cli("sessions", "list").stdout
    assert "participants: lab-01, lab-09" in listing
    assert "starts when 12 have joined; when done: kept, disabled" in listing
    assert "  2. weekly: hp.img" in listing and "group" not in listing
    assert "  3. first: a.img" in listing
    exported = cli("export").stdout
    assert "[[room 101]]" in exported and "participants = lab-01, lab-09" in exported
    cli("sessions", "remove", "first")
    assert "first" not in cli("sessions", "list").stdout
    # refusals, each with its reason
    assert "exists" in cli("sessions", "add", "Room  101", "--image", "x", expect=65).stderr
    assert "no multicast session named" in cli("sessions", "remove", "x", expect=65).stderr
    assert "local network control block" in cli("sessions", "set", "weekly", "--group",
                                                 "224.0.0.5", expect=65).stderr
    assert "more than 255" in cli("sessions", "add", "é" * 128, "--image", "x",
                                  expect=65).stderr
    assert "named twice" in cli("sessions", "set", "weekly", "--participant", "a",
                                "--participant", "A", expect=65).stderr
    assert "position must be 1..2" in cli("sessions", "move", "weekly", "5", expect=65).stderr
    cli("sessions", "add", "x", "--image", "x", "--clients", "0", expect=2)


def test_explain_shows_the_sessions_and_the_one_a_machine_joins(cli, tmp_path):
    _import_policy(cli, tmp_path)
    cli("sessions", "add", "off", "--image", "o.img", "--disabled",
        "--participant", "525400000002")
    cli("sessions", "add", "room 101", "--image", "dell/base.img",
        "--participant", "52:54:00:00:00:02")
    out = cli("explain", "--mac", "525400000002", "--manufacturer", "Dell Inc.").stdout
    assert "session   1. [off  ] off:" in out
    assert "session   2. [JOINS] room 101: session 'room 101' names this machine " \
           "(MAC 525400000002)" in out
    assert "answer: join multicast session room 101" in out
    other = cli("explain", "--mac", "525400000003").stdout
    assert "[no   ] room 101: neither named in it nor chosen by a multicast rule" in other
