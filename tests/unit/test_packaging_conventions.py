"""Packaging conventions (issue 16, item 4): man pages and bash completions generated from the
commands' own parsers and the daemons' config schemas, the sysusers.d, tmpfiles.d and logrotate
files, LICENSE, and the spec lines that ship them. docs/packaging.md says why each is so."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "packaging" / "rpm" / "preboot.spec"
DAEMONS = ["tftpd", "proxydhcpd", "policyd", "imgsrvd"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


genman = _load("genman", REPO / "packaging" / "man" / "genman.py")
gencompletion = _load("gencompletion", REPO / "packaging" / "completion" / "gencompletion.py")
COMMANDS = {c.name: c for c in genman.commands()}
PAGES = genman.pages()


def page_of(name: str) -> str:
    command = COMMANDS[name]
    return PAGES[f"man{command.section}/{name}.{command.section}"]


def shipped_commands() -> set[str]:
    """The commands the spec writes a wrapper for (/usr/sbin, /usr/bin)."""
    return set(re.findall(r"^cat > %\{buildroot\}%\{_s?bindir\}/(\S+) <<", SPEC.read_text(), re.M))


def test_every_shipped_command_has_a_page():
    assert shipped_commands() == set(COMMANDS)
    assert len(COMMANDS) == 7


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_page_lists_every_option_and_subcommand(name):
    page = page_of(name)
    parser = COMMANDS[name].parser()
    for path, sub, _help in genman.walk(parser):
        if path:
            assert f'.SS "{genman.esc(" ".join((name,) + path))}"' in page, path
        for action in genman.options(sub):
            for option in action.option_strings:
                assert f"\\fB{genman.esc(option)}\\fR" in page, (path, option)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"):
        assert f"\n.SH {section}\n" in page


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_pages_list_every_config_key(daemon):
    keys = genman.schema(daemon).keys
    assert keys
    for page in (page_of(f"preboot-{daemon}"), PAGES[f"man5/preboot-{daemon}.conf.5"]):
        for key in keys:
            default = f" = \\fI{genman.esc(key.default)}\\fR" if key.default else " = (empty)"
            assert f"\\fB{genman.esc(key.name)}\\fR{default}" in page, key.name
    page = page_of(f"preboot-{daemon}")
    for section in ("CONFIGURATION", "FILES", "EXIT STATUS"):
        assert f"\n.SH {section}\n" in page
    for code in ("0", "1", "70", "78"):
        assert f".TP\n\\fB{code}\\fR\n" in page


def test_bootfiles_page_follows_the_scripts_help():
    """preboot-bootfiles(8) comes from the script's --help: every option its argument loop
    handles and every exit code is on the page."""
    script = genman.BOOTFILES.read_text()
    loop = script.split("while [ $# -gt 0 ]; do")[1].split("done")[0]
    handled = {opt for case in re.findall(r"^\s+([-\w|]+)\)", loop, re.M)
               for opt in case.split("|") if opt.startswith("-") and opt != "-*"}
    assert handled == {"--force", "--download", "--cache", "--family", "-h", "--help"}
    page = PAGES["man8/preboot-bootfiles.8"]
    for option in handled:
        assert f"\\fB{genman.esc(option)}\\fR" in page, option
    for code in ("0", "1", "2"):
        assert f".TP\n\\fB{code}\\fR\n" in page
    assert "\n.SH NAME\npreboot\\-bootfiles \\- put the boot programs" in page
    assert "\n.B preboot\\-bootfiles\n[\\-\\-force]" in page


def test_documented_exit_codes():
    from img.errors import EXIT_FAILED, EXIT_NOT_GROWN, EXIT_OK, EXIT_USAGE
    exit_status = {name: page_of(name).split("\n.SH EXIT STATUS\n")[1].split("\n.SH ")[0]
                   for name in ("img", "preboot-dir", "zmgmcast")}
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_GROWN):
        assert f"{code} " in exit_status["img"]
    for code in ("0", "1", "2", "65"):
        assert code in exit_status["preboot-dir"]
    for code in ("0", "2", "3", "4"):
        assert f"\n{code}  " in exit_status["zmgmcast"]


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed (groff-base)")
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_renders_without_warnings(page, tmp_path):
    path = tmp_path / Path(page).name
    path.write_text(PAGES[page])
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    if shutil.which("man"):
        result = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                                text=True, timeout=60, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0 and not result.stderr, result.stderr
        assert "NAME" in result.stdout


def test_genman_writes_the_pages(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "packaging/man/genman.py"), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == set(PAGES)
    assert not list((REPO / "packaging" / "man").glob("*.[158]")), "generated pages committed"


# ------------------------------------------------------------------------ bash completion

SCRIPTS = gencompletion.scripts()


def complete(tmp_path: Path, words: list[str]) -> list[str]:
    """What the generated completion offers for the words typed (the last one being completed)."""
    script = tmp_path / words[0]
    script.write_text(SCRIPTS[words[0]])
    driver = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
              f'{gencompletion.function_name(words[0])}; printf "%s\\n" "${{COMPREPLY[@]}}"')
    result = subprocess.run(["bash", "-c", driver, "bash", str(script), *words],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_completion_for_each_command():
    assert set(SCRIPTS) == {"img", "preboot-dir", "zmgmcast"}
    for name, text in SCRIPTS.items():
        assert f"complete -F {gencompletion.function_name(name)} {name}\n" in text
        parser = COMMANDS[name].parser()
        for _path, sub, _help in genman.walk(parser):
            for action in genman.options(sub):
                for option in action.option_strings:
                    assert f"'{option}" in text or f" {option}" in text, (name, option)


@pytest.mark.parametrize("words, expected", [
    (["img", ""], {"make", "restore", "addon", "auto", "session", "verify", "dump", "info"}),
    (["img", "restore", "--disk", "/dev/sda", "--sh"], {"--shrink"}),
    (["img", "restore", "--sector-size", ""], {"512", "4096"}),
    (["img", "addon", ""], {"make", "apply"}),
    (["preboot-dir", "--config", "x.conf", "rules", ""],
     {"list", "add", "set", "remove", "enable", "disable", "move"}),
    (["preboot-dir", "rules", "add", "r1", "--action", "re"], {"restore"}),
    (["preboot-dir", "menu", "set", "--display", ""], {"always", "never", "hotkey"}),
    (["zmgmcast", "-sta"], {"-status", "-start"}),
])
def test_completion_offers(tmp_path, words, expected):
    offered = set(complete(tmp_path, words))
    assert expected <= offered, offered
    if words[-1].startswith("-"):
        assert all(word.startswith(words[-1]) for word in offered)


def test_completion_offers_files_for_paths(tmp_path):
    (tmp_path / "disk.img").write_text("")
    assert complete(tmp_path, ["img", "dump", "--disk", "dis"]) == ["disk.img"]
    assert complete(tmp_path, ["img", "verify", "dis"]) == ["disk.img"]


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_completion_passes_shellcheck(tmp_path):
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(["shellcheck", "-s", "bash", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------------ user, folders, logs

def unit_value(daemon: str, key: str) -> str:
    for line in (REPO / "systemd" / f"preboot-{daemon}.service").read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"no {key}= in preboot-{daemon}.service")


def config_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_sysusers_creates_the_user_the_units_run_as():
    lines = [line for line in (REPO / "packaging/sysusers/preboot.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ['u preboot - "Preboot Services" /srv/tftp /sbin/nologin']
    for daemon in DAEMONS:
        assert unit_value(daemon, "User") == "preboot"
        assert unit_value(daemon, "Group") == "preboot"


def test_tmpfiles_modes_match_the_units():
    entries = {fields[1]: fields for fields in config_lines(REPO / "packaging/tmpfiles/preboot.conf")}
    assert set(entries) == {"/run/preboot", "/var/lib/preboot", "/var/lib/preboot/images",
                            "/var/log/preboot"}
    for path, fields in entries.items():
        assert fields[0] == "d" and fields[3:5] == ["preboot", "preboot"], path
    for daemon in DAEMONS:
        assert entries["/run/preboot"][2] == unit_value(daemon, "RuntimeDirectoryMode")
        assert entries["/var/log/preboot"][2] == unit_value(daemon, "LogsDirectoryMode")
    for daemon in ("policyd", "imgsrvd"):
        assert entries["/var/lib/preboot"][2] == unit_value(daemon, "StateDirectoryMode")


@pytest.mark.skipif(not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
                    reason="systemd-sysusers or systemd-tmpfiles not installed")
def test_sysusers_and_tmpfiles_in_a_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for kind in ("sysusers", "tmpfiles"):
        target = root / "usr/lib" / f"{kind}.d"
        target.mkdir(parents=True)
        shutil.copy(REPO / "packaging" / kind / "preboot.conf", target / "preboot.conf")
    for tool in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        result = subprocess.run([*tool, f"--root={root}"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
    passwd = (root / "etc/passwd").read_text()
    user = next(line for line in passwd.splitlines() if line.startswith("preboot:")).split(":")
    assert user[4:] == ["Preboot Services", "/srv/tftp", "/sbin/nologin"]
    uid, gid = int(user[2]), int(user[3])
    for path, mode in (("run/preboot", 0o755), ("var/lib/preboot", 0o750),
                       ("var/lib/preboot/images", 0o750), ("var/log/preboot", 0o750)):
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, uid, gid), path


def test_logrotate_rotates_the_logs_not_the_results_log():
    text = (REPO / "packaging/logrotate/preboot").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^/var/log/preboot/\*\.log \{$", code, re.M)
    assert "results" not in code and ".xml" not in code  # imgsrvd rotates it itself
    assert "su preboot preboot" in code and "create 0640 preboot preboot" in code
    # the daemons reopen a moved log file themselves: no signal, no copytruncate
    assert "postrotate" not in code and "copytruncate" not in code
    assert "WatchedFileHandler" in (REPO / "common/daemon/logsetup.py").read_text()


def test_license_is_the_gpl_v2():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert "Version 2, June 1991" in text
    assert "END OF TERMS AND CONDITIONS" in text


# ------------------------------------------------------------------------ the spec

def test_spec_ships_the_conventions():
    spec = SPEC.read_text()
    assert "_sharedstatedir" not in spec
    assert re.search(r"^URL:\s+%\{preboot_url\}$", spec, re.M)
    assert re.search(r"^License:\s+GPL-2\.0-or-later$", spec, re.M)
    build = spec.split("\n%build\n")[1].split("\n%install\n")[0]
    assert "packaging/man/genman.py --out build/man" in build
    assert "packaging/completion/gencompletion.py --out build/completion" in build
    assert "%sysusers_generate_pre packaging/sysusers/preboot.conf preboot preboot.conf" in build
    assert "%pre common -f preboot.pre" in spec
    for line in ("packaging/sysusers/preboot.conf %{buildroot}%{_sysusersdir}/preboot.conf",
                 "packaging/tmpfiles/preboot.conf %{buildroot}%{_tmpfilesdir}/preboot.conf",
                 "packaging/logrotate/preboot %{buildroot}%{_sysconfdir}/logrotate.d/%{name}-common"):
        assert f"install -D -m 0644 {line}" in spec
    files = spec.split("\n%files common\n")[1]
    common, rest = files.split("\n%files tftpd\n")
    for entry in ("%license LICENSE", "%{_sysusersdir}/preboot.conf",
                  "%{_tmpfilesdir}/preboot.conf",
                  "%config(noreplace) %{_sysconfdir}/logrotate.d/%{name}-common",
                  "%ghost %dir %attr(0755,preboot,preboot) /run/preboot",
                  "%dir %attr(0750,preboot,preboot) /var/log/preboot",
                  "%{bashcompdir}/preboot-dir", "%{bashcompdir}/zmgmcast",
                  "%{_mandir}/man8/preboot-dir.8*", "%{_mandir}/man1/zmgmcast.1*"):
        assert entry in common.split("\n"), entry
    for daemon in DAEMONS:
        section = spec.split(f"\n%files {daemon}\n")[1].split("\n%files ")[0]
        for entry in (f"%{{_mandir}}/man8/preboot-{daemon}.8*",
                      f"%{{_mandir}}/man5/preboot-{daemon}.conf.5*", "%license LICENSE"):
            assert entry in section.split("\n"), (daemon, entry)
    img = spec.split("\n%files img\n")[1].split("\n%changelog")[0]
    for entry in ("%{_mandir}/man8/img.8*", "%{bashcompdir}/img", "%license LICENSE"):
        assert entry in img.split("\n"), entry
    # every generated page is in some %files list
    for page in PAGES:
        section = page.split("/")[0]
        assert f"%{{_mandir}}/{section}/{Path(page).name}*" in spec, page


def test_spec_descriptions_fit_79_columns():
    spec = SPEC.read_text()
    for body in re.findall(r"^%description[^\n]*\n(.*?)\n\n", spec, re.S | re.M):
        for line in body.splitlines():
            assert len(line) <= 79, line


@pytest.mark.skipif(not shutil.which("rpmspec"), reason="rpmspec not installed")
def test_spec_parses_with_suse_macros():
    """The SUSE branch: sysusers macros, %pre -f, %tmpfiles_create (stubbed where the build
    machine has no SUSE macros)."""
    defines = ["suse_version 1600", "sysusers_requires Requires(pre): sysuser-shadow",
               "sysusers_generate_pre() echo %1 %2 %3 > %2.pre",
               "tmpfiles_create() systemd-tmpfiles --create %1"]
    args = [arg for define in defines for arg in ("--define", define)]
    result = subprocess.run(["rpmspec", "-P", *args, str(SPEC)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    parsed = result.stdout
    assert "\n%pre common -f preboot.pre\n" in parsed
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/preboot.conf" in parsed
    assert "useradd" not in parsed
    assert "URL:            https://preboot.invalid/" in parsed


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("rpmbuild") and shutil.which("git")),
                    reason="rpmbuild not installed")
def test_rpms_build_and_hold_the_generated_files(tmp_path):
    """rpmbuild -bb from the work tree (committed and uncommitted files), no dependency check
    (a Debian build machine has no RPM database): the pages and completions land in the RPMs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "SOURCES").mkdir()
    tarball = tmp_path / "SOURCES" / "preboot-0.1.0.tar.gz"
    subprocess.run(["tar", "--transform", "s,^,preboot-0.1.0/,", "-czf", str(tarball), "-T", "-"],
                   cwd=REPO, input=listed, text=True, check=True)
    result = subprocess.run(
        ["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {tmp_path}",
         "--define", f"preboot_python {sys.executable}", "--without", "imaging_env", str(SPEC)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    contents = {}
    for rpm in (tmp_path / "RPMS").glob("*/*.rpm"):
        query = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                               check=True)
        contents[rpm.name.rsplit("-", 2)[0]] = set(query.stdout.split())
    assert contents["preboot-common"] >= {
        "/usr/lib/sysusers.d/preboot.conf", "/usr/lib/tmpfiles.d/preboot.conf",
        "/etc/logrotate.d/preboot-common", "/usr/share/bash-completion/completions/zmgmcast",
        "/usr/share/bash-completion/completions/preboot-dir", "/run/preboot", "/var/log/preboot"}
    assert "/usr/share/bash-completion/completions/img" in contents["preboot-img"]
    every = set().union(*contents.values())
    for page in PAGES:
        assert any(path.startswith(f"/usr/share/man/{page}") for path in every), page
    assert not [path for path in every if path.startswith("/usr/com")]


@pytest.mark.skipif(not (shutil.which("rpmbuild") and shutil.which("git")),
                    reason="rpmbuild not installed")
def test_only_tftpd_is_architecture_specific_and_holds_the_c_loop():
    """tftpd's subpackage carries the compiled lock-step loop; the others stay noarch."""
    spec = SPEC.read_text()
    packages = spec.split("\n%package ")[1:]
    for block in packages:
        name = block.split("\n", 1)[0].strip()
        header = block.split("\n%description", 1)[0]
        if name == "tftpd":
            assert "BuildArch" not in header
        else:
            assert "BuildArch:      noarch" in header, name
    assert "setup.py -q build_ext --inplace" in spec
