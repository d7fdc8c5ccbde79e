"""preboot-dir import --merge / --dry-run, workstations import FILE.csv and images, run as a real
process against both backends: a SQLite file and a real slapd (tests/ldapserver.py, one per
module, a fresh subtree per test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.imaging.imagefile import ImageWriter
from tests.support import REPO

import ldapserver

POLICY = """\
format = 1
[menu]
display = hotkey
timeout_s = 4
[rules]
[[Dell lab]]
filter = "manufacturer = 'Dell Inc.'"
action = restore
image = dell/base.img
[[Small disks]]
filter = "disk_mb < 100GB"
action = make
image = uploads/small.img
[[Everyone else]]
action = none
[workstations]
[[52:54:00:00:00:01]]
name = lab-01
image_on_next_boot = yes
image = special.img
[[52:54:00:00:00:02]]
name = lab-02
[sessions]
[[weekly]]
image = dell/base.img
clients = 3
"""

MERGE = """\
format = 1
[rules]
[[SMALL DISKS]]
filter = "disk_mb < 64GB"
action = make
image = uploads/tiny.img
[[HP lab]]
filter = "manufacturer startswith HP"
action = restore
image = hp.img
[[Everyone else]]
action = none
[workstations]
[[52-54-00-00-00-01]]
name = lab-one
[[525400000003]]
name = lab-03
[sessions]
[[room 101]]
image = room.img
"""


@pytest.fixture(scope="module")
def slapd():
    reason = ldapserver.missing()
    if reason:
        pytest.skip(reason)
    server = ldapserver.Slapd().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "ldap"])
def cli(request, tmp_path):
    """cli(*args, expect=0) runs preboot-dir on a fresh, empty store of each backend."""
    target = ["--directory", f"sqlite:///{tmp_path}/dir.db"]
    cleanup = None
    if request.param == "ldap":
        server = request.getfixturevalue("slapd")
        base = f"ou=t{uuid.uuid4().hex[:12]},{server.suffix}"
        server.ldapadd(f"dn: {base}\nobjectClass: organizationalUnit\n"
                       f"ou: {base.split(',')[0][3:]}\n")
        credentials = server.write_credentials(tmp_path / "ldap.cred")
        target = ["--directory", server.url_for(base), "--credentials", str(credentials)]
        cleanup = (server, base)

    def run(*args, stdin=None, expect=0):
        proc = subprocess.run(
            [sys.executable, "-m", "common.dircli", "--config", str(tmp_path / "none.conf"),
             *target, *args],
            input=stdin, capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == expect, (proc.stdout, proc.stderr)
        return proc
    run.backend = request.param
    run.cleanup = cleanup
    run.db = tmp_path / "dir.db"
    yield run
    if cleanup:
        cleanup[0].delete_subtree(cleanup[1])


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _sections(exported: str, kind: str) -> list[str]:
    """The [[names]] under [kind] of an exported file, in order."""
    names, inside = [], False
    for line in exported.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            inside = stripped == f"[{kind}]"
        elif inside and stripped.startswith("[["):
            names.append(stripped.strip("[]"))
    return names


# -- import --merge -------------------------------------------------------------------------------

def test_merge_replaces_in_place_appends_and_removes_nothing(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    out = cli("import", "--merge", _file(tmp_path, "m.conf", MERGE)).stdout
    assert "rules: 1 added, 1 replaced, 1 unchanged" in out
    assert "workstations: 1 added, 1 replaced, 0 unchanged" in out
    assert "sessions: 1 added, 0 replaced, 0 unchanged" in out
    assert "menu: not in the file, kept" in out
    exported = cli("export").stdout
    # the rule of that name replaced where it stood, with the file's spelling; new ones last
    assert _sections(exported, "rules") == ["Dell lab", "SMALL DISKS", "Everyone else", "HP lab"]
    assert "uploads/tiny.img" in exported and "uploads/small.img" not in exported
    assert _sections(exported, "workstations") == ["525400000001", "525400000002",
                                                   "525400000003"]
    # lab-01's record: the name the file gives, the flag and image it did not mention kept
    listing = cli("workstations", "list").stdout
    assert "525400000001  lab-one  image on next boot: special.img" in listing
    assert "525400000002  lab-02" in listing
    assert _sections(exported, "sessions") == ["weekly", "room 101"]
    assert "display = hotkey" in exported and "timeout_s = 4" in exported
    # merging the same file again changes nothing
    again = cli("import", "--merge", str(tmp_path / "m.conf")).stdout
    assert "rules: 0 added, 0 replaced, 3 unchanged" in again
    assert cli("export").stdout == exported


IDENTITIES = """\
format = 1
[identities]
[[lab]]
naming = counter
prefix = lab-
[[office]]
naming = mac
prefix = pc-
"""

IDENTITIES_MERGE = """\
format = 1
[identities]
[[LAB]]
naming = counter
prefix = room-
[[hall]]
naming = serial
"""


def test_merge_takes_identity_policies_by_name_and_counts_them(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", IDENTITIES))
    out = cli("import", "--merge", _file(tmp_path, "m.conf", IDENTITIES_MERGE)).stdout
    assert "identity policies: 1 added, 1 replaced, 0 unchanged" in out
    exported = cli("export").stdout
    assert _sections(exported, "identities") == ["LAB", "office", "hall"]
    assert "prefix = room-" in exported and "prefix = lab-" not in exported
    # a file without [identities] keeps the store's
    cli("import", "--merge", _file(tmp_path, "r.conf", MERGE))
    assert _sections(cli("export").stdout, "identities") == ["LAB", "office", "hall"]
    # a replace import takes the file's, and says what it removed
    out = cli("import", str(tmp_path / "p.conf")).stdout
    assert "identity policies: 0 added, 1 replaced, 1 removed, 1 unchanged" in out


def test_merge_takes_the_menu_keys_the_file_gives(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    out = cli("import", "--merge", _file(tmp_path, "m.conf", "[menu]\ntimeout_s = 9\n")).stdout
    assert "menu: replaced" in out and "rules: 0 added, 0 replaced, 0 unchanged" in out
    assert "menu display = hotkey, timeout_s = 9" in cli("menu", "show").stdout
    assert len(_sections(cli("export").stdout, "rules")) == 3


def test_dry_run_shows_the_changes_of_either_mode_and_writes_nothing(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    before = cli("export").stdout
    merge = cli("import", "--merge", "--dry-run", _file(tmp_path, "m.conf", MERGE)).stdout
    assert "dry run: merging" in merge and "nothing written (dry run)" in merge
    for line in ("  + rule 'HP lab'", "  ~ rule 'SMALL DISKS'", "  ~ workstation 525400000001",
                 "  + workstation 525400000003", "  + session 'room 101'"):
        assert line in merge.splitlines(), merge
    assert "  - " not in merge
    replace = cli("import", "--dry-run", str(tmp_path / "m.conf")).stdout
    assert "rules: 1 added, 1 replaced, 1 removed, 1 unchanged" in replace
    for line in ("  - rule 'Dell lab'", "  - workstation 525400000002", "  - session 'weekly'",
                 "  ~ menu settings"):
        assert line in replace.splitlines(), replace
    assert cli("export").stdout == before


def test_replace_import_reports_what_it_removed(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    out = cli("import", _file(tmp_path, "m.conf", MERGE)).stdout
    assert "imported 3 rules, 2 workstations, 1 multicast sessions" in out
    assert "workstations: 1 added, 1 replaced, 1 removed, 0 unchanged" in out
    exported = cli("export").stdout
    assert _sections(exported, "rules") == ["SMALL DISKS", "HP lab", "Everyone else"]
    assert "image = special.img" not in exported     # a replace takes the file's record whole


def _break_a_rule(cli) -> None:
    """Give 'Everyone else' a filter that does not parse, behind preboot-dir's back."""
    if cli.backend == "sqlite":
        import sqlite3
        with sqlite3.connect(cli.db) as conn:
            conn.execute("UPDATE rules SET filter = 'ram >' WHERE name = 'Everyone else'")
    else:
        server, base = cli.cleanup
        server.ldapmodify(f"dn: cn=Everyone else,ou=rules,{base}\nchangetype: modify\n"
                          "replace: prebootFilter\nprebootFilter: ram >\n")


