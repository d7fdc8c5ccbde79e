"""The iPXE scripts policyd answers with (pure: settings and decisions in, script text out).

Every answer starts its path with one marker line on the console, which the end-to-end tests
read on the serial console:

    preboot-answer: imaging <what>      the imaging environment is booted to do <what>
    preboot-answer: menu                the Preboot menu is shown
    preboot-answer: local <reason>      the machine boots its own disk

iPXE's script language has no quoting: a line is split at blanks, a word starting with '#'
starts a comment, the words '||', '&&' and ';' end a command, '${...}' expands a setting, and a
trailing backslash continues the line. Nothing that comes from the directory (image paths,
session names, reasons) is written into a script as is:

* kernel arguments (preboot.image=, preboot.addons=, preboot.session=, ...) are percent-encoded
  (RFC 3986, UTF-8) except for ``A-Z a-z 0-9 - . _ ~ / : @ + = [ ]``; the imaging environment
  decodes them. ',' is encoded inside values, since it separates add-on images.
* text echoed on the console keeps its words, but '$', '#', '\\', ';', '&', '|', '%', control
  characters and anything outside printable ASCII are percent-encoded.

So no directory value can add a command, expand a setting or end a line.
"""

from __future__ import annotations

import re

from dataclasses import dataclass

from common.policy.model import Action, ActionKind, MenuDisplay, MenuSettings, WorkAssignment

from .config import Settings

MAGIC = "#!ipxe"
MARKER = "preboot-answer:"
CHOICE_SETTING = "preboot-item"
LOCAL_BIOS = "sanboot --no-describe --drive 0x80 || exit"
LOCAL_EFI = "exit"
INITRD_NAME = "initrd"      # the imaging initrd's image name in iPXE, and initrd= for the kernel
# Platform unknown: decide on the machine. `iseq` fails on EFI, so `exit` runs; on BIOS a
# failed sanboot falls through to `exit` as well.
LOCAL_ANY = "iseq ${platform} pcbios && sanboot --no-describe --drive 0x80 || exit"

# What may stay as it is: in a kernel argument, these; in echoed text, printable ASCII but
# these. Everything else is %-encoded (a regular expression: a token is 200 characters, and
# a loop per character was a tenth of an answer's CPU).
_ARG_UNSAFE = re.compile(r"[^A-Za-z0-9\-._~/:@+=\[\]]")
_TEXT_UNSAFE = re.compile(r"[^\x21-\x7e]|[$#\\;&|%]")


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def _percent_match(match: re.Match) -> str:
    return _percent(match.group())


def encode_arg(value: str) -> str:
    """A value for a kernel argument: one word, nothing iPXE or the kernel would read."""
    return _ARG_UNSAFE.sub(_percent_match, value)


def encode_text(text: str) -> str:
    """Text for `echo`: words kept, single blanks between them, nothing iPXE interprets."""
    return " ".join(_TEXT_UNSAFE.sub(_percent_match, w) for w in text.split())


def local_boot(platform: str | None) -> str:
    """Boot the local disk the right way for the firmware iPXE runs on."""
    if platform == "pcbios":
        return LOCAL_BIOS
    if platform == "efi":
        return LOCAL_EFI
    return LOCAL_ANY


@dataclass(frozen=True)
class Answer:
    kind: str                        # "imaging", "local", "menu" (shown) or "hotkey" (offered)
    script: str


def _substitute(template: str, server: str, port: int) -> str:
    return template.replace("{server}", server).replace("{port}", str(port))


