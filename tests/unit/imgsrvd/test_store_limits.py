"""imgsrvd.store, the lesser transfer-path findings of issue 13: a refused upload leaves no
folders, names of 233-255 bytes are stored (the temporary name is shorter), AllowedUploadDirs
is checked where symbolic links lead."""

from pathlib import Path

import pytest

from imgsrvd import store
from tests.unit.imgsrvd.test_store import image_bytes, parts, root  # noqa: F401 (fixture)


def test_a_refused_upload_to_a_deep_path_leaves_no_folders(root, tmp_path):
    (root / "a").mkdir()
    upload = store.Upload.begin(str(root), "a/b/c/d/x.img", False)
    with pytest.raises(store.BadImage):
        upload.write(b"not an image at all, not even its header" * 10)
        upload.finish()
    assert sorted(p.name for p in root.rglob("*")) == ["a"]


def test_a_refusal_before_the_body_leaves_no_folders(root):
    with pytest.raises(store.DiskFull):
        store.Upload.begin(str(root), "deep/er/x.img", False, expected_size=1 << 62)
    assert list(root.iterdir()) == []


def test_folders_another_upload_uses_are_kept(root, tmp_path):
    first = store.Upload.begin(str(root), "shared/one.img", False)
    second = store.Upload.begin(str(root), "shared/two.img", False)
    first.abort()
    assert (root / "shared").is_dir() and len(parts(root)) == 1
    second.abort()
    assert parts(root) == []


@pytest.mark.parametrize("length", [232, 233, 240, 255])
def test_names_up_to_255_bytes_are_stored(root, tmp_path, length):
    name = "n" * (length - 4) + ".img"
    upload = store.Upload.begin(str(root), f"lab/{name}", False)
    assert store.PART_RE.match(Path(upload.temp).name)
    upload.write(image_bytes(tmp_path))
    upload.finish()
    assert (root / "lab" / name).is_file() and parts(root) == []


def test_allowed_upload_dirs_are_checked_where_links_lead(root, tmp_path):
    (root / "lab").mkdir()
    (root / "private").mkdir()
    (root / "lab" / "sneak").symlink_to(root / "private")
    with pytest.raises(store.Forbidden, match="not allowed"):
        store.Upload.begin(str(root), "lab/sneak/x.img", False, None, ("lab",))
    upload = store.Upload.begin(str(root), "lab/x.img", False, None, ("lab",))
    upload.abort()
    assert list((root / "private").iterdir()) == []