def test_a_store_that_cannot_be_read_is_repaired_by_a_replace_not_merged_into(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    _break_a_rule(cli)
    assert "missing value after '>'" in cli("import", "--merge", _file(tmp_path, "m.conf", MERGE),
                                         expect=1).stderr
    assert "missing value after '>'" in cli("import", "--dry-run", str(tmp_path / "m.conf"),
                                         expect=1).stderr
    out = cli("import", str(tmp_path / "p.conf")).stdout
    assert "note: the store could not be read" in out and "imported 3 rules" in out
    assert "rules: 0 added, 0 replaced, 0 removed, 3 unchanged" in cli(
        "import", "--dry-run", str(tmp_path / "p.conf")).stdout


BAD_MERGES = [
    ("[rules]\n[[Dell lab]]\naction = restore\nimage = x\nfilter = ram >= four\n", ":5:",
     "[rules] [[Dell lab]] filter:"),
    ("[rules]\n[[x]]\naction = none\nforse = yes\n", ":4:", "unknown key (did you mean force?)"),
    ("[workstations]\n[[52:54:00:00:00:01]]\nname = a\n[[nope]]\nname = b\n", ":4:",
     "'nope' is not a MAC address"),
    ("[workstations]\n[[525400000001]]\nimage_on_next_boot = perhaps\n", ":3:",
     "image_on_next_boot: 'perhaps' is not yes or no"),
    ("[rules]\n[[new]]\naction = none\n[[NEW]]\naction = none\n", ":4:",
     "differ only in case or spacing"),
    ("[sessions]\n[[s]]\nclients = 3\n", ":2:", "a multicast session needs its master image"),
    ("[menu]\ntimeout_s = 99999\n", ":2:", "[menu] timeout_s:"),
    ("[rules]\n[[x]]\naction = none\n[[y]\n", ":4:", "syntax error"),
]


@pytest.mark.parametrize("text, line, message", BAD_MERGES)
def test_a_bad_merge_file_changes_nothing_and_says_where(cli, tmp_path, text, line, message):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    before = cli("export").stdout
    bad = _file(tmp_path, "bad.conf", text)
    proc = cli("import", "--merge", bad, expect=65)
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"preboot-dir: {bad}{line}"), proc.stderr
    assert message in errors[0], proc.stderr
    assert cli("export").stdout == before


