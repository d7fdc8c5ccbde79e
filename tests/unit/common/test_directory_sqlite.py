"""SQLite backend specifics (common/policy/directory/sqlite.py): schema versions, change marker,
refusing bad data. The behaviour both backends share is in tests/integration/
test_directory_backends.py."""

import multiprocessing
import sqlite3

import pytest

from common.policy.directory import (DirectoryError, open_directory, parse_directory_url,
                                     read_credentials)
from common.policy.directory.sqlite import SCHEMA_VERSION
from common.policy.model import (Action, ActionKind, ImagingPolicy, MulticastSession, Rule,
                                 Workstation)


def _url(tmp_path):
    return f"sqlite:///{tmp_path}/dir.db"


def test_a_new_file_gets_the_current_schema_in_wal_mode(tmp_path):
    with open_directory(_url(tmp_path), create=True):
        pass
    conn = sqlite3.connect(tmp_path / "dir.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_readers_do_not_create_a_missing_store(tmp_path):
    with pytest.raises(DirectoryError, match="no such database file"):
        open_directory(_url(tmp_path), create=False)
    assert not (tmp_path / "dir.db").exists()


def test_a_store_from_a_newer_release_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "dir.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DirectoryError, match="newer than this release"):
        open_directory(_url(tmp_path), create=True)


def test_an_edit_by_another_program_shows_on_the_next_query(tmp_path):
    with open_directory(_url(tmp_path), create=True) as directory:
        directory.replace_policy(ImagingPolicy((Rule.from_text("a", "", Action()),)))
        assert [r.name for r in directory.policy().rules] == ["a"]
        first = directory.policy()
        assert directory.policy() is first            # unchanged: the parsed policy is reused
        conn = sqlite3.connect(tmp_path / "dir.db")
        conn.execute("UPDATE rules SET name = 'b'")
        conn.commit()
        assert [r.name for r in directory.policy().rules] == ["b"]


def test_a_rule_with_a_bad_filter_refuses_the_whole_policy(tmp_path):
    with open_directory(_url(tmp_path), create=True) as directory:
        directory.replace_policy(ImagingPolicy((Rule.from_text("ok", "", Action()),)))
        conn = sqlite3.connect(tmp_path / "dir.db")
        conn.execute("INSERT INTO rules (position, name, filter, action) "
                     "VALUES (2, 'broken', 'ram_mb >>> 1', 'none')")
        conn.commit()
        with pytest.raises(DirectoryError, match="rule 'broken'"):
            directory.policy()


def test_an_unreadable_store_is_a_directory_error(tmp_path):
    (tmp_path / "dir.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DirectoryError, match="sqlite://"):
        open_directory(_url(tmp_path), create=True).policy()


def _writer(url, count):
    with open_directory(url, create=True) as directory:
        for n in range(count):
            directory.put_workstation(Workstation(f"{n:012X}", f"w{n}"))


def test_several_processes_write_and_read_at_once(tmp_path):
    url = _url(tmp_path)
    open_directory(url, create=True).close()
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(url, 50))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    with open_directory(url, create=True) as reader:
        while any(p.is_alive() for p in procs):
            reader.policy()
            reader.workstations()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    with open_directory(url, create=True) as directory:
        assert len(directory.workstations()) == 50


@pytest.mark.parametrize("text, expected", [
    ("sqlite:///var/lib/preboot/directory.db", ("sqlite", "/var/lib/preboot/directory.db", "", "")),
    ("ldap://ldap.example.com/ou=preboot,dc=example,dc=com",
     ("ldap", "", "ldap.example.com", "ou=preboot,dc=example,dc=com")),
    ("ldaps://10.0.0.5:636/dc=x", ("ldaps", "", "10.0.0.5:636", "dc=x")),
    ("ldap://h/ou=a%20b,dc=x", ("ldap", "", "h", "ou=a b,dc=x")),
])
def test_directory_urls(text, expected):
    url = parse_directory_url(text)
    assert (url.scheme, url.path, url.host, url.base_dn) == expected


@pytest.mark.parametrize("text, fragment", [
    ("sqlite://relative.db", "must be absolute"),
    ("sqlite:///var/lib/", "folder"),
    ("ldap:///dc=x", "no LDAP host"),
    ("ldap://host", "no base DN"),
    ("mysql://host/db", "unknown directory scheme"),
    ("/var/lib/x.db", "unknown directory scheme"),
])
def test_bad_directory_urls_say_why(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_directory_url(text)


def test_credentials_must_be_private(tmp_path):
    path = tmp_path / "ldap.secret"
    path.write_text("# bind\nBindDN = cn=admin,dc=x\nPassword = s3 cr=et\n")
    path.chmod(0o600)
    creds = read_credentials(str(path))
    assert (creds.bind_dn, creds.password) == ("cn=admin,dc=x", "s3 cr=et")
    path.chmod(0o640)
    with pytest.raises(ValueError, match="readable by others"):
        read_credentials(str(path))
    path.chmod(0o600)
    path.write_text("BindDN = x\n")
    with pytest.raises(ValueError, match="needs both"):
        read_credentials(str(path))
    path.write_text("User = x\n")
    with pytest.raises(ValueError, match=":1:"):
        read_credentials(str(path))


def test_lookup_nowait_answers_only_from_a_current_cached_policy(tmp_path):
    from common.policy.directory import WouldBlock
    with open_directory(_url(tmp_path), create=True) as directory:
        directory.replace_policy(ImagingPolicy((Rule.from_text("a", "", Action()),)))
        directory.put_workstation(Workstation("001122334455", "ws"))
        with pytest.raises(WouldBlock):       # nothing loaded yet: the reload is blocking work
            directory.lookup_nowait("00:11:22:33:44:55")
        loaded = directory.policy()
        policy, station = directory.lookup_nowait("00:11:22:33:44:55")
        assert policy is loaded and station == Workstation("001122334455", "ws")
        assert directory.lookup_nowait("001122334466")[1] is None
        directory.replace_policy(ImagingPolicy((Rule.from_text("b", "", Action()),)))
        with pytest.raises(WouldBlock):       # changed: the next blocking call reloads
            directory.lookup_nowait("001122334455")
        assert [r.name for r in directory.policy().rules] == ["b"]
        assert [r.name for r in directory.lookup_nowait("001122334455")[0].rules] == ["b"]


def test_lookup_nowait_turns_a_busy_store_into_would_block(tmp_path):
    from common.policy.directory import WouldBlock

    class Busy:
        def execute(self, *args):
            raise sqlite3.OperationalError("database is locked")

    with open_directory(_url(tmp_path), create=True) as directory:
        directory.policy()
        directory._nowait = Busy()    # what a lock looks like with busy_timeout 0
        with pytest.raises(WouldBlock):
            directory.lookup_nowait("001122334455")


def test_a_store_of_schema_1_is_migrated_and_keeps_its_rules(tmp_path):
    """A store written before rules could shrink: version 2 adds the column, shrink off."""
    from common.policy.directory.sqlite import MIGRATIONS
    conn = sqlite3.connect(tmp_path / "dir.db")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO rules (position, name, filter, action, image) "
                 "VALUES (1, 'lab', '', 'restore', 'lab/base.img')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    with open_directory(_url(tmp_path), create=True) as directory:
        (rule,) = directory.policy().rules
        assert rule.action == Action(ActionKind.RESTORE, "lab/base.img")
        shrinking = Rule.from_text("lab", "", Action(ActionKind.RESTORE, "lab/base.img",
                                                     shrink=True))
        directory.replace_policy(ImagingPolicy((shrinking,)))
        assert directory.policy().rules[0].action.shrink is True
    conn = sqlite3.connect(tmp_path / "dir.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


def test_a_store_of_schema_3_is_migrated_and_its_rules_restore_everything(tmp_path):
    """A store written before file sets: version 4 adds the column, set 1 (everything)."""
    from common.policy.directory.sqlite import MIGRATIONS
    conn = sqlite3.connect(tmp_path / "dir.db")
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute("INSERT INTO rules (position, name, filter, action, image) "
                 "VALUES (1, 'lab', '', 'restore', 'lab/base.img')")
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    with open_directory(_url(tmp_path), create=True) as directory:
        (rule,) = directory.policy().rules
        assert rule.action == Action(ActionKind.RESTORE, "lab/base.img") and \
            rule.action.fileset == 1
        subset = Rule.from_text("lab", "", Action(ActionKind.RESTORE, "lab/base.img",
                                                  fileset=7))
        directory.replace_policy(ImagingPolicy((subset,)))
        assert directory.policy().rules[0].action.fileset == 7
    conn = sqlite3.connect(tmp_path / "dir.db")
    conn.execute("UPDATE rules SET fileset = 12")
    conn.commit()
    conn.close()
    with open_directory(_url(tmp_path)) as directory:
        with pytest.raises(DirectoryError, match="file set 12 is not a number from 1 to 10"):
            directory.policy()


def test_a_store_of_schema_2_is_migrated_and_keeps_its_sessions(tmp_path):
    """A store written before sessions named participants: version 3 adds the columns."""
    from common.policy.directory.sqlite import MIGRATIONS
    conn = sqlite3.connect(tmp_path / "dir.db")
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("INSERT INTO sessions (position, name, image, clients, timeout_min, enabled, "
                 "delete_after) VALUES (1, 'room-101', 'lab/base.img', 12, 5, 1, 0)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    with open_directory(_url(tmp_path), create=True) as directory:
        assert directory.sessions() == [MulticastSession("room-101", "lab/base.img", 12, 5,
                                                         True, False)]
        named = MulticastSession("room-101", "lab/base.img", participants=("pc1",),
                                 group="239.192.0.1", data_port=4000)
        directory.replace_sessions([named])
        assert directory.sessions() == [named]


def test_a_session_the_model_refuses_is_a_directory_error(tmp_path):
    with open_directory(_url(tmp_path), create=True) as directory:
        directory.replace_sessions([MulticastSession("s", "a.img")])
    conn = sqlite3.connect(tmp_path / "dir.db")
    conn.execute("UPDATE sessions SET group_address = '10.0.0.1'")
    conn.commit()
    conn.close()
    with open_directory(_url(tmp_path)) as directory:
        with pytest.raises(DirectoryError, match="session 's': group 10.0.0.1 is not a multicast"):
            directory.sessions()


def test_a_missing_file_is_an_error_unless_created(tmp_path):
    with pytest.raises(DirectoryError, match="no such database file"):
        open_directory(_url(tmp_path))
    with pytest.raises(DirectoryError, match="no such database file"):
        open_directory(f"sqlite:///{tmp_path}/new/dir.db")
    assert list(tmp_path.iterdir()) == []              # neither the file nor its folder
    open_directory(f"sqlite:///{tmp_path}/new/dir.db", create=True).close()
    with open_directory(f"sqlite:///{tmp_path}/new/dir.db") as directory:
        assert directory.policy().rules == ()
