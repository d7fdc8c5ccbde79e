"""tftpd works the same on uvloop (the default when installed) and on asyncio's own loop."""

import hashlib
import os
import subprocess

import pytest


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_download_on_each_event_loop(tftpd_factory, tftp_root, tmp_path, loop):
    content = os.urandom(2 * 1024 * 1024 + 7)
    (tftp_root / "file.bin").write_bytes(content)
    daemon = tftpd_factory(_env={"PREBOOT_EVENT_LOOP": loop})
    port = daemon.port
    out = tmp_path / "out.bin"
    subprocess.run(["curl", "-sS", "--tftp-blksize", "1468", "-o", str(out),
                    f"tftp://127.0.0.1:{port}/file.bin"], check=True, timeout=60)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(content).digest()
    windowed = tmp_path / "windowed.bin"
    subprocess.run(["atftp", "--option", "blksize 1468", "--option", "windowsize 8", "-g",
                    "-r", "file.bin", "-l", str(windowed), "127.0.0.1", str(port)],
                   check=True, timeout=60, capture_output=True)
    assert windowed.read_bytes() == content
    assert f"event loop {loop}" in daemon.log()
    assert daemon.counters()["transfers_completed"] == 2