# -- workstations import FILE.csv -----------------------------------------------------------------

def test_csv_registers_new_and_updates_known_machines(cli, tmp_path):
    cli("import", _file(tmp_path, "p.conf", POLICY))
    csv = tmp_path / "lab.csv"
    csv.write_bytes(("\ufeffMAC,Name,Next-Boot,image\r\n"
                     "52:54:00:00:00:01,,no,\r\n"                     # flag cleared, rest kept
                     "\"52-54-00-00-00-02\",\"lab, two\",,\r\n"
                     "\r\n"
                     "5254.0000.0004,lab-04,YES,win/base.img\r\n"
                     "525400000005,lab-05,0,\r\n").encode("utf-8"))
    out = cli("workstations", "import", str(csv)).stdout
    assert f"{csv}: registered 2 new, 2 updated, 0 unchanged workstations in" in out
    listing = cli("workstations", "list").stdout.splitlines()
    assert listing == ["525400000001  lab-01",
                       "525400000002  lab, two",
                       "525400000004  lab-04  image on next boot: win/base.img",
                       "525400000005  lab-05"]
    exported = cli("export").stdout
    assert "image = special.img" in exported          # an empty cell keeps the record's value
    assert "registered 0 new, 0 updated, 4 unchanged" in cli("workstations", "import",
                                                              str(csv)).stdout


