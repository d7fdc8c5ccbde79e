"""imgsrvd.store: path resolution, the temp+fsync+link upload, validation, cleanup."""

import errno
import os
from pathlib import Path

import pytest

from common.imaging.imagefile import ImageWriter
from imgsrvd import store

CHUNK = 4096


def image_bytes(tmp_path: Path, chunks: int = 4) -> bytes:
    path = tmp_path / "src.img"
    with open(path, "wb") as out:
        writer = ImageWriter(out, {"format": 1, "type": "base", "streams": []},
                             chunk_size=CHUNK)
        for n in range(chunks):
            writer.add(0, n * CHUNK, os.urandom(CHUNK))
        writer.close()
    return path.read_bytes()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def parts(root: Path) -> list[Path]:
    return list(root.rglob(".*.part-*"))


def test_upload_is_linked_into_place(root, tmp_path):
    data = image_bytes(tmp_path)
    upload = store.Upload.begin(str(root), "lab/a.img", overwrite=False)
    assert Path(upload.temp).name.startswith(".a.img.part-")
    assert not (root / "lab" / "a.img").exists()
    upload.write(data[:100])
    upload.write(data[100:])
    assert upload.finish() == len(data)
    assert (root / "lab" / "a.img").read_bytes() == data
    assert parts(root) == []


def test_no_overwrite(root, tmp_path):
    data = image_bytes(tmp_path)
    (root / "a.img").write_bytes(b"old")
    with pytest.raises(store.Exists):
        store.Upload.begin(str(root), "a.img", overwrite=False)
    # an image that appears during the upload is not replaced either (os.link)
    upload = store.Upload.begin(str(root), "b.img", overwrite=False)
    upload.write(data)
    (root / "b.img").write_bytes(b"raced")
    with pytest.raises(store.Exists):
        upload.finish()
    assert (root / "b.img").read_bytes() == b"raced"
    assert parts(root) == []


def test_overwrite(root, tmp_path):
    data = image_bytes(tmp_path)
    (root / "a.img").write_bytes(b"old")
    upload = store.Upload.begin(str(root), "a.img", overwrite=True)
    upload.write(data)
    upload.finish()
    assert (root / "a.img").read_bytes() == data


@pytest.mark.parametrize("cut", [10, 100, -33, -1])
def test_incomplete_image_is_refused_and_removed(root, tmp_path, cut):
    data = image_bytes(tmp_path)
    upload = store.Upload.begin(str(root), "a.img", overwrite=False)
    upload.write(data[:cut])
    with pytest.raises(store.BadImage):
        upload.finish()
    assert not (root / "a.img").exists()
    assert parts(root) == []


def test_damaged_chunk_is_refused(root, tmp_path):
    data = bytearray(image_bytes(tmp_path))
    data[200] ^= 0xFF                                   # inside the first chunk's payload
    assert store.check_image(_write(tmp_path / "d.img", bytes(data)), "d.img")
    assert store.check_image(_write(tmp_path / "g.img", image_bytes(tmp_path)), "g.img") is None


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_abort_removes_the_temp_file(root):
    upload = store.Upload.begin(str(root), "x/a.img", overwrite=False)
    upload.write(b"partial")
    upload.abort()
    upload.abort()                                      # twice is fine
    assert parts(root) == [] and not (root / "x" / "a.img").exists()


def test_disk_full_is_reported_and_cleaned(root, monkeypatch):
    upload = store.Upload.begin(str(root), "a.img", overwrite=False)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(store.DiskFull, match="no space left"):
        upload.write(b"x" * 10)
    monkeypatch.undo()
    assert parts(root) == [] and not (root / "a.img").exists()


def test_disk_full_up_front_from_content_length(root):
    with pytest.raises(store.DiskFull):
        store.Upload.begin(str(root), "a.img", overwrite=False, expected_size=1 << 62)
    assert parts(root) == []


def test_symlinks_out_of_the_root_are_refused(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "s.img").write_bytes(b"s")
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root)
    with pytest.raises(store.Forbidden):
        store.open_for_reading(str(root), "out/s.img")
    with pytest.raises(store.Forbidden):
        store.Upload.begin(str(root), "out/new.img", overwrite=False)
    assert not (outside / "new.img").exists()
    (root / "a.img").write_bytes(b"a")
    assert store.open_for_reading(str(root), "in/a.img")[1] == 1


def test_reading(root):
    (root / "d").mkdir()
    with pytest.raises(store.NotFound):
        store.open_for_reading(str(root), "missing.img")
    with pytest.raises(store.NotFound):
        store.open_for_reading(str(root), "d")
    (root / "f").write_bytes(b"x")
    with pytest.raises(store.NotFound):
        store.open_for_reading(str(root), "f/x.img")


def test_a_file_on_the_way_is_refused(root):
    (root / "f").write_bytes(b"x")
    with pytest.raises(store.Forbidden):
        store.Upload.begin(str(root), "f/a.img", overwrite=False)
    (root / "d").mkdir()
    with pytest.raises(store.Forbidden):
        store.Upload.begin(str(root), "d", overwrite=True)


def test_clean_partials(root):
    (root / "a").mkdir()
    (root / "a" / ".x.img.part-0123456789abcdef").write_bytes(b"p")
    (root / ".y.img.part-fedcba9876543210").write_bytes(b"p")
    (root / "keep.img").write_bytes(b"k")
    (root / ".x.img.part-notours").write_bytes(b"k")
    removed = store.clean_partials(str(root))
    assert len(removed) == 2
    assert sorted(p.name for p in root.rglob("*")) == [".x.img.part-notours", "a", "keep.img"]
    assert store.clean_partials(str(root / "missing")) == []
