"""A real, private OpenLDAP slapd for tests: `Slapd().start()` ... `.stop()`.

Importable without pytest. Everything lives in a temporary folder: a cn=config built with
`slapadd -n0` (core, cosine, inetorgperson and our packaging/ldap/preboot.ldif), one mdb database
for the suffix (default dc=preboot,dc=test) with the syncprov overlay, so the suffix entry carries
contextCSN as on a replicated server, and an equality index on prebootMAC. slapd listens on a free
loopback port and on a private ldapi socket in its folder (never /etc/ldap/slapd.d, never the
system slapd) and is stopped by the PID we started.

    with Slapd() as server:
        server.url                      # ldap://127.0.0.1:PORT/dc=preboot,dc=test
        server.ldapmodify("dn: ...")    # the real ldap-utils binary, bound as the root DN
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = Path("/etc/ldap/schema")
PREBOOT_SCHEMA = REPO / "packaging" / "ldap" / "preboot.ldif"
MODULE_PATH = Path("/usr/lib/ldap")
SLAPD = shutil.which("slapd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or ""
SLAPADD = shutil.which("slapadd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or ""
LDAPMODIFY = shutil.which("ldapmodify") or ""


def missing() -> str | None:
    """Why a Slapd cannot start here (a skip reason), or None when it can."""
    if not SLAPD or not SLAPADD:
        return "OpenLDAP slapd is not installed (apt-get install slapd)"
    if not LDAPMODIFY:
        return "ldap-utils is not installed (apt-get install ldap-utils)"
    for name in ("core.ldif", "cosine.ldif", "inetorgperson.ldif"):
        if not (SCHEMA_DIR / name).is_file():
            return f"{SCHEMA_DIR / name} is missing"
    if not (MODULE_PATH / "back_mdb.so").exists() and not (MODULE_PATH / "back_mdb.la").exists():
        return f"no back_mdb module in {MODULE_PATH}"
    try:
        import ldap  # noqa: F401
    except ImportError:
        return "python-ldap is not installed"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tls_files(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `host` (an IP SAN), made with openssl:
    (ca.pem, server.pem, server.key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in (
        "ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text(f"subjectAltName = IP:{host}\nbasicConstraints = CA:FALSE\n")
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=preboot test CA", "-keyout", ca_key, "-out", ca],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
         "-keyout", key, "-out", csr],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert],
    ]
    for step in steps:
        result = subprocess.run([str(part) for part in step], capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise SlapdError(f"openssl failed: {result.stderr.strip()}")
    return ca, cert, key


def _config_ldif(folder: Path, suffix: str, root_dn: str, root_password: str,
                 syncprov: bool = True, schema: bool = True, tls: bool = False) -> str:
    preboot = f"include: file://{PREBOOT_SCHEMA}\n" if schema else ""
    tls_lines = (f"olcTLSCACertificateFile: {folder}/ca.pem\n"
                 f"olcTLSCertificateFile: {folder}/server.pem\n"
                 f"olcTLSCertificateKeyFile: {folder}/server.key\n") if tls else ""
    mac_index = "olcDbIndex: prebootMAC eq\n" if schema else ""
    overlay = """
dn: olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {0}syncprov
olcSpCheckpoint: 100 10
""" if syncprov else ""
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {folder}/slapd.pid
olcArgsFile: {folder}/slapd.args
olcLogLevel: none
{tls_lines}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: back_mdb
olcModuleLoad: syncprov

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{SCHEMA_DIR}/core.ldif

include: file://{SCHEMA_DIR}/cosine.ldif

include: file://{SCHEMA_DIR}/inetorgperson.ldif

{preboot}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcSizeLimit: 500

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact=gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth manage by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {suffix}
olcRootDN: {root_dn}
olcRootPW: {root_password}
olcDbDirectory: {folder}/db
olcDbMaxSize: 1073741824
olcDbNoSync: TRUE
olcDbIndex: objectClass eq
olcDbIndex: entryCSN,entryUUID eq
{mac_index}olcLimits: {{0}}dn.exact="cn=reader,{suffix}" size=unlimited time=unlimited
olcAccess: {{0}}to attrs=userPassword by self =xw by anonymous auth by * none
olcAccess: {{1}}to * by * read
{overlay}"""


class SlapdError(RuntimeError):
    pass


