"""prebootpolicyd/grubscript.py: GRUB answers, and that directory text cannot become GRUB
commands."""

from __future__ import annotations

import re

import pytest

from common.policy.model import (Action, ActionKind, MenuDisplay, MenuSettings,
                                 WorkAssignment)
from common.daemon.config import defaults
from common.daemon.runner import CommonSettings
from prebootpolicyd import grubscript
from prebootpolicyd.config import SCHEMA, make_settings

NEVER = MenuSettings(MenuDisplay.NEVER, 5)


@pytest.fixture
def settings():
    values = defaults(SCHEMA)
    return make_settings(values, CommonSettings.from_values(values))


def work(image: str = "lab/base.img", **kw) -> WorkAssignment:
    return WorkAssignment(Action(ActionKind.RESTORE, image, **kw), "rule 'Lab'",
                          "rule 'Lab' matches")


def test_bootstrap_asks_through_tftp_with_the_facts_and_exits_without_an_answer():
    text = grubscript.bootstrap()
    assert "set root=(tftp,${net_default_server})" in text
    source = re.search(r'source "(/preboot/policy\.grub/[^"]+)"', text)
    assert source and source[1].startswith("/preboot/policy.grub/mac=${net_default_mac}/")
    for fact in ("ip=${net_default_ip}", "platform=${grub_platform}",
                 "product=${preboot_product}", "serial=${preboot_serial}"):
        assert fact in source[1]
    assert "smbios --type 1 --get-string 5 --set preboot_product" in text
    tail = text[text.index("source"):]
    assert "preboot-answer: local the policy service did not answer" in tail
    assert tail.rstrip().endswith("fi") and "  exit" in tail


def test_work_boots_the_environment_from_tftp(settings):
    answer = grubscript.answer_script(settings, work(), NEVER, "192.168.77.2",
                                      "525400AB0001", "TOKEN.x-y_z")
    assert answer.kind == "imaging"
    lines = answer.script.splitlines()
    assert lines[0] == "echo 'preboot-answer: imaging restore lab/base.img'"
    linux = next(line for line in lines if line.startswith("if linux "))
    assert linux.startswith("if linux /preboot/linux console=ttyS0 console=tty0 quiet ")
    for arg in ("preboot.server=192.168.77.2", "preboot.work=restore",
                "preboot.image=lab/base.img", "preboot.mac=525400AB0001",
                "preboot.token=TOKEN.x-y_z"):
        assert arg in linux.removesuffix("; then").split()
    assert "  if initrd /preboot/initrd; then boot; fi" in lines
    assert lines[-1] == "exit"                    # the environment did not start: the disk


def test_no_work_exits_to_the_firmware(settings):
    answer = grubscript.answer_script(settings, WorkAssignment(Action(ActionKind.NONE),
                                                                "policy", "no rule matches"),
                                      NEVER, "10.0.0.2", "AA", None)
    assert answer.kind == "local"
    assert answer.script == "echo 'preboot-answer: local no rule matches'\nexit\n"


@pytest.mark.parametrize("menu", [MenuSettings(MenuDisplay.ALWAYS, 7),
                                  MenuSettings(MenuDisplay.HOTKEY, 3)])
def test_menu_entries_with_the_default_and_timeout(settings, menu):
    answer = grubscript.answer_script(settings, work(), menu, "10.0.0.2", "AA", "T")
    text = answer.script
    assert answer.kind == "menu"
    assert "set preboot_answer=menu" in text             # the bootstrap then shows it
    assert f"set timeout={menu.timeout_s}" in text and "set default=start" in text
    for entry in ("menuentry 'Start Imaging' --id start {",
                  "menuentry 'Imaging Maintenance' --id maintenance {",
                  "menuentry 'Exit (boot the local disk)' --id local {"):
        assert entry in text
    assert text.count("{") == text.count("}") == 3


# (double quotes and control characters never get this far: the policy model refuses them)
HOSTILE = [
    "lab/x'; reboot; echo '",
    "lab/$(reboot).img",
    "lab/${root}/x",
    "lab/a}{b",
    "lab/x;exit",
    "lab/ä ö.img",
]


@pytest.mark.parametrize("image", HOSTILE)
def test_directory_text_cannot_make_a_command(settings, image):
    answer = grubscript.answer_script(settings, work(image, addons=(image,)), NEVER,
                                      "10.0.0.2", "AA", "T")
    lines = answer.script.splitlines()
    # exactly the lines of an ordinary answer, whatever the image's name
    plain = grubscript.answer_script(settings, work("lab/x.img", addons=("lab/x.img",)), NEVER,
                                     "10.0.0.2", "AA", "T").script.splitlines()
    assert len(lines) == len(plain)
    echo = lines[0]
    assert re.fullmatch(r"echo '[^']*'", echo), echo
    linux = next(line for line in lines if line.startswith("if linux "))
    words = linux.removesuffix("; then").split()
    image_args = [w for w in words if w.startswith(("preboot.image=", "preboot.addons="))]
    assert len(image_args) == 2
    for word in image_args:
        assert re.fullmatch(r"preboot\.\w+=[A-Za-z0-9\-._~/:@+=\[\]%,]+", word), word


@pytest.mark.parametrize("key,value", [("GrubKernel", "a b"), ("GrubKernel", "../linux"),
                                       ("GrubInitrd", "x;reboot"), ("GrubInitrd", "")])
def test_grub_paths_must_be_plain_words(key, value):
    from common.errors import SettingError
    values = defaults(SCHEMA)
    values[key] = value
    with pytest.raises(SettingError) as caught:
        make_settings(values, CommonSettings.from_values(values))
    assert caught.value.key == key


def test_fallback_maintenance_and_local(settings):
    local = grubscript.fallback_script(settings, "directory unavailable", "10.0.0.2", "AA")
    assert local.script.startswith("echo 'preboot-answer: local directory unavailable'")
    maintenance = grubscript.fallback_script(
        settings.__class__(**{**settings.__dict__, "fallback": "maintenance"}),
        "directory unavailable", "10.0.0.2", "AA", "T")
    assert "preboot.work=maintenance" in maintenance.script
