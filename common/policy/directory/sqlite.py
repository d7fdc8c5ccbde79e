"""The embedded directory: one SQLite file (WAL), safe for several daemons reading while imgsrvd
and preboot-dir write.

Schema versions live in PRAGMA user_version and are applied in order by MIGRATIONS, each in one
transaction, so an old file is upgraded in place on first open and a file from a newer release
is refused rather than misread. Triggers bump `meta.generation` on every change to the rules or
the menu; policy() reads that one row per call and re-parses the rules only when it moved.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable

from common.machine import normalize_mac
from common.policy.identitypolicy import (AddressPool, Assignment, IdentityPolicy, NameSource,
                                          assignment_order)
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation)
from common.policy.rules import parse_filter

from .base import (Directory, DirectoryChange, DirectoryError, DirectoryURL, PolicyCache,
                   WouldBlock)

log = logging.getLogger("preboot.directory")

_BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation';"

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema.
    f"""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('generation', '0');
    CREATE TABLE rules (
        position INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        enabled INTEGER NOT NULL DEFAULT 1,
        filter TEXT NOT NULL DEFAULT '',
        action TEXT NOT NULL,
        image TEXT NOT NULL DEFAULT '',
        addons TEXT NOT NULL DEFAULT '[]',
        session TEXT NOT NULL DEFAULT '',
        force INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE menu (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        display TEXT NOT NULL,
        timeout_s INTEGER NOT NULL);
    CREATE TABLE workstations (
        mac TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        image_on_next_boot INTEGER NOT NULL DEFAULT 0,
        image TEXT NOT NULL DEFAULT '',
        menu TEXT NOT NULL DEFAULT '');
    CREATE TABLE sessions (
        position INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        image TEXT NOT NULL,
        clients INTEGER NOT NULL,
        timeout_min INTEGER NOT NULL,
        enabled INTEGER NOT NULL,
        delete_after INTEGER NOT NULL);
    CREATE TRIGGER rules_ins AFTER INSERT ON rules BEGIN {_BUMP} END;
    CREATE TRIGGER rules_upd AFTER UPDATE ON rules BEGIN {_BUMP} END;
    CREATE TRIGGER rules_del AFTER DELETE ON rules BEGIN {_BUMP} END;
    CREATE TRIGGER menu_ins AFTER INSERT ON menu BEGIN {_BUMP} END;
    CREATE TRIGGER menu_upd AFTER UPDATE ON menu BEGIN {_BUMP} END;
    CREATE TRIGGER menu_del AFTER DELETE ON menu BEGIN {_BUMP} END;
    """,
    # 2: restore rules that shrink filesystems to fit a smaller disk.
    "ALTER TABLE rules ADD COLUMN shrink INTEGER NOT NULL DEFAULT 0;",
    # 3: multicast sessions' named participants (JSON list), group override and data port.
    """
    ALTER TABLE sessions ADD COLUMN participants TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE sessions ADD COLUMN group_address TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN data_port INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the image's file set a restore rule puts down (1: everything).
    "ALTER TABLE rules ADD COLUMN fileset INTEGER NOT NULL DEFAULT 1;",
    # 5: identity policies (docs/identity.md), the rule naming one, and the assignment log:
    # one row per address or counter value handed out; the keys make each value go once and
    # each MAC get one value per pool and kind.
    f"""
    ALTER TABLE rules ADD COLUMN identity TEXT NOT NULL DEFAULT '';
    CREATE TABLE identities (
        position INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        naming TEXT NOT NULL,
        prefix TEXT NOT NULL DEFAULT '',
        counter_digits INTEGER NOT NULL DEFAULT 3,
        dns_suffix TEXT NOT NULL DEFAULT '',
        workgroup TEXT NOT NULL DEFAULT '',
        addresses TEXT NOT NULL DEFAULT '[]',
        prefix_len INTEGER NOT NULL DEFAULT 0,
        gateway TEXT NOT NULL DEFAULT '',
        dns_servers TEXT NOT NULL DEFAULT '[]',
        is_default INTEGER NOT NULL DEFAULT 0);
    CREATE TRIGGER identities_ins AFTER INSERT ON identities BEGIN {_BUMP} END;
    CREATE TRIGGER identities_upd AFTER UPDATE ON identities BEGIN {_BUMP} END;
    CREATE TRIGGER identities_del AFTER DELETE ON identities BEGIN {_BUMP} END;
    CREATE TABLE assignments (
        pool TEXT NOT NULL COLLATE NOCASE,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        mac TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        PRIMARY KEY (pool, kind, value),
        UNIQUE (pool, kind, mac));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SqliteDirectory(Directory):
    def __init__(self, url: DirectoryURL, timeout_s: float = 3.0, create: bool = False):
        """create=True (preboot-dir's writing commands only) makes a missing file and its
        folder; otherwise a missing file is a DirectoryError: a daemon must not answer every
        machine "no work" from an empty directory it invented out of a typo."""
        self.url = url
        self.path = url.path
        self.timeout_s = timeout_s
        self.create = create
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._cache = PolicyCache()
        self._nowait: sqlite3.Connection | None = None   # lookup_nowait's, one caller thread
        self._closed = False
        self._migrate(self._connection())

    # -- connections ------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """One connection per thread: sqlite3 objects must not cross threads, and separate
        connections let readers run beside a writer under WAL."""
        if self._closed:
            raise DirectoryError(f"directory {self.url.redacted()} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if not self.create and not os.path.exists(self.path):
            raise DirectoryError(f"directory {self.url.redacted()}: no such database file "
                                 "(preboot-dir import or preboot-dir init creates it)")
        try:
            folder = os.path.dirname(self.path)
            if self.create and folder and not os.path.isdir(folder):
                os.makedirs(folder, mode=0o750, exist_ok=True)
            # mode=rw: never create the file here, even if it vanished since the check above.
            mode = "rwc" if self.create else "rw"
            conn = sqlite3.connect(f"file://{urllib.parse.quote(self.path)}?mode={mode}",
                                   uri=True, timeout=self.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        except (sqlite3.Error, OSError) as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: cannot open: {exc}") from None
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DirectoryError(
                    f"directory {self.url.redacted()}: schema version {version} is newer than "
                    f"this release understands ({SCHEMA_VERSION}); upgrade the software")
            for number in range(version, SCHEMA_VERSION):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Re-check under the write lock: another process may have just migrated.
                    if conn.execute("PRAGMA user_version").fetchone()[0] > number:
                        conn.execute("ROLLBACK")
                        continue
                    for statement in _statements(MIGRATIONS[number]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={number + 1}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                log.info("directory %s: schema migrated to version %d", self.path, number + 1)
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: write failed: {exc}") from None

    # -- policy -----------------------------------------------------------------------------

    def policy(self) -> ImagingPolicy:
        marker = self._read("SELECT value FROM meta WHERE key = 'generation'")
        return self._cache.get(marker[0][0] if marker else None, self._load_policy)

    def lookup_nowait(self, mac: str) -> tuple[ImagingPolicy, Workstation | None]:
        """Both reads on a connection that never waits for a lock (busy_timeout 0). Under WAL
        a reader does not wait for writers, so this normally answers in tens of microseconds;
        a lock (another program's exclusive mode, a recovery) or a changed policy, which takes
        a reload, is WouldBlock and the caller goes the blocking way."""
        conn = self._nowait_connection()
        try:
            marker = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchall()
            policy = self._cache.current(marker[0][0] if marker else None)
            if policy is None:
                raise WouldBlock
            mac = normalize_mac(mac) or mac
            rows = conn.execute("SELECT mac, name, image_on_next_boot, image, menu FROM "
                                "workstations WHERE mac = ?", (mac,)).fetchall()
        except sqlite3.OperationalError as exc:
            raise WouldBlock from exc   # busy or locked; the blocking path reports real errors
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None
        return policy, (_station(rows[0]) if rows else None)

    def _nowait_connection(self) -> sqlite3.Connection:
        if self._closed:
            raise DirectoryError(f"directory {self.url.redacted()} is closed")
        if self._nowait is None:
            try:
                conn = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=0")
            except sqlite3.Error:
                raise WouldBlock from None
            with self._lock:
                self._connections.append(conn)
            self._nowait = conn
        return self._nowait

    def _load_policy(self) -> ImagingPolicy:
        # One read transaction: under WAL it is a snapshot, so the rules and the menu always
        # come from the same committed write.
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            try:
                rows = conn.execute("SELECT name, enabled, filter, action, image, addons, "
                                    "session, force, shrink, fileset, identity FROM rules "
                                    "ORDER BY position").fetchall()
                identity_rows = conn.execute(
                    "SELECT name, naming, prefix, counter_digits, dns_suffix, workgroup, "
                    "addresses, prefix_len, gateway, dns_servers, is_default FROM identities "
                    "ORDER BY position").fetchall()
                menu_rows = conn.execute("SELECT display, timeout_s FROM menu "
                                         "WHERE id = 1").fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None
        rules = tuple(self._rule(row) for row in rows)
        menu = MenuSettings()
        if menu_rows:
            try:
                menu = MenuSettings(MenuDisplay(menu_rows[0][0]), int(menu_rows[0][1]))
            except ValueError as exc:
                raise DirectoryError(f"directory {self.url.redacted()}: bad menu settings: {exc}")
        identities = tuple(self._identity(row) for row in identity_rows)
        return ImagingPolicy(rules, menu, identities)

    def _identity(self, row: tuple) -> IdentityPolicy:
        (name, naming, prefix, digits, suffix, workgroup, addresses, prefix_len, gateway,
         servers, default) = row
        try:
            ranges = tuple(json.loads(addresses))
            pool = None if not ranges else AddressPool(
                ranges, int(prefix_len), gateway, tuple(json.loads(servers)))
            return IdentityPolicy(name, NameSource(naming), prefix, int(digits), suffix,
                                  workgroup, pool, bool(default))
        except (ValueError, TypeError) as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: identity policy "
                                 f"'{name}': {exc}") from None

    def _rule(self, row: tuple) -> Rule:
        (name, enabled, filter_text, action, image, addons, session, force, shrink, fileset,
         ident) = row
        try:
            act = Action(ActionKind(action), image, tuple(json.loads(addons)), session,
                         bool(shrink), int(fileset))
            return Rule(name, parse_filter(filter_text), act, bool(enabled), bool(force),
                        ident)
        except (ValueError, TypeError) as exc:  # FilterSyntaxError and JSON errors included
            # Refuse the whole policy: silently skipping a rule could image a machine wrongly.
            raise DirectoryError(f"directory {self.url.redacted()}: rule '{name}': {exc}") from None

    def replace_policy(self, policy: ImagingPolicy) -> None:
        self._write(_policy_statements(policy))

    def apply(self, change: DirectoryChange) -> None:
        """Every write of `change` in one transaction: all of it or, on any error, none."""
        statements: list[tuple[str, tuple]] = []
        if change.policy is not None:
            statements += _policy_statements(change.policy)
        for mac in change.delete_workstations:
            statements.append(("DELETE FROM workstations WHERE mac = ?",
                               (normalize_mac(mac) or mac,)))
        statements += [_station_statement(station) for station in change.put_workstations]
        if change.sessions is not None:
            statements += _sessions_statements(list(change.sessions))
        if statements:
            self._write(statements)


    # -- workstations -------------------------------------------------------------------------

    def workstation(self, mac: str) -> Workstation | None:
        mac = normalize_mac(mac) or mac
        rows = self._read("SELECT mac, name, image_on_next_boot, image, menu FROM workstations "
                          "WHERE mac = ?", (mac,))
        return _station(rows[0]) if rows else None

    def workstations(self) -> list[Workstation]:
        rows = self._read("SELECT mac, name, image_on_next_boot, image, menu FROM workstations "
                          "ORDER BY mac")
        return [_station(row) for row in rows]

    def put_workstation(self, station: Workstation) -> None:
        self._write([_station_statement(station)])

    def delete_workstation(self, mac: str) -> bool:
        mac = normalize_mac(mac) or mac
        existed = bool(self._read("SELECT 1 FROM workstations WHERE mac = ?", (mac,)))
        self._write([("DELETE FROM workstations WHERE mac = ?", (mac,))])
        return existed

    # -- multicast sessions ---------------------------------------------------------------------

    def sessions(self) -> list[MulticastSession]:
        rows = self._read("SELECT name, image, clients, timeout_min, enabled, delete_after, "
                          "participants, group_address, data_port FROM sessions "
                          "ORDER BY position")
        return [self._session(row) for row in rows]

    def _session(self, row: tuple) -> MulticastSession:
        name, image, clients, timeout, enabled, delete, participants, group, port = row
        try:
            named = json.loads(participants)
            if not isinstance(named, list) or not all(isinstance(p, str) for p in named):
                raise ValueError("participants is not a list of names")
            return MulticastSession(name, image, clients, timeout, bool(enabled), bool(delete),
                                    tuple(named), group, port)
        except (ValueError, TypeError) as exc:   # JSON errors included
            raise DirectoryError(f"directory {self.url.redacted()}: multicast session "
                                 f"'{name}': {exc}") from None

    def replace_sessions(self, sessions: list[MulticastSession]) -> None:
        self._write(_sessions_statements(sessions))

    # -- the assignment log ---------------------------------------------------------------------

    def assign(self, pool: str, kind: str, mac: str, candidates: Iterable[str],
               now_s: float) -> Assignment | None:
        """In one write transaction (BEGIN IMMEDIATE: one writer at a time, across processes):
        the MAC's own value if it has one, else the first free candidate, recorded."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = self._mine(conn, pool, kind, mac)
                if found is None:
                    taken = {row[0] for row in conn.execute(
                        "SELECT value FROM assignments WHERE pool = ? AND kind = ?",
                        (pool, kind))}
                    free = next((value for value in candidates if value not in taken), None)
                    if free is not None:
                        conn.execute("INSERT INTO assignments (pool, kind, value, mac, "
                                     "assigned_at) VALUES (?, ?, ?, ?, ?)",
                                     (pool, kind, free, mac, now_s))
                        found = Assignment(pool, kind, free, mac, now_s)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: assignment in pool "
                                 f"'{pool}' failed: {exc}") from None
        return found

    def _mine(self, conn: sqlite3.Connection, pool: str, kind: str, mac: str
              ) -> Assignment | None:
        rows = conn.execute("SELECT pool, kind, value, mac, assigned_at FROM assignments "
                            "WHERE pool = ? AND kind = ? AND mac = ?",
                            (pool, kind, mac)).fetchall()
        return Assignment(*rows[0]) if rows else None

    def assignment_of(self, pool: str, kind: str, mac: str) -> Assignment | None:
        rows = self._read("SELECT pool, kind, value, mac, assigned_at FROM assignments "
                          "WHERE pool = ? AND kind = ? AND mac = ?", (pool, kind, mac))
        return Assignment(*rows[0]) if rows else None

    def assignments(self, pool: str | None = None) -> list[Assignment]:
        sql = "SELECT pool, kind, value, mac, assigned_at FROM assignments"
        rows = self._read(sql + " WHERE pool = ?" if pool else sql, (pool,) if pool else ())
        return sorted((Assignment(*row) for row in rows), key=assignment_order)

    def release(self, pool: str, mac: str = "", value: str = "") -> list[Assignment]:
        found = [a for a in self.assignments(pool)
                 if (mac and a.mac == mac) or (value and a.value == value)]
        self._write([("DELETE FROM assignments WHERE pool = ? AND kind = ? AND value = ?",
                      (a.pool, a.kind, a.value)) for a in found])
        return found

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._cache.clear()


def _policy_statements(policy: ImagingPolicy) -> list[tuple[str, tuple]]:
    problem = policy.identity_problem()
    if problem:
        raise ValueError(problem)
    statements: list[tuple[str, tuple]] = [("DELETE FROM rules", ())]
    for position, rule in enumerate(policy.rules, 1):
        statements.append((
            "INSERT INTO rules (position, name, enabled, filter, action, image, addons, "
            "session, force, shrink, fileset, identity) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (position, rule.name, int(rule.enabled), rule.filter.canonical(),
             rule.action.kind.value, rule.action.image, json.dumps(list(rule.action.addons)),
             rule.action.session, int(rule.force), int(rule.action.shrink),
             rule.action.fileset, rule.identity)))
    statements.append(("DELETE FROM identities", ()))
    for position, item in enumerate(policy.identities, 1):
        pool = item.pool
        statements.append((
            "INSERT INTO identities (position, name, naming, prefix, counter_digits, "
            "dns_suffix, workgroup, addresses, prefix_len, gateway, dns_servers, is_default) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (position, item.name, item.naming.value, item.prefix, item.counter_digits,
             item.dns_suffix, item.workgroup, json.dumps(list(pool.ranges) if pool else []),
             pool.prefix_len if pool else 0, pool.gateway if pool else "",
             json.dumps(list(pool.dns_servers) if pool else []), int(item.default))))
    statements.append(("INSERT OR REPLACE INTO menu (id, display, timeout_s) VALUES (1, ?, ?)",
                       (policy.menu.display.value, policy.menu.timeout_s)))
    return statements


def _station_statement(station: Workstation) -> tuple[str, tuple]:
    return ("INSERT OR REPLACE INTO workstations (mac, name, image_on_next_boot, image, menu) "
            "VALUES (?, ?, ?, ?, ?)",
            (station.mac, station.name, int(station.image_on_next_boot), station.image,
             station.menu.value if station.menu else ""))


def _sessions_statements(sessions: list[MulticastSession]) -> list[tuple[str, tuple]]:
    statements: list[tuple[str, tuple]] = [("DELETE FROM sessions", ())]
    for position, session in enumerate(sessions, 1):
        statements.append((
            "INSERT INTO sessions (position, name, image, clients, timeout_min, enabled, "
            "delete_after, participants, group_address, data_port) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (position, session.name, session.image, session.clients, session.timeout_min,
             int(session.enabled), int(session.delete_after),
             json.dumps(list(session.participants)), session.group, session.data_port)))
    return statements


def _station(row: tuple) -> Workstation:
    mac, name, flag, image, menu = row
    try:
        return Workstation(mac, name, bool(flag), image, MenuDisplay(menu) if menu else None)
    except ValueError:
        raise DirectoryError(f"workstation {mac}: bad menu display '{menu}'") from None


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
