"""tftpd.paths: nothing outside the root is ever read."""

import os

import pytest

from tftpd import packet, paths
from tftpd.paths import Refusal


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "upload").mkdir()
    (root / "boot.ipxe").write_text("#!ipxe\n")
    (root / "sub" / "file").write_text("x")
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", root / "escape-link")
    os.symlink(tmp_path, root / "escape-dir")
    os.symlink("boot.ipxe", root / "inside-link")
    return root


@pytest.mark.parametrize("name", ["../secret", "sub/../../secret", "..\\secret",
                                  "sub\\..\\..\\secret", "escape-link", "escape-dir/secret",
                                  "boot\x01.ipxe"])
def test_escapes_are_refused_and_flagged(root, name):
    result = paths.resolve_read(str(root), name, case_insensitive=False)
    assert isinstance(result, Refusal) and result.escape
    assert result.code == packet.ERR_ACCESS


@pytest.mark.parametrize("name,expected", [
    ("boot.ipxe", "boot.ipxe"), ("/boot.ipxe", "boot.ipxe"), ("sub\\file", "sub/file"),
    ("./sub//file", "sub/file"), ("inside-link", "boot.ipxe")])
def test_names_inside_the_root(root, name, expected):
    assert paths.resolve_read(str(root), name, False) == str(root / expected)


def test_absolute_path_spelling_the_root_is_the_same_file(root):
    assert paths.resolve_read(str(root), f"{root}/sub/file", False) == str(root / "sub" / "file")


def test_absolute_path_outside_maps_inside_the_root(root):
    result = paths.resolve_read(str(root), "/etc/passwd", False)
    assert isinstance(result, Refusal) and result.code == packet.ERR_NOT_FOUND


def test_folders_are_not_files(root):
    result = paths.resolve_read(str(root), "sub", False)
    assert isinstance(result, Refusal) and result.code == packet.ERR_ACCESS and not result.escape


def test_case_insensitive_lookup(root):
    assert isinstance(paths.resolve_read(str(root), "SUB/FILE", False), Refusal)
    assert paths.resolve_read(str(root), "SUB/FILE", True) == str(root / "sub" / "file")


def test_open_for_read_checks_the_descriptor(root):
    fd = paths.open_for_read(str(root), str(root / "boot.ipxe"))
    assert isinstance(fd, int)
    os.close(fd)
    swapped = paths.open_for_read(str(root), str(root / "escape-link"))
    assert isinstance(swapped, Refusal) and swapped.escape


def test_writes_only_into_the_upload_folder(root):
    upload = str(root / "upload")
    assert paths.resolve_write(str(root), upload, "upload/new.bin") == str(root / "upload" /
                                                                          "new.bin")
    outside = paths.resolve_write(str(root), upload, "new.bin")
    assert isinstance(outside, Refusal) and outside.code == packet.ERR_ACCESS
    escape = paths.resolve_write(str(root), upload, "../../x")
    assert isinstance(escape, Refusal) and escape.escape
    os.symlink(root / "boot.ipxe", root / "upload" / "link")
    assert isinstance(paths.resolve_write(str(root), upload, "upload/link"), Refusal)
