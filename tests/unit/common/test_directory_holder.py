"""common.policy.directory.holder.DirectoryHolder with real SQLite stores and a real thread pool."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.policy.directory import DirectoryError, open_directory
from common.policy.directory.holder import DirectoryHolder, describe
from common.policy.directory.settings import directory_settings


def settings_for(url: str, timeout: int = 2, made: bool = True):
    """The settings naming URL; a SQLite file there is made first (by preboot-dir, in life)
    unless made=False, or its folder cannot hold one."""
    path = Path(url[len("sqlite://"):])
    if made and path.parent.is_dir():
        open_directory(url, create=True).close()
    return directory_settings({"Directory": [url], "DirectoryCredentials": "",
                               "DirectoryTimeout": timeout})


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_lookup_reads_the_policy_and_the_workstation(tmp_path: Path, pool):
    async def run():
        held = DirectoryHolder(lambda: pool, "answering 503")
        await held.configure(settings_for(f"sqlite://{tmp_path}/d.db"))
        policy, station = await held.lookup("52:54:00:00:00:01")
        held.close()
        return policy, station
    policy, station = asyncio.run(run())
    assert policy.rules == () and station is None


def test_a_directory_that_cannot_open_is_retried_only_after_reopen_s(tmp_path: Path, pool,
                                                                     monkeypatch):
    (tmp_path / "blocked").write_text("a file where a folder should be")
    bad = settings_for(f"sqlite://{tmp_path}/blocked/d.db")
    opens = []
    original = type(bad).open

    def counting_open(self):
        opens.append(self.text)
        return original(self)
    monkeypatch.setattr(type(bad), "open", counting_open)

    async def run():
        held = DirectoryHolder(lambda: pool, "answering 503")
        await held.configure(bad)
        with pytest.raises(DirectoryError, match="is not open") as first:
            await held.current()
        with pytest.raises(DirectoryError):
            await held.current()             # within REOPEN_S: no new attempt
        attempts = len(opens)
        held._reopen_at = 0.0                # as if REOPEN_S had passed
        with pytest.raises(DirectoryError):
            await held.current()
        held.close()
        return str(first.value), attempts
    reason, attempts = asyncio.run(run())
    assert attempts == 1, opens
    assert len(opens) == 2, opens
    assert "blocked" in reason


def test_reload_to_another_store_swaps_it_and_a_failed_one_is_retried_at_once(tmp_path, pool):
    async def run():
        held = DirectoryHolder(lambda: pool, "answering 503")
        first = settings_for(f"sqlite://{tmp_path}/a.db")
        await held.configure(first)
        a = await held.current()
        await held.configure(settings_for(f"sqlite://{tmp_path}/b.db"))
        b = await held.current()
        await held.configure(settings_for(f"sqlite://{tmp_path}/b.db"))   # unchanged: kept
        same = await held.current()
        held.close()
        return a, b, same
    a, b, same = asyncio.run(run())
    assert a is not b and same is b
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


def test_a_missing_sqlite_file_is_an_error_and_is_not_created(tmp_path, pool):
    async def run():
        held = DirectoryHolder(lambda: pool, "answering 503")
        await held.configure(settings_for(f"sqlite://{tmp_path}/d.db", made=False))
        with pytest.raises(DirectoryError, match="no such database file") as raised:
            await held.lookup("52:54:00:00:00:01")
        held.close()
        return str(raised.value)
    assert "preboot-dir" in asyncio.run(run())
    assert list(tmp_path.iterdir()) == []


def test_describe_says_what_went_wrong():
    assert describe(asyncio.TimeoutError()) == "no answer within DirectoryTimeout"
    assert describe(DirectoryError("server down")) == "server down"
    assert describe(ValueError("x")) == "ValueError: x"
