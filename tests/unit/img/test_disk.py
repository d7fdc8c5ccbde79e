"""img/disk.py: the disk file and the sync-behind thread."""

from __future__ import annotations

import os
import time

import pytest

from img.disk import Disk, SyncBehind

MiB = 1 << 20


def _disk(tmp_path, size=8 * MiB) -> Disk:
    path = tmp_path / "disk.img"
    with open(path, "wb") as handle:
        handle.truncate(size)
    return Disk.open(str(path), writable=True)


def test_zero_punches_a_hole_that_reads_as_zeros(tmp_path):
    with _disk(tmp_path) as disk:
        disk.write(MiB, b"\xff" * MiB)
        disk.zero(MiB + 4096, 8192)
        assert disk.read(MiB, 4096) == b"\xff" * 4096
        assert disk.read(MiB + 4096, 8192) == bytes(8192)
        assert disk.read(MiB + 12288, 4096) == b"\xff" * 4096


def test_sync_behind_syncs_after_each_step_and_stops(tmp_path):
    with _disk(tmp_path) as disk:
        with SyncBehind(disk, step_bytes=MiB) as behind:
            for n in range(4):
                disk.write(n * MiB, os.urandom(MiB))
                behind.wrote(MiB)
            # Steps that come faster than a sync may be folded into one; at least one runs
            # while the writer goes on (on a loaded machine the thread may start late: close()
            # would then stop it before its first sync, which the final sync makes good).
            deadline = time.monotonic() + 30
            while behind.syncs == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert 1 <= behind.syncs <= 4
        assert not behind._thread.is_alive()


def test_sync_behind_below_one_step_never_syncs(tmp_path):
    with _disk(tmp_path) as disk:
        with SyncBehind(disk, step_bytes=64 * MiB) as behind:
            disk.write(0, b"x" * 4096)
            behind.wrote(4096)
        assert behind.syncs == 0


def test_a_failed_sync_is_raised_not_dropped(tmp_path):
    # fdatasync on a pipe fails (EINVAL), as a real write error would at the sync.
    read_end, write_end = os.pipe()
    disk = Disk("pipe-disk", write_end, 0, False)
    try:
        behind = SyncBehind(disk, step_bytes=1)
        behind.wrote(1)
        behind._thread.join(timeout=10)
        with pytest.raises(OSError, match="pipe-disk: writing to the disk failed"):
            behind.wrote(1)
        with pytest.raises(OSError, match="writing to the disk failed"):
            behind.close()
        assert behind.syncs == 0
    finally:
        os.close(read_end)
        disk.close()


def test_zero_on_a_hole_leaves_it_a_hole_and_zero_on_data_zeroes_it(tmp_path):
    with _disk(tmp_path) as disk:
        disk.zero(0, 2 * MiB)                          # a hole already: nothing to do
        assert disk._is_hole(0, 2 * MiB)
        disk.write(3 * MiB, b"\x01" * MiB)
        assert not disk._is_hole(2 * MiB, 2 * MiB)     # data inside the range
        disk.zero(2 * MiB, 2 * MiB)
        assert disk.read(3 * MiB, MiB) == bytes(MiB)
        assert disk._is_hole(3 * MiB, MiB)


def test_sync_and_close(tmp_path):
    disk = _disk(tmp_path)
    disk.write(0, b"synced")
    disk.sync()
    disk.close()
    assert disk.fd == -1
    disk.close()                                       # twice is harmless
    assert (tmp_path / "disk.img").read_bytes()[:6] == b"synced"
