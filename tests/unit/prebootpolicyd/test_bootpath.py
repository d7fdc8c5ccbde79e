"""prebootpolicyd.bootpath and bootfiles.open_inside: a /boot/ path never leaves the root, and a
Range header gives the bytes RFC 9110 says (or the whole file, or 416)."""

import os
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prebootpolicyd.bootfiles import open_inside
from prebootpolicyd.bootpath import (MAX_PATH, UNSATISFIABLE, ByteRange, Refusal, parse_path,
                                     parse_range)

# ---- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, name", [
    ("preboot/initrd", "preboot/initrd"),
    ("undionly.kpxe", "undionly.kpxe"),
    ("dir%20with%20blank/f", "dir with blank/f"),
    ("%C3%A9t%C3%A9", "été"),
    ("a/.hidden", "a/.hidden"),
    ("a..b/c", "a..b/c"),
])
def test_paths_inside_the_root(raw, name):
    assert parse_path(raw) == name


@pytest.mark.parametrize("raw, status", [
    ("", 404),
    ("..", 403), ("../secret", 403), ("a/../../secret", 403), ("%2e%2e/secret", 403),
    ("a/%2E%2E/%2e%2e/b", 403), ("a/..", 403),
    ("/etc/passwd", 403), ("%2fetc/passwd", 403), ("//x", 403),
    ("a\\b", 400), ("..\\secret", 400), ("a%5c..%5csecret", 400),
    ("a%00b", 400), ("a%0ab", 400), ("a%7fb", 400), ("a%09b", 400),
    ("a//b", 400), ("a/", 400), ("./a", 400), ("a/./b", 400),
    ("a%zz", 400), ("a%2", 400), ("a%", 400),
    ("%ff%fe", 400), ("%c3", 400),
    ("a" * (MAX_PATH + 1), 414), ("%41" * (MAX_PATH + 1), 414), ("x" * 256, 414),
])
def test_refused_paths(raw, status):
    refused = parse_path(raw)
    assert isinstance(refused, Refusal) and refused.status == status, refused
    assert refused.reason and "\n" not in refused.reason


SAFE = string.ascii_letters + string.digits + "-._~"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_path_is_a_clean_relative_name_or_a_refusal(raw):
    result = parse_path(raw)
    if isinstance(result, Refusal):
        assert 400 <= result.status < 500
        return
    parts = result.split("/")
    assert not result.startswith("/") and "\\" not in result and "\0" not in result
    assert all(p not in ("", ".", "..") for p in parts)
    assert not any(ord(c) < 32 or ord(c) == 127 for c in result)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "%2f", "%5c",
                                 "\\", "%00"]), max_size=8))
def test_joined_components_never_climb(parts):
    result = parse_path("/".join(parts))
    if not isinstance(result, Refusal):
        depth = 0
        for part in result.split("/"):
            depth += -1 if part == ".." else 1
            assert depth >= 0
        assert os.path.normpath(result) == result


# ---- the file system: symlinks --------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "preboot").mkdir(parents=True)
    (root / "preboot" / "linux").write_bytes(b"kernel")
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", root / "escape-link")
    os.symlink(tmp_path, root / "escape-dir")
    os.symlink("preboot/linux", root / "inside-link")
    os.mkfifo(root / "fifo")
    os.symlink("/dev/zero", root / "device-link")
    return root


def _read(opened) -> bytes:
    fd, _info = opened
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_files_and_symlinks_inside_are_opened(root):
    assert _read(open_inside(str(root), "preboot/linux")) == b"kernel"
    assert _read(open_inside(str(root), "inside-link")) == b"kernel"


@pytest.mark.parametrize("name, status", [
    ("escape-link", 403), ("escape-dir/secret", 403), ("preboot", 403), ("fifo", 403),
    ("device-link", 403), ("preboot/linux/x", 403),
    ("missing", 404), ("preboot/missing", 404),
])
def test_refused_on_the_file_system(root, name, status):
    refused = open_inside(str(root), name)
    assert isinstance(refused, Refusal) and refused.status == status, refused


