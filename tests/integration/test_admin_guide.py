"""docs/admin-guide.md, run: every command block of the administrator's guide, in order, in a
root with the RPMs installed by rpm with their scriptlets (tests/rpmroot.py) and in network
namespaces of the test's own, so the guide cannot rot.

The guide marks each ```console block on the line before it (its HTML comment at the top says
how): `run` blocks are run and their output compared; `shown KEY` blocks cannot run here (no
SUSE repository, no systemd or firewalld running) and EQUIVALENTS[KEY] runs the nearest
equivalent; `machine KEY` markers are where a lab machine boots, which MACHINES[KEY] does
(policyd's answer fetched as iPXE fetches it, then `img auto` with the capability in it, on a
disk file, from a namespace of its own). A block without a marker, a command that fails,
output that differs, or a KEY with no equivalent (or an equivalent the guide no longer uses)
fails the test.

Network: the namespace "server" holds the daemons (started in the foreground from the units'
ExecStart, as root) on `lab0` 192.0.2.1/24; the namespace "machines" is the lab's other end of
a veth pair, with one address per machine (192.0.2.11 the reference, .21 and .22 the lab).

The root is the test's own (a copy of the cached base root with the session's RPMs installed:
the guide edits configs, enables units and upgrades, which the session's shared `rpm_root`
must not see). About 65 s: the root copy and install (35 s), the upgrade's rpmbuild.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import rpmroot

pytestmark = [pytest.mark.root, pytest.mark.slow]

GUIDE = rpmroot.REPO / "docs" / "admin-guide.md"
MARKER = re.compile(r"<!-- guide-test: (run|shown|machine)(?: ([a-z0-9-]+))?(?:: (.*?))? -->$")
SERVER_IP = "192.0.2.1"


# ---- the guide, parsed ----

@dataclass
class Command:
    text: str                       # what goes to sh (continuations and a heredoc included)
    expected: list[str] = field(default_factory=list)


@dataclass
class Step:
    kind: str                       # run, shown, machine
    key: str | None
    reason: str | None
    line: int                       # 1-based line of the marker
    commands: list[Command] = field(default_factory=list)


class GuideError(AssertionError):
    pass


def parse_guide(text: str, name: str = "admin-guide.md") -> list[Step]:
    """The steps in order. Raises GuideError for an unmarked or malformed block."""
    lines = text.split("\n")
    steps: list[Step] = []
    pending: Step | None = None
    i = 0
    in_comment = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if in_comment:
            in_comment = "-->" not in line
            i += 1
            continue
        marker = MARKER.fullmatch(stripped)
        if marker:
            kind, key, reason = marker.groups()
            if pending is not None:
                raise GuideError(f"{name}:{pending.line}: a marker with no block after it")
            step = Step(kind, key, reason, i + 1)
            if kind in ("shown", "machine") and not key:
                raise GuideError(f"{name}:{i + 1}: '{kind}' needs a KEY")
            if kind == "shown" and not reason:
                raise GuideError(f"{name}:{i + 1}: 'shown {key}' needs a reason")
            if kind == "machine":
                steps.append(step)
            else:
                pending = step
            i += 1
            continue
        if stripped.startswith("<!--"):
            in_comment = "-->" not in stripped
            i += 1
            continue
        if stripped.startswith("```"):
            lang = stripped[3:].strip()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise GuideError(f"{name}:{i + 1}: a block that is never closed")
            if lang != "console":
                raise GuideError(f"{name}:{i + 1}: a ```{lang or ''} block: every block in the "
                                 f"guide is ```console, marked for the test")
            if pending is None:
                raise GuideError(f"{name}:{i + 1}: a block without a guide-test marker on the "
                                 f"line before it")
            pending.commands = _commands(lines[i + 1:end], name, i + 2)
            steps.append(pending)
            pending = None
            i = end + 1
            continue
        if pending is not None and stripped:
            raise GuideError(f"{name}:{pending.line}: text between a marker and its block")
        i += 1
    if pending is not None:
        raise GuideError(f"{name}:{pending.line}: a marker with no block after it")
    return steps


def _commands(body: list[str], name: str, first: int) -> list[Command]:
    commands: list[Command] = []
    j = 0
    while j < len(body):
        line = body[j]
        if not line.startswith("# "):
            if not commands:
                raise GuideError(f"{name}:{first + j}: a block must start with a '# ' command")
            commands[-1].expected.append(line.rstrip())
            j += 1
            continue
        text = line[2:]
        while text.endswith("\\") and j + 1 < len(body):
            j += 1
            text += "\n" + body[j]
        heredoc = re.search(r"<<-?'?(\w+)'?\s*$", text)
        if heredoc:
            word = heredoc.group(1)
            while j + 1 < len(body):
                j += 1
                text += "\n" + body[j]
                if body[j] == word:
                    break
            else:
                raise GuideError(f"{name}:{first + j}: heredoc {word} never ends")
        commands.append(Command(text))
        j += 1
    return commands


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Each expected line matches one actual line, `...` inside a line any text; a line of only
    `...` any number of lines (none included)."""
    def line_ok(pattern: str, text: str) -> bool:
        regex = ".*".join(re.escape(part) for part in pattern.split("..."))
        return re.fullmatch(regex, text.rstrip()) is not None

    def match(e: int, a: int) -> bool:
        if e == len(expected):
            return a == len(actual)
        if expected[e].strip() == "...":
            return any(match(e + 1, k) for k in range(a, len(actual) + 1))
        return a < len(actual) and line_ok(expected[e], actual[a]) and match(e + 1, a + 1)

    return match(0, 0)


