"""Nothing escapes the TFTP root; nothing is written unless allowed, and only where allowed.

Reads: '..', absolute paths, backslashes, control characters, symlinks out of the root (file and
folder), case-insensitive lookup. Writes: refused by default; with AllowWrite only into
UploadDir, never over an existing file unless AllowOverwrite, never through a symlink, and an
interrupted upload leaves neither the final name nor a temporary file behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftpclients as tc  # noqa: E402
from tftpclients import OP_DATA, OP_ERROR, RawClient  # noqa: E402

ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL, ERR_ILLEGAL, ERR_EXISTS = 0, 1, 2, 3, 4, 6
TEMP_PREFIX = ".tftp-upload-"


def first_reply(port: int, filename: str | bytes, opcode: int = tc.OP_RRQ, mode="octet"):
    with RawClient(port) as client:
        client.send(tc.request(opcode, filename, mode))
        reply = client.recv(10)
        assert reply is not None, f"no answer to {filename!r}"
        if reply.opcode == OP_DATA:
            client.send_tid(tc.error(0, "enough"))
        return reply


def raw_download(port: int, filename: str) -> bytes:
    with RawClient(port) as client:
        return client.download(filename)


def assert_refused(daemon, filename, code: int, counted_as_escape: bool,
                   opcode: int = tc.OP_RRQ) -> tc.Packet:
    before = daemon.counters()
    reply = first_reply(daemon.port, filename, opcode)
    assert reply.opcode == OP_ERROR, f"{filename!r} was not refused: {reply!r}"
    assert reply.code == code, f"{filename!r}: {reply!r}"
    after = daemon.counters()
    escapes = after["refused_paths"] - before["refused_paths"]
    assert escapes == (1 if counted_as_escape else 0), f"{filename!r}: refused_paths {escapes}"
    assert after["transfers_started"] == before["transfers_started"]
    return reply


def no_temp_files(folder: Path) -> list[str]:
    return [n for _, _, files in os.walk(folder) for n in files if n.startswith(TEMP_PREFIX)]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the root, with a secret the daemon must never serve."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret").write_text("top secret\n")
    return folder


# ---- reads: traversal ------------------------------------------------------------------------

TRAVERSALS = ["../etc/passwd", "a/../../x", "..\\..\\x", "sub/../../../etc/passwd", "..",
              "./../etc/passwd", "sub\\..\\..\\etc\\passwd", "../outside/secret",
              "/../outside/secret", "sub/..", "...//../x"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_is_refused(tftpd, tftp_root, outside, name):
    (tftp_root / "sub").mkdir()
    reply = assert_refused(tftpd, name, ERR_ACCESS, counted_as_escape=True)
    assert "Access violation" in reply.message
    assert tftpd.counters()["errors"].get("access_violation") == 1


def test_traversal_with_real_clients(tftpd, tftp_root, outside, tmp_path):
    port = tftpd.port
    secret = (outside / "secret").read_bytes()
    hpa_out = tmp_path / "hpa.out"
    result = tc.tftp_hpa_get(port, "../outside/secret", hpa_out)
    assert "Error code 2: Access violation" in tc.output_of(result), tc.output_of(result)
    assert not hpa_out.exists() or hpa_out.read_bytes() != secret
    curl_out = tmp_path / "curl.out"
    result = tc.curl_get(port, "../outside/secret", curl_out, extra=["--path-as-is"])
    assert result.returncode == tc.CURL_TFTP_PERM, tc.output_of(result)
    assert not curl_out.exists() or curl_out.read_bytes() != secret
    result = tc.atftp_get(port, "../../../../../../etc/passwd", tmp_path / "atftp.out")
    assert result.returncode != 0
    assert "Access violation" in tc.output_of(result), tc.output_of(result)
    assert tftpd.counters()["refused_paths"] == 3


def test_absolute_path_maps_inside_the_root(tftpd, tftp_root):
    reply = assert_refused(tftpd, "/etc/passwd", ERR_NOT_FOUND, counted_as_escape=False)
    assert reply.message == "File not found"
    (tftp_root / "etc").mkdir()
    (tftp_root / "etc" / "passwd").write_bytes(b"the root's own etc/passwd\n")
    assert raw_download(tftpd.port, "/etc/passwd") == b"the root's own etc/passwd\n"
    # A request that spells out the root itself names the same file.
    assert raw_download(tftpd.port, f"{tftp_root}/etc/passwd") == b"the root's own etc/passwd\n"


def test_spelled_out_root_through_a_symlinked_root(tftpd_factory, tftp_root, tmp_path):
    (tftp_root / "pxelinux.0").write_bytes(b"pxe\n")
    link = tmp_path / "srv-tftpboot"
    os.symlink(tftp_root, link)
    daemon = tftpd_factory(Root=str(link))
    assert raw_download(daemon.port, "pxelinux.0") == b"pxe\n"
    assert raw_download(daemon.port, f"{tftp_root}/pxelinux.0") == b"pxe\n"
    assert raw_download(daemon.port, f"{link}/pxelinux.0") == b"pxe\n"


def test_backslash_is_a_separator(tftpd, tftp_root, tmp_path):
    digest = tc.make_file(tftp_root / "sub" / "dir" / "file.bin", 3000)
    assert tc.sha256_bytes(raw_download(tftpd.port, "sub\\dir\\file.bin")) == digest
    out = tmp_path / "hpa.bin"
    result = tc.tftp_hpa_get(tftpd.port, "\\sub\\dir\\file.bin", out)
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    assert tc.sha256(out) == digest


CONTROL_NAMES = ["boot\x01.ipxe", "boot\n.ipxe", "boot\r.ipxe", "\tboot.ipxe", "boot\x7f.ipxe",
                 "boot.ipxe\x1b[2J"]


@pytest.mark.parametrize("name", CONTROL_NAMES, ids=[repr(n) for n in CONTROL_NAMES])
def test_control_characters_are_refused(tftpd, tftp_root, name):
    (tftp_root / "boot.ipxe").write_text("#!ipxe\n")
    (tftp_root / name).write_text("a file whose name holds a control character\n")
    reply = assert_refused(tftpd, name, ERR_ACCESS, counted_as_escape=True)
    assert "control character" in reply.message


def test_embedded_nul_does_not_smuggle_a_name(tftpd, tftp_root):
    """'boot.ipxe\\0../../etc/passwd\\0octet\\0': the NUL ends the name, the rest is a bad mode."""
    (tftp_root / "boot.ipxe").write_text("#!ipxe\n")
    before = tftpd.counters()
    reply = first_reply(tftpd.port, b"boot.ipxe\x00../../etc/passwd", mode="octet")
    assert reply.opcode == OP_ERROR and reply.code == ERR_ILLEGAL, reply
    after = tftpd.counters()
    assert after["malformed_packets"] == before["malformed_packets"] + 1
    assert after["transfers_started"] == before["transfers_started"]


# ---- reads: symlinks --------------------------------------------------------------------------

def test_symlinks_out_of_the_root_are_refused(tftpd, tftp_root, outside):
    os.symlink(outside / "secret", tftp_root / "file-link")
    os.symlink(outside, tftp_root / "dir-link")
    os.symlink("../outside/secret", tftp_root / "relative-link")
    (tftp_root / "sub").mkdir()
    os.symlink("../../outside", tftp_root / "sub" / "deep-link")
    os.symlink("/etc/passwd", tftp_root / "passwd")
    os.symlink(tftp_root / "file-link", tftp_root / "chain-link")   # inside -> inside -> out
    for name in ["file-link", "dir-link/secret", "relative-link", "sub/deep-link/secret",
                 "passwd", "chain-link"]:
        reply = assert_refused(tftpd, name, ERR_ACCESS, counted_as_escape=True)
        assert "outside" in reply.message, reply.message
    assert tftpd.counters()["refused_paths"] == 6


def test_symlinks_inside_the_root_are_served(tftpd, tftp_root):
    digest = tc.make_file(tftp_root / "images" / "real.bin", 5000)
    os.symlink("images/real.bin", tftp_root / "file-link")
    os.symlink(tftp_root / "images", tftp_root / "dir-link")
    os.symlink(tftp_root / "file-link", tftp_root / "chain-link")
    os.symlink("images", tftp_root / "relative-dir-link")
    names = ["file-link", "dir-link/real.bin", "chain-link", "relative-dir-link/real.bin"]
    for name in names:
        assert tc.sha256_bytes(raw_download(tftpd.port, name)) == digest, name
    counters = tc.wait_counters(tftpd, lambda c: c["transfers_completed"] == len(names))
    assert counters["refused_paths"] == 0


def test_symlink_to_a_folder_is_not_a_file(tftpd, tftp_root):
    (tftp_root / "folder").mkdir()
    reply = assert_refused(tftpd, "folder", ERR_ACCESS, counted_as_escape=False)
    assert "not a regular file" in reply.message


# ---- reads: case-insensitive lookup ---------------------------------------------------------

def make_case_tree(root: Path) -> dict[str, str]:
    return {
        "BOOT.IPXE": tc.make_file(root / "BOOT.IPXE", 700),
        "Sub/PXELinux.CFG/Default": tc.make_file(root / "Sub" / "PXELinux.CFG" / "Default", 300),
    }


def test_case_insensitive_yes_finds_other_case(tftpd_factory, tftp_root, outside):
    hashes = make_case_tree(tftp_root)
    os.symlink(outside / "secret", tftp_root / "SECRET-LINK")
    daemon = tftpd_factory(CaseInsensitive=True)
    assert tc.sha256_bytes(raw_download(daemon.port, "boot.ipxe")) == hashes["BOOT.IPXE"]
    assert tc.sha256_bytes(raw_download(daemon.port, "sub/pxelinux.cfg/default")) == \
        hashes["Sub/PXELinux.CFG/Default"]
    assert tc.sha256_bytes(raw_download(daemon.port, "SUB\\PXELINUX.CFG\\DEFAULT")) == \
        hashes["Sub/PXELinux.CFG/Default"]
    # The case-insensitive match is still confined to the root.
    assert_refused(daemon, "secret-link", ERR_ACCESS, counted_as_escape=True)
    assert_refused(daemon, "../OUTSIDE/SECRET", ERR_ACCESS, counted_as_escape=True)


def test_case_insensitive_prefers_the_exact_name(tftpd_factory, tftp_root):
    (tftp_root / "a.txt").write_bytes(b"lower\n")
    (tftp_root / "A.TXT").write_bytes(b"upper\n")
    daemon = tftpd_factory(CaseInsensitive=True)
    assert raw_download(daemon.port, "a.txt") == b"lower\n"
    assert raw_download(daemon.port, "A.TXT") == b"upper\n"


def test_case_insensitive_no_does_not(tftpd_factory, tftp_root, tmp_path):
    make_case_tree(tftp_root)
    daemon = tftpd_factory(CaseInsensitive=False)
    assert_refused(daemon, "boot.ipxe", ERR_NOT_FOUND, counted_as_escape=False)
    assert_refused(daemon, "sub/pxelinux.cfg/default", ERR_NOT_FOUND, counted_as_escape=False)
    result = tc.curl_get(daemon.port, "boot.ipxe", tmp_path / "x")
    assert result.returncode == tc.CURL_TFTP_NOTFOUND, tc.output_of(result)


# ---- writes: refused by default ---------------------------------------------------------------

def test_writes_are_refused_by_default(tftpd, tftp_root, tmp_path):
    local = tmp_path / "up.bin"
    tc.make_file(local, 3000)
    before_root = sorted(str(p) for p in tftp_root.rglob("*"))
    port = tftpd.port
    result = tc.curl_put(port, local, "upload/up.bin")
    assert result.returncode == tc.CURL_TFTP_PERM, tc.output_of(result)
    result = tc.atftp_put(port, local, "upload/up2.bin")
    assert result.returncode != 0
    assert "writes are disabled" in tc.output_of(result), tc.output_of(result)
    result = tc.tftp_hpa_put(port, local, "upload/up3.bin")
    assert "Error code 2: Access violation" in tc.output_of(result), tc.output_of(result)
    assert sorted(str(p) for p in tftp_root.rglob("*")) == before_root, "something was created"
    counters = tftpd.counters()
    assert counters["requests_write"] == 3
    assert counters["errors"].get("write_refused") == 3
    assert counters["transfers_started"] == 0


# ---- writes: allowed, into UploadDir only ------------------------------------------------------

@pytest.mark.slow
def test_uploads_land_in_upload_dir_byte_identical(tftpd_factory, tftp_root, tmp_path):
    daemon = tftpd_factory(AllowWrite=True)
    port = daemon.port
    files = {}
    for name, size in [("curl.bin", 1024 * 1024 + 3), ("curl-1468.bin", 200_000),
                       ("atftp.bin", 300_001), ("atftp-window.bin", 1024 * 1024 + 5),
                       ("hpa.bin", 70_000), ("empty.bin", 0), ("exact.bin", 1024)]:
        files[name] = tc.make_file(tmp_path / name, size)
    results = [
        tc.curl_put(port, tmp_path / "curl.bin", "upload/curl.bin"),
        tc.curl_put(port, tmp_path / "curl-1468.bin", "upload/curl-1468.bin", blksize=1468),
        tc.curl_put(port, tmp_path / "empty.bin", "upload/empty.bin", no_options=True),
        tc.atftp_put(port, tmp_path / "atftp.bin", "upload/atftp.bin", {"blksize": 1428}),
        tc.atftp_put(port, tmp_path / "atftp-window.bin", "upload/atftp-window.bin",
                     {"blksize": 1468, "windowsize": 8, "tsize": 1024 * 1024 + 5}),
        tc.atftp_put(port, tmp_path / "exact.bin", "/upload/exact.bin", {"blksize": 512}),
    ]
    for result in results:
        assert result.returncode == 0, tc.output_of(result)
    result = tc.tftp_hpa_put(port, tmp_path / "hpa.bin", "upload/hpa.bin")
    assert "Error code" not in tc.output_of(result), tc.output_of(result)
    counters = tc.wait_counters(daemon, lambda c: c["transfers_completed"] == len(files)
                                and c["active_transfers"] == 0)
    assert counters["transfers_failed"] == 0
    assert counters["bytes_received"] == sum((tmp_path / n).stat().st_size for n in files)
    assert tc.listing(tftp_root / "upload") == sorted(files), "temporary or extra files"
    for name, digest in files.items():
        assert tc.sha256(tftp_root / "upload" / name) == digest, name
    assert tc.listing(tftp_root) == ["upload"]


WRITE_REFUSALS = [
    # name, error code, counted as a root escape
    ("outside-upload.bin", ERR_ACCESS, False),
    ("sub/x.bin", ERR_ACCESS, False),
    ("upload/../x.bin", ERR_ACCESS, True),
    ("../x.bin", ERR_ACCESS, True),
    ("upload\\..\\..\\x.bin", ERR_ACCESS, True),
    ("upload/no-such-folder/x.bin", ERR_NOT_FOUND, False),
    ("upload/bad\x01name", ERR_ACCESS, True),
    ("upload", ERR_ACCESS, False),
]


@pytest.mark.parametrize("name,code,escape", WRITE_REFUSALS, ids=[w[0] for w in WRITE_REFUSALS])
def test_writes_outside_upload_dir_are_refused(tftpd_factory, tftp_root, name, code, escape):
    (tftp_root / "sub").mkdir()
    daemon = tftpd_factory(AllowWrite=True, AllowOverwrite=True)
    before = sorted(str(p) for p in tftp_root.parent.rglob("*") if "tftpd" not in p.name)
    reply = assert_refused(daemon, name, code, escape, opcode=tc.OP_WRQ)
    assert reply.opcode == OP_ERROR
    after = sorted(str(p) for p in tftp_root.parent.rglob("*") if "tftpd" not in p.name)
    assert after == before, "a refused write created something"


def test_write_through_symlink_is_refused(tftpd_factory, tftp_root, outside):
    os.symlink(outside / "secret", tftp_root / "upload" / "evil")
    os.symlink(outside, tftp_root / "upload" / "outdir")
    daemon = tftpd_factory(AllowWrite=True, AllowOverwrite=True)
    assert_refused(daemon, "upload/evil", ERR_ACCESS, True, opcode=tc.OP_WRQ)
    assert_refused(daemon, "upload/outdir/new", ERR_ACCESS, True, opcode=tc.OP_WRQ)
    assert (outside / "secret").read_text() == "top secret\n"
    assert tc.listing(outside) == ["secret"]
    assert tc.listing(tftp_root / "upload") == ["evil", "outdir"]


def test_existing_file_is_not_overwritten(tftpd_factory, tftp_root, tmp_path):
    target = tftp_root / "upload" / "exists.bin"
    target.write_bytes(b"original\n")
    local = tmp_path / "new.bin"
    tc.make_file(local, 5000)
    daemon = tftpd_factory(AllowWrite=True)
    result = tc.curl_put(daemon.port, local, "upload/exists.bin")
    assert result.returncode == tc.CURL_REMOTE_FILE_EXISTS, tc.output_of(result)
    result = tc.atftp_put(daemon.port, local, "upload/exists.bin")
    assert result.returncode != 0 and "already exists" in tc.output_of(result)
    assert target.read_bytes() == b"original\n"
    assert tc.listing(tftp_root / "upload") == ["exists.bin"]
    assert daemon.counters()["errors"].get("file_exists") == 2


def test_existing_file_is_overwritten_when_allowed(tftpd_factory, tftp_root, tmp_path):
    target = tftp_root / "upload" / "exists.bin"
    target.write_bytes(b"original\n")
    local = tmp_path / "new.bin"
    digest = tc.make_file(local, 5000)
    daemon = tftpd_factory(AllowWrite=True, AllowOverwrite=True)
    result = tc.curl_put(daemon.port, local, "upload/exists.bin")
    assert result.returncode == 0, tc.output_of(result)
    tc.wait_counters(daemon, lambda c: c["transfers_completed"] == 1)
    assert tc.sha256(target) == digest
    assert tc.listing(tftp_root / "upload") == ["exists.bin"]


def test_concurrent_uploads_to_one_name_first_wins(tftpd_factory, tftp_root):
    """Both WRQs are accepted while the name is free; the second to finish must not replace
    the first (link(2), not rename(2)), and is told so."""
    daemon = tftpd_factory(AllowWrite=True)
    first, second = os.urandom(700), os.urandom(900)
    with RawClient(daemon.port) as a, RawClient(daemon.port) as b:
        a.wrq("upload/same.bin")
        a.expect(tc.OP_ACK, block=0)
        b.wrq("upload/same.bin")
        b.expect(tc.OP_ACK, block=0)
        a.send_tid(tc.data(1, first[:512]))
        a.expect(tc.OP_ACK, block=1)
        b.send_tid(tc.data(1, second[:512]))
        b.expect(tc.OP_ACK, block=1)
        a.send_tid(tc.data(2, first[512:]))
        a.expect(tc.OP_ACK, block=2)
        b.send_tid(tc.data(2, second[512:]))
        reply = b.expect_error()
        assert reply.code == ERR_EXISTS, reply
    counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
    assert counters["transfers_completed"] == 1 and counters["transfers_failed"] == 1
    assert counters["errors"].get("file_exists") == 1
    assert (tftp_root / "upload" / "same.bin").read_bytes() == first
    assert tc.listing(tftp_root / "upload") == ["same.bin"]


def test_upload_size_limit(tftpd_factory, tftp_root, tmp_path):
    local = tmp_path / "big.bin"
    tc.make_file(local, 5000)
    daemon = tftpd_factory(AllowWrite=True, MaxUploadSize=1000)
    # With tsize the WRQ is refused up front; without, once the limit is crossed.
    result = tc.curl_put(daemon.port, local, "upload/a.bin")
    assert result.returncode == tc.CURL_REMOTE_DISK_FULL, tc.output_of(result)
    result = tc.curl_put(daemon.port, local, "upload/b.bin", no_options=True)
    assert result.returncode == tc.CURL_REMOTE_DISK_FULL, tc.output_of(result)
    counters = tc.wait_counters(daemon, lambda c: c["active_transfers"] == 0)
    assert counters["errors"].get("disk_full") == 2
    assert tc.listing(tftp_root / "upload") == []


# ---- interrupted uploads leave nothing behind --------------------------------------------------

def test_upload_abandoned_mid_transfer_leaves_nothing(tftpd_factory, tftp_root):
    daemon = tftpd_factory(AllowWrite=True, Timeout=1, Retries=2)
    with RawClient(daemon.port) as client:
        client.wrq("upload/raw.bin")
        assert client.expect(tc.OP_ACK, block=0)
        for block in (1, 2, 3):
            client.send_tid(tc.data(block, os.urandom(512)))
            client.expect(tc.OP_ACK, block=block)
        assert len(no_temp_files(tftp_root)) == 1, "the upload is not written to a temp file"
        seen = []                                      # now fall silent
        while not seen or seen[-1].opcode != OP_ERROR:
            packet = client.recv(15)
            assert packet is not None, seen
            seen.append(packet)
    assert [(p.opcode, p.block) for p in seen[:-1]] == [(tc.OP_ACK, 3), (tc.OP_ACK, 3)]
    counters = tc.wait_counters(daemon, lambda c: c["transfers_failed"] == 1
                                and c["active_transfers"] == 0)
    assert counters["errors"].get("timeout") == 1
    assert tc.listing(tftp_root / "upload") == []


KILLED_UPLOADERS = {
    "curl-no-options": lambda port, local: tc.curl_put_cmd(port, local, "upload/big.bin",
                                                           no_options=True),
    "atftp-window8": lambda port, local: tc.atftp_cmd(port, "-p", "upload/big.bin", local,
                                                      {"blksize": 512, "windowsize": 8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("client", sorted(KILLED_UPLOADERS))
def test_killed_uploader_leaves_nothing(tftpd_factory, tftp_root, tmp_path, client):
    local = tmp_path / "big.bin"
    tc.make_file(local, 64 * 1024 * 1024)
    daemon = tftpd_factory(AllowWrite=True, Timeout=1, Retries=2)
    proc = subprocess.Popen(KILLED_UPLOADERS[client](daemon.port, local),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tc.wait_counters(daemon, lambda c: c["bytes_received"] > 100_000,
                         what="the upload to be under way")
        assert no_temp_files(tftp_root), "no temporary file during the upload"
        assert proc.poll() is None, "the upload finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Well past Timeout x Retries: the daemon gave up and cleaned up.
    counters = tc.wait_counters(daemon, lambda c: c["transfers_failed"] == 1
                                and c["active_transfers"] == 0, timeout_s=30)
    assert counters["transfers_completed"] == 0
    assert tc.listing(tftp_root / "upload") == [], "a partial or temporary file was left"
    assert no_temp_files(tftp_root) == []