BAD_ROWS = [
    ("zz:zz,a,,", "'zz:zz' is not a MAC address"),
    (",a,,", "no MAC address"),
    ("525400000009,a,maybe,", "next_boot: 'maybe' is not yes/no, true/false or 1/0"),
    ("525400000009,a", "2 fields, the header has 4"),
    ("525400000009,a,yes,x,extra", "5 fields, the header has 4"),
    ("52:54:00:00:00:07,again,,", "MAC 525400000007 is also on line 2"),
    ('525400000009,"two\nlines",,',
     "name: control characters (a line break?) are not allowed"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_a_bad_csv_row_is_reported_with_its_line_and_nothing_is_written(cli, tmp_path, row,
                                                                         reason):
    cli("init")
    csv = _file(tmp_path, "lab.csv", f"mac,name,next_boot,image\n525400000007,ok,,\n{row}\n"
                                     "525400000008,fine,,\n")
    proc = cli("workstations", "import", csv, expect=65)
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == f"{csv}:3: {reason}", proc.stderr
    assert errors[1] == f"preboot-dir: {csv}: 1 bad row; nothing written (--skip-bad writes " \
                        "the good rows)"
    assert cli("workstations", "list").stdout == ""
    skipped = cli("workstations", "import", "--skip-bad", csv)
    assert f"{csv}:3: {reason}" in skipped.stderr
    assert "registered 2 new, 0 updated, 0 unchanged" in skipped.stdout
    assert "1 bad row skipped" in skipped.stdout
    assert [line.split()[0] for line in cli("workstations", "list").stdout.splitlines()] == [
        "525400000007", "525400000008"]


BAD_HEADERS = [
    ("mac,colour,size\n", ":1: unknown columns 'colour', 'size' (known: mac, name, image, "
                          "next_boot)"),
    ("name,image\nlab,x\n", ":1: no 'mac' column"),
    ("mac,MAC\n", ":1: column 'mac' is named twice"),
    ("", ": empty file"),
]


@pytest.mark.parametrize("text, message", BAD_HEADERS)
def test_a_bad_csv_header_is_refused(cli, tmp_path, text, message):
    cli("init")
    csv = _file(tmp_path, "lab.csv", text)
    proc = cli("workstations", "import", csv, expect=65)
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"preboot-dir: {csv}{message}"), errors


def test_csv_dry_run_writes_nothing(cli, tmp_path):
    cli("init")
    csv = _file(tmp_path, "lab.csv", "mac\n525400000001\n")
    assert "would register 1 new" in cli("workstations", "import", "--dry-run", csv).stdout
    assert cli("workstations", "list").stdout == ""


# -- images ---------------------------------------------------------------------------------------

def _image(path: Path, kind: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        writer = ImageWriter(out, {"format": 1, "type": kind, "streams": []}, chunk_size=65536)
        for offset in range(0, size, 65536):
            writer.add(0, offset, os.urandom(min(65536, size - offset)))
        writer.close()


def test_images_lists_path_size_type_and_date_from_headers_only(tmp_path):
    root = tmp_path / "images"
    _image(root / "dell" / "base.img", "base", 200_000)
    _image(root / "dell" / "drivers.add", "addon", 1000)
    whole = (root / "dell" / "base.img").read_bytes()
    (root / "cut.img").write_bytes(whole[:-10])                     # an interrupted copy
    (root / "README").write_text("not an image\n")
    (root / "dell" / ".base.img.part-0123456789abcdef").write_bytes(b"uploading")
    os.utime(root / "dell" / "base.img", (1_700_000_000, 1_700_000_000))

    def run(*args, expect=0):
        proc = subprocess.run([sys.executable, "-m", "common.dircli", "images", *args],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(REPO), TZ="UTC"))
        assert proc.returncode == expect, proc.stderr
        return proc

    lines = run("--root", str(root)).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["README", "cut.img", "dell/base.img",
                                                   "dell/drivers.add"]
    base = lines[2].split()
    size = len(whole)
    assert base[1:] == [*f"{size / 1024:.1f} KiB ({size} bytes)".split(), "base", "2023-11-14",
                        "22:13"], lines[2]
    assert " add-on " in lines[3]
    assert "incomplete image: no trailer" in lines[1] and "not an image" in lines[0]
    listing = json.loads(run("--root", str(root), "--json").stdout)
    assert [(item["path"], item["type"]) for item in listing] == [
        ("README", "-"), ("cut.img", "-"), ("dell/base.img", "base"),
        ("dell/drivers.add", "add-on")]
    assert listing[2]["size"] == size and listing[2]["date"] == "2023-11-14T22:13:20+0000"
    assert listing[3]["problem"] == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("--root", str(empty)).stdout == f"no images under {empty}\n"
    assert "no such folder" in run("--root", str(tmp_path / "nope"), expect=65).stderr