# ---- the parser can fail ----

def test_an_unmarked_block_fails():
    with pytest.raises(GuideError, match="without a guide-test marker"):
        parse_guide("text\n\n```console\n# true\n```\n")
    with pytest.raises(GuideError, match="every block in the guide is"):
        parse_guide("<!-- guide-test: run -->\n```sh\ntrue\n```\n")
    with pytest.raises(GuideError, match="needs a reason"):
        parse_guide("<!-- guide-test: shown install -->\n```console\n# zypper in x\n```\n")


def test_output_comparison():
    assert output_matches(["a ... c", "..."], ["a b c", "d", "e"])
    assert output_matches(["...", "z"], ["z"])
    assert not output_matches(["a"], ["a", "b"])
    assert not output_matches(["x ... y"], ["x y z"])


def test_every_block_of_the_guide_is_marked_and_every_key_has_its_equivalent():
    steps = parse_guide(GUIDE.read_text())
    shown = [s.key for s in steps if s.kind == "shown"]
    machines = [s.key for s in steps if s.kind == "machine"]
    assert sorted(shown) == sorted(EQUIVALENTS), "guide's shown blocks vs EQUIVALENTS"
    assert sorted(machines) == sorted(MACHINES), "guide's machine markers vs MACHINES"
    assert sum(len(s.commands) for s in steps if s.kind == "run") >= 40


# ---- the lab: a root, two namespaces, the daemons ----

class Lab:
    def __init__(self, root: rpmroot.RpmRoot, work: Path, built_rpms: list[Path]):
        self.root = root
        self.work = work
        self.built_rpms = built_rpms
        tag = f"{os.getpid() % 100000}"
        self.server = f"pbguide-s{tag}"
        self.machines = f"pbguide-m{tag}"
        self.daemons: dict[str, subprocess.Popen] = {}

    # network
    def up(self) -> None:
        for ns in (self.server, self.machines):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.server, "link", "add", "lab0", "type", "veth", "peer", "name", "lab1",
            "netns", self.machines)
        _ip("-n", self.server, "addr", "add", f"{SERVER_IP}/24", "dev", "lab0")
        for address in ("192.0.2.11", "192.0.2.21", "192.0.2.22"):
            _ip("-n", self.machines, "addr", "add", f"{address}/24", "dev", "lab1")
        _ip("-n", self.server, "link", "set", "lab0", "up")
        _ip("-n", self.machines, "link", "set", "lab1", "up")

    def down(self) -> None:
        for name in list(self.daemons):
            self.stop(name)
        for ns in (self.server, self.machines):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # daemons, as their units would start them
    def exec_start(self, name: str) -> list[str]:
        unit = (self.root.path / f"usr/lib/systemd/system/preboot-{name}.service").read_text()
        line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
        return shlex.split(line.split("=", 1)[1])

    def start(self, name: str) -> None:
        log = open(self.work / f"{name}.log", "ab")
        self.daemons[name] = self.root.popen(*self.exec_start(name), netns=self.server,
                                             stdout=log, stderr=subprocess.STDOUT)
        log.close()
        sock = self.root.path / f"run/preboot/{name}.sock"
        deadline = time.monotonic() + 30
        while not _answers(sock):
            process = self.daemons[name]
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start: "
                                     f"{(self.work / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self, name: str) -> None:
        process = self.daemons.pop(name)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def sh(self, text: str, netns: str | None = None) -> rpmroot.Result:
        return self.root.run("sh", "-c", "{\n" + text + "\n} 2>&1", check=False,
                             netns=netns or self.server, timeout_s=120)

    def host(self, text: str, netns: str | None = None) -> rpmroot.Result:
        """On the host, in the namespace: curl, which the root has not (SLES has)."""
        return _host_sh(text, netns or self.server)


