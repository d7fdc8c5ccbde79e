"""The GRUB scripts policyd answers Secure Boot clients with (pure: settings and decisions in,
script text out); the sibling of script.py, which answers iPXE.

A Secure Boot machine boots shim, then the distribution's signed network GRUB
(docs/secure-boot.md). That GRUB cannot speak HTTP (no http module, and unsigned modules do not
load), so it reaches policyd through tftpd: it reads `grub/grub.cfg` over TFTP, which tftpd
fetches from /grub.cfg here (`bootstrap()`), and that script collects what GRUB knows about the
machine and `source`s `/preboot/policy.grub/mac=.../product=...`, which tftpd turns into
GET /policy.grub?mac=...&product=... (tftpd/gateway.py). The answer (`answer_script()`) is the
same decision an iPXE client gets (common/policy `work_for`, the same rules, menu and work
capability), written for GRUB:

    preboot-answer: imaging <what> | menu | local <reason>   (the console marker, as for iPXE)

GRUB's script language splits words at blanks and reads quotes, `$`, `;`, `|`, `&`, `<`, `>`,
`{`, `}` and `\\`; inside single quotes nothing but the closing quote is special. So:

* kernel arguments are script.py's percent-encoded words (`A-Z a-z 0-9 - . _ ~ / : @ + = [ ]`
  and '%' escapes only), which GRUB reads as plain words;
* text shown (echo, menu titles) is script.py's console text with `'` also percent-encoded,
  inside single quotes.

Nothing that comes from the directory can add a command. The kernel and initrd come from the
TFTP server GRUB booted from (GrubKernel, GrubInitrd: paths there); GRUB checks the kernel's
signature through shim, and the initrd needs none.
"""

from __future__ import annotations

from common.policy.model import Action, ActionKind, MenuDisplay, MenuSettings, WorkAssignment

from .config import Settings
from .script import MARKER, Answer, encode_text, kernel_arguments

LOCAL = "exit"     # back to the firmware, which boots its next boot option (the disk)
# What the bootstrap sends, in the order /policy reads them (mac first: it counts once).
# GRUB's smbios module reads the SMBIOS tables; type 1 is the System Information structure
# (SMBIOS 3.x section 7.2: manufacturer at offset 4, product 5, serial 7, UUID 8). Not the
# enclosure's asset tag (type 3): GRUB prints an error for a string a machine leaves out.
FACTS = (
    ("mac", "${net_default_mac}"),
    ("uuid", "${preboot_uuid}"),
    ("ip", "${net_default_ip}"),
    ("platform", "${grub_platform}"),
    ("arch", "${grub_cpu}"),
    ("manufacturer", "${preboot_manufacturer}"),
    ("product", "${preboot_product}"),
    ("serial", "${preboot_serial}"),
)
POLICY_PATH = "/preboot/policy.grub"


def grub_text(text: str) -> str:
    """Text for echo and menu titles: one single-quoted GRUB word that shows `text`."""
    return "'" + encode_text(text).replace("'", "%27") + "'"


def bootstrap() -> str:
    """grub/grub.cfg: ask the policy for this machine, then run the answer (source keeps its
    menu entries in this menu). Without an answer it says so and exits: the firmware boots
    the disk."""
    path = POLICY_PATH + "".join(f"/{name}={value}" for name, value in FACTS)
    return "\n".join([
        "# Preboot Services: ask the Preboot Policy Service what this machine should do",
        "# (served by tftpd from prebootpolicyd's /grub.cfg; docs/secure-boot.md)",
        "set timeout=0",
        "smbios --type 1 --get-string 4 --set preboot_manufacturer",
        "smbios --type 1 --get-string 5 --set preboot_product",
        "smbios --type 1 --get-string 7 --set preboot_serial",
        "smbios --type 1 --get-uuid 8 --set preboot_uuid",
        "set root=(tftp,${net_default_server})",
        'echo "Preboot: asking the policy service for ${net_default_mac}"',
        f'source "{path}"',
        # an answer with a menu returns here with its entries defined: GRUB shows them when
        # this script ends; any other answer boots or exits itself
        'if [ "$preboot_answer" != menu ]; then',
        f"  echo '{MARKER} local the policy service did not answer'",
        f"  {LOCAL}",
        "fi",
    ]) + "\n"


