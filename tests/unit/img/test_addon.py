"""img.addon without disks: the tar member checks against hostile members, a make -> read-back
round trip of the files stream, and extraction into a folder (hostile add-ons refused before
anything is written; a symbolic link already in the target cannot lead a write outside)."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from common.imaging.imagefile import ImageReader, ImageWriter
from common.imaging.imageformat import ImageFormatError
from img.addon import (AddonError, MemberChecker, RefusedMember, TreeCount, addon_metadata,
                       check_member, extract_addon, files_stream, make_addon, scan_addon)


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


HOSTILE = [
    ("absolute path", member("/etc/passwd"), "absolute path"),
    ("dot-dot", member("../x"), "'..'"),
    ("dot-dot inside", member("a/../../x"), "'..'"),
    ("harmless-looking dot-dot", member("a/../b"), "'..'"),
    ("drive letter", member("C:/windows/x"), "absolute path"),
    ("backslash root", member("\\windows\\x"), "absolute path"),
    ("symlink to /etc", member("etc", tarfile.SYMTYPE, "/etc"), "symbolic link"),
    ("symlink up", member("a/up", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
    ("hardlink outside", member("pw", tarfile.LNKTYPE, "../etc/passwd"), "hard link"),
    ("hardlink absolute", member("pw", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    ("character device", member("null", tarfile.CHRTYPE), "device node"),
    ("block device", member("sda", tarfile.BLKTYPE), "device node"),
    ("fifo", member("pipe", tarfile.FIFOTYPE), "fifo"),
    ("NUL in name", member("a\0b"), "NUL"),
]


@pytest.mark.parametrize("label, info, why", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_members_are_refused_by_name(label: str, info: tarfile.TarInfo, why: str) -> None:
    with pytest.raises(RefusedMember) as caught:
        check_member(info)
    assert why in str(caught.value)
    assert repr(info.name)[1:-1].split("\\")[0] in str(caught.value)


@pytest.mark.parametrize("info", [
    member("readme.txt"), member("a/b/c.dll"), member("a", tarfile.DIRTYPE),
    member("a/link", tarfile.SYMTYPE, "b/c.dll"), member("a/b/up", tarfile.SYMTYPE, "../x"),
    member("copy", tarfile.LNKTYPE, "a/b/c.dll"), member("./dot/file"), member("a:b.txt"),
])
def test_ordinary_members_pass(info: tarfile.TarInfo) -> None:
    check_member(info)


CHAINS = [
    ("link chain up", [member("a", tarfile.DIRTYPE), member("a/b", tarfile.SYMTYPE, ".."),
                       member("c", tarfile.SYMTYPE, "a/b/..")], "c"),
    ("write through a link", [member("d", tarfile.DIRTYPE), member("l", tarfile.SYMTYPE, "d"),
                              member("l/x")], "l/x"),
    ("file over a link", [member("l", tarfile.SYMTYPE, "d"), member("l")], "l"),
    ("hard link through a link", [member("l", tarfile.SYMTYPE, "."),
                                  member("h", tarfile.LNKTYPE, "l/f")], "h"),
]


@pytest.mark.parametrize("label, members, refused", CHAINS, ids=[c[0] for c in CHAINS])
def test_links_made_by_the_archive_cannot_be_gone_through(label: str, members: list,
                                                         refused: str) -> None:
    checker = MemberChecker()
    for info in members[:-1]:
        checker.check(info)
    with pytest.raises(RefusedMember, match="symbolic link") as caught:
        checker.check(members[-1])
    assert f"'{refused}'" in str(caught.value)


def test_links_to_links_and_replaced_links_pass() -> None:
    checker = MemberChecker()
    for info in (member("lib", tarfile.DIRTYPE), member("lib/libx.so.1"),
                 member("lib/libx.so", tarfile.SYMTYPE, "libx.so.1"),
                 member("current", tarfile.SYMTYPE, "lib/libx.so"),
                 member("current", tarfile.SYMTYPE, "lib/libx.so.1"),
                 member("hard", tarfile.LNKTYPE, "lib/libx.so")):
        checker.check(info)


def test_symlinks_are_refused_where_the_filesystem_has_none() -> None:
    with pytest.raises(RefusedMember, match="symbolic links cannot be stored"):
        check_member(member("l", tarfile.SYMTYPE, "x"), allow_symlinks=False)


# ------------------------------------------------------------------ images

def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "readme.txt": b"add-on\n" * 100,
        "drivers/net/e1000.sys": random.Random(1).randbytes(300_000),
        "drivers/zeros.bin": bytes(200_000),
        "apps/empty.cfg": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "empty-folder").mkdir()
    os.symlink("drivers/net/e1000.sys", root / "current.sys")
    return files


def image_of_tar(path: Path, tar_bytes: bytes, chunk_size: int = 64 * 1024) -> Path:
    """An add-on image whose files stream is exactly tar_bytes (for crafted, hostile tars)."""
    meta = addon_metadata(TreeCount(1, 1, 1), {}, 1)
    with open(path, "wb") as out:
        writer = ImageWriter(out, meta, chunk_size=chunk_size)
        for offset in range(0, len(tar_bytes), chunk_size):
            writer.add(0, offset, tar_bytes[offset:offset + chunk_size])
        writer.close()
    return path


def hostile_tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def test_make_and_read_back(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    image = tmp_path / "addon.img"
    with open(image, "wb") as out:
        stats, meta = make_addon(str(tmp_path / "src"), out, source={"mac": "x"},
                                 chunk_size=64 * 1024)
    assert meta["type"] == "addon" and meta["streams"][0]["role"] == "files"
    assert meta["files"] == {"count": 4, "bytes": sum(map(len, files.values())), "entries": 9}
    assert stats.chunks > 5 and stats.zero_chunks >= 1, "several chunks, zeros stored as such"
    with open(image, "rb") as handle:
        reader = ImageReader(handle, str(image))
        assert files_stream(reader) == 0
        assert reader.verify() == []
        scan = scan_addon(reader)
        assert (scan.files, scan.bytes, scan.members) == (4, sum(map(len, files.values())), 9)
        # the stream is a plain pax tar: read it back with tarfile alone
        stream = b"".join(data for _, data in reader.chunks(reader.entries(0)))
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
        assert tar.pax_headers is not None
        names = tar.getnames()
        assert set(names) == set(files) | {"drivers", "drivers/net", "apps", "empty-folder",
                                           "current.sys"}
        for number, name in enumerate(names):          # folders come before their contents
            parent = os.path.dirname(name)
            assert not parent or names.index(parent) < number
        for name, data in files.items():
            assert tar.extractfile(name).read() == data
        assert tar.getmember("current.sys").linkname == "drivers/net/e1000.sys"
        assert tar.getmember("empty-folder").isdir()


@pytest.fixture(params=["tarfile filters", "python before 3.11.4"])
def extraction(request, monkeypatch) -> str:
    """Run an extraction test twice: with tarfile's data filter, and as on a Python that
    lacks it (the imaging environment's Debian 12 python3.11 is 3.11.2)."""
    if request.param != "tarfile filters":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def test_extract_overwrites_existing_files(tmp_path: Path, extraction: str) -> None:
    files = make_tree(tmp_path / "src")
    image = tmp_path / "addon.img"
    with open(image, "wb") as out:
        make_addon(str(tmp_path / "src"), out)
    root = tmp_path / "root"
    (root / "drivers").mkdir(parents=True)
    (root / "readme.txt").write_bytes(b"old contents that are longer than the new ones" * 99)
    (root / "keep.txt").write_bytes(b"untouched")
    with open(image, "rb") as handle:
        extract_addon(ImageReader(handle, "addon"), str(root))
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert (root / "keep.txt").read_bytes() == b"untouched"
    assert os.readlink(root / "current.sys") == "drivers/net/e1000.sys"
    for path in root.rglob("*"):           # no set-id bits, no group/other write, ever
        if not path.is_symlink():
            assert path.stat().st_mode & 0o7022 == 0, (path, oct(path.stat().st_mode))


@pytest.mark.parametrize("evil", [
    (member("../escape"), b"x"),
    (member("/abs-escape"), b"x"),
    (member("lnk", tarfile.SYMTYPE, "/tmp"), b""),
    (member("fifo", tarfile.FIFOTYPE), b""),
], ids=["dot-dot", "absolute", "symlink", "fifo"])
def test_a_hostile_image_is_refused_before_anything_is_written(tmp_path: Path, evil,
                                                                extraction: str) -> None:
    tar = hostile_tar((member("first.txt"), b"harmless"), evil, (member("last.txt"), b"z"))
    image = image_of_tar(tmp_path / "evil.img", tar, chunk_size=4096)
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    with open(image, "rb") as handle:
        reader = ImageReader(handle, "evil")
        with pytest.raises(RefusedMember, match="refused tar member"):
            scan_addon(reader)
        # extraction alone (no scan first) refuses it too, and writes nothing outside
        with pytest.raises(AddonError, match="refused tar member") as caught:
            extract_addon(reader, str(root))
        assert caught.value.changed
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["root"]
    assert not (tmp_path / "escape").exists() and not Path("/abs-escape").exists()


def test_a_symlink_on_the_target_cannot_lead_outside(tmp_path: Path, extraction: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside), root / "evil")          # already on the target filesystem
    tar = hostile_tar((member("evil/planted.txt"), b"x"))
    image = image_of_tar(tmp_path / "a.img", tar)
    with open(image, "rb") as handle:
        reader = ImageReader(handle, "a")
        scan_addon(reader)                            # the tar alone is harmless
        with pytest.raises(AddonError, match="evil/planted.txt"):
            extract_addon(reader, str(root))
    assert list(outside.iterdir()) == []


