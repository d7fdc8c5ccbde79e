"""imgsrvd.store, the lesser transfer-path findings of issue 13: a refused upload leaves no
folders, names of 233-255 bytes are stored (the temporary name is shorter), AllowedUploadDirs
is checked where symbolic links lead."""

import errno
import threading
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
    second.abort()                   # the last upload in the folder first made removes it
    assert list(root.iterdir()) == [] and len(store.FOLDERS) == 0


def test_the_last_refused_upload_removes_what_the_first_made(root):
    first = store.Upload.begin(str(root), "new/deep/one.img", False)
    second = store.Upload.begin(str(root), "new/deep/two.img", False)
    third = store.Upload.begin(str(root), "new/other/three.img", False)
    second.abort()
    first.abort()
    assert [p.name for p in root.rglob("*") if p.is_dir()] == ["new", "other"]
    third.abort()
    third.abort()                    # twice: harmless
    assert list(root.iterdir()) == [] and len(store.FOLDERS) == 0


def test_folders_holding_a_stored_image_are_kept(root, tmp_path):
    first = store.Upload.begin(str(root), "kept/deep/one.img", False)
    second = store.Upload.begin(str(root), "kept/deep/two.img", False)
    second.write(image_bytes(tmp_path))
    second.finish()
    first.abort()
    assert [p.name for p in (root / "kept" / "deep").iterdir()] == ["two.img"]
    assert len(store.FOLDERS) == 0
    store.Upload.begin(str(root), "kept/deep/sub/x.img", False).abort()
    assert [p.name for p in (root / "kept" / "deep").iterdir()] == ["two.img"]


def test_folders_that_existed_are_never_removed(root):
    (root / "operator").mkdir()
    store.Upload.begin(str(root), "operator/x.img", False).abort()
    store.Upload.begin(str(root), "operator/new/x.img", False).abort()
    assert [p.name for p in root.rglob("*")] == ["operator"]


def test_a_refusal_never_removes_a_folder_another_upload_is_entering(root, tmp_path,
                                                                       monkeypatch):
    """The race of concurrent uploads into a new folder: a refused upload's abort comes
    between another upload making (here: finding) the folder and creating its file in it.
    Old: the folder was removed there, the other upload failed with ENOENT (a 500)."""
    refused = store.Upload.begin(str(root), "race/deep/bad.img", False)
    real_disk_usage = store.shutil.disk_usage
    aborting: list[threading.Thread] = []

    def abort_meanwhile(folder):
        aborting.append(threading.Thread(target=refused.abort))
        aborting[0].start()
        aborting[0].join(0.2)        # old: done at once; now: it waits for this upload
        return real_disk_usage(folder)

    monkeypatch.setattr(store.shutil, "disk_usage", abort_meanwhile)
    entering = store.Upload.begin(str(root), "race/deep/good.img", False, expected_size=1)
    aborting[0].join()
    entering.write(image_bytes(tmp_path))
    entering.finish()
    assert (root / "race" / "deep" / "good.img").is_file() and parts(root) == []
    assert len(store.FOLDERS) == 0


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


def test_folders_made_before_a_failed_makedirs_are_removed(root, monkeypatch):
    real_mkdir = store.os.mkdir

    def mkdir_until_full(path, mode=0o777):
        if path.endswith("/c"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_mkdir(path, mode)

    monkeypatch.setattr(store.os, "mkdir", mkdir_until_full)
    with pytest.raises(store.DiskFull):
        store.Upload.begin(str(root), "a/b/c/x.img", False)
    assert list(root.iterdir()) == [] and len(store.FOLDERS) == 0
