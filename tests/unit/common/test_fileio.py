"""common.fileio: fsync of a folder, publishing a finished file, the atomic write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import fileio


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part-" in p.name)


def test_fsync_folder_and_parent(tmp_path):
    fileio.fsync_folder(str(tmp_path))
    fileio.fsync_parent(str(tmp_path / "not-yet-there"))
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_bytes(b"x")
        fileio.fsync_folder(str(tmp_path / "file"))


def test_atomic_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.img"
    with fileio.atomic_file(str(target)) as out:
        out.write(b"first half ")
        assert not target.exists()
        assert leftovers(tmp_path) == [f".out.img.part-{os.getpid()}"]
        out.write(b"second half")
    assert target.read_bytes() == b"first half second half"
    assert leftovers(tmp_path) == []


def test_atomic_file_replaces_an_existing_file(tmp_path):
    target = tmp_path / "policy.conf"
    target.write_bytes(b"old")
    with fileio.atomic_file(str(target)) as out:
        out.write(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_file_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.img"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(str(target)) as out:
            out.write(b"partial")
            raise RuntimeError("the source went away")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_file_returns_what_the_body_returns(tmp_path):
    def make(path: str) -> int:
        with fileio.atomic_file(path) as out:
            return out.write(b"12345")
    assert make(str(tmp_path / "x")) == 5
    assert (tmp_path / "x").read_bytes() == b"12345"


def test_publish_with_and_without_replacing(tmp_path):
    final = tmp_path / "final"
    first = tmp_path / ".first"
    first.write_bytes(b"1")
    fileio.publish(str(first), str(final), replace=False)
    assert final.read_bytes() == b"1" and not first.exists()
    second = tmp_path / ".second"
    second.write_bytes(b"2")
    with pytest.raises(FileExistsError):
        fileio.publish(str(second), str(final), replace=False)
    assert final.read_bytes() == b"1" and second.exists()   # the caller removes it
    fileio.publish(str(second), str(final), replace=True)
    assert final.read_bytes() == b"2" and not second.exists()
