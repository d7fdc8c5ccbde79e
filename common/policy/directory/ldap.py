"""The LDAP v3 directory backend (OpenLDAP; any server that takes our schema).

Layout under the URL's base DN (which must exist; docs/directory-ldap.md has the full story):

    cn=policy               prebootImagingPolicy      the menu settings
    ou=rules                organizationalUnit        one prebootRule per rule, RDN cn=<name>
    ou=workstations         organizationalUnit        prebootWorkstation, RDN prebootMAC=<12 hex>
    ou=sessions             organizationalUnit        prebootMulticastSession, RDN cn=<name>
    ou=identities           organizationalUnit        prebootIdentityPolicy, RDN cn=<name>
    ou=assignments          organizationalUnit        the assignment log (docs/identity.md):
                                                      prebootAssignment, RDN cn=<pool>|<kind>|<value>
                                                      prebootAssignmentClaim, RDN
                                                      cn=<pool>|<kind>|mac|<MAC>

The assignment log leaves the decision to the server: a value is handed out by adding the entry
named after it, which fails (entryAlreadyExists) when another MAC holds it; a MAC first adds its
claim entry, so two requests of one MAC at once cannot take two values.

The containers are created on the first write; a base without them reads as an empty policy.

Change detection: policy() reads the contextCSN of the database suffix (one base-scope search;
syncprov keeps it current, and every replicated OpenLDAP runs syncprov) and re-reads the rules
only when it moved. Without a contextCSN every call re-reads the rules: correct, slower. The
parsed policy is also re-read at least every POLICY_MAX_AGE_S, so a contextCSN frozen by a removed
syncprov overlay cannot pin an old policy for ever.

Consistency: replace_policy brackets its writes with prebootPolicySerial on cn=policy (odd while
writing, each step a compare-and-swap), and a reader takes the rules only when the serial is even
and unchanged across the read; during a rewrite it keeps the last whole policy it read. So a
booting machine is never judged by half of a rewritten rule set.

Connections: one per thread, bound with the credentials (anonymous without), network and
operation timeouts of timeout_s. A connection that turns out dead (the server restarted, an idle
timeout) is replaced and the call retried once; a fresh connection that fails is reported at
once, so an unreachable server costs about timeout_s, not twice that.

The event loop's lookup (lookup_async, prebootpolicyd's common case): handing each query to a
worker thread cost more than the query itself, so one more connection belongs to the loop. Each
call sends its own contextCSN read and workstation search at once (never shared between calls:
a change made before a call is seen by it), and the answers are read whenever the socket is
readable. Nothing on it may block the loop: it is connected and bound on a thread of its own
(the call says WouldBlock meanwhile), a changed policy is reloaded by policy() on a worker
thread, and every error goes back to the blocking methods, which report it as they always did.

Reads are strict: an entry we cannot use (a rule whose filter does not parse, an unknown action,
a missing order) fails the whole call with DirectoryError naming the entry, because silently
skipping a rule could image a machine wrongly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import ldap
import ldap.dn
import ldap.filter
from ldap.ldapobject import LDAPObject

from common.machine import normalize_mac
from common.policy.identitypolicy import (AddressPool, Assignment, IdentityPolicy, NameSource,
                                          assignment_order)
from common.policy.model import (Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings,
                                 MulticastSession, Rule, Workstation)
from common.policy.rules import Filter, parse_filter

from .base import (DEFAULT_TIMEOUT_S, Credentials, Directory, DirectoryChange, DirectoryError,
                   DirectoryURL, PolicyCache, WouldBlock)

log = logging.getLogger("preboot.directory")

T = TypeVar("T")

POLICY_MAX_AGE_S = 60.0      # re-read the rules at least this often, whatever the marker says
ORDER_STEP = 10              # rule/session order numbers 10, 20, 30...: room to insert by hand
MATCH_ALL = "*"              # prebootFilter of a rule for every machine (LDAP has no empty values)
RECONNECT_S = 1.0            # lookup_async: a failed connect is retried at most this often
# lookup_async: searches unanswered on its connection, at most. Below what a server that stopped
# reading can take in its socket buffer, and below OpenLDAP's conn_max_pending (100 anonymous,
# 1000 bound), past which it closes the connection.
MAX_IN_FLIGHT = 256
MAX_IN_FLIGHT_ANONYMOUS = 64
# lookup_async: while searches are unanswered, read anyway this often. libldap may hold a whole
# answer in its own buffers with the socket no longer readable (after it read and dropped an
# answer to an abandoned search, or TLS records); this bounds that wait.
POKE_S = 0.05

OC_POLICY = "prebootImagingPolicy"
OC_RULE = "prebootRule"
OC_WORKSTATION = "prebootWorkstation"
OC_SESSION = "prebootMulticastSession"
OC_IDENTITY = "prebootIdentityPolicy"
OC_ASSIGNMENT = "prebootAssignment"
OC_CLAIM = "prebootAssignmentClaim"
STALE_CLAIM_S = 30.0         # a claim without a value this old was left by a request that died

# The attributes each kind of entry carries that we manage; anything else (description, ...)
# is the administrator's and is left alone on writes.
RULE_ATTRS = ("cn", "prebootRuleOrder", "prebootEnabled", "prebootFilter", "prebootAction",
              "prebootImage", "prebootAddonImage", "prebootSession", "prebootForce",
              "prebootShrink", "prebootFileset", "prebootIdentity")
IDENTITY_ATTRS = ("cn", "prebootIdentityOrder", "prebootNaming", "prebootNamePrefix",
                  "prebootCounterDigits", "prebootDnsSuffix", "prebootWorkgroup",
                  "prebootIpRange", "prebootIpPrefixLength", "prebootIpGateway",
                  "prebootDnsServer", "prebootDefault")
ASSIGNMENT_ATTRS = ("cn", "prebootPool", "prebootAssignmentKind", "prebootAssignedValue",
                    "prebootMAC", "prebootAssignedAt")
WORKSTATION_ATTRS = ("prebootMAC", "cn", "prebootImageOnNextBoot", "prebootImage",
                     "prebootMenuDisplay")
SESSION_ATTRS = ("cn", "prebootSessionOrder", "prebootImage", "prebootSessionClients",
                 "prebootSessionTimeout", "prebootEnabled", "prebootDeleteAfter",
                 "prebootSessionParticipant", "prebootSessionGroup", "prebootSessionDataPort")
POLICY_ATTRS = ("prebootMenuDisplay", "prebootMenuTimeout")
SERIAL = "prebootPolicySerial"             # odd while replace_policy is writing; see there
UNORDERED = {"prebootaddonimage", "prebootsessionparticipant", "prebootiprange",
             "prebootdnsserver"}          # multi-valued: compare as sets when diffing

_ADDON = re.compile(r"\{(\d+)\}(.*)", re.DOTALL)
_UNREACHABLE = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)

Attrs = dict[str, list[bytes]]
Entry = tuple[str, Attrs]


class _EntryError(ValueError):
    """An entry holds something we cannot use; becomes DirectoryError naming the entry."""


class LdapDirectory(Directory):
    def __init__(self, url: DirectoryURL, credentials: Credentials | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if url.scheme not in ("ldap", "ldaps"):
            raise ValueError(f"'{url.redacted()}': not an ldap:// or ldaps:// URL")
        if not ldap.dn.is_dn(url.base_dn):
            raise ValueError(f"'{url.redacted()}': '{url.base_dn}' is not a valid DN")
        self.url = url
        self.uri = f"{url.scheme}://{url.host}"
        self.base_dn = url.base_dn
        self.policy_dn = f"cn=policy,{self.base_dn}"
        self.rules_dn = f"ou=rules,{self.base_dn}"
        self.workstations_dn = f"ou=workstations,{self.base_dn}"
        self.sessions_dn = f"ou=sessions,{self.base_dn}"
        self.identities_dn = f"ou=identities,{self.base_dn}"
        self.assignments_dn = f"ou=assignments,{self.base_dn}"
        self.credentials = credentials
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: dict[int, LDAPObject] = {}     # thread ident -> its connection
        self._cache = PolicyCache()
        self._closed = False
        self._suffix: str | None = None
        self._suffix_known = False
        self._no_marker_logged = False
        self._containers_ok = False
        self._consistent: ImagingPolicy | None = None   # the last policy read whole
        self._filters: dict[str, Filter] = {}           # its filters by text
        # lookup_async's connection, used only on the event loop's thread (see there)
        self._link: _LoopConnection | None = None
        self._connecting_for: asyncio.AbstractEventLoop | None = None
        self._reconnect_at = 0.0
        # Nothing touches the network here: a daemon starting while the directory is down still
        # comes up, and each call reports the outage (DirectoryError) until it is back.

    # -- connections --------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        return f"'{self.credentials.bind_dn}'" if self.credentials else "anonymous"

    def _connection(self) -> tuple[LDAPObject, bool]:
        """This thread's connection and whether it was made just now."""
        if self._closed:
            raise DirectoryError(f"directory {self.url.redacted()} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, False
        conn = self._open_connection()
        self._local.conn = conn
        ident = threading.get_ident()
        with self._lock:
            stale = [self._connections.pop(ident)] if ident in self._connections else []
            alive = {thread.ident for thread in threading.enumerate()}
            for other in [i for i in self._connections if i not in alive]:
                stale.append(self._connections.pop(other))
            self._connections[ident] = conn
        for old in stale:
            _unbind(old)
        return conn, True

    def _open_connection(self) -> LDAPObject:
        """A new connection, bound; DirectoryError when that fails."""
        conn = None
        try:
            conn = ldap.initialize(self.uri)
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
            conn.set_option(ldap.OPT_REFERRALS, 0)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, self.timeout_s)
            conn.set_option(ldap.OPT_TIMEOUT, self.timeout_s)
            # TLS for ldaps:// comes from libldap's defaults and /etc/ldap/ldap.conf
            # (TLS_CACERT, TLS_REQCERT demand by default): the certificate must verify.
            if self.credentials is not None:
                conn.simple_bind_s(self.credentials.bind_dn, self.credentials.password)
            else:
                conn.simple_bind_s("", "")
        except ldap.INVALID_CREDENTIALS:
            _unbind(conn)
            raise DirectoryError(
                f"directory {self.url.redacted()}: bind as {self._who} refused: invalid "
                "credentials (check BindDN and Password in the credentials file)") from None
        except ldap.LDAPError as exc:
            if conn is not None:
                _unbind(conn)
            raise self._error("connect", exc) from None
        return conn

    def _drop(self, conn: LDAPObject) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            for ident, held in list(self._connections.items()):
                if held is conn:
                    del self._connections[ident]
        _unbind(conn)

    def _run(self, what: str, operation: Callable[[LDAPObject], T]) -> T:
        """Run operation on this thread's connection, mapping every LDAP error to
        DirectoryError. A dead connection that was open before is replaced and the whole
        operation retried once (each operation is safe to repeat)."""
        for attempt in (1, 2):
            conn, fresh = self._connection()
            try:
                return operation(conn)
            except _UNREACHABLE as exc:
                self._drop(conn)
                if fresh or attempt == 2:
                    raise self._error(what, exc) from None
                log.info("directory %s: connection lost (%s); reconnecting",
                         self.url.redacted(), _reason(exc))
            except ldap.TIMEOUT as exc:
                self._drop(conn)        # an answer may still arrive on it: never reuse
                raise self._error(what, exc) from None
            except ldap.NO_SUCH_OBJECT as exc:
                # Reads turn a missing container into "empty"; a write gets here when someone
                # removed a container we created earlier: create it again, once.
                if not self._containers_ok or attempt == 2:
                    raise self._error(what, exc) from None
                self._containers_ok = False
            except ldap.LDAPError as exc:
                raise self._error(what, exc) from None
            except _EntryError as exc:
                raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None
        raise AssertionError("unreachable")

    def _error(self, what: str, exc: ldap.LDAPError) -> DirectoryError:
        where = f"directory {self.url.redacted()}"
        if isinstance(exc, _UNREACHABLE):
            return DirectoryError(f"{where} unreachable: {_reason(exc)}")
        if isinstance(exc, ldap.TIMEOUT):
            return DirectoryError(f"{where} did not answer within {self.timeout_s:g} s ({what})")
        if isinstance(exc, ldap.INVALID_CREDENTIALS):
            return DirectoryError(f"{where}: bind as {self._who} refused: invalid credentials")
        if isinstance(exc, ldap.INSUFFICIENT_ACCESS):
            return DirectoryError(f"{where}: {what}: access denied to {self._who} "
                                  f"({_reason(exc)})")
        if isinstance(exc, (ldap.SIZELIMIT_EXCEEDED, ldap.ADMINLIMIT_EXCEEDED)):
            return DirectoryError(f"{where}: {what}: the server's size limit cut the answer "
                                  f"short; give {self._who} unlimited results "
                                  "(olcLimits, see docs/directory-ldap.md)")
        if isinstance(exc, ldap.TIMELIMIT_EXCEEDED):
            return DirectoryError(f"{where}: {what}: the server's time limit was reached")
        return DirectoryError(f"{where}: {what}: {_reason(exc)}")

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            _unbind(conn)
        link, self._link = self._link, None
        if link is not None:
            link.close_threadsafe()
        self._cache.clear()

    # -- low-level reads ------------------------------------------------------------------------

    def _search(self, conn: LDAPObject, base: str, scope: int, filterstr: str,
                attrs: list[str] | None = None) -> list[Entry]:
        found = conn.search_ext_s(base, scope, filterstr, attrs, timeout=self.timeout_s)
        return [(dn, entry) for dn, entry in found if dn is not None]   # drop referrals

    def _children(self, conn: LDAPObject, container: str, scope: int, filterstr: str,
                  attrs: list[str] | None = None) -> list[Entry]:
        """Entries under one of our containers; [] when the container does not exist yet,
        DirectoryError when the base DN itself does not."""
        try:
            return self._search(conn, container, scope, filterstr, attrs)
        except ldap.NO_SUCH_OBJECT:
            self._require_base(conn)
            return []

    def _require_base(self, conn: LDAPObject) -> None:
        try:
            self._search(conn, self.base_dn, ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
        except ldap.NO_SUCH_OBJECT:
            raise DirectoryError(
                f"directory {self.url.redacted()}: base DN '{self.base_dn}' does not exist "
                "(create it; see docs/directory-ldap.md)") from None

    # -- change marker --------------------------------------------------------------------------

    def _find_suffix(self, conn: LDAPObject) -> str | None:
        """The naming context holding our base DN (from the root DSE), or None."""
        try:
            found = self._search(conn, "", ldap.SCOPE_BASE, "(objectClass=*)",
                                 ["namingContexts"])
        except (ldap.NO_SUCH_OBJECT, ldap.INSUFFICIENT_ACCESS):
            return None
        contexts = [value.decode("utf-8", "replace")
                    for _, attrs in found for value in _lower(attrs).get("namingcontexts", [])]
        base = _dn_key(self.base_dn)
        best: str | None = None
        for context in contexts:
            try:
                key = _dn_key(context)
            except ldap.DECODING_ERROR:
                continue
            if key and base[len(base) - len(key):] == key and \
                    (best is None or len(key) > len(_dn_key(best))):
                best = context
        return best

    def _marker(self, conn: LDAPObject) -> object:
        if not self._suffix_known:
            self._suffix = self._find_suffix(conn)
            self._suffix_known = True
        found: list[Entry] = []
        if self._suffix is not None:
            try:
                found = self._search(conn, self._suffix, ldap.SCOPE_BASE, "(objectClass=*)",
                                     ["contextCSN"])
            except (ldap.NO_SUCH_OBJECT, ldap.INSUFFICIENT_ACCESS):
                found = []
        return self._marker_of(found)

    def _marker_of(self, found: list[Entry]) -> object:
        """The change marker from the suffix entry's contextCSN (as read by _marker)."""
        values = [v for _, attrs in found for v in _lower(attrs).get("contextcsn", [])]
        if not values:
            if not self._no_marker_logged:
                self._no_marker_logged = True
                log.info("directory %s: no contextCSN on the suffix %s (enable the syncprov "
                         "overlay); the rules are re-read on every query",
                         self.url.redacted(), self._suffix or "(not found in the root DSE)")
            return object()      # equal to nothing: always reload
        return tuple(sorted(values)), int(time.monotonic() // POLICY_MAX_AGE_S)

    # -- policy ---------------------------------------------------------------------------------

    def policy(self) -> ImagingPolicy:
        def run(conn: LDAPObject) -> ImagingPolicy:
            return self._cache.get(self._marker(conn), lambda: self._load_policy(conn))
        return self._run("read the policy", run)

    def _policy_entry(self, conn: LDAPObject) -> tuple[MenuSettings, int | None]:
        """The menu settings and the write serial from cn=policy (defaults when absent)."""
        try:
            found = self._search(conn, self.policy_dn, ldap.SCOPE_BASE, "(objectClass=*)",
                                 [*POLICY_ATTRS, SERIAL])
        except ldap.NO_SUCH_OBJECT:
            self._require_base(conn)
            return MenuSettings(), None
        if not found:
            return MenuSettings(), None
        dn, raw = found[0]
        attrs = _lower(raw)
        try:
            serial = _int(attrs, SERIAL) if _text(attrs, SERIAL) is not None else None
        except _EntryError as exc:
            raise _EntryError(f"policy {dn}: {exc}") from None
        return _menu(found[0]), serial

    def _load_policy(self, conn: LDAPObject) -> ImagingPolicy:
        """Read a consistent policy: the write serial on cn=policy is even and the same before
        and after the rules were read. While a replace_policy is under way (odd serial), keep
        answering with the last consistent policy this object read; with none yet, wait up to
        timeout_s and then fail."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            menu, before = self._policy_entry(conn)
            if before is None or before % 2 == 0:
                entries = self._children(conn, self.rules_dn, ldap.SCOPE_ONELEVEL,
                                         f"(objectClass={OC_RULE})", list(RULE_ATTRS))
                identities = self._children(conn, self.identities_dn, ldap.SCOPE_ONELEVEL,
                                            f"(objectClass={OC_IDENTITY})",
                                            list(IDENTITY_ATTRS))
                _, after = self._policy_entry(conn)
                if after == before:
                    policy = ImagingPolicy(self._ordered_rules(entries), menu,
                                           _ordered_identities(identities))
                    self._consistent = policy
                    return policy
            previous = self._consistent
            if previous is not None:
                log.info("directory %s: the policy is being written (%s %s); answering with "
                         "the policy read before", self.url.redacted(), SERIAL, before)
                return previous
            if time.monotonic() >= deadline:
                raise _EntryError(
                    f"policy {self.policy_dn}: a policy write is under way or was interrupted "
                    f"({SERIAL} {before} is odd); write the policy again to repair it")
            time.sleep(0.05)

    def _ordered_rules(self, entries: list[Entry]) -> tuple[Rule, ...]:
        # Filters are immutable: reuse the ones parsed last time for unchanged text, so a
        # reload after one edit (or after any write, which moves contextCSN) parses only what
        # changed. Rebuilt each time, so it holds exactly the current filters.
        known, parsed = self._filters, {}
        rules = [_rule(dn, attrs, known, parsed) for dn, attrs in entries]
        self._filters = parsed
        rules.sort(key=lambda item: (item[0], item[1].name.casefold(), item[1].name))
        for (order, first), (again, second) in zip(rules, rules[1:]):
            if order == again:
                log.warning("directory %s: rules '%s' and '%s' share prebootRuleOrder %d; "
                            "'%s' goes first (by name)", self.url.redacted(), first.name,
                            second.name, order, first.name)
        return tuple(rule for _, rule in rules)

    def replace_policy(self, policy: ImagingPolicy) -> None:
        problem = policy.identity_problem()
        if problem:
            raise ValueError(problem)
        identities = [(item.name, _identity_attrs(item, position * ORDER_STEP))
                      for position, item in enumerate(policy.identities, 1)]
        wanted: list[tuple[str, Attrs]] = []
        for position, rule in enumerate(policy.rules, 1):
            wanted.append((rule.name, _rule_attrs(rule, position * ORDER_STEP)))
        menu = {"prebootMenuDisplay": [policy.menu.display.value.encode()],
                "prebootMenuTimeout": [str(policy.menu.timeout_s).encode()]}

        def run(conn: LDAPObject) -> None:
            _check_names(wanted, "rule")
            self._ensure_containers(conn)
            serial = self._begin_policy_write(conn)
            self._sync_children(conn, self.rules_dn, OC_RULE, RULE_ATTRS, wanted, "rule")
            self._sync_children(conn, self.identities_dn, OC_IDENTITY, IDENTITY_ATTRS,
                                identities, "identity policy")
            self._set_serial(conn, serial, serial + 1, [
                (ldap.MOD_REPLACE, name, values) for name, values in menu.items()])
        self._run("write the policy", run)

    def apply(self, change: DirectoryChange) -> None:
        """LDAP has no transaction over several entries: check everything the server would
        refuse half-way (names that clash, MACs) before the first write, then write in turn."""
        try:
            if change.policy is not None:
                _check_names([(rule.name, {}) for rule in change.policy.rules], "rule")
            if change.sessions is not None:
                _check_names([(session.name, {}) for session in change.sessions],
                             "multicast session")
        except _EntryError as exc:
            raise DirectoryError(f"directory {self.url.redacted()}: {exc}") from None
        for station in change.put_workstations:
            if normalize_mac(station.mac) is None:
                raise DirectoryError(f"'{station.mac}' is not a MAC address")
        super().apply(change)

    def _begin_policy_write(self, conn: LDAPObject) -> int:
        """Mark the policy as being written (odd serial) and return that serial, by compare-
        and-swap on the old value. An odd serial found here is taken over: a writer that died
        half-way cannot be told from one still at work, and the repair is to write again. The
        writer taken over then fails at its end (its swap no longer matches)."""
        try:
            _, serial = self._policy_entry(conn)
        except _EntryError:
            serial = None         # unreadable: take it over
        if serial is None:
            try:
                found = self._search(conn, self.policy_dn, ldap.SCOPE_BASE, "(objectClass=*)",
                                     ["1.1"])
            except ldap.NO_SUCH_OBJECT:
                found = []
            if not found:
                try:
                    _add(conn, self.policy_dn, [b"top", OC_POLICY.encode()],
                         {"cn": [b"policy"], SERIAL: [b"1"]})
                except ldap.ALREADY_EXISTS:
                    raise _EntryError("another program is writing the policy right now; "
                                      "try again") from None
                return 1
        writing = 1 if serial is None else serial + 1 if serial % 2 == 0 else serial + 2
        self._set_serial(conn, serial, writing, [])
        return writing

    def _set_serial(self, conn: LDAPObject, old: int | None, new: int,
                    more: list[tuple[int, str, list[bytes] | None]]) -> None:
        changes: list[tuple[int, str, list[bytes] | None]] = []
        if old is not None:
            changes.append((ldap.MOD_DELETE, SERIAL, [str(old).encode()]))
        else:
            changes.append((ldap.MOD_REPLACE, SERIAL, None))
        changes.append((ldap.MOD_ADD, SERIAL, [str(new).encode()]))
        try:
            conn.modify_s(self.policy_dn, changes + more)
        except (ldap.NO_SUCH_ATTRIBUTE, ldap.TYPE_OR_VALUE_EXISTS, ldap.CONSTRAINT_VIOLATION):
            raise _EntryError(f"another program changed {SERIAL} on {self.policy_dn} while "
                              "we wrote the policy, so the rules may be a mix of both writes; "
                              "write the policy again") from None

    # -- workstations ---------------------------------------------------------------------------

    def workstation(self, mac: str) -> Workstation | None:
        wanted = normalize_mac(mac)
        if wanted is None:
            return None

        def run(conn: LDAPObject) -> Workstation | None:
            found = self._find_station(conn, wanted)
            return _station(*found) if found else None
        return self._run(f"look up workstation {wanted}", run)

    def _find_station(self, conn: LDAPObject, mac: str) -> Entry | None:
        found = self._children(conn, self.workstations_dn, ldap.SCOPE_SUBTREE,
                               _station_filter(mac), list(WORKSTATION_ATTRS))
        return _one_station(mac, found)

    # -- the event loop's lookup ----------------------------------------------------------------

    async def lookup_async(self, mac: str, timeout_s: float
                           ) -> tuple[ImagingPolicy, Workstation | None]:
        """The marker read and the workstation search sent together on the loop's connection,
        their answers read when its socket is readable: no thread, no waiting on the loop.
        WouldBlock whenever the blocking methods should answer instead: no connection yet
        (one is being made on a thread of its own), the policy changed (reloading it is
        blocking work), or anything went wrong that they report properly (a lost
        connection, an error result, an entry we cannot use). Only a server that does not
        answer within timeout_s is DirectoryError here: asking again would double the wait."""
        wanted = normalize_mac(mac)
        if wanted is None or self._closed or not self._suffix_known or self._suffix is None:
            raise WouldBlock      # the suffix is learnt (and the policy loaded) by policy()
        link = self._loop_connection()
        if link.busy():
            raise WouldBlock              # a burst beyond that waits on the worker threads
        sent: list[int] = []
        call = _Call(link.loop.create_future())
        timer = link.loop.call_later(timeout_s, _expire, call.answers)
        try:
            link.search(sent, call, self._suffix, ldap.SCOPE_BASE, "(objectClass=*)",
                        ["contextCSN"], timeout_s)
            link.search(sent, call, self.workstations_dn, ldap.SCOPE_SUBTREE,
                        _station_filter(wanted), list(WORKSTATION_ATTRS), timeout_s)
            marker, stations = await call.answers
            policy = self._cache.current(self._marker_of(marker))
            if policy is None:
                raise WouldBlock
            found = _one_station(wanted, stations)
            return policy, (_station(*found) if found else None)
        except _Unanswered:
            self._retire(link)
            raise DirectoryError(f"directory {self.url.redacted()} did not answer within "
                                 f"{timeout_s:g} s (look up workstation {wanted})") from None
        except (ldap.LDAPError, _EntryError):
            # An error result, a lost connection (the link is closed), an unusable entry
            raise WouldBlock from None
        finally:
            timer.cancel()
            link.forget(sent)
            if call.answers.done() and not call.answers.cancelled():
                call.answers.exception()  # a failure left unawaited is still not news

    def _loop_connection(self) -> "_LoopConnection":
        """The running loop's connection; WouldBlock while it is being made."""
        loop = asyncio.get_running_loop()
        link = self._link
        if link is not None and link.loop is loop and not link.closed:
            return link
        if link is not None:              # failed, or made for another loop
            self._link = None
            if link.loop is not loop:
                link.close_threadsafe()
        if self._connecting_for is not loop and time.monotonic() >= self._reconnect_at:
            self._connecting_for = loop
            threading.Thread(target=self._connect_for, args=(loop,), daemon=True,
                             name="ldap-loop-connect").start()
        raise WouldBlock

    def _connect_for(self, loop: asyncio.AbstractEventLoop) -> None:
        """On its own thread: the connect and bind block, so they never run on the loop."""
        try:
            conn: LDAPObject | None = self._open_connection()
        except DirectoryError as exc:  # the blocking path reports the outage to the caller
            log.debug("directory %s: no event loop connection: %s", self.url.redacted(), exc)
            conn = None
        try:
            loop.call_soon_threadsafe(self._connected, loop, conn)
        except RuntimeError:              # that loop is closed
            if conn is not None:
                _unbind(conn)

    def _connected(self, loop: asyncio.AbstractEventLoop, conn: LDAPObject | None) -> None:
        if self._connecting_for is loop:
            self._connecting_for = None
        if conn is None:
            self._reconnect_at = time.monotonic() + RECONNECT_S
        elif self._closed or self._link is not None:
            _unbind(conn)
        else:
            self._link = _LoopConnection(conn, loop, MAX_IN_FLIGHT_ANONYMOUS
                                         if self.credentials is None else MAX_IN_FLIGHT)

    def _retire(self, link: "_LoopConnection") -> None:
        """A search went unanswered: no new ones on this connection (an answer to the old
        may still come); it closes when the last search on it is answered or given up."""
        if self._link is link:
            self._link = None
        link.retired = True

    def workstations(self) -> list[Workstation]:
        def run(conn: LDAPObject) -> list[Workstation]:
            entries = self._children(conn, self.workstations_dn, ldap.SCOPE_SUBTREE,
                                     f"(objectClass={OC_WORKSTATION})",
                                     list(WORKSTATION_ATTRS))
            stations: dict[str, tuple[str, Workstation]] = {}
            for dn, attrs in entries:
                station = _station(dn, attrs)
                if station.mac in stations:
                    raise _EntryError(f"workstation {station.mac} is registered more than "
                                      f"once: {stations[station.mac][0]}; {dn}")
                stations[station.mac] = (dn, station)
            return [stations[mac][1] for mac in sorted(stations)]
        return self._run("list the workstations", run)

    def put_workstation(self, station: Workstation) -> None:
        mac = normalize_mac(station.mac)
        if mac is None:
            raise ValueError(f"'{station.mac}' is not a MAC address")
        attrs: Attrs = {"prebootMAC": [mac.encode()],
                        "cn": [station.name.encode()] if station.name else [],
                        "prebootImageOnNextBoot": [_bool(station.image_on_next_boot)],
                        "prebootImage": [station.image.encode()] if station.image else [],
                        "prebootMenuDisplay": [station.menu.value.encode()] if station.menu
                        else []}
        rdn = f"prebootMAC={mac}"

        def run(conn: LDAPObject) -> None:
            self._ensure_containers(conn)
            found = self._find_station(conn, mac)
            if found is None:
                _add(conn, f"{rdn},{self.workstations_dn}", [b"top", OC_WORKSTATION.encode()],
                     attrs)
                return
            dn, old = found
            if _dn_key(dn)[0] != _dn_key(rdn)[0]:
                # Registered by hand under another RDN (cn=..., or a MAC with colons): give it
                # ours so the values we write never clash with its RDN.
                if _dn_key(dn)[0][0][0] != "prebootmac":
                    # prebootMAC is single-valued: spell it our way before it joins the RDN.
                    conn.modify_s(dn, [(ldap.MOD_REPLACE, "prebootMAC", [mac.encode()])])
                conn.rename_s(dn, rdn, delold=1)
                dn = ",".join([rdn, ldap.dn.dn2str(ldap.dn.str2dn(dn)[1:])])
                old = self._search(conn, dn, ldap.SCOPE_BASE, "(objectClass=*)",
                                   list(WORKSTATION_ATTRS))[0][1]
            _modify(conn, dn, old, attrs, WORKSTATION_ATTRS)
        self._run(f"write workstation {mac}", run)

    def delete_workstation(self, mac: str) -> bool:
        wanted = normalize_mac(mac)
        if wanted is None:
            return False

        def run(conn: LDAPObject) -> bool:
            found = self._find_station(conn, wanted)
            if found is None:
                return False
            try:
                conn.delete_s(found[0])
            except ldap.NO_SUCH_OBJECT:
                return False     # removed meanwhile (or by our first, retried attempt)
            return True
        return self._run(f"delete workstation {wanted}", run)

    # -- multicast sessions ---------------------------------------------------------------------

    def sessions(self) -> list[MulticastSession]:
        def run(conn: LDAPObject) -> list[MulticastSession]:
            entries = self._children(conn, self.sessions_dn, ldap.SCOPE_ONELEVEL,
                                     f"(objectClass={OC_SESSION})", list(SESSION_ATTRS))
            items = [_session(dn, attrs) for dn, attrs in entries]
            items.sort(key=lambda item: (item[0], item[1].name.casefold(), item[1].name))
            return [session for _, session in items]
        return self._run("list the multicast sessions", run)

    def replace_sessions(self, sessions: list[MulticastSession]) -> None:
        wanted = [(session.name, _session_attrs(session, position * ORDER_STEP))
                  for position, session in enumerate(sessions, 1)]

        def run(conn: LDAPObject) -> None:
            _check_names(wanted, "multicast session")
            self._ensure_containers(conn)
            self._sync_children(conn, self.sessions_dn, OC_SESSION, SESSION_ATTRS, wanted,
                                "multicast session")
        self._run("write the multicast sessions", run)

    # -- the assignment log ---------------------------------------------------------------------

    def _claim_dn(self, pool: str, kind: str, mac: str) -> str:
        return f"cn={ldap.dn.escape_dn_chars(f'{pool}|{kind}|mac|{mac}')},{self.assignments_dn}"

    def _value_dn(self, pool: str, kind: str, value: str) -> str:
        return f"cn={ldap.dn.escape_dn_chars(f'{pool}|{kind}|{value}')},{self.assignments_dn}"

    def _pool_filter(self, pool: str, kind: str = "", mac: str = "", value: str = "") -> str:
        parts = [f"(objectClass={OC_ASSIGNMENT})",
                 f"(prebootPool={ldap.filter.escape_filter_chars(pool)})"]
        for attr, text in (("prebootAssignmentKind", kind), ("prebootMAC", mac),
                           ("prebootAssignedValue", value)):
            if text:
                parts.append(f"({attr}={ldap.filter.escape_filter_chars(text)})")
        return f"(&{''.join(parts)})"

    def assign(self, pool: str, kind: str, mac: str, candidates: Iterable[str],
               now_s: float) -> Assignment | None:
        """The server decides: the MAC's claim entry, then the value's entry, each added only
        if it does not exist (see the module's docstring)."""
        todo = iter(candidates)

        def run(conn: LDAPObject) -> Assignment | None:
            self._ensure_containers(conn)
            claim = self._claim_dn(pool, kind, mac)
            held = self._take_claim(conn, claim, pool, kind, mac, now_s)
            if held is not None:
                return held
            try:
                got = self._first_free(conn, pool, kind, mac, todo, now_s)
                if got is None:
                    conn.delete_s(claim)
                    return None
                conn.modify_s(claim, [(ldap.MOD_REPLACE, "prebootAssignedValue",
                                       [got.value.encode()])])
                return got
            except BaseException:
                try:
                    conn.delete_s(claim)      # let the next request of this MAC start afresh
                except ldap.LDAPError:
                    pass
                raise
        return self._run(f"assign from pool '{pool}'", run)

    def _take_claim(self, conn: LDAPObject, claim: str, pool: str, kind: str, mac: str,
                    now_s: float) -> Assignment | None:
        """Add this MAC's claim (then None: the caller hands out a value), or return the value
        the MAC already holds. A claim without a value is another request of this MAC at work:
        wait for it, up to timeout_s; one older than STALE_CLAIM_S is removed."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                _add(conn, claim, [b"top", OC_CLAIM.encode()], {
                    "cn": [claim.split(",", 1)[0][3:].encode()], "prebootPool": [pool.encode()],
                    "prebootAssignmentKind": [kind.encode()], "prebootMAC": [mac.encode()],
                    "prebootAssignedAt": [repr(now_s).encode()]})
                return None
            except ldap.ALREADY_EXISTS:
                pass
            try:
                found = self._search(conn, claim, ldap.SCOPE_BASE, "(objectClass=*)",
                                     list(ASSIGNMENT_ATTRS))
            except ldap.NO_SUCH_OBJECT:
                continue                       # released meanwhile: try again
            attrs = _lower(found[0][1]) if found else {}
            value = _text(attrs, "prebootAssignedValue")
            at = _assigned_at(attrs)
            if value:
                return Assignment(pool, kind, value, mac, at)
            if now_s - at > STALE_CLAIM_S:
                try:
                    conn.delete_s(claim)
                except ldap.NO_SUCH_OBJECT:
                    pass
                continue
            if time.monotonic() >= deadline:
                raise _EntryError(f"another request of {mac} is taking a value of pool "
                                  f"'{pool}'; try again")
            time.sleep(0.05)

    def _first_free(self, conn: LDAPObject, pool: str, kind: str, mac: str,
                    candidates: Iterable[str], now_s: float) -> Assignment | None:
        # A value entry of this MAC without a claim: a request died between the two; keep it.
        mine = self._search(conn, self.assignments_dn, ldap.SCOPE_ONELEVEL,
                            self._pool_filter(pool, kind, mac), list(ASSIGNMENT_ATTRS))
        if mine:
            return _assignment(mine[0][0], mine[0][1])
        taken = {_text(_lower(attrs), "prebootAssignedValue") for _, attrs in self._search(
            conn, self.assignments_dn, ldap.SCOPE_ONELEVEL, self._pool_filter(pool, kind),
            ["prebootAssignedValue"])}
        for value in candidates:
            if value in taken:
                continue
            dn = self._value_dn(pool, kind, value)
            try:
                _add(conn, dn, [b"top", OC_ASSIGNMENT.encode()], {
                    "cn": [f"{pool}|{kind}|{value}".encode()], "prebootPool": [pool.encode()],
                    "prebootAssignmentKind": [kind.encode()],
                    "prebootAssignedValue": [value.encode()], "prebootMAC": [mac.encode()],
                    "prebootAssignedAt": [repr(now_s).encode()]})
            except ldap.ALREADY_EXISTS:
                continue                       # another MAC was quicker: the server said so
            return Assignment(pool, kind, value, mac, now_s)
        return None

    def assignments(self, pool: str | None = None) -> list[Assignment]:
        filterstr = self._pool_filter(pool) if pool else f"(objectClass={OC_ASSIGNMENT})"

        def run(conn: LDAPObject) -> list[Assignment]:
            entries = self._children(conn, self.assignments_dn, ldap.SCOPE_ONELEVEL,
                                     filterstr, list(ASSIGNMENT_ATTRS))
            return sorted((_assignment(dn, attrs) for dn, attrs in entries),
                          key=assignment_order)
        return self._run("read the assignment log", run)

    def assignment_of(self, pool: str, kind: str, mac: str) -> Assignment | None:
        def run(conn: LDAPObject) -> Assignment | None:
            entries = self._children(conn, self.assignments_dn, ldap.SCOPE_ONELEVEL,
                                     self._pool_filter(pool, kind, mac),
                                     list(ASSIGNMENT_ATTRS))
            return _assignment(*entries[0]) if entries else None
        return self._run("read the assignment log", run)

    def release(self, pool: str, mac: str = "", value: str = "") -> list[Assignment]:
        def run(conn: LDAPObject) -> list[Assignment]:
            found: list[Assignment] = []
            for who in ((mac, ""), ("", value)):
                if not any(who):
                    continue
                for dn, attrs in self._children(conn, self.assignments_dn, ldap.SCOPE_ONELEVEL,
                                                self._pool_filter(pool, "", *who),
                                                list(ASSIGNMENT_ATTRS)):
                    item = _assignment(dn, attrs)
                    for gone in (dn, self._claim_dn(pool, item.kind, item.mac)):
                        try:
                            conn.delete_s(gone)
                        except ldap.NO_SUCH_OBJECT:
                            pass
                    found.append(item)
            return found
        return self._run(f"release from pool '{pool}'", run)

    # -- writes ---------------------------------------------------------------------------------

    def _ensure_containers(self, conn: LDAPObject) -> None:
        """Create ou=rules, ou=workstations and ou=sessions under the base if missing."""
        if self._containers_ok:
            return
        self._require_base(conn)
        for dn in (self.rules_dn, self.workstations_dn, self.sessions_dn, self.identities_dn,
                   self.assignments_dn):
            try:
                self._search(conn, dn, ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
                continue
            except ldap.NO_SUCH_OBJECT:
                pass
            ou = ldap.dn.str2dn(dn)[0][0][1]
            try:
                conn.add_s(dn, [("objectClass", [b"top", b"organizationalUnit"]),
                                ("ou", [ou.encode()])])
                log.info("directory %s: created %s", self.url.redacted(), dn)
            except ldap.ALREADY_EXISTS:
                pass            # another writer was quicker
        self._containers_ok = True

    def _sync_children(self, conn: LDAPObject, container: str, objectclass: str,
                       managed: tuple[str, ...], wanted: list[tuple[str, Attrs]],
                       kind: str) -> None:
        """Make the container hold exactly the wanted entries (by cn): delete the others,
        modify what differs, add what is new."""
        keys = _check_names(wanted, kind)
        existing: dict[str, Entry] = {}
        for dn, attrs in self._search(conn, container, ldap.SCOPE_ONELEVEL,
                                      f"(objectClass={objectclass})", list(managed)):
            existing[_name_key(_entry_name(dn, attrs))] = (dn, attrs)
        for key, (dn, _) in existing.items():
            if key not in keys:
                conn.delete_s(dn)
        for name, attrs in wanted:
            rdn = f"cn={ldap.dn.escape_dn_chars(name)}"
            dn = f"{rdn},{container}"
            old = existing.get(_name_key(name))
            if old is None:
                _add(conn, dn, [b"top", objectclass.encode()], attrs)
                continue
            # Same name to the server (ignoring case): keep the DN, and let the cn value
            # carry the new spelling (_entry_name reads it from there).
            _modify(conn, old[0], old[1], attrs, managed)


class _Unanswered(Exception):
    """lookup_async's time ran out."""


def _expire(answers: asyncio.Future) -> None:
    if not answers.done():
        answers.set_exception(_Unanswered())


class _Call:
    """The searches one lookup_async call sent: their entries, in the order sent, go to one
    future when the last is answered (or the first error)."""

    __slots__ = ("answers", "entries", "unanswered")

    def __init__(self, answers: asyncio.Future):
        self.answers = answers
        self.entries: list[list[Entry]] = []
        self.unanswered = 0


class _LoopConnection:
    """One connection driven by an event loop. Searches are sent at once, any number of
    queries' interleaved on the wire, and every answer that has arrived is read (one message
    at a time, so nothing is left in libldap's buffers unseen) each time the socket is
    readable, and handed to the call that sent the search. The loop's thread alone uses it;
    close_threadsafe() is the one way in from elsewhere."""

    def __init__(self, conn: LDAPObject, loop: asyncio.AbstractEventLoop, max_in_flight: int):
        self.conn = conn
        self.loop = loop
        self.max_in_flight = max_in_flight
        self.fd = conn.fileno()
        self.closed = False
        self.retired = False
        self._waiting: dict[int, tuple[_Call, int]] = {}   # msgid -> its call, its index
        self._poke: asyncio.TimerHandle | None = None
        loop.add_reader(self.fd, self._readable)

    def busy(self) -> bool:
        """So many searches unanswered that sending more could fill the socket's buffer and
        block the loop (a server that stopped reading)."""
        return len(self._waiting) >= self.max_in_flight

    def search(self, sent: list[int], call: _Call, base: str, scope: int, filterstr: str,
               attrs: list[str], timeout_s: float) -> None:
        """Send a search for call, its msgid appended to sent. A send that fails closes the
        connection and raises."""
        try:
            msgid = self.conn.search_ext(base, scope, filterstr, attrs, timeout=timeout_s)
        except ldap.LDAPError as exc:
            self.close(exc)
            raise
        sent.append(msgid)
        self._waiting[msgid] = (call, len(call.entries))
        call.entries.append([])
        call.unanswered += 1
        if self._poke is None:
            self._poke = self.loop.call_later(POKE_S, self._poked)

    def _poked(self) -> None:
        self._poke = None
        self._readable()
        if self._waiting and not self.closed:
            self._poke = self.loop.call_later(POKE_S, self._poked)

    def forget(self, msgids: list[int]) -> None:
        """Give up these searches (abandoned if still unanswered)."""
        for msgid in msgids:
            if self._waiting.pop(msgid, None) is not None and not self.closed:
                try:
                    self.conn.abandon_ext(msgid)
                except ldap.LDAPError:
                    pass
        if self.retired and not self._waiting:
            self.close()

    def _readable(self) -> None:
        while not self.closed:
            try:
                kind, data, msgid, _ = self.conn.result3(ldap.RES_ANY, all=0, timeout=0)
            except ldap.LDAPError as exc:
                info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                if "msgid" not in info:   # not one search's result: the connection failed
                    self.close(exc)
                    return
                failed = self._waiting.pop(info["msgid"], None)
                if failed is not None and not failed[0].answers.done():
                    failed[0].answers.set_exception(exc)
                continue
            if kind is None:
                return                    # nothing more has arrived
            search = self._waiting.get(msgid)
            if search is None:
                continue                  # a search given up meanwhile
            call, index = search
            if kind == ldap.RES_SEARCH_ENTRY:
                call.entries[index].extend((dn, attrs) for dn, attrs in data if dn is not None)
            elif kind == ldap.RES_SEARCH_RESULT:
                del self._waiting[msgid]
                call.unanswered -= 1
                if not call.unanswered and not call.answers.done():
                    call.answers.set_result(call.entries)
            # search references and anything else: ignored, as the blocking reads drop them

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._poke is not None:
            self._poke.cancel()
        try:
            self.loop.remove_reader(self.fd)
        except (RuntimeError, ValueError, OSError):   # the loop is closed already
            pass
        waiting, self._waiting = self._waiting, {}
        for call, _ in waiting.values():
            if not call.answers.done() and not self.loop.is_closed():
                call.answers.set_exception(
                    exc or ldap.SERVER_DOWN({"desc": "connection closed"}))
        _unbind(self.conn)

    def close_threadsafe(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.close)
        except RuntimeError:              # the loop is closed: nothing runs on it any more
            self.close()


# -- entries <-> model ------------------------------------------------------------------------

def _station_filter(mac: str) -> str:
    """A workstation by its normalised MAC, in each spelling people register it with."""
    pairs = [mac[i:i + 2] for i in range(0, 12, 2)]
    spellings = {mac, ":".join(pairs), "-".join(pairs)}
    either = "".join(f"(prebootMAC={ldap.filter.escape_filter_chars(s)})"
                     for s in sorted(spellings))
    return f"(&(objectClass={OC_WORKSTATION})(|{either}))"


def _one_station(mac: str, found: list[Entry]) -> Entry | None:
    if len(found) > 1:
        raise _EntryError(f"workstation {mac} is registered more than once: "
                          + "; ".join(dn for dn, _ in found))
    return found[0] if found else None


def _check_names(wanted: list[tuple[str, Attrs]], kind: str) -> dict[str, str]:
    """Names must differ the way the server compares them (they are the entries' RDNs)."""
    keys: dict[str, str] = {}
    for name, _ in wanted:
        if not name.strip():
            raise _EntryError(f"a {kind} needs a name")
        key = _name_key(name)
        if key in keys:
            raise _EntryError(f"{kind} names must differ (ignoring case and repeated "
                              f"spaces): '{keys[key]}' and '{name}'")
        keys[key] = name
    return keys


def _rule_attrs(rule: Rule, order: int) -> Attrs:
    canonical = rule.filter.canonical()
    action = rule.action
    return {
        "cn": [rule.name.encode()],
        "prebootRuleOrder": [str(order).encode()],
        "prebootEnabled": [_bool(rule.enabled)],
        "prebootFilter": [(canonical if canonical.strip() else MATCH_ALL).encode()],
        "prebootAction": [action.kind.value.encode()],
        "prebootImage": [action.image.encode()] if action.image else [],
        "prebootAddonImage": [f"{{{i}}}{addon}".encode() for i, addon in enumerate(action.addons)],
        "prebootSession": [action.session.encode()] if action.session else [],
        "prebootForce": [_bool(rule.force)],
        # only when set: a server whose schema predates prebootShrink still takes the rest
        "prebootShrink": [_bool(True)] if action.shrink else [],
        # likewise only when not 1 (the whole image), for a schema without prebootFileset
        "prebootFileset": [str(action.fileset).encode()] if action.fileset != 1 else [],
        "prebootIdentity": [rule.identity.encode()] if rule.identity else [],
    }


def _rule(dn: str, raw: Attrs, known: dict[str, Filter] | None = None,
          parsed: dict[str, Filter] | None = None) -> tuple[int, Rule]:
    """One rule from its entry; known/parsed: filters by text, reused / collected."""
    attrs = _lower(raw)
    try:
        name = _entry_name(dn, attrs)
        order = _int(attrs, "prebootRuleOrder")
        text = _text(attrs, "prebootFilter")
        if text is None:
            raise _EntryError("no prebootFilter (use * for every machine)")
        text = "" if text.strip() == MATCH_ALL else text
        flt = known.get(text) if known else None
        if flt is None:
            flt = parse_filter(text)
        if parsed is not None:
            parsed[text] = flt
        kind_text = (_text(attrs, "prebootAction") or "").strip().lower()
        try:
            kind = ActionKind(kind_text)
        except ValueError:
            raise _EntryError(f"unknown prebootAction '{kind_text}' (restore, make, multicast, "
                              "maintenance or none)") from None
        action = Action(kind, _text(attrs, "prebootImage") or "",
                        _addons(attrs.get("prebootaddonimage", [])),
                        _text(attrs, "prebootSession") or "",
                        _flag(attrs, "prebootShrink", False),
                        _int(attrs, "prebootFileset", 1))
        rule = Rule(name, flt, action, _flag(attrs, "prebootEnabled", True),
                    _flag(attrs, "prebootForce", False), _text(attrs, "prebootIdentity") or "")
    except ValueError as exc:     # _EntryError, FilterSyntaxError, Action's own checks
        raise _EntryError(f"rule {dn}: {exc}") from None
    return order, rule


def _identity_attrs(item: IdentityPolicy, order: int) -> Attrs:
    pool = item.pool
    return {
        "cn": [item.name.encode()],
        "prebootIdentityOrder": [str(order).encode()],
        "prebootNaming": [item.naming.value.encode()],
        "prebootNamePrefix": [item.prefix.encode()] if item.prefix else [],
        "prebootCounterDigits": [str(item.counter_digits).encode()],
        "prebootDnsSuffix": [item.dns_suffix.encode()] if item.dns_suffix else [],
        "prebootWorkgroup": [item.workgroup.encode()] if item.workgroup else [],
        "prebootIpRange": [f"{{{i}}}{r}".encode() for i, r in enumerate(pool.ranges)]
        if pool else [],
        "prebootIpPrefixLength": [str(pool.prefix_len).encode()] if pool else [],
        "prebootIpGateway": [pool.gateway.encode()] if pool and pool.gateway else [],
        "prebootDnsServer": [f"{{{i}}}{d}".encode() for i, d in enumerate(pool.dns_servers)]
        if pool else [],
        "prebootDefault": [_bool(True)] if item.default else [],
    }


def _ordered_identities(entries: list[Entry]) -> tuple[IdentityPolicy, ...]:
    items = []
    for dn, raw in entries:
        attrs = _lower(raw)
        try:
            ranges = _indexed(attrs.get("prebootiprange", []), "prebootIpRange")
            pool = None
            if ranges:
                pool = AddressPool(ranges, _int(attrs, "prebootIpPrefixLength"),
                                   _text(attrs, "prebootIpGateway") or "",
                                   _indexed(attrs.get("prebootdnsserver", []),
                                            "prebootDnsServer"))
            naming = (_text(attrs, "prebootNaming") or "").strip().lower()
            item = IdentityPolicy(_entry_name(dn, raw), NameSource(naming),
                                  _text(attrs, "prebootNamePrefix") or "",
                                  _int(attrs, "prebootCounterDigits", 3),
                                  _text(attrs, "prebootDnsSuffix") or "",
                                  _text(attrs, "prebootWorkgroup") or "", pool,
                                  _flag(attrs, "prebootDefault", False))
            items.append((_int(attrs, "prebootIdentityOrder"), item))
        except ValueError as exc:
            raise _EntryError(f"identity policy {dn}: {exc}") from None
    items.sort(key=lambda pair: (pair[0], pair[1].name.casefold()))
    return tuple(item for _, item in items)


def _indexed(values: list[bytes], name: str) -> tuple[str, ...]:
    """Values written {N}text, in N order (LDAP keeps no order of values)."""
    indexed: dict[int, str] = {}
    for value in values:
        match = _ADDON.fullmatch(value.decode("utf-8", "replace"))
        if match is None:
            raise _EntryError(f"{name} '{value.decode('utf-8', 'replace')}' has no {{N}} "
                              "order prefix")
        indexed[int(match.group(1))] = match.group(2)
    return tuple(indexed[index] for index in sorted(indexed))


def _assigned_at(attrs: Attrs) -> float:
    try:
        return float(_text(attrs, "prebootAssignedAt") or "0")
    except ValueError:
        return 0.0


def _assignment(dn: str, raw: Attrs) -> Assignment:
    attrs = _lower(raw)
    try:
        return Assignment(_text(attrs, "prebootPool") or "",
                          _text(attrs, "prebootAssignmentKind") or "",
                          _text(attrs, "prebootAssignedValue") or "",
                          _text(attrs, "prebootMAC") or "", _assigned_at(attrs))
    except ValueError as exc:
        raise _EntryError(f"assignment {dn}: {exc}") from None


def _menu(entry: Entry) -> MenuSettings:
    dn, raw = entry
    attrs = _lower(raw)
    try:
        display = _display(attrs) if _text(attrs, "prebootMenuDisplay") else MenuDisplay.HOTKEY
        timeout = _int(attrs, "prebootMenuTimeout", MenuSettings().timeout_s)
        return MenuSettings(display, timeout)
    except ValueError as exc:
        raise _EntryError(f"policy {dn}: {exc}") from None


def _station(dn: str, raw: Attrs) -> Workstation:
    attrs = _lower(raw)
    try:
        text = _text(attrs, "prebootMAC") or ""
        mac = normalize_mac(text)
        if mac is None:
            raise _EntryError(f"prebootMAC '{text}' is not a MAC address (12 hex digits)")
        rdn = ldap.dn.str2dn(dn)[0]
        names = [value for attr, value, _ in rdn if attr.lower() == "cn"]
        if not names:
            names = [v.decode("utf-8") for v in attrs.get("cn", [])]
        return Workstation(mac, names[0] if names else "",
                           _flag(attrs, "prebootImageOnNextBoot", False),
                           _text(attrs, "prebootImage") or "",
                           _display(attrs) if _text(attrs, "prebootMenuDisplay") else None)
    except (ValueError, ldap.DECODING_ERROR) as exc:
        raise _EntryError(f"workstation {dn}: {exc}") from None


def _session_attrs(session: MulticastSession, order: int) -> Attrs:
    return {
        "cn": [session.name.encode()],
        "prebootSessionOrder": [str(order).encode()],
        "prebootImage": [session.image.encode()] if session.image else [],
        "prebootSessionClients": [str(session.clients).encode()],
        "prebootSessionTimeout": [str(session.timeout_min).encode()],
        "prebootEnabled": [_bool(session.enabled)],
        "prebootDeleteAfter": [_bool(session.delete_after)],
        # only when set: a server whose schema predates them still takes the other sessions
        "prebootSessionParticipant": [p.encode() for p in session.participants],
        "prebootSessionGroup": [session.group.encode()] if session.group else [],
        "prebootSessionDataPort": [str(session.data_port).encode()] if session.data_port
        else [],
    }


def _session(dn: str, raw: Attrs) -> tuple[int, MulticastSession]:
    attrs = _lower(raw)
    defaults = MulticastSession("", "")
    try:
        try:
            participants = tuple(v.decode("utf-8")
                                 for v in attrs.get("prebootsessionparticipant", []))
        except UnicodeDecodeError:
            raise _EntryError("prebootSessionParticipant is not UTF-8 text") from None
        return _int(attrs, "prebootSessionOrder"), MulticastSession(
            _entry_name(dn, raw), _text(attrs, "prebootImage") or "",
            _int(attrs, "prebootSessionClients", defaults.clients),
            _int(attrs, "prebootSessionTimeout", defaults.timeout_min),
            _flag(attrs, "prebootEnabled", defaults.enabled),
            _flag(attrs, "prebootDeleteAfter", defaults.delete_after),
            participants,
            (_text(attrs, "prebootSessionGroup") or "").strip(),
            _int(attrs, "prebootSessionDataPort", 0))
    except ValueError as exc:
        raise _EntryError(f"multicast session {dn}: {exc}") from None


# -- values -----------------------------------------------------------------------------------

def _lower(raw: Attrs) -> Attrs:
    """The entry's attributes by lower-case name (attribute names are case-insensitive)."""
    return {name.lower(): values for name, values in raw.items()}


def _text(attrs: Attrs, name: str) -> str | None:
    """attrs: from _lower(). The single value of an attribute as text, None when absent."""
    values = attrs.get(name.lower()) or []
    if not values:
        return None
    if len(values) > 1:
        raise _EntryError(f"{name} has {len(values)} values, expected one")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _EntryError(f"{name} is not UTF-8 text") from None


def _int(attrs: Attrs, name: str, default: int | None = None) -> int:
    text = _text(attrs, name)
    if text is None:
        if default is None:
            raise _EntryError(f"no {name}")
        return default
    try:
        return int(text.strip())
    except ValueError:
        raise _EntryError(f"{name} '{text}' is not a whole number") from None


def _flag(attrs: Attrs, name: str, default: bool) -> bool:
    text = _text(attrs, name)
    if text is None:
        return default
    value = text.strip().upper()
    if value not in ("TRUE", "FALSE"):
        raise _EntryError(f"{name} '{text}' is not TRUE or FALSE")
    return value == "TRUE"


def _display(attrs: Attrs) -> MenuDisplay:
    text = (_text(attrs, "prebootMenuDisplay") or "").strip().lower()
    try:
        return MenuDisplay(text)
    except ValueError:
        raise _EntryError(f"unknown prebootMenuDisplay '{text}' (always, never or hotkey)") \
            from None


def _bool(value: bool) -> bytes:
    return b"TRUE" if value else b"FALSE"


def _addons(values: list[bytes]) -> tuple[str, ...]:
    """prebootAddonImage values '{0}a.zmg', '{1}b.zmg' in index order. LDAP does not keep the
    order of values, hence the index; a single value may go without one."""
    try:
        texts = [value.decode("utf-8") for value in values]
    except UnicodeDecodeError:
        raise _EntryError("prebootAddonImage is not UTF-8 text") from None
    if len(texts) == 1 and not _ADDON.fullmatch(texts[0]):
        return (texts[0],)
    indexed: dict[int, str] = {}
    for text in texts:
        match = _ADDON.fullmatch(text)
        if match is None:
            raise _EntryError(f"prebootAddonImage '{text}' has no {{N}} order prefix")
        index = int(match.group(1))
        if index in indexed:
            raise _EntryError(f"two prebootAddonImage values have order {{{index}}}")
        indexed[index] = match.group(2)
    return tuple(indexed[index] for index in sorted(indexed))


def _entry_name(dn: str, raw: Attrs) -> str:
    """The name of a rule or session: its RDN's cn (the cn attribute may hold aliases)."""
    try:
        rdn = ldap.dn.str2dn(dn)[0]
    except ldap.DECODING_ERROR:
        raise _EntryError(f"cannot parse the DN {dn}") from None
    try:
        values = [value.decode("utf-8") for value in _lower(raw).get("cn") or []]
    except UnicodeDecodeError:
        raise _EntryError("cn is not UTF-8 text") from None
    for attr, value, _ in rdn:
        if attr.lower() == "cn":
            # The cn value the server matches to the RDN keeps the spelling last written.
            if value in values:
                return value
            same = [other for other in values if _name_key(other) == _name_key(value)]
            return same[0] if same else value
    if not values:
        raise _EntryError(f"{dn} has no cn")
    return values[0]


def _name_key(name: str) -> str:
    """How the server compares cn values (caseIgnoreMatch), near enough to pair entries."""
    return " ".join(name.split()).casefold()


def _dn_key(dn: str) -> list[list[tuple[str, str]]]:
    return [[(attr.lower(), " ".join(value.split()).casefold()) for attr, value, _ in rdn]
            for rdn in ldap.dn.str2dn(dn)]


def _add(conn: LDAPObject, dn: str, objectclasses: list[bytes], attrs: Attrs) -> None:
    modlist = [("objectClass", objectclasses)]
    modlist += [(name, values) for name, values in attrs.items() if values]
    conn.add_s(dn, modlist)


def _modify(conn: LDAPObject, dn: str, old_raw: Attrs, new: Attrs,
            managed: Iterable[str]) -> None:
    """Replace each managed attribute whose values differ; leave the rest alone."""
    old = _lower(old_raw)
    changes = []
    for name in managed:
        before = old.get(name.lower()) or []
        after = new.get(name) or []
        if name.lower() in UNORDERED:
            same = sorted(before) == sorted(after)
        else:
            same = before == after
        if same:
            continue
        changes.append((ldap.MOD_REPLACE, name, after or None))
    if changes:
        conn.modify_s(dn, changes)


def _reason(exc: ldap.LDAPError) -> str:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    desc = str(info.get("desc") or type(exc).__name__)
    extra = str(info.get("info") or "").strip()
    return f"{desc} ({extra})" if extra and extra != desc else desc


def _unbind(conn: LDAPObject) -> None:
    try:
        conn.unbind_s()
    except ldap.LDAPError:
        pass