def test_a_base_image_is_not_an_addon(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    with open(path, "wb") as out:
        ImageWriter(out, {"format": 1, "type": "base", "streams": []}).close()
    with open(path, "rb") as handle:
        with pytest.raises(AddonError, match="not an add-on image"):
            files_stream(ImageReader(handle, "base.img"))


def test_special_files_are_refused_when_making(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with open(tmp_path / "x.img", "wb") as out, pytest.raises(AddonError, match="pipe"):
        make_addon(str(src), out)


def test_a_chain_of_links_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    tar = hostile_tar((member("a", tarfile.DIRTYPE), b""),
                      (member("a/b", tarfile.SYMTYPE, ".."), b""),
                      (member("c", tarfile.SYMTYPE, "a/b/.."), b""),
                      (member("c/planted.txt"), b"x"))
    image = image_of_tar(tmp_path / "chain.img", tar)
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    with open(image, "rb") as handle:
        reader = ImageReader(handle, "chain")
        with pytest.raises(RefusedMember, match="'c'.*through the symbolic link 'a/b'"):
            scan_addon(reader)
        with pytest.raises(AddonError, match="'c'"):
            extract_addon(reader, str(root))
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["root"]
    assert not list(tmp_path.rglob("planted.txt"))


def test_a_damaged_chunk_is_found_before_anything_is_written(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    image = tmp_path / "addon.img"
    with open(image, "wb") as out:
        make_addon(str(tmp_path / "src"), out, chunk_size=64 * 1024)
    data = bytearray(image.read_bytes())
    with open(image, "rb") as handle:
        last = ImageReader(handle, "a").entries(0)[-2]
    data[last.position + 48 + last.payload_length // 2] ^= 0xFF
    image.write_bytes(data)
    with open(image, "rb") as handle:
        with pytest.raises(ImageFormatError, match="checksum mismatch"):
            scan_addon(ImageReader(handle, "a"))