def kernel_arguments(settings: Settings, work: str, action: Action | None, mac: str | None,
                     token: str | None, imaging_server: str) -> list[str]:
    """The imaging environment's kernel command line (KernelArgs, then the preboot.* words,
    each one plain word), the same for iPXE's and GRUB's answers."""
    args = [settings.kernel_args] if settings.kernel_args else []
    args += [f"preboot.server={encode_arg(imaging_server)}", f"preboot.work={encode_arg(work)}"]
    if action is not None and action.image:
        args.append(f"preboot.image={encode_arg(action.image)}")
    if action is not None and action.addons:
        args.append("preboot.addons=" + ",".join(encode_arg(a) for a in action.addons))
    if action is not None and action.session:
        args.append(f"preboot.session={encode_arg(action.session)}")
    if mac:
        args.append(f"preboot.mac={encode_arg(mac)}")
    if token:
        args.append(f"preboot.token={encode_arg(token)}")
    if settings.imaging_server_pin:
        args.append(f"preboot.serverpin={settings.imaging_server_pin}")
    return args


def imaging_lines(settings: Settings, work: str, action: Action | None, server: str,
                  mac: str | None, token: str | None = None, port: int | None = None
                  ) -> list[str]:
    """kernel + initrd + boot for the imaging environment; on failure, to :failed. token: the
    machine's capability to ask the imaging server for its work (preboot.token); port: the
    port iPXE reached this service on ({port}; None: the configured Port)."""
    port = settings.port if port is None else port
    imaging_server = _substitute(settings.imaging_server, server, port) or server
    args = kernel_arguments(settings, work, action, mac, token, imaging_server)
    kernel = _substitute(settings.imaging_kernel, server, port)
    initrd = _substitute(settings.imaging_initrd, server, port)
    # A UEFI kernel (EFI stub) finds its initrd only by the name on its command line (iPXE
    # offers downloaded images by name); BIOS kernels ignore the argument.
    return [f"kernel {kernel} initrd={INITRD_NAME} {' '.join(args)} || goto failed",
            f"initrd --name {INITRD_NAME} {initrd} || goto failed",
            "boot || goto failed"]


def _failed_lines(platform: str | None) -> list[str]:
    return [":failed",
            "echo Preboot: cannot start the imaging environment; booting the local disk",
            local_boot(platform)]


def _direct_lines(settings: Settings, assignment: WorkAssignment, platform: str | None,
                  server: str, mac: str | None, token: str | None, port: int | None
                  ) -> list[str]:
    """The answer without a menu: the imaging environment, or the local disk."""
    if assignment.has_work:
        action = assignment.action
        return ([f"echo {MARKER} imaging {encode_text(action.describe())}"]
                + imaging_lines(settings, action.kind.value, action, server, mac, token, port))
    return [f"echo {MARKER} local {encode_text(assignment.reason)}", local_boot(platform)]


def _menu_lines(settings: Settings, assignment: WorkAssignment, menu: MenuSettings,
                platform: str | None, server: str, mac: str | None, token: str | None,
                port: int | None) -> list[str]:
    default = "start" if assignment.has_work else "local"
    timeout = f" --timeout {menu.timeout_s * 1000}" if menu.timeout_s else ""
    if assignment.has_work:
        action = assignment.action
        start = ([f"echo Preboot menu: {encode_text(action.describe())}"]
                 + imaging_lines(settings, action.kind.value, action, server, mac, token,
                                 port))
    else:
        start = (["echo Preboot menu: imaging, as the imaging server decides"]
                 + imaging_lines(settings, "auto", None, server, mac, token, port))
    return ([f"echo {MARKER} menu",
             "menu Preboot Menu",
             "item start Start Imaging",
             "item maintenance Imaging Maintenance",
             "item local Exit (boot the local disk)",
             f"choose{timeout} --default {default} {CHOICE_SETTING} || goto local",
             f"goto ${{{CHOICE_SETTING}}}",
             ":start"] + start
            + [":maintenance", "echo Preboot menu: imaging maintenance"]
            + imaging_lines(settings, ActionKind.MAINTENANCE.value, None, server, mac, token,
                            port)
            + [":local", "echo Preboot menu: booting the local disk", local_boot(platform)])


def _script(lines: list[str], platform: str | None) -> str:
    """The whole script; a :failed section when some line may jump there."""
    if any(line.endswith("|| goto failed") for line in lines):
        lines = lines + _failed_lines(platform)
    return "\n".join([MAGIC] + lines) + "\n"


