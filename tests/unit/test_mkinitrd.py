"""packaging/imaging-env/mkinitrd.py: the initrd writer. Read back with GNU cpio (a real
reader, as the kernel's is not callable here), same bytes from trees that differ only in what
must not matter, and the entries it refuses."""

import gzip
import importlib.util
import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mkinitrd", REPO / "packaging/imaging-env/mkinitrd.py")
mkinitrd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mkinitrd)


def make_tree(root: Path, mode_bits: int = 0o644, mtime: int = 1_000_000) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(100))
    (root / "bin/busybox").chmod(0o700 if mode_bits == 0o600 else 0o755)
    (root / "bin/sh").symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/a-b").write_text("x")       # '-' sorts before '/': 'etc/a-b' < 'etc/a/...'
    (root / "etc/a").mkdir()
    (root / "etc/a/c").write_text("odd length!")
    (root / "empty").mkdir()
    for path in root.rglob("*"):
        if not path.is_symlink():
            if path.is_file() and path.name != "busybox":
                path.chmod(mode_bits)
            os.utime(path, (mtime, mtime))
    return root


def archive(root: Path, epoch: int = 42) -> bytes:
    out = io.BytesIO()
    mkinitrd.write_initrd(str(root), out, epoch)
    return out.getvalue()


def test_gnu_cpio_reads_it_back(tmp_path):
    raw = archive(make_tree(tmp_path / "tree"))
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=gzip.decompress(raw),
                             capture_output=True, check=True).stdout.decode()
    lines = listing.splitlines()
    names = [line.split()[8] for line in lines]
    assert names == ["bin", "bin/busybox", "bin/sh", "empty", "etc", "etc/a", "etc/a-b",
                     "etc/a/c"]
    assert all(" root " in line for line in lines)           # owner 0:0 whatever built it
    assert lines[1].startswith("-rwxr-xr-x") and lines[6].startswith("-rw-r--r--")
    assert "bin/sh -> busybox" in listing
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=gzip.decompress(raw), cwd=out, check=True)
    assert (out / "etc/a/c").read_text() == "odd length!"
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.stat(out / "etc/a/c").st_mtime == 42


def test_same_bytes_whatever_the_umask_mtime_and_place(tmp_path):
    first = archive(make_tree(tmp_path / "one", 0o644, 1_000_000))
    second = archive(make_tree(tmp_path / "elsewhere" / "two", 0o600, 2_000_000))
    assert first == second
    assert first[4:8] == bytes(4)                 # gzip MTIME 0 (RFC 1952 section 2.3)
    assert not first[3] & 0x08                    # no FNAME: no build path
    assert archive(tmp_path / "one", epoch=43) != first


@pytest.mark.parametrize("make,reason", [
    (lambda p: os.mkfifo(p / "fifo"), "not a folder, file or link"),
    (lambda p: (p / "file").write_text("x"), "not a folder"),   # root given as a file
])
def test_refused_trees(tmp_path, make, reason):
    root = tmp_path / "tree"
    root.mkdir()
    make(root)
    target = root / "file" if reason == "not a folder" else root
    with pytest.raises(mkinitrd.TreeError, match=reason):
        archive(target)


def test_command_line_errors(tmp_path, capsys):
    assert mkinitrd.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert mkinitrd.main([str(tmp_path), str(tmp_path / "out"), "--epoch", "-1"]) == 2
    assert "32-bit" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcXYZ-_.0", min_size=1, max_size=8).filter(
           lambda n: n not in (".", "..")), st.binary(max_size=70), max_size=8))
def test_any_flat_tree_round_trips(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("fuzz")
    for name, data in files.items():
        (root / name).write_bytes(data)
    raw = gzip.decompress(archive(root))
    out = tmp_path_factory.mktemp("out")
    subprocess.run(["cpio", "-id", "--quiet"], input=raw, cwd=out, check=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert len(raw) % 4 == 0 and raw.rstrip(b"\0").endswith(b"TRAILER!!!")