def imaging_lines(settings: Settings, work: str, action: Action | None, mac: str | None,
                  token: str | None, imaging_server: str) -> list[str]:
    """linux + initrd + boot for the imaging environment; on failure, say so and exit."""
    args = kernel_arguments(settings, work, action, mac, token, imaging_server)
    # the paths are plain words (config.py checks them), absolute on $root: GRUB's TFTP server
    return [f"if linux {settings.grub_kernel} {' '.join(args)}; then",
            f"  if initrd {settings.grub_initrd}; then boot; fi",
            "fi",
            "echo 'Preboot: cannot start the imaging environment; booting the local disk'",
            LOCAL]


def _direct_lines(settings: Settings, assignment: WorkAssignment, mac: str | None,
                  token: str | None, imaging_server: str) -> list[str]:
    if assignment.has_work:
        action = assignment.action
        return ([f"echo {grub_text(f'{MARKER} imaging {action.describe()}')}"]
                + imaging_lines(settings, action.kind.value, action, mac, token,
                                imaging_server))
    return [f"echo {grub_text(f'{MARKER} local {assignment.reason}')}", LOCAL]


def _entry(title: str, entry_id: str, lines: list[str]) -> list[str]:
    return ([f"menuentry {grub_text(title)} --id {entry_id} {{"]
            + [f"  {line}" for line in lines] + ["}"])


def _menu_lines(settings: Settings, assignment: WorkAssignment, menu: MenuSettings,
                default: str, mac: str | None, token: str | None,
                imaging_server: str) -> list[str]:
    if assignment.has_work:
        action = assignment.action
        start = ([f"echo {grub_text(f'Preboot menu: {action.describe()}')}"]
                 + imaging_lines(settings, action.kind.value, action, mac, token,
                                 imaging_server))
    else:
        start = (["echo 'Preboot menu: imaging, as the imaging server decides'"]
                 + imaging_lines(settings, "auto", None, mac, token, imaging_server))
    maintenance = (["echo 'Preboot menu: imaging maintenance'"]
                   + imaging_lines(settings, ActionKind.MAINTENANCE.value, None, mac, token,
                                   imaging_server))
    # GRUB counts the menu timeout in seconds; -1 waits for a key
    timeout = menu.timeout_s if menu.timeout_s > 0 else -1
    return ([f"echo {grub_text(f'{MARKER} menu')}",
             "set preboot_answer=menu",
             f"set timeout={timeout}",
             f"set default={default}"]
            + _entry("Start Imaging", "start", start)
            + _entry("Imaging Maintenance", "maintenance", maintenance)
            + _entry("Exit (boot the local disk)", "local",
                     ["echo 'Preboot menu: booting the local disk'", LOCAL]))


def answer_script(settings: Settings, assignment: WorkAssignment, menu: MenuSettings,
                  server: str, mac: str | None, token: str | None = None) -> Answer:
    """The answer to /policy.grub. `server` is the address the client reached us by (through
    tftpd: the boot server's), for {server} in ImagingServer. GRUB has no hot-key prompt
    before its menu: a HOTKEY menu is shown as a menu that counts down to the direct answer."""
    imaging_server = settings.imaging_server.replace("{server}", server) or server
    show_menu = menu.display is MenuDisplay.ALWAYS or (
        menu.display is MenuDisplay.HOTKEY and menu.timeout_s > 0)
    if show_menu:
        default = "start" if assignment.has_work else "local"
        lines = _menu_lines(settings, assignment, menu, default, mac, token, imaging_server)
        return Answer("menu", "\n".join(lines) + "\n")
    lines = _direct_lines(settings, assignment, mac, token, imaging_server)
    return Answer("imaging" if assignment.has_work else "local", "\n".join(lines) + "\n")


def fallback_script(settings: Settings, reason: str, server: str, mac: str | None,
                    token: str | None = None) -> Answer:
    """The answer when the directory cannot be read (FallbackAnswer)."""
    imaging_server = settings.imaging_server.replace("{server}", server) or server
    if settings.fallback == "maintenance":
        action = Action(ActionKind.MAINTENANCE)
        lines = ([f"echo {grub_text(f'{MARKER} imaging {action.describe()}')}",
                  f"echo {grub_text(f'Preboot: {reason}')}"]
                 + imaging_lines(settings, action.kind.value, action, mac, token,
                                 imaging_server))
        return Answer("imaging", "\n".join(lines) + "\n")
    return Answer("local", "\n".join([f"echo {grub_text(f'{MARKER} local {reason}')}",
                                      LOCAL]) + "\n")