def answer_script(settings: Settings, assignment: WorkAssignment, menu: MenuSettings,
                  platform: str | None, server: str, mac: str | None,
                  token: str | None = None, port: int | None = None) -> Answer:
    """The answer to a /policy query. `server` and `port` are the host and port iPXE reached
    us on ({server}, {port}; port None: the configured Port); token goes on every kernel line
    of the imaging environment (preboot.token)."""
    if menu.display is MenuDisplay.ALWAYS:
        lines = _menu_lines(settings, assignment, menu, platform, server, mac, token, port)
        return Answer("menu", _script(lines, platform))
    if menu.display is MenuDisplay.HOTKEY and menu.timeout_s > 0:
        key = settings.hot_key
        prompt = (f"prompt --key {key.ipxe} --timeout {menu.timeout_s * 1000} "
                  f"Press {key.label} for the Preboot menu... && goto menu || goto answer")
        lines = ([prompt, ":answer"]
                 + _direct_lines(settings, assignment, platform, server, mac, token, port)
                 + [":menu"] + _menu_lines(settings, assignment, menu, platform, server, mac,
                                           token, port))
        return Answer("hotkey", _script(lines, platform))
    # NEVER, or a hot-key prompt of zero seconds (nobody could press the key): no menu.
    lines = _direct_lines(settings, assignment, platform, server, mac, token, port)
    return Answer("imaging" if assignment.has_work else "local", _script(lines, platform))


def fallback_script(settings: Settings, reason: str, platform: str | None, server: str,
                    mac: str | None, token: str | None = None, port: int | None = None
                    ) -> Answer:
    """The answer when the directory cannot be read (FallbackAnswer), without any menu."""
    if settings.fallback == "maintenance":
        action = Action(ActionKind.MAINTENANCE)
        lines = ([f"echo {MARKER} imaging {encode_text(action.describe())}",
                  f"echo Preboot: {encode_text(reason)}"]
                 + imaging_lines(settings, action.kind.value, action, server, mac, token,
                                 port))
        return Answer("imaging", _script(lines, platform))
    lines = [f"echo {MARKER} local {encode_text(reason)}", local_boot(platform)]
    return Answer("local", _script(lines, platform))


def boot_script(authority: str, scheme: str = "http") -> str:
    """boot.ipxe: the static first script. It sends what iPXE knows about the machine to
    /policy on the same scheme, host and port and runs the answer in its place; if that fails, it says so
    and boots the local disk.

    String settings are sent with the :uristring type (older iPXE encodes them with it; newer
    iPXE encodes every URL itself when it sends it). Typed settings use their own formatting,
    which is already URL-safe: :uristring would send their raw bytes (a MAC's six bytes, an
    IPv4 address's four). The MAC goes first: a parameter given twice counts the first time.
    ${memsize} is empty on builds without memory map settings; the service takes that as
    unknown.
    """
    base = f"{scheme}://{authority}/policy"
    params = [
        ("mac", "${netX/mac:hexhyp}"),
        ("uuid", "${uuid}"),
        ("ip", "${netX/ip}"),
        ("platform", "${platform:uristring}"),
        ("arch", "${buildarch:uristring}"),
        ("ram_mb", "${memsize}"),
        ("manufacturer", "${manufacturer:uristring}"),
        ("product", "${product:uristring}"),
        ("serial", "${serial:uristring}"),
        ("asset_tag", "${asset:uristring}"),
        ("hostname", "${hostname:uristring}"),
    ]
    url = base + "?" + "&".join(f"{name}={value}" for name, value in params)
    lines = [
        MAGIC,
        "# Preboot Services: ask the Preboot Policy Service what this machine should do",
        "# (image it, show the Preboot menu, or boot its own disk), then do it.",
        f"echo Preboot: asking {base}",
        f"chain --replace --autofree {url} || goto failed",
        ":failed",
        f"echo {MARKER} local the policy service at {base} did not answer",
        LOCAL_ANY,
    ]
    return "\n".join(lines) + "\n"