def _host_sh(text: str, netns: str) -> rpmroot.Result:
    done = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", "{\n" + text + "\n} 2>&1"],
                          capture_output=True, text=True, timeout=60)
    return rpmroot.Result(done.returncode, done.stdout, done.stderr)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


# ---- what the guide's shown blocks stand for ----

def _installed(lab: Lab) -> None:
    # The fixture installed the same RPM files with rpm -i; zypper would have run the same.
    for name in rpmroot.PACKAGES:
        lab.root.rpm("-q", f"preboot-{name}")


def _start(lab: Lab) -> None:
    for name in ("tftpd", "policyd", "imgsrvd"):
        lab.start(name)


def _service(lab: Lab, name: str) -> list[str]:
    path = lab.root.path / f"usr/lib/firewalld/services/{name}.xml"
    tree = ET.parse(path).getroot()
    assert tree.tag == "service" and tree.findtext("short"), path
    return [f"{p.get('port')}/{p.get('protocol')}" for p in tree.findall("port")]


def _firewall_info(lab: Lab) -> None:
    step = next(s for s in parse_guide(GUIDE.read_text()) if s.key == "firewall-info")
    shown = next(l for l in step.commands[0].expected if l.strip().startswith("ports:"))
    assert _service(lab, "preboot-imaging") == shown.split(":", 1)[1].split()


def _firewall_open(lab: Lab) -> None:
    step = next(s for s in parse_guide(GUIDE.read_text()) if s.key == "firewall-open")
    names = re.findall(r"--add-service=(\S+)", step.commands[0].text)
    assert names == ["preboot-tftp", "preboot-policy", "preboot-imaging"]
    for name in names:
        assert _service(lab, name)


def _start_proxy(lab: Lab) -> None:
    assert _service(lab, "preboot-proxydhcp") == ["67/udp", "4011/udp"]
    lab.start("proxydhcpd")


SUSE_BOOTFILES = ("usr/share/ipxe/undionly.kpxe", "usr/share/ipxe/ipxe-x86_64.efi",
                  "usr/share/ipxe/snp-x86_64.efi", "usr/share/efi/x86_64/shim.efi",
                  "usr/share/efi/x86_64/grub.efi")


def _bootfiles(lab: Lab) -> None:
    sysroot = lab.root.path / "opt/sles"
    for n, rel in enumerate(SUSE_BOOTFILES):
        (sysroot / rel).parent.mkdir(parents=True, exist_ok=True)
        (sysroot / rel).write_bytes(f"stand-in {n} for SUSE's {rel}\n".encode())
    result = lab.sh("PREBOOT_BOOTFILES_SYSROOT=/opt/sles preboot-bootfiles --family suse /srv/tftp")
    assert result.returncode == 0, result.stdout
    for name in ("undionly.kpxe", "ipxe.efi", "snponly.efi", "shimx64.efi", "grubx64.efi"):
        assert re.search(rf"^(placed|unchanged) {re.escape(name)}: ", result.stdout, re.M), result.stdout
        assert (lab.root.path / "srv/tftp" / name).is_file()


def _proxydhcpd_changed(tree: Path) -> None:
    conf = tree / "packaging" / "etc" / "proxydhcpd.conf"
    conf.write_text(conf.read_text() + "# changed in release 1.2 (the admin guide's upgrade)\n")


def _upgrade(lab: Lab) -> None:
    newer = rpmroot.build_rpms(lab.work / "build-1.2", dist=".2", edit=_proxydhcpd_changed)
    lab.root.rpm("-U", "--nodeps", *map(str, newer))
    for name in list(lab.daemons):          # systemctl try-restart: those that run
        lab.stop(name)
        lab.start(name)


