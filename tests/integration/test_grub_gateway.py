"""Secure Boot clients' GRUB files through tftpd from policyd, with real daemons and real TFTP
clients (tftp-hpa, curl): grub/grub.cfg is policyd's bootstrap, a preboot/policy.grub/... name
is the machine's answer from the same rules iPXE clients get, and a policy service that does not
answer is a TFTP error that says so."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.policy.directory import open_directory
from common.policy.model import Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings, Rule
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftpclients import (HOST, DaemonProcess, start_daemon, tftp_hpa_get,  # noqa: E402
                         wait_counters, write_config)

pytestmark = pytest.mark.skipif(not (shutil.which("tftp") and shutil.which("curl")),
                                reason="needs tftp-hpa and curl")

MAC = "52:54:00:07:5b:01"


@pytest.fixture
def workdir():
    # short: Unix socket paths stay far below their 108-byte limit
    path = Path(tempfile.mkdtemp(prefix="pbgrub-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_policyd(workdir: Path) -> DaemonProcess:
    """policyd on loopback with a SQLite directory holding one rule for efi machines."""
    db = workdir / "directory.db"
    with open_directory(f"sqlite://{db}", create=True) as directory:
        directory.replace_policy(ImagingPolicy((
            Rule.from_text("Secure Boot lab", "product = 'Imaging E2E' and platform = efi",
                           Action(ActionKind.RESTORE, "lab/base.img")),),
            MenuSettings(MenuDisplay.NEVER, 5)))
    values = {"IPAddress": HOST, "Port": 0, "Directory": f"sqlite://{db}", "StatusPort": 0,
              "StatusSocket": str(workdir / "policyd.sock"), "PidFile": str(workdir / "p.pid"),
              "LogLevel": "DEBUG", "LogFile": str(workdir / "policyd.log"),
              "TokenKeyFile": str(workdir / "imaging.key")}
    config = write_config(workdir / "policyd.conf", values)
    return DaemonProcess("prebootpolicyd", config, values["StatusSocket"],
                         Path(values["LogFile"])).start(timeout_s=20)


@pytest.fixture
def stack(workdir, tmp_path):
    policyd = start_policyd(workdir)
    root = tmp_path / "root"
    (root / "grub").mkdir(parents=True)
    (root / "grub" / "grub.cfg").write_text("# the file on disk: the gateway answers instead\n")
    tftpd = start_daemon(workdir, root, PolicyGateway=f"http://{HOST}:{policyd.port}")
    yield policyd, tftpd, root
    tftpd.stop()
    policyd.stop()


def curl_tftp(port: int, name: str, out: Path) -> subprocess.CompletedProcess:
    from urllib.parse import quote
    return subprocess.run(["curl", "-sS", "--max-time", "30", "-o", str(out),
                           f"tftp://{HOST}:{port}/{quote(name)}"],
                          capture_output=True, text=True, timeout=60)


def test_grub_cfg_is_the_policy_services_bootstrap(stack, tmp_path):
    policyd, tftpd, _root = stack
    out = tmp_path / "grub.cfg"
    tftp_hpa_get(tftpd.port, "grub/grub.cfg", out)
    text = out.read_text()
    assert 'source "/preboot/policy.grub/mac=${net_default_mac}/' in text
    assert "set root=(tftp,${net_default_server})" in text
    assert wait_counters(tftpd, lambda c: c["gateway_answers"] == 1)


def test_a_machines_answer_comes_from_its_rule(stack, tmp_path):
    policyd, tftpd, _root = stack
    out = tmp_path / "answer"
    name = (f"preboot/policy.grub/mac={MAC}/ip=192.168.77.130/platform=efi/arch=x86_64/"
            "manufacturer=QEMU/product=Imaging E2E/serial=")
    done = curl_tftp(tftpd.port, name, out)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("echo 'preboot-answer: imaging restore lab/base.img'\n"), text
    assert "preboot.image=lab/base.img" in text and "preboot.token=" in text
    assert "if linux /preboot/linux " in text
    log = policyd.log()
    assert "525400075B01 (efi, GRUB): imaging; rule 'Secure Boot lab'" in log, log[-2000:]
    # another machine (not efi in the rule's sense): no work, GRUB exits to the firmware
    other = tmp_path / "other"
    assert curl_tftp(tftpd.port, "preboot/policy.grub/mac=52:54:00:00:00:09/platform=efi",
                     other).returncode == 0
    assert other.read_text().endswith("\nexit\n")


def test_a_bad_query_and_an_absent_policy_service_are_tftp_errors(stack, tmp_path):
    policyd, tftpd, _root = stack
    bad = tftp_hpa_get(tftpd.port, "preboot/policy.grub/ip=10.0.0.1", tmp_path / "bad")
    assert "Preboot policy: the policy service answered 400: bad request: mac" in \
        bad.stdout + bad.stderr
    policyd.stop()
    gone = tftp_hpa_get(tftpd.port, "grub/grub.cfg", tmp_path / "gone")
    assert "Preboot policy: the policy service cannot be reached" in gone.stdout + gone.stderr
    counters = wait_counters(tftpd, lambda c: c["gateway_failures"] == 2)
    assert counters["errors"]["gateway"] == 2, counters
    assert "cannot be reached" in tftpd.log()


def test_without_a_gateway_the_names_are_files(workdir, tmp_path):
    root = tmp_path / "root"
    (root / "grub").mkdir(parents=True)
    (root / "grub" / "grub.cfg").write_text("set timeout=5\n")
    tftpd = start_daemon(workdir, root, name="plain", PolicyGateway="off")
    try:
        out = tmp_path / "grub.cfg"
        tftp_hpa_get(tftpd.port, "grub/grub.cfg", out)
        assert out.read_text() == "set timeout=5\n"
    finally:
        tftpd.stop()
