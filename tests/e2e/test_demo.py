"""The demo a newcomer runs (`bash scripts/demo.sh`) works: a BIOS VM and a UEFI VM with Secure
Boot on are imaged over the network and then boot the image, and nothing is left behind."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import netlab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]


def test_the_demo_images_both_machines_and_they_boot_the_image():
    if netlab.missing_prerequisites():
        pytest.skip("demo: " + "; ".join(netlab.missing_prerequisites()))
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout.split())
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=netlab.REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for line in ("| preboot-answer: imaging restore demo/sample.img",
                 "| Fetching Netboot Image grubx64.efi",
                 "lockdown [integrity]",
                 "| preboot-demo: the restored disk boots (BIOS)",
                 "| preboot-demo: the restored disk boots (UEFI, Secure Boot)",
                 "demo done: both machines were imaged over the network and boot the image"):
        assert line in out, (line, out[-3000:])
    # every step has its time
    assert len(re.findall(r"^\[\s*\d+\.\d s\]   done in \d+\.\d s$", out, re.M)) == 9, out
    work = re.search(r"work folder (\S+)", out)[1]
    assert not Path(work).exists()
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split())
    assert not {ns for ns in after - before if ns.startswith("pdemo")}
