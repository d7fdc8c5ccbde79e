"""prebootpolicyd.script: every answer shape for BIOS and UEFI, the boot script, and escaping.

The scripts are run through a small model of iPXE's script interpreter (the rules of
src/core/exec.c and script.c: words split at blanks, a word starting with '#' ends the line,
'||' '&&' ';' end a command and chain on its status, ${name[:type]} expands a setting, a failing
line ends the script, goto finds the first matching label). Tests assert on what the machine
would do (echo, kernel, initrd, boot, sanboot, exit), not on the text alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.daemon.config import defaults
from common.policy.model import (NO_WORK, Action, ActionKind, MenuDisplay, MenuSettings,
                                 WorkAssignment)
from common.daemon.runner import CommonSettings
from prebootpolicyd import script
from prebootpolicyd.config import SCHEMA, Settings, make_settings

SERVER = "10.0.0.1"
MAC = "00C04FDC2AB5"


def make(**overrides: str) -> Settings:
    values = defaults(SCHEMA)
    values.update(overrides)
    return make_settings(values, CommonSettings.from_values(values))


SETTINGS = make()


# ---- a model of the iPXE script interpreter ---------------------------------------------------

class ScriptEnd(Exception):
    pass


@dataclass
class Machine:
    platform: str | None = "pcbios"
    key_pressed: bool = False
    choice: str | None = None          # None: choose times out (its default); "ESC": cancelled
    failing: frozenset = frozenset()   # commands that fail: kernel, initrd, boot, sanboot, chain
    effects: list = field(default_factory=list)
    initrd_names: list = field(default_factory=list)   # initrd --name NAME, in order
    expanded: set = field(default_factory=set)
    settings: dict = field(default_factory=dict)
    items: list = field(default_factory=list)

    def expand(self, word: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(1).split(":", 1)[0]
            self.expanded.add(name)
            return self.settings.get(name, "")
        return re.sub(r"\$\{([^}]*)\}", value, word)

    def run(self, text: str, max_steps: int = 500) -> list:
        self.settings.setdefault("platform", self.platform or "")
        lines = text.split("\n")
        assert lines[0] == "#!ipxe" and text.endswith("\n")
        labels: dict[str, int] = {}
        for number, line in enumerate(lines):
            if line.startswith(":"):
                labels.setdefault(line[1:], number)
        pc = 1
        try:
            for _ in range(max_steps):
                if pc >= len(lines):
                    self.effects.append(("end-of-script",))
                    return self.effects
                line = lines[pc]
                pc += 1
                assert not line.endswith("\\"), f"line continues: {line!r}"
                if not line.strip() or line.startswith(":"):
                    continue
                jump = self._line(line, labels)
                if jump is not None:
                    pc = labels[jump] + 1
            raise AssertionError("script loops")
        except ScriptEnd:
            return self.effects

    def _line(self, line: str, labels: dict[str, int]) -> str | None:
        tokens = line.split()
        index, rc, process = 0, 0, True
        while True:
            command, terminator = [], None
            while index < len(tokens):
                token = tokens[index]
                index += 1
                if token.startswith("#"):
                    index = len(tokens)
                    break
                if token in ("||", "&&", ";"):
                    terminator = token
                    break
                command.append(token)
            if process and command:
                argv = [self.expand(token) for token in command]
                rc, jump = self._execute(argv, labels)
                if jump is not None:
                    return jump
            if terminator is None:
                if rc != 0:
                    self.effects.append(("script-failed", line))
                    raise ScriptEnd
                return None
            process = {"||": rc != 0, "&&": rc == 0, ";": True}[terminator]

    def _execute(self, argv: list[str], labels: dict[str, int]) -> tuple[int, str | None]:
        name, args = argv[0], argv[1:]
        fails = 1 if name in self.failing else 0
        if name == "echo":
            self.effects.append(("echo", " ".join(args)))
            return 0, None
        if name == "goto":
            assert len(args) == 1 and args[0] in labels, f"goto {args}: no such label"
            return 0, args[0]
        if name == "iseq":
            assert len(args) == 2
            return (0 if args[0] == args[1] else 1), None
        if name == "prompt":
            assert args[0] == "--key" and args[2] == "--timeout"
            self.effects.append(("prompt", int(args[1], 0), int(args[3]), " ".join(args[4:])))
            return (0 if self.key_pressed else 1), None
        if name == "menu":
            self.items = []
            self.effects.append(("menu", " ".join(args)))
            return 0, None
        if name == "item":
            self.items.append(args[0])
            return 0, None
        if name == "choose":
            options = dict(zip(args[:-1:2], args[1:-1:2]))
            setting = args[-1]
            if self.choice == "ESC":
                return 1, None
            chosen = self.choice or options["--default"]
            assert chosen in self.items
            self.settings[setting] = chosen
            self.effects.append(("choose", chosen, int(options.get("--timeout", "0"))))
            return 0, None
        if name in ("kernel", "initrd"):
            if args[:1] == ["--name"]:           # initrd --name NAME URI
                self.initrd_names.append(args[1])
                args = args[2:]
            self.effects.append((name, args[0], args[1:]))
            return fails, None
        if name in ("boot", "sanboot", "exit", "chain"):
            self.effects.append((name, args))
            if fails:
                return 1, None
            raise ScriptEnd
        raise AssertionError(f"unknown iPXE command {name!r}")


def unchecked(kind: ActionKind, image: str = "", addons: tuple[str, ...] = (),
              session: str = "") -> Action:
    """An Action without the model's own checks (it refuses quotes and control characters):
    the script must be safe even for values that got past them."""
    action = object.__new__(Action)
    for name, value in (("kind", kind), ("image", image), ("addons", addons),
                        ("session", session)):
        object.__setattr__(action, name, value)
    return action


def run(answer: script.Answer | str, **machine) -> Machine:
    m = Machine(**machine)
    m.run(answer if isinstance(answer, str) else answer.script)
    return m


def echoes(m: Machine) -> list[str]:
    return [effect[1] for effect in m.effects if effect[0] == "echo"]


def markers(m: Machine) -> list[str]:
    return [text for text in echoes(m) if text.startswith("preboot-answer:")]


def kernel(m: Machine) -> tuple[str, dict[str, str], list[str]]:
    """The kernel URL, its preboot.* arguments (decoded) and the other arguments. The initrd=
    arguments must name exactly the initrds the script loaded (a UEFI kernel finds its initrd
    only that way)."""
    found = [effect for effect in m.effects if effect[0] == "kernel"]
    assert len(found) == 1, m.effects
    preboot, other, initrds = {}, [], []
    for arg in found[0][2]:
        if arg.startswith("initrd="):
            initrds.append(arg[len("initrd="):])
        elif arg.startswith("preboot."):
            key, _, value = arg.partition("=")
            preboot[key[len("preboot."):]] = value
        else:
            other.append(arg)
    assert initrds == m.initrd_names == ["initrd"], (initrds, m.initrd_names)
    return found[0][1], preboot, other


def last(m: Machine) -> tuple:
    return m.effects[-1]


RESTORE = Action(ActionKind.RESTORE, "/images/win10.zmg", ("drivers.zmg", "apps.zmg"))
WORKS = {
    "restore": (RESTORE, "restore /images/win10.zmg + add-ons drivers.zmg, apps.zmg",
                {"image": "/images/win10.zmg", "addons": "drivers.zmg,apps.zmg"}),
    "make": (Action(ActionKind.MAKE, "/images/new.zmg"), "make an image to /images/new.zmg",
             {"image": "/images/new.zmg"}),
    "multicast": (Action(ActionKind.MULTICAST, session="lab1"), "join multicast session lab1",
                  {"session": "lab1"}),
    "maintenance": (Action(ActionKind.MAINTENANCE), "maintenance shell", {}),
}
PLATFORMS = ["pcbios", "efi", None]
NEVER = MenuSettings(MenuDisplay.NEVER, 5)
ALWAYS = MenuSettings(MenuDisplay.ALWAYS, 7)
HOTKEY = MenuSettings(MenuDisplay.HOTKEY, 3)


def work(action: Action) -> WorkAssignment:
    return WorkAssignment(action, "rule 'lab'", f"rule 'lab' matches: {action.describe()}",
                          "lab")


NOTHING = WorkAssignment(NO_WORK, "policy", "no enabled rule matches this machine")


def answer(assignment: WorkAssignment, menu: MenuSettings = NEVER, platform: str | None = None,
           settings: Settings = SETTINGS, mac: str | None = MAC) -> script.Answer:
    return script.answer_script(settings, assignment, menu, platform, SERVER, mac)


def assert_local_boot(m: Machine, platform: str | None) -> None:
    actual = platform or m.platform
    if actual == "pcbios":
        assert last(m) == ("sanboot", ["--no-describe", "--drive", "0x80"])
    else:
        assert last(m) == ("exit", [])
        assert not any(effect[0] == "sanboot" for effect in m.effects)


# ---- no menu (display never) ----------------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", sorted(WORKS))
def test_work_boots_the_imaging_environment(kind, platform):
    action, described, expected_args = WORKS[kind]
    result = answer(work(action), NEVER, platform)
    assert result.kind == "imaging"
    lines = result.script.splitlines()
    assert lines[1] == f"echo preboot-answer: imaging {described}"   # the marker comes first
    m = run(result, platform=platform or "pcbios")
    assert markers(m) == [f"preboot-answer: imaging {described}"]
    url, args, other = kernel(m)
    assert url == f"http://{SERVER}:8090/boot/preboot/linux"   # Port: {port} not given
    assert other == ["console=ttyS0", "console=tty0", "quiet"]
    assert args == {"server": SERVER, "work": kind, "mac": MAC, **expected_args}
    assert ("initrd", f"http://{SERVER}:8090/boot/preboot/initrd", []) in m.effects
    assert last(m) == ("boot", [])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_no_work_boots_the_local_disk(platform):
    result = answer(NOTHING, NEVER, platform)
    assert result.kind == "local"
    assert result.script.splitlines()[1] == \
        "echo preboot-answer: local no enabled rule matches this machine"
    for machine_platform in ("pcbios", "efi"):
        if platform and platform != machine_platform:
            continue
        m = run(result, platform=machine_platform)
        assert markers(m) == ["preboot-answer: local no enabled rule matches this machine"]
        assert not any(effect[0] in ("kernel", "menu", "prompt") for effect in m.effects)
        assert_local_boot(m, machine_platform)


def test_local_boot_commands_per_platform():
    assert answer(NOTHING, NEVER, "pcbios").script.endswith(
        "\nsanboot --no-describe --drive 0x80 || exit\n")
    assert answer(NOTHING, NEVER, "efi").script.endswith("\nexit\n")
    assert answer(NOTHING, NEVER, None).script.endswith(
        "\niseq ${platform} pcbios && sanboot --no-describe --drive 0x80 || exit\n")


def test_bios_falls_back_to_exit_when_sanboot_fails():
    m = run(answer(NOTHING, NEVER, "pcbios"), failing=frozenset({"sanboot"}))
    assert m.effects[-2:] == [("sanboot", ["--no-describe", "--drive", "0x80"]), ("exit", [])]


@pytest.mark.parametrize("platform", ["pcbios", "efi"])
@pytest.mark.parametrize("failing", ["kernel", "initrd", "boot"])
def test_imaging_environment_that_cannot_load_boots_the_local_disk(platform, failing):
    m = run(answer(work(RESTORE), NEVER, platform), platform=platform,
            failing=frozenset({failing, "sanboot"} if platform == "pcbios" else {failing}))
    assert "Preboot: cannot start the imaging environment; booting the local disk" in echoes(m)
    assert last(m) == ("exit", [])
    assert not any(effect[0] == "script-failed" for effect in m.effects)


def test_hotkey_with_zero_timeout_is_never():
    result = answer(work(RESTORE), MenuSettings(MenuDisplay.HOTKEY, 0), "efi")
    assert result.kind == "imaging"
    assert "prompt" not in result.script and "menu" not in result.script


# ---- the Preboot menu (display always) --------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
def test_menu_with_work_defaults_to_start_imaging(platform):
    result = answer(work(RESTORE), ALWAYS, platform)
    assert result.kind == "menu"
    assert result.script.splitlines()[1] == "echo preboot-answer: menu"
    m = run(result, platform=platform or "efi")
    assert markers(m) == ["preboot-answer: menu"]
    assert ("menu", "Preboot Menu") in m.effects
    assert m.items == ["start", "maintenance", "local"]
    assert ("choose", "start", 7000) in m.effects
    _url, args, _ = kernel(m)
    assert args["work"] == "restore" and args["image"] == "/images/win10.zmg"
    assert last(m) == ("boot", [])


@pytest.mark.parametrize("platform", ["pcbios", "efi"])
def test_menu_without_work_defaults_to_exit(platform):
    m = run(answer(NOTHING, ALWAYS, platform), platform=platform)
    assert ("choose", "local", 7000) in m.effects
    assert not any(effect[0] == "kernel" for effect in m.effects)
    assert_local_boot(m, platform)


@pytest.mark.parametrize("assignment", [work(RESTORE), NOTHING], ids=["work", "no-work"])
def test_menu_items(assignment):
    result = answer(assignment, ALWAYS, "pcbios")
    lines = result.script.splitlines()
    assert "item start Start Imaging" in lines
    assert "item maintenance Imaging Maintenance" in lines
    assert "item local Exit (boot the local disk)" in lines
    m = run(result, choice="maintenance")
    assert kernel(m)[1] == {"server": SERVER, "work": "maintenance", "mac": MAC}
    m = run(result, choice="local")
    assert_local_boot(m, "pcbios")
    m = run(result, choice="ESC")
    assert_local_boot(m, "pcbios")
    m = run(result, choice="start")
    expected = "restore" if assignment.has_work else "auto"
    assert kernel(m)[1]["work"] == expected


def test_menu_timeout_zero_waits_for_a_choice():
    result = answer(work(RESTORE), MenuSettings(MenuDisplay.ALWAYS, 0), "efi")
    assert "choose --default start preboot-item || goto local" in result.script.splitlines()


# ---- the hot-key prompt (display hotkey) ------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("assignment", [work(RESTORE), NOTHING], ids=["work", "no-work"])
def test_hotkey_not_pressed_goes_on_as_never(assignment, platform):
    result = answer(assignment, HOTKEY, platform)
    assert result.kind == "hotkey"
    m = run(result, platform=platform or "pcbios", key_pressed=False)
    assert m.effects[0] == ("prompt", 0x01, 3000, "Press Ctrl-A for the Preboot menu...")
    assert not any(effect[0] == "menu" for effect in m.effects)
    if assignment.has_work:
        assert markers(m) == [f"preboot-answer: imaging {RESTORE.describe()}"]
        assert last(m) == ("boot", [])
    else:
        assert markers(m) == ["preboot-answer: local no enabled rule matches this machine"]
        assert_local_boot(m, platform or "pcbios")


@pytest.mark.parametrize("assignment", [work(RESTORE), NOTHING], ids=["work", "no-work"])
def test_hotkey_pressed_shows_the_menu(assignment):
    m = run(answer(assignment, HOTKEY, "efi"), platform="efi", key_pressed=True)
    assert markers(m) == ["preboot-answer: menu"]
    assert ("menu", "Preboot Menu") in m.effects
    assert ("choose", "start" if assignment.has_work else "local", 3000) in m.effects


def test_hotkey_is_configurable():
    result = answer(NOTHING, HOTKEY, "efi", settings=make(MenuHotKey="Esc"))
    m = run(result, platform="efi")
    assert m.effects[0] == ("prompt", 0x1B, 3000, "Press Esc for the Preboot menu...")


# ---- the fallback answer --------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["pcbios", "efi"])
def test_fallback_local(platform):
    result = script.fallback_script(SETTINGS, "directory unavailable", platform, SERVER, MAC)
    assert result.kind == "local"
    m = run(result, platform=platform)
    assert markers(m) == ["preboot-answer: local directory unavailable"]
    assert_local_boot(m, platform)


@pytest.mark.parametrize("platform", ["pcbios", "efi"])
def test_fallback_maintenance(platform):
    settings = make(FallbackAnswer="maintenance")
    result = script.fallback_script(settings, "directory unavailable", platform, SERVER, MAC)
    assert result.kind == "imaging"
    m = run(result, platform=platform)
    assert markers(m) == ["preboot-answer: imaging maintenance shell"]
    assert kernel(m)[1] == {"server": SERVER, "work": "maintenance", "mac": MAC}
    assert not any(effect[0] in ("menu", "prompt") for effect in m.effects)


# ---- the servers and the kernel command line -----------------------------------------------

def test_server_placeholders():
    settings = make(ImagingKernel="http://{server}:8080/k", ImagingInitrd="tftp://boot.lan/i",
                    ImagingServer="imaging.lan", KernelArgs="")
    m = run(answer(work(RESTORE), NEVER, "efi", settings=settings), platform="efi")
    url, args, other = kernel(m)
    assert url == f"http://{SERVER}:8080/k" and other == []
    assert args["server"] == "imaging.lan"
    assert ("initrd", "tftp://boot.lan/i", []) in m.effects


def test_ipv6_server():
    result = script.answer_script(SETTINGS, work(RESTORE), NEVER, "efi", "[fd00::1]", MAC)
    url, args, _ = kernel(run(result, platform="efi"))
    assert url == "http://[fd00::1]:8090/boot/preboot/linux" and args["server"] == "[fd00::1]"


def test_port_is_the_one_ipxe_reached_us_on():
    """{port}: the port of the request (the policy service's /boot/ serves the files); a TFTP
    URL without it still works."""
    result = script.answer_script(SETTINGS, work(RESTORE), NEVER, "efi", "10.0.0.5", MAC,
                                  port=18090)
    m = run(result, platform="efi")
    assert kernel(m)[0] == "http://10.0.0.5:18090/boot/preboot/linux"
    assert ("initrd", "http://10.0.0.5:18090/boot/preboot/initrd", []) in m.effects
    tftp = make(ImagingKernel="tftp://{server}/preboot/linux",
                ImagingInitrd="tftp://{server}/preboot/initrd")
    m = run(script.answer_script(tftp, work(RESTORE), NEVER, "efi", "10.0.0.5", MAC, port=1),
            platform="efi")
    assert kernel(m)[0] == "tftp://10.0.0.5/preboot/linux"
    assert ("initrd", "tftp://10.0.0.5/preboot/initrd", []) in m.effects


def test_no_mac_no_mac_argument():
    _url, args, _ = kernel(run(answer(work(RESTORE), NEVER, "efi", mac=None), platform="efi"))
    assert "mac" not in args


# ---- escaping: nothing from the directory can change the script -------------------------------

NASTY = [
    "/images/win 10.zmg",
    "/images/$x.zmg",
    "/images/${net0/ip}.zmg",
    "a || shell",
    "a && shell ; exit",
    "#comment",
    "a\nshell\n:failed",
    "back\\",
    "50% off",
    "Büro/ünïcödé.zmg",
    "tab\there",
    "a,b",
    "\x00\x1b[2J",
    "\u2028line\u2029sep",
    'say "hi"',
]


@pytest.mark.parametrize("image", NASTY)
def test_image_paths_are_percent_encoded(image):
    action = unchecked(ActionKind.RESTORE, image, (image, "second"))
    result = answer(work(action), NEVER, "pcbios")
    assert len(result.script.splitlines()) == len(answer(work(RESTORE), NEVER,
                                                         "pcbios").script.splitlines())
    m = run(result)
    assert m.expanded <= {"platform"}
    _url, args, other = kernel(m)
    assert unquote(args["image"]) == image
    assert [unquote(a) for a in args["addons"].split(",")] == [image, "second"]
    assert other == ["console=ttyS0", "console=tty0", "quiet"]
    assert last(m) == ("boot", [])
    marker = markers(m)
    assert len(marker) == 1 and unquote(marker[0]) == \
        "preboot-answer: imaging " + " ".join(action.describe().split())


@pytest.mark.parametrize("name", NASTY)
def test_directory_text_in_reasons_is_harmless(name):
    assignment = WorkAssignment(NO_WORK, f"workstation {name}",
                                f"workstation {name} is registered and not flagged for imaging")
    for menu in (NEVER, ALWAYS, HOTKEY):
        m = run(answer(assignment, menu, "pcbios"), choice="local")
        assert m.expanded <= {"platform", "preboot-item"}
        assert_local_boot(m, "pcbios")
    m = run(answer(assignment, NEVER, "efi"), platform="efi")
    assert len(markers(m)) == 1
    assert unquote(markers(m)[0]) == "preboot-answer: local " + " ".join(
        assignment.reason.split())


def test_examples_of_the_encodings():
    assert script.encode_arg("/images/win 10.zmg") == "/images/win%2010.zmg"
    assert script.encode_arg("a,b$c") == "a%2Cb%24c"
    assert script.encode_arg("dell/base.img") == "dell/base.img"
    assert script.encode_text("rule 'Dell lab' matches: restore ${x} || y") == \
        "rule 'Dell lab' matches: restore %24{x} %7C%7C y"
    assert script.encode_text("a\n#b  \\ 50%") == "a %23b %5C 50%25"


@settings(max_examples=300, deadline=None)
@given(image=st.text(min_size=1, max_size=60), session=st.text(min_size=1, max_size=30),
       addons=st.lists(st.text(min_size=1, max_size=20), max_size=3),
       platform=st.sampled_from(PLATFORMS), display=st.sampled_from(list(MenuDisplay)))
def test_any_directory_value_stays_one_argument(image, session, addons, platform, display):
    menu = MenuSettings(display, 2)
    for action in (unchecked(ActionKind.RESTORE, image, tuple(addons)),
                   unchecked(ActionKind.MAKE, image),
                   unchecked(ActionKind.MULTICAST, session=session)):
        result = answer(work(action), menu, platform)
        m = run(result, platform=platform or "efi", key_pressed=display is MenuDisplay.HOTKEY)
        assert m.expanded <= {"platform", "preboot-item"}
        _url, args, other = kernel(m)
        assert other == ["console=ttyS0", "console=tty0", "quiet"]
        if action.image:
            assert unquote(args["image"], errors="surrogatepass") == image
        if action.addons:
            assert [unquote(a, errors="surrogatepass") for a in args["addons"].split(",")] == \
                list(addons)
        if action.session:
            assert unquote(args["session"], errors="surrogatepass") == session
        assert last(m) == ("boot", [])
        for text in echoes(m):
            assert all(" " <= c < "\x7f" for c in text)


# ---- boot.ipxe ------------------------------------------------------------------------------

def test_boot_script_asks_policy_on_the_same_host():
    text = script.boot_script("10.0.0.1:8090")
    lines = text.splitlines()
    assert lines[0] == "#!ipxe"
    chain = next(line for line in lines if line.startswith("chain "))
    words = chain.split()
    assert words[:3] == ["chain", "--replace", "--autofree"] and words[-2:] == ["||", "goto"] \
        or words[-3:] == ["||", "goto", "failed"]
    url = words[3]
    assert url.startswith("http://10.0.0.1:8090/policy?mac=${netX/mac:hexhyp}&")
    params = [part.split("=", 1) for part in url.split("?", 1)[1].split("&")]
    assert [name for name, _ in params] == ["mac", "uuid", "ip", "platform", "arch", "ram_mb",
                                            "manufacturer", "product", "serial", "asset_tag",
                                            "hostname"]
    values = dict(params)
    # :uristring on string settings only; typed ones keep their URL-safe formatting
    assert values["uuid"] == "${uuid}" and values["ip"] == "${netX/ip}"
    assert values["ram_mb"] == "${memsize}"
    for name, setting in (("platform", "platform"), ("arch", "buildarch"),
                          ("manufacturer", "manufacturer"), ("product", "product"),
                          ("serial", "serial"), ("asset_tag", "asset"), ("hostname", "hostname")):
        assert values[name] == f"${{{setting}:uristring}}"


@pytest.mark.parametrize("platform", ["pcbios", "efi"])
def test_boot_script_runs_the_answer_or_boots_the_local_disk(platform):
    text = script.boot_script("[fd00::1]:8090")
    m = run(text, platform=platform, settings={"netX/mac": "52-54-00-12-34-56",
                                               "buildarch": "x86_64", "asset": "A 1"})
    assert m.effects[-1][0] == "chain"
    url = m.effects[-1][1][-1]
    assert url.startswith("http://[fd00::1]:8090/policy?mac=52-54-00-12-34-56&uuid=&ip=&")
    assert "&arch=x86_64&" in url and f"&platform={platform}&" in url
    m = run(text, platform=platform, failing=frozenset({"chain", "sanboot"}))
    assert markers(m) == ["preboot-answer: local the policy service at "
                          "http://[fd00::1]:8090/policy did not answer"]
    assert last(m) == ("exit", [])


def test_every_answer_is_a_well_formed_script():
    """Labels unique where jumped to, every goto target exists, nothing after the magic line
    that iPXE would read as a comment except real comments."""
    for assignment in (work(RESTORE), NOTHING):
        for menu in (NEVER, ALWAYS, HOTKEY):
            for platform in PLATFORMS:
                text = answer(assignment, menu, platform).script
                lines = text.splitlines()
                labels = [line[1:] for line in lines if line.startswith(":")]
                assert len(labels) == len(set(labels)), labels
                for target in re.findall(r"goto (\S+)", text):
                    assert target == "${preboot-item}" or target in labels, target
                assert not [line for line in lines[1:] if line.startswith("#")]