EQUIVALENTS: dict[str, Callable[[Lab], None]] = {
    "install": _installed,
    "start": _start,
    "firewall-info": _firewall_info,
    "firewall-open": _firewall_open,
    "start-proxy": _start_proxy,
    "bootfiles": _bootfiles,
    "upgrade": _upgrade,
}


# ---- what the lab machines do ----

def _disk(path: Path) -> None:
    """A 16 MiB MBR disk with one partition of data img does not know (copied whole)."""
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: dos\nstart=2048, type=83\n",
                   text=True, check=True, capture_output=True)
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))


def _boot(lab: Lab, mac: str, address: str, disk: str, name: str) -> str:
    """One machine's network boot from policyd's answer on: what iPXE fetches, then what the
    imaging environment runs (img auto with the capability on the kernel line)."""
    _ip("-n", lab.machines, "route", "replace", f"{SERVER_IP}/32", "dev", "lab1", "src", address)
    script = lab.host(f"curl -sf 'http://{SERVER_IP}:8090/policy?mac={mac}&platform=efi&arch=x86_64'",
                      netns=lab.machines)
    assert script.returncode == 0, script.stdout
    token = re.search(r"preboot\.token=(\S+)", script.stdout)
    assert token, f"no imaging work for {mac}: {script.stdout}"
    result = lab.sh(f"img auto --disk {disk} --server {SERVER_IP} --token {token.group(1)} "
                    f"--fact mac={mac} --fact hostname={name}", netns=lab.machines)
    assert result.returncode == 0, result.stdout
    return result.stdout


def _wait_results(lab: Lab, count: int) -> None:
    log = lab.root.path / "var/log/preboot/imgsrvd-results.xml"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("success") >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"results log has not {count} successes")


def _reference_makes(lab: Lab) -> None:
    _disk(lab.root.path / "root/ref.disk")
    out = _boot(lab, "52:54:00:aa:00:01", "192.0.2.11", "/root/ref.disk", "ref")
    assert "lab/base.img" in out, out
    _wait_results(lab, 1)


def _lab_restores(lab: Lab) -> None:
    reference = (lab.root.path / "root/ref.disk").read_bytes()
    for n, address in ((1, "192.0.2.21"), (2, "192.0.2.22")):
        disk = lab.root.path / f"root/lab{n}.disk"
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        out = _boot(lab, f"52:54:00:bb:00:0{n}", address, f"/root/lab{n}.disk", f"lab-0{n}")
        assert "restored" in out, out
        assert disk.read_bytes()[:4 << 20] == reference[:4 << 20]
    _wait_results(lab, 3)


MACHINES: dict[str, Callable[[Lab], None]] = {
    "reference-makes": _reference_makes,
    "lab-restores": _lab_restores,
}


# ---- the walk ----

@pytest.fixture(scope="module")
def lab(tmp_path_factory, built_rpms):
    if shutil.which("sfdisk") is None or shutil.which("ip") is None:
        pytest.skip("needs sfdisk and ip")
    work = tmp_path_factory.mktemp("guide")
    root = rpmroot.make_root(work / "root")
    lab = Lab(root, work, built_rpms)
    try:
        rpmroot.install(root, built_rpms)
        lab.up()
        yield lab
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def test_every_step_of_the_guide_runs(lab):
    for step in parse_guide(GUIDE.read_text()):
        where = f"admin-guide.md:{step.line}"
        if step.kind == "shown":
            EQUIVALENTS[step.key](lab)
            continue
        if step.kind == "machine":
            MACHINES[step.key](lab)
            continue
        for command in step.commands:
            if command.text.startswith("curl "):
                done = lab.host(command.text)
                output = done.stdout
            elif command.text.startswith("rpm "):
                done = lab.root.rpm(*shlex.split(command.text)[1:], check=False)
                output = done.stdout + done.stderr
            else:
                done = lab.sh(command.text)
                output = done.stdout
            if os.environ.get("GUIDE_SHOW"):
                print(f"\n## {where}: # {command.text}\n{output}", end="")
            assert done.returncode == 0, f"{where}: `{command.text}` exited {done.returncode}:\n{output}"
            actual = output.rstrip("\n").split("\n") if output.strip() else []
            if command.expected and not output_matches(command.expected, actual):
                raise AssertionError(f"{where}: `{command.text}` printed:\n{output}\n"
                                     f"the guide shows:\n" + "\n".join(command.expected))