def test_root_given_through_a_symlink(root, tmp_path):
    os.symlink(root, tmp_path / "link-to-root")
    assert _read(open_inside(str(tmp_path / "link-to-root"), "preboot/linux")) == b"kernel"


# ---- ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    ("bytes=0-9", 100, ByteRange(0, 9)),
    ("bytes=10-", 100, ByteRange(10, 99)),
    ("bytes=-10", 100, ByteRange(90, 99)),
    ("bytes=-1000", 100, ByteRange(0, 99)),
    ("bytes=90-1000", 100, ByteRange(90, 99)),
    ("bytes=99-99", 100, ByteRange(99, 99)),
    (" bytes = 5 - 6 ", 100, ByteRange(5, 6)),
    ("bytes=100-", 100, UNSATISFIABLE),
    ("bytes=100-200", 100, UNSATISFIABLE),
    ("bytes=-0", 100, UNSATISFIABLE),
    ("bytes=0-", 0, UNSATISFIABLE),
    ("bytes=-5", 0, UNSATISFIABLE),
    # ignored (the whole file): malformed, another unit, several ranges, first > last
    ("bytes=9-0", 100, None),
    ("bytes=-", 100, None),
    ("bytes=a-b", 100, None),
    ("items=0-9", 100, None),
    ("bytes=0-1,5-6", 100, None),
    ("bytes=0-9 trailing", 100, None),
    ("bytes=" + "9" * 40 + "-", 100, None),
])
def test_ranges(header, size, expected):
    assert parse_range(header, size) == expected


def test_if_range_must_match_a_validator():
    validators = ('"abc-64"', "Mon, 01 Jan 2024 00:00:00 GMT")
    assert parse_range("bytes=0-9", 100, '"abc-64"', validators) == ByteRange(0, 9)
    assert parse_range("bytes=0-9", 100, validators[1], validators) == ByteRange(0, 9)
    assert parse_range("bytes=0-9", 100, '"changed"', validators) is None


def test_content_range():
    assert ByteRange(90, 99).content_range(100) == "bytes 90-99/100"
    assert ByteRange(90, 99).length == 10


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60), st.integers(min_value=0, max_value=1 << 40))
def test_any_range_header_gives_bytes_of_the_file(header, size):
    result = parse_range(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), st.integers(0, 300)), st.one_of(st.none(), st.integers(0, 300)),
       st.integers(0, 200))
def test_well_formed_ranges(first, last, size):
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    result = parse_range(header, size)
    if first is None and last is None:
        assert result is None
    elif first is None:
        assert result == (UNSATISFIABLE if last == 0 or size == 0
                          else ByteRange(max(0, size - last), size - 1))
    elif last is not None and last < first:
        assert result is None
    elif first >= size:
        assert result is UNSATISFIABLE
    else:
        assert result == ByteRange(first, min(size - 1, size - 1 if last is None else last))


# ---- where /boot/ opens its files: on the loop, or in a thread on a network file system ---------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:40 / /srv rw,relatime - nfs4 filer:/srv rw,vers=4.2
41 40 0:41 / /srv/tftp/local rw,relatime - tmpfs tmpfs rw
42 27 0:42 / /mnt/with\\040space rw - fuse.sshfs host:/x rw
"""


@pytest.mark.parametrize("path, local", [
    ("/var/lib/tftpboot", True),          # on /, ext4
    ("/srv/tftp", False),                 # nfs4
    ("/srv/tftp/local/preboot", True),    # the longest mount point wins: tmpfs
    ("/srvx", True),                      # not under /srv: a prefix is not a parent
    ("/mnt/with space/boot", False),      # fuse.sshfs, the \040 of mountinfo read
])
def test_local_file_system_by_the_longest_mount_point(tmp_path, path, local, monkeypatch):
    from prebootpolicyd.bootfiles import on_local_file_system
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    monkeypatch.setattr(os.path, "realpath", lambda p: p)
    assert on_local_file_system(path, str(info)) is local


def test_unknown_mounts_count_as_remote(tmp_path):
    from prebootpolicyd.bootfiles import on_local_file_system
    assert on_local_file_system("/srv/tftp", str(tmp_path / "missing")) is False
