"""common.daemon.pidfile: the lock, not the file, says 'running'."""

import os

import pytest

from common.errors import AlreadyRunning
from common.daemon.pidfile import LockedPidFile, read_pid


def test_writes_our_pid_and_removes_the_file_on_release(tmp_path):
    path = str(tmp_path / "run" / "d.pid")
    pidfile = LockedPidFile(path)
    pidfile.acquire()
    assert read_pid(path) == os.getpid()
    pidfile.release()
    assert not os.path.exists(path)


def test_second_holder_is_refused_with_the_first_pid(tmp_path):
    path = str(tmp_path / "d.pid")
    first = LockedPidFile(path)
    first.acquire()
    with pytest.raises(AlreadyRunning) as info:
        LockedPidFile(path).acquire()
    assert f"pid {os.getpid()}" in str(info.value)
    first.release()
    LockedPidFile(path).acquire()  # free again


def test_stale_file_from_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "d.pid"
    path.write_text("999999\n")
    pidfile = LockedPidFile(str(path))
    pidfile.acquire()
    assert read_pid(str(path)) == os.getpid()
    pidfile.release()


def test_read_pid_of_garbage_is_none(tmp_path):
    path = tmp_path / "d.pid"
    path.write_text("not a pid")
    assert read_pid(str(path)) is None
    assert read_pid(str(tmp_path / "absent")) is None


def test_a_daemon_about_to_detach_leaves_no_pid_until_it_has_forked(tmp_path):
    """Before python-daemon's fork the pid is about to change: the file stays empty (a stale
    pid of a killed daemon is cleared too) until the detached process enters the pidfile."""
    path = tmp_path / "d.pid"
    path.write_text("99999\n")                     # left by a daemon killed with -9
    pidfile = LockedPidFile(str(path))
    pidfile.acquire(write=False)
    assert path.read_text() == "" and read_pid(str(path)) is None
    with pidfile:                                  # what DaemonContext does after the fork
        assert read_pid(str(path)) == os.getpid()
    assert not path.exists()
