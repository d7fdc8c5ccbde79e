"""TLS on the imaging server and the policy service (docs/security.md, "TLS"), against real
daemons on 127.0.0.1 with certificates made by `preboot-dir tls create` (openssl), and real
clients: curl and img.

- img with the server's pin (`--server-pin`, or $PREBOOT_SERVER_PIN as the imaging environment
  sets it from preboot.serverpin) stores and restores an image over TLS; with another pin it
  stops before sending anything (the server never sees a request, so never a capability); with
  --server-ca it trusts what that CA signed for the name.
- A refusal before the upload's body (409: the image exists) reaches img over TLS with its
  reason (the 100-continue path reads the answer off a TLS socket).
- Plain HTTP to a TLS port gets nothing; curl with the certificate as its CA gets answers.
- policyd over TLS points iPXE's next request at https://, and with ImagingServerCertificate
  puts the pin on the kernel line.
- A certificate replaced on disk is served after a reload (SIGHUP), without a restart.
- Half a pair, or a key that is not the certificate's, is a one-line config error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from common.policy.directory import open_directory
from common.policy.model import Action, ActionKind, ImagingPolicy, Rule
from common.tlspin import pem_fingerprint
from tests.integration.test_img_server_modes import (  # noqa: F401 (fixtures)
    NEVER, Imgsrvd, blank, check_restored, img, imgsrvd_factory, source_disk)
from tests.integration.test_trust import curl, token
from tests.support import REPO, DaemonProcess, write_config

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="img reads disks via loop devices")]

IMAGE = "lab/tls.img"
MAC = "52:54:00:7a:10:01"


def make_pair(folder: Path, name: str = "server") -> tuple[Path, Path, str]:
    """A self-signed pair for 127.0.0.1 made by preboot-dir (openssl); (cert, key, pin)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    done = subprocess.run(
        [sys.executable, "-m", "common.dircli", "tls", "create", "--cert", str(cert), "--key",
         str(key), "--name", "127.0.0.1", "--name", "localhost", "--force"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    pin = pem_fingerprint(str(cert))
    assert f"pin: sha256:{pin}" in done.stdout
    assert os.stat(key).st_mode & 0o777 == 0o600
    return cert, key, pin


@pytest.fixture
def tls_server(imgsrvd_factory, tmp_path) -> tuple[Imgsrvd, Path, str]:  # noqa: F811
    """imgsrvd with capabilities on and TLS: (daemon, certificate, pin)."""
    cert, key, pin = make_pair(tmp_path)
    daemon = imgsrvd_factory(AllowAnonymous=False, TLSCertificate=str(cert), TLSKey=str(key))
    return daemon, cert, pin


def operator(server: Imgsrvd) -> str:
    return token(server, "operator:tls", ("store", "retrieve", "result"), ("lab/*",))


def test_img_stores_and_restores_over_tls_with_the_pin(tls_server, source_disk, tmp_path):
    server, _cert, pin = tls_server
    assert f"answering on https://127.0.0.1:{server.port}/v1/" in server.log()
    assert f"certificate sha256:{pin}" in server.log()
    cap = operator(server)
    img("make", "--disk", str(source_disk), "--server", server.address, IMAGE,
        "--token", cap, "--server-pin", f"sha256:{pin.upper()}")
    target = blank(tmp_path / "target.disk")
    # as the imaging environment runs it: the pin from the environment
    done = subprocess.run(
        [sys.executable, "-m", "img", "restore", "--disk", str(target), "--server",
         server.address, IMAGE], capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PREBOOT_TOKEN=cap,
                 PREBOOT_SERVER_PIN=":".join(pin[i:i + 2] for i in range(0, 64, 2))))
    assert done.returncode == 0, done.stdout + done.stderr
    check_restored(target, tmp_path)
    assert [e.status for e in server.results("upload")] == ["success"]
    assert [e.status for e in server.results("download")] == ["success"]


def test_another_pin_stops_before_anything_is_sent(tls_server, source_disk, tmp_path):
    server, _cert, pin = tls_server
    other = "0" * 64 if pin != "0" * 64 else "1" * 64
    before = server.log()
    refused = img("make", "--disk", str(source_disk), "--server", server.address, IMAGE,
                  "--token", operator(server), "--server-pin", other, expect=1)
    assert f"is not the pinned one (sha256:{other}); nothing was sent" in refused.stderr
    assert f"sha256:{pin}" in refused.stderr
    time.sleep(0.5)
    new = server.log()[len(before):]
    assert "PUT" not in new and "store" not in new.lower(), new
    assert not (server.root / IMAGE).exists()
    malformed = img("make", "--disk", str(source_disk), "--server", server.address, IMAGE,
                    "--server-pin", "sha256:nothex", expect=1)
    assert "--server-pin: 'sha256:nothex' is not a SHA-256 certificate fingerprint" \
        in malformed.stderr


def test_a_ca_file_is_trusted_for_the_name_and_a_refusal_reaches_img(tls_server, source_disk,
                                                                      tmp_path):
    server, cert, _pin = tls_server
    cap = operator(server)
    img("make", "--disk", str(source_disk), "--server", server.address, IMAGE,
        "--token", cap, "--server-ca", str(cert))
    again = img("make", "--disk", str(source_disk), "--server", server.address, IMAGE,
                "--token", cap, "--server-ca", str(cert), expect=1)
    assert "HTTP 409" in again.stderr and "exists" in again.stderr, again.stderr
    other_cert, _key, _ = make_pair(tmp_path, "other")
    untrusted = img("make", "--disk", str(source_disk), "--server", server.address,
                    "lab/x.img", "--token", cap, "--server-ca", str(other_cert), expect=1)
    assert "the server's certificate is not trusted" in untrusted.stderr
    assert "nothing was sent" in untrusted.stderr


def test_curl_needs_tls_and_the_certificate(tls_server):
    server, cert, _pin = tls_server
    url = f"{server.address}/v1/images/{IMAGE}"
    status, _ = curl(f"http://{url}")
    assert status in (0, 400), status          # no HTTP answer on a TLS port
    status, _ = curl(f"https://{url}")         # curl's own CA store knows no such certificate
    assert status == 0
    status, body = curl(f"https://{url}", "--cacert", str(cert))
    assert status == 401 and "needs a capability" in body, body
    status, _ = curl(f"https://{url}", "--cacert", str(cert), "--tls-max", "1.1")
    assert status == 0                         # TLS 1.2 or later only


def test_a_replaced_certificate_is_served_after_a_reload(tls_server, tmp_path):
    server, cert, pin = tls_server
    key = cert.with_suffix(".key")
    _, _, new_pin = make_pair(tmp_path)            # the same file names, a new pair
    assert new_pin != pin
    server.signal(signal.SIGHUP)
    url = f"https://{server.address}/v1/images/{IMAGE}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, _ = curl(url, "--cacert", str(cert))
        if status == 401:
            break
        time.sleep(0.2)
    assert status == 401, "the new certificate is not served after SIGHUP"
    assert key.exists()


@pytest.fixture
def tls_policyd(tls_server, tmp_path) -> tuple[DaemonProcess, Path, str]:
    """policyd over TLS with its own pair, pinning the imaging server's certificate."""
    server, server_cert, server_pin = tls_server
    cert, key, _pin = make_pair(tmp_path, "policy")
    workdir = server.workdir
    boot_root = workdir / "bootfiles"
    (boot_root / "preboot").mkdir(parents=True)
    (boot_root / "preboot" / "initrd").write_bytes(os.urandom(3 << 20 | 777))
    config = write_config(workdir / "policyd.conf", {
        "BootFilesRoot": str(boot_root),
        "IPAddress": "127.0.0.1", "Port": 0, "Directory": f"sqlite://{server.db}",
        "StatusPort": 0, "StatusSocket": str(workdir / "p.sock"),
        "PidFile": str(workdir / "p.pid"), "LogLevel": "DEBUG",
        "LogFile": str(workdir / "p.log"), "TokenKeyFile": str(workdir / "imaging.key"),
        "TLSCertificate": str(cert), "TLSKey": str(key),
        "ImagingServerCertificate": str(server_cert)})
    daemon = DaemonProcess("prebootpolicyd", config, str(workdir / "p.sock"),
                           workdir / "p.log").start(timeout_s=20)
    yield daemon, cert, server_pin
    daemon.stop()


def test_policyd_over_tls_points_ipxe_at_https_and_pins_the_imaging_server(tls_policyd):
    daemon, cert, server_pin = tls_policyd
    base = f"https://127.0.0.1:{daemon.port}"
    status, script = curl(f"{base}/boot.ipxe", "--cacert", str(cert))
    assert status == 200 and f"chain --replace --autofree {base}/policy?mac=" in script, script
    query = urllib.parse.urlencode({"mac": MAC, "platform": "pcbios", "arch": "x86_64"})
    status, script = curl(f"{base}/policy?{query}", "--cacert", str(cert))
    assert status == 200, script
    # no rule yet: the machine boots its disk; with a rule, the kernel line carries the pin
    server_db = re.search(r"sqlite://(\S+)", Path(daemon.config).read_text()).group(1)
    with open_directory(f"sqlite://{server_db}") as directory:
        directory.replace_policy(ImagingPolicy(
            (Rule.from_text("everyone", "", Action(ActionKind.RESTORE, IMAGE)),), NEVER))
    status, script = curl(f"{base}/policy?{query}", "--cacert", str(cert))
    assert status == 200 and f"preboot.serverpin={server_pin}" in script, script


def test_policyd_boot_files_over_tls_are_encrypted_and_whole(tls_policyd, tmp_path):
    """Over TLS the bytes cannot leave with a bare sendfile(2) (they would be plaintext): they
    go through the transport's encryption, and arrive whole, ranges included."""
    daemon, cert, _ = tls_policyd
    url = f"https://127.0.0.1:{daemon.port}/boot/preboot/initrd"
    want = (Path(daemon.config).parent / "bootfiles" / "preboot" / "initrd").read_bytes()
    out = tmp_path / "initrd"
    done = subprocess.run(["curl", "-sS", "--cacert", str(cert), "-o", str(out), "-w",
                           "%{http_code}", url], capture_output=True, text=True, timeout=60)
    assert done.stdout == "200" and out.read_bytes() == want, done.stderr
    done = subprocess.run(["curl", "-sS", "--cacert", str(cert), "-r", "1000-1999", "-o",
                           str(out), "-w", "%{http_code}", url],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "206" and out.read_bytes() == want[1000:2000], done.stderr
    plain = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                            url.replace("https://", "http://")],
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout != "200"                 # no plaintext way in
    assert daemon.counters()["boot_files_sent"] == 2


def test_half_a_pair_or_a_foreign_key_is_a_config_error(tmp_path):
    cert, _key, _ = make_pair(tmp_path)
    _, other_key, _ = make_pair(tmp_path, "other")
    for values, key, message in (
            ({"TLSCertificate": str(cert)}, "TLSKey", "must be set when TLSCertificate is"),
            ({"TLSCertificate": str(cert), "TLSKey": str(other_key)}, "TLSKey",
             "does not load with"),
            ({"TLSCertificate": str(tmp_path / "none.crt"), "TLSKey": str(other_key)},
             "TLSCertificate", "No such file")):
        config = write_config(tmp_path / "imgsrvd.conf", {
            "IPAddress": "127.0.0.1", "Port": 0, "ImageRoot": str(tmp_path / "images"),
            "StatusPort": 0, "TokenKeyFile": str(tmp_path / "imaging.key"), **values})
        done = subprocess.run([sys.executable, "-m", "imgsrvd", "--config", str(config), "--check"],
                              capture_output=True, text=True, timeout=60, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and message in lines[0] \
            and "imgsrvd.conf" in lines[0], done.stderr