class Slapd:
    """One private slapd. start() returns self; stop() is idempotent and removes the folder.

    syncprov=False leaves the overlay out (no contextCSN: the backend's slow path);
    schema=False leaves our schema out, for loading it over ldapi as an administrator would
    (ldapadd_config). cn=config is writable only over the private ldapi socket, by our own uid.
    The suffix entry exists after start(), plus `cn=reader,<suffix>` (password `reader`), a
    read-only account with unlimited size limit, for tests that should not use the root DN.
    """

    def __init__(self, suffix: str = "dc=preboot,dc=test", root_password: str = "secret",
                 ready_timeout_s: float = 15.0, syncprov: bool = True, schema: bool = True,
                 netns: str | None = None, host: str = "127.0.0.1", tls: bool = False):
        # netns/host: serve ldap://HOST:PORT inside a network namespace (e2e labs); the test's
        # own tools then reach it over the private ldapi socket, which crosses namespaces.
        self.netns = netns
        self.host = host
        # tls: also serve ldaps://HOST:TLS_PORT with a certificate from a throwaway CA (ca_file)
        self.tls = tls
        self.tls_port = 0
        self.suffix = suffix
        self.syncprov = syncprov
        self.schema = schema
        self.base_dn = suffix
        self.root_dn = f"cn=admin,{suffix}"
        self.root_password = root_password
        self.reader_dn = f"cn=reader,{suffix}"
        self.reader_password = "reader"
        self.ready_timeout_s = ready_timeout_s
        self.folder: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._seeded = False

    # -- addresses --------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """ldap://HOST:PORT (no base): what clients in slapd's namespace use."""
        return f"ldap://{self.host}:{self.port}"

    @property
    def admin_uri(self) -> str:
        """What this process's tools use: the TCP URI, or the ldapi socket across namespaces."""
        return self.ldapi_uri if self.netns else self.uri

    @property
    def url(self) -> str:
        """The directory URL of the suffix: ldap://127.0.0.1:PORT/dc=preboot,dc=test."""
        return self.url_for(self.base_dn)

    @property
    def ldapi_uri(self) -> str:
        """The private Unix socket (cn=config over SASL EXTERNAL)."""
        assert self.folder is not None
        return "ldapi://" + quote(str(self.folder / "ldapi"), safe="")

    @property
    def ca_file(self) -> Path:
        assert self.folder is not None and self.tls
        return self.folder / "ca.pem"

    @property
    def ldaps_url(self) -> str:
        assert self.tls
        return f"ldaps://{self.host}:{self.tls_port}/{self.base_dn}"

    def url_for(self, base_dn: str) -> str:
        return f"ldap://{self.host}:{self.port}/{base_dn}"

    def write_credentials(self, path: str | os.PathLike, bind_dn: str | None = None,
                          password: str | None = None, mode: int = 0o600) -> Path:
        """A credentials file for open_directory (root DN unless told otherwise)."""
        target = Path(path)
        target.write_text(f"BindDN = {bind_dn or self.root_dn}\n"
                          f"Password = {self.root_password if password is None else password}\n")
        os.chmod(target, mode)
        return target

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Slapd":
        reason = missing()
        if reason:
            raise SlapdError(reason)
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="preboot-slapd-"))
            self._build_config()
        try:
            for attempt in range(3):
                self.port = free_port()
                try:
                    self._launch()
                    break
                except SlapdError:
                    # Another process may have taken the port between free_port() and bind.
                    if attempt == 2 or "Address already in use" not in self._stderr():
                        raise
            if not self._seeded:
                self._seed()
        except BaseException:
            self.stop()
            raise
        return self

    def _build_config(self) -> None:
        assert self.folder is not None
        (self.folder / "slapd.d").mkdir()
        (self.folder / "db").mkdir()
        ldif = self.folder / "config.ldif"
        if self.tls:
            make_tls_files(self.folder, self.host)
        ldif.write_text(_config_ldif(self.folder, self.suffix, self.root_dn, self.root_password,
                                  self.syncprov, self.schema, self.tls))
        result = subprocess.run([SLAPADD, "-n0", "-F", str(self.folder / "slapd.d"), "-l",
                                 str(ldif)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlapdError(f"slapadd -n0 failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")

    def _launch(self) -> None:
        assert self.folder is not None
        stderr = open(self.folder / "slapd.stderr", "wb")
        try:
            # -d 0: stay in the foreground (so the PID is ours) without debug output; stderr still
            # gets startup errors.
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            urls = f"ldap://{self.host}:{self.port}/ {self.ldapi_uri}"
            if self.tls:
                self.tls_port = self.tls_port or free_port()
                urls += f" ldaps://{self.host}:{self.tls_port}/"
            self.proc = subprocess.Popen(
                [*prefix, SLAPD, "-d", "0", "-h", urls, "-F", str(self.folder / "slapd.d")],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True)
        finally:
            stderr.close()
        self._wait_ready()

    def _stderr(self) -> str:
        if self.folder is None:
            return ""
        try:
            return (self.folder / "slapd.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        import ldap
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise SlapdError(f"slapd exited with {code}: {self._stderr()[-2000:]}")
            conn = ldap.initialize(self.admin_uri)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 1.0)
            conn.set_option(ldap.OPT_TIMEOUT, 2.0)
            try:
                conn.simple_bind_s(self.root_dn, self.root_password)
                return
            except ldap.LDAPError as exc:
                last = str(exc)
            finally:
                try:
                    conn.unbind_s()
                except ldap.LDAPError:
                    pass
            time.sleep(0.05)
        self._kill()
        raise SlapdError(f"slapd did not answer on {self.uri} within {self.ready_timeout_s} s "
                         f"(last error: {last}); stderr: {self._stderr()[-2000:]}")

    def _seed(self) -> None:
        top = self.suffix.split(",")[0].split("=", 1)
        rdn_attr, rdn_value = top[0], top[1]
        entry = f"dn: {self.suffix}\n"
        if rdn_attr.lower() == "dc":
            entry += f"objectClass: dcObject\nobjectClass: organization\ndc: {rdn_value}\n" \
                     f"o: {rdn_value}\n"
        elif rdn_attr.lower() == "o":
            entry += f"objectClass: organization\no: {rdn_value}\n"
        else:
            entry += f"objectClass: organizationalUnit\nou: {rdn_value}\n"
        entry += (f"\ndn: {self.reader_dn}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
                  f"cn: reader\nsn: reader\nuserPassword: {self.reader_password}\n")
        self.ldapadd(entry)
        self._seeded = True

    def restart(self) -> "Slapd":
        """Stop slapd and start it again on the same port with the same data."""
        port = self.port
        self._kill()
        self._launch_on(port)
        return self

    def stop_process(self) -> None:
        """Stop slapd but keep its folder, so start_again() serves the same data and port."""
        self._kill()

    def start_again(self) -> "Slapd":
        self._launch_on(self.port)
        return self

    def _launch_on(self, port: int) -> None:
        self.port = port
        deadline = time.monotonic() + 10
        while True:
            try:
                self._launch()
                return
            except SlapdError:
                # The old socket may linger briefly; slapd sets SO_REUSEADDR, but be patient.
                if time.monotonic() > deadline or "Address already in use" not in self._stderr():
                    raise
                time.sleep(0.2)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        self._kill()
        folder, self.folder = self.folder, None
        self._seeded = False
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the real ldap-utils ----------------------------------------------------------------

    def ldapmodify(self, ldif: str, add: bool = False, check: bool = True,
                   continue_on_error: bool = False) -> subprocess.CompletedProcess:
        """Run /usr/bin/ldapmodify (with -a when add) bound as the root DN, LDIF on stdin.
        Raises SlapdError with ldapmodify's message when check and it fails."""
        args = [LDAPMODIFY, "-x", "-H", self.admin_uri, "-D", self.root_dn, "-w",
                self.root_password]
        if add:
            args.append("-a")
        if continue_on_error:
            args.append("-c")
        env = dict(os.environ, LDAPNOINIT="1")   # ignore ~/.ldaprc and /etc/ldap/ldap.conf
        result = subprocess.run(args, input=ldif, capture_output=True, text=True, timeout=60,
                                env=env)
        if check and result.returncode != 0:
            raise SlapdError(f"ldapmodify failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")
        return result

    def ldapadd(self, ldif: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ldapmodify(ldif, add=True, check=check)

    def ldapadd_config(self, ldif_path: str | os.PathLike) -> subprocess.CompletedProcess:
        """`ldapadd -Y EXTERNAL -H ldapi:/// -f FILE` into cn=config, as the admin guide says."""
        env = dict(os.environ, LDAPNOINIT="1")
        result = subprocess.run([LDAPMODIFY, "-a", "-Q", "-Y", "EXTERNAL", "-H", self.ldapi_uri,
                                 "-f", str(ldif_path)], capture_output=True, text=True,
                                timeout=60, env=env)
        if result.returncode != 0:
            raise SlapdError(f"ldapadd -Y EXTERNAL failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")
        return result

    def connect(self, bind_dn: str | None = None, password: str | None = None):
        """A python-ldap connection bound as the root DN (or as told), for inspection."""
        import ldap
        conn = ldap.initialize(self.admin_uri)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 5.0)
        conn.simple_bind_s(bind_dn or self.root_dn,
                           self.root_password if password is None else password)
        return conn

    def delete_subtree(self, dn: str) -> None:
        """Delete dn and everything under it (absent is fine)."""
        import ldap
        conn = self.connect()
        try:
            try:
                found = conn.search_s(dn, ldap.SCOPE_SUBTREE, "(objectClass=*)", ["1.1"])
            except ldap.NO_SUCH_OBJECT:
                return
            # Deepest first: more RDNs means deeper.
            for entry_dn in sorted((d for d, _ in found),
                                   key=lambda d: len(ldap.dn.str2dn(d)), reverse=True):
                conn.delete_s(entry_dn)
        finally:
            conn.unbind_s()


if __name__ == "__main__":   # a manual check: start, print the URL, wait for Ctrl-C
    with Slapd() as server:
        print(server.url, server.root_dn, server.root_password, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
