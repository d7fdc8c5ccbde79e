"""A referral between two imaging servers in separate network namespaces (issue 5).

Four namespaces made (and deleted) by a `netlab.Lab`: a switch holding a bridge, and three
hosts on it, each with one veth port and one address in a per-run 10.78.N.0/24:

    [sw ] br0 ──┬── eth0 [srvA  ] A  .2   imgsrvd A (998/tcp, status 9998/tcp)
                ├── eth0 [srvB  ] B  .3   imgsrvd B (998/tcp, status 9998/tcp)
                └── eth0 [client] C  .10  img, zmgmcast

Each imgsrvd is started inside its namespace, bound to its own address, with its own ImageRoot,
SQLite directory, results log and status port. The base image is made onto B from the client
namespace (`img make --server B`); A's policy restores `//B/lab/base.img`. The client then:

- `img auto --server A`: A refers it to B (Client Referrals on A), the image comes from B
  (Images Sent on B), the restored disk's ext4 is sound and its files identical;
- `img restore --server A //B/lab/base.img` (manual mode): denied with the original's
  manual-referral error, exit 1, disk untouched;
- `img auto --server A` with B stopped, and with a referral to an address nobody has: exit 1,
  a message naming the referred server and saying the disk was not changed; A still counted
  each referral.

Statistics are read the administrator's way, `zmgmcast -status -i HOST -p 9998 --json`, from
the client namespace (the daemons' read-only TCP status ports).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from xml.etree import ElementTree as ET

import pytest

from common.policy.directory import open_directory
from common.policy.model import Action, ActionKind, ImagingPolicy, MenuDisplay, MenuSettings, Rule
from tests.e2e import netlab
from tests.support import REPO

TOOLS = ("ip", "sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "partclone.ext4", "losetup")
pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root (network namespaces, loop devices for partclone)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs " + ", ".join(t for t in TOOLS if shutil.which(t) is None)),
]

MiB = 1 << 20
DISK_SIZE = 40 * MiB
EXT4 = (1 * MiB, 32 * MiB)          # (offset, size) of the one partition
IMAGE = "lab/base.img"
IMG_PORT = 998                      # the real ports: each daemon has its own namespace
STATUS_PORT = 9998
NEVER = MenuSettings(MenuDisplay.NEVER, 5)
CLIENT_MAC = "52:54:00:78:00:0a"

FILES = {
    "readme.txt": b"Preboot referral test\n" * 300,
    "random.bin": random.Random(5).randbytes(3 * MiB + 11),
    "zeros.bin": bytes(MiB),
    "docs/notes.txt": b"".join(b"line %d\n" % n for n in range(4000)),
    "docs/deep/small.dat": random.Random(6).randbytes(4097),
}


def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr or result.stdout}"
    return result


# ----------------------------------------------------------------------------- the lab

@dataclass
class Server:
    name: str
    ns: netlab.Netns
    ip: str
    workdir: Path
    root: Path
    db: Path
    results_log: Path
    log: Path
    status_socket: Path
    proc: netlab.Proc

    def set_policy(self, *rules: Rule) -> None:
        with open_directory(f"sqlite://{self.db}") as directory:
            directory.replace_policy(ImagingPolicy(tuple(rules), NEVER))

    def results(self, operation: str | None = None) -> list[Any]:
        from imgsrvd.resultslog import read_entries
        if not self.results_log.exists():
            return []
        return [e for e in read_entries(self.results_log)
                if operation is None or e.operation == operation]


@dataclass
class Net:
    lab: netlab.Lab
    client: netlab.Netns
    client_ip: str
    a: Server
    b: Server
    dead_ip: str                     # in the subnet, on no namespace
    workdir: Path

    def img(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        """`python3 -m img ARGS` inside the client namespace."""
        result = subprocess.run(
            self.client.cmd([sys.executable, "-m", "img", *args]), capture_output=True,
            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
        assert result.returncode == expect, \
            f"img {' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result

    def raw_request(self, method: str, server: Server, url: str, mode: str = "manual"
                    ) -> tuple[int, str, str]:
        """One HTTP request from the client namespace: (status, Location, body)."""
        code = ("import http.client, sys\n"
                "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)\n"
                "c.request(sys.argv[3], sys.argv[4], headers={'X-Preboot-Mode': sys.argv[5]})\n"
                "r = c.getresponse()\n"
                "print(r.status, r.getheader('Location', '-'))\n"
                "sys.stdout.write(r.read().decode())\n")
        result = subprocess.run(
            self.client.cmd([sys.executable, "-c", code, server.ip, str(IMG_PORT), method, url,
                             mode]),
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        first, _, body = result.stdout.partition("\n")
        status, location = first.split(" ", 1)
        return int(status), location, body

    def zmgmcast(self, server: Server, *extra: str) -> str:
        """`zmgmcast -status -i IP -p 9998 [EXTRA]` from the client namespace: its output."""
        result = subprocess.run(
            self.client.cmd([sys.executable, "-m", "zmgmcast", "-status", "-i", server.ip,
                             "-p", str(STATUS_PORT), *extra]),
            capture_output=True, text=True, timeout=30, env=dict(os.environ,
                                                                 PYTHONPATH=str(REPO)),
            cwd=REPO)
        assert result.returncode == 0, f"zmgmcast: {result.returncode}\n{result.stdout}" \
                                       f"{result.stderr}"
        return result.stdout

    def stats(self, server: Server) -> dict[str, Any]:
        """The server's imgsrvd status, as `zmgmcast -status -i IP -p 9998 --json` from the
        client namespace reads it."""
        report = json.loads(self.zmgmcast(server, "--json"))["imgsrvd"]
        assert report["state"] == "running", report
        return report["status"]

    def counters(self, server: Server) -> dict[str, Any]:
        return self.stats(server)["counters"]


def start_imgsrvd(lab: netlab.Lab, name: str, ns: netlab.Netns, ip: str) -> Server:
    workdir = lab.workdir / name
    root = workdir / "images"
    root.mkdir(parents=True)
    db = workdir / "directory.db"
    open_directory(f"sqlite://{db}", create=True).close()   # as preboot-dir init does
    settings = {
        "IPAddress": ip, "Port": IMG_PORT, "StatusPort": STATUS_PORT, "StatusAddress": ip,
        "ImageRoot": root, "Directory": f"sqlite://{db}", "DirectoryTimeout": 2,
        "ResultsLog": workdir / "results.xml", "ServerName": f"{name}.referral.test",
        "StatusSocket": workdir / "imgsrvd.sock", "PidFile": workdir / "imgsrvd.pid",
        "LogLevel": "DEBUG", "LogFile": workdir / "imgsrvd.log",
        # referrals between servers without capabilities: tests/integration/test_trust.py
        "AllowAnonymous": True, "TokenKeyFile": workdir / "imaging.key",
    }
    config = netlab.write_config(workdir / "imgsrvd.conf", settings)
    proc = lab.spawn(f"imgsrvd-{name}", ns, [sys.executable, "-m", "imgsrvd", "--config",
                                             str(config), "--foreground"],
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    server = Server(name, ns, ip, workdir, root, db, workdir / "results.xml",
                    workdir / "imgsrvd.log", workdir / "imgsrvd.sock", proc)

    def ready() -> bool:
        if not proc.alive():
            return True
        try:
            return bool(netlab.status_query(server.status_socket, timeout=1.0).get("ok"))
        except (OSError, ValueError):
            return False

    ok = netlab.wait_for(ready, 20.0, 0.05)
    if not ok or not proc.alive():
        raise RuntimeError(f"imgsrvd {name} did not start (exit {proc.popen.poll()})\n"
                           f"--- output ---\n{netlab.tail(proc.log)}\n"
                           f"--- log ---\n{netlab.tail(server.log)}")
    listen = [entry for entry in netlab.status_query(server.status_socket)["listen"]
              if entry["proto"] == "tcp"]         # (and multicast's udp port)
    assert listen == [{"proto": "tcp", "address": ip, "port": IMG_PORT}], listen
    server.set_policy()
    return server


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("referral-netns")
    subnet = f"10.78.{random.randint(1, 254)}"
    with netlab.Lab(tmp / "lab", prefix=netlab.unique_prefix("pref")) as lab:
        sw = lab.netns("sw")
        netlab.add_bridge(sw, "br0")
        hosts = {}
        for role, host in (("srvA", 2), ("srvB", 3), ("client", 10)):
            ns = lab.netns(role)
            netlab.add_veth(sw, f"p-{role}", ns, "eth0", bridge_a="br0",
                            cidr_b=f"{subnet}.{host}/24")
            hosts[role] = (ns, f"{subnet}.{host}")
        client, client_ip = hosts["client"]
        client.ip("link", "set", "eth0", "address", CLIENT_MAC)
        a = start_imgsrvd(lab, "A", *hosts["srvA"])
        b = start_imgsrvd(lab, "B", *hosts["srvB"])
        yield Net(lab, client, client_ip, a, b, f"{subnet}.99", tmp)
        for server in (a, b):          # shown only when a test failed
            print(f"--- imgsrvd {server.name} log ---\n{netlab.tail(server.log, 60)}")
    leftover = netlab.run(["ip", "netns", "list"]).stdout
    assert lab.prefix not in leftover, leftover


# ----------------------------------------------------------------------------- disks

@pytest.fixture(scope="module")
def source_disk(net: Net) -> Path:
    src = net.workdir / "src"
    for name, data in FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    fs = net.workdir / "ext4.fs"
    with open(fs, "wb") as f:
        f.truncate(EXT4[1])
    run("mkfs.ext4", "-q", "-F", "-d", str(src), str(fs))
    disk = net.workdir / "source.disk"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    run("sfdisk", "-q", str(disk), input=(
        f"label: dos\nstart={EXT4[0] // 512}, size={EXT4[1] // 512}, type=83\n"))
    with open(disk, "r+b") as f:
        f.seek(EXT4[0])
        f.write(fs.read_bytes())
    fs.unlink()
    return disk


def blank(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def is_blank(path: Path) -> bool:
    return path.stat().st_size == DISK_SIZE and path.read_bytes() == bytes(DISK_SIZE)


def check_restored(disk: Path, tmp: Path) -> None:
    parts = json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]["partitions"]
    assert [(p["start"] * 512, p["size"] * 512, p["type"]) for p in parts] == \
        [(EXT4[0], EXT4[1], "83")]
    fs = tmp / "check.fs"
    with open(disk, "rb") as f:
        f.seek(EXT4[0])
        fs.write_bytes(f.read(EXT4[1]))
    try:
        run("e2fsck", "-fn", str(fs))
        out = tmp / "out.bin"
        for name, data in FILES.items():
            run("debugfs", "-R", f"dump /{name} {out}", str(fs))
            assert out.read_bytes() == data, name
        out.unlink()
    finally:
        fs.unlink()


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def image_on_b(net: Net, source_disk: Path) -> str:
    """The base image, made onto B from the client namespace."""
    made = net.img("make", "--disk", str(source_disk), "--server", net.b.ip, IMAGE)
    assert f"made //{net.b.ip}/{IMAGE}" in made.stdout, made.stdout
    assert (net.b.root / IMAGE).is_file() and not (net.a.root / IMAGE).exists()
    counters = net.counters(net.b)
    # the store (one entry with the result img reported of it) is B's one Update Request
    assert (counters["images_received"], counters["update_requests"]) == (1, 1), counters
    net.a.set_policy(Rule.from_text(
        "elsewhere", "", Action(ActionKind.RESTORE, f"//{net.b.ip}/{IMAGE}")))
    return f"//{net.b.ip}/{IMAGE}"


def test_auto_follows_a_referral_to_the_other_namespace(net: Net, image_on_b: str):
    a, b = net.a, net.b
    before_b = net.counters(b)
    target = blank(net.workdir / "auto.disk")
    started = time.monotonic()
    result = net.img("auto", "--disk", str(target), "--server", a.ip, "--fact", f"mac={CLIENT_MAC}")
    seconds = time.monotonic() - started
    out = result.stdout
    assert f"{a.ip}: referral: restore {image_on_b}" in out, out
    assert f"restored {image_on_b} onto {target}" in out, out
    check_restored(target, net.workdir)

    # A referred and sent nothing; B sent the image and referred nothing.
    counters_a, counters_b = net.counters(a), net.counters(b)
    assert counters_a["client_referrals"] == 1, counters_a
    assert counters_a["images_sent"] == 0 and counters_a["bytes_sent"] == 0, counters_a
    # the work query and the result img reports to the server it was pointed at
    assert counters_a["update_requests"] == 2, counters_a
    assert counters_b["images_sent"] == 1 and counters_b["client_referrals"] == 0, counters_b
    requests = int(out.split(" requests in ")[0].rsplit(" ", 1)[1])
    # the HEAD, the header probe and every ranged GET are one retrieve: one Update Request
    # (issue 13: they were one each); no result is sent to B
    assert requests > 1, out
    assert counters_b["update_requests"] == before_b["update_requests"] + 1, \
        (before_b, counters_b, out)
    assert counters_b["bytes_sent"] >= (b.root / IMAGE).stat().st_size
    assert counters_a["failures"] == 0 and counters_b["failures"] == 0

    # A's results log: the referral, asked from the client's namespace address, then the
    # client's own report of the restore. B's: the download, from the same address.
    assert netlab.wait_for(lambda: len(a.results()) >= 2, 10)
    referred = [e for e in a.results("download") if e.status == "referred"]
    assert len(referred) == 1, a.results()
    entry = referred[0]
    assert entry.requesting_address == net.client_ip, entry
    assert entry.image_path == image_on_b and entry.server == b.ip, entry
    assert entry.workstation == CLIENT_MAC.replace(":", "").upper(), entry
    reported = [e for e in a.results("download") if e.status == "success"]
    assert [(e.image_path, e.requesting_address) for e in reported] == \
        [(image_on_b, net.client_ip)], a.results()
    assert netlab.wait_for(lambda: any(e.status == "success" for e in b.results("download")), 10)
    sent = [e for e in b.results("download") if e.status == "success"]
    assert [(e.image_path, e.requesting_address) for e in sent] == [(IMAGE, net.client_ip)], \
        b.results()
    # ... read as the XML it is (one <result/> per entry, fields as attributes)
    rows = [e.attrib for e in ET.parse(a.results_log).getroot().iter("result")]
    referrals = [r for r in rows if r.get("status") == "referred"]
    assert len(referrals) == 1, rows
    assert {k: referrals[0].get(k) for k in ("operation", "image_path", "server",
                                             "requesting_address")} == \
        {"operation": "download", "image_path": image_on_b, "server": b.ip,
         "requesting_address": net.client_ip}, rows
    rows_b = [e.attrib for e in ET.parse(b.results_log).getroot().iter("result")]
    assert any(r.get("operation") == "download" and r.get("status") == "success" and
               r.get("image_path") == IMAGE and r.get("requesting_address") == net.client_ip
               for r in rows_b), rows_b

    # ... and the administrator's view: zmgmcast's table, from the client namespace
    table = net.zmgmcast(a)
    assert re.search(r"^\s*Client Referrals\s+1$", table, re.M), table
    assert re.search(r"^\s*Images Sent\s+0$", table, re.M), table
    assert f"Listening on tcp {a.ip}:{IMG_PORT}" in table, table
    table = net.zmgmcast(b)
    assert re.search(r"^\s*Images Sent\s+1$", table, re.M), table
    assert re.search(r"^\s*Client Referrals\s+0$", table, re.M), table
    print(f"referred restore: {seconds:.1f} s, {requests} range requests to B")


def test_manual_mode_referral_is_denied(net: Net, image_on_b: str):
    from common.imaging.protocol import MANUAL_REFERRAL_ERROR

    a, b = net.a, net.b
    before_a, before_b = net.counters(a), net.counters(b)
    target = blank(net.workdir / "manual.disk")
    result = net.img("restore", "--disk", str(target), "--server", a.ip, image_on_b, expect=1)
    assert "403" in result.stderr and a.ip in result.stderr, result.stderr
    assert "not changed" in result.stderr, result.stderr
    assert "restored" not in result.stdout
    assert is_blank(target)

    after_a, after_b = net.counters(a), net.counters(b)
    assert after_a["client_referrals"] == before_a["client_referrals"], after_a
    assert after_a["images_sent"] == 0 and after_a["failures"] == before_a["failures"] + 1
    # B never heard of it
    assert after_b["update_requests"] == before_b["update_requests"], after_b
    assert netlab.wait_for(lambda: any(e.status == "denied" for e in a.results("download")), 10)
    denied = [e for e in a.results("download") if e.status == "denied"]
    assert len(denied) == 1 and denied[0].requesting_address == net.client_ip, denied
    assert denied[0].error_message == MANUAL_REFERRAL_ERROR.format(server=b.ip), denied

    # The server gives the original's reason in a GET's body; a HEAD answer has no body ...
    status, _, body = net.raw_request("GET", a, f"/v1/images{image_on_b}")
    assert (status, json.loads(body)) == \
        (403, {"error": MANUAL_REFERRAL_ERROR.format(server=b.ip)}), (status, body)
    assert net.raw_request("HEAD", a, f"/v1/images{image_on_b}") == (403, "-", "")

    # ... so the server repeats the reason in a header, and img shows the original's words
    assert MANUAL_REFERRAL_ERROR.format(server=b.ip) in result.stderr, result.stderr
    assert "///" not in result.stderr, result.stderr


def test_auto_mode_request_for_bs_image_is_redirected(net: Net, image_on_b: str):
    """The 307 form of a referral: an auto-mode GET of //B/path on A is sent to B's port 998
    (A does not proxy), and the Location works from the client namespace."""
    a, b = net.a, net.b
    before_a, before_b = net.counters(a), net.counters(b)
    status, location, body = net.raw_request("GET", a, f"/v1/images{image_on_b}", "auto")
    assert status == 307, (status, body)
    assert location == f"http://{b.ip}:{IMG_PORT}/v1/images/{IMAGE}", location
    assert json.loads(body) == {"work": "referral", "server": b.ip, "path": IMAGE,
                                "location": location}
    status, _, body = net.raw_request("HEAD", b, location.split(f":{IMG_PORT}", 1)[1], "auto")
    assert status == 200 and body == "", (status, body)
    after_a, after_b = net.counters(a), net.counters(b)
    assert after_a["client_referrals"] == before_a["client_referrals"] + 1, after_a
    assert after_a["bytes_sent"] == 0 and after_a["images_sent"] == 0, after_a
    assert after_b["images_sent"] == before_b["images_sent"], after_b     # a HEAD sends none


def test_auto_referral_to_an_address_nobody_has(net: Net, image_on_b: str):
    a = net.a
    before = net.counters(a)
    dead = f"//{net.dead_ip}/{IMAGE}"
    a.set_policy(Rule.from_text("nowhere", "", Action(ActionKind.RESTORE, dead)))
    try:
        target = blank(net.workdir / "dead.disk")
        started = time.monotonic()
        result = net.img("auto", "--disk", str(target), "--server", a.ip,
                         "--fact", f"mac={CLIENT_MAC}", expect=1)
        seconds = time.monotonic() - started
    finally:
        a.set_policy(Rule.from_text(
            "elsewhere", "", Action(ActionKind.RESTORE, image_on_b)))
    assert f"referral: restore {dead}" in result.stdout, result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("img: ") and net.dead_ip in error, result.stderr
    assert "the disk was not changed" in error, result.stderr
    assert is_blank(target)
    assert net.counters(a)["client_referrals"] == before["client_referrals"] + 1
    assert netlab.wait_for(lambda: any(
        e.status == "failure" and net.dead_ip in (e.image_path or "")
        for e in a.results("download")), 10), a.results()
    print(f"unreachable referral failed in {seconds:.1f} s: {error}")


def test_auto_referral_to_a_stopped_server(net: Net, image_on_b: str):
    a, b = net.a, net.b
    before = net.counters(a)

    def failures() -> int:
        return sum(e.status == "failure" and b.ip in (e.image_path or "") and
                   e.requesting_address == net.client_ip for e in a.results("download"))

    failed_before = failures()
    assert net.lab.stop(b.proc) == 0, netlab.tail(b.proc.log)
    target = blank(net.workdir / "stopped.disk")
    result = net.img("auto", "--disk", str(target), "--server", a.ip,
                     "--fact", f"mac={CLIENT_MAC}", expect=1)
    assert f"referral: restore {image_on_b}" in result.stdout, result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("img: ") and b.ip in error, result.stderr
    assert "the disk was not changed" in error, result.stderr
    assert is_blank(target)
    after = net.counters(a)
    assert after["client_referrals"] == before["client_referrals"] + 1, after
    assert after["images_sent"] == 0
    assert netlab.wait_for(lambda: failures() == failed_before + 1, 10), a.results()
