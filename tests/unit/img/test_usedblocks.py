"""Unit tests for img.usedblocks: filesystem detection, the domain-log codec, extent algebra.

Detection runs on the first bytes of real filesystems, made here with the mkfs tools on sparse
files (quick, no root needed); a test skips when its mkfs is missing.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from img.usedblocks import (
    PROBE_BYTES, Extent, UsedMap, detect_filesystem, fat_cluster_count, filesystem_unit,
    format_map, merge_extents, parse_domain_log, partclone_distrusted, raw_map, safety_extents,
)

MiB = 1024 * 1024

# (id, expected, size in MiB, mkfs command; the image path is appended)
MKFS = [
    ("ext2", "ext2", 16, ["mkfs.ext2", "-q", "-F"]),
    ("ext3", "ext3", 16, ["mkfs.ext3", "-q", "-F"]),
    ("ext4", "ext4", 16, ["mkfs.ext4", "-q", "-F"]),
    ("ext4-4k", "ext4", 16, ["mkfs.ext4", "-q", "-F", "-b", "4096"]),
    ("ext4-no-extents", "ext4", 16, ["mkfs.ext4", "-q", "-F", "-O", "^extents,^64bit"]),
    ("fat12", "vfat", 8, ["mkfs.vfat", "-F", "12"]),
    ("fat16", "vfat", 32, ["mkfs.vfat", "-F", "16"]),
    ("fat32", "vfat", 64, ["mkfs.vfat", "-F", "32"]),
    ("ntfs", "ntfs", 16, ["mkntfs", "-F", "-Q", "-q"]),
    ("xfs", "xfs", 300, ["mkfs.xfs", "-q", "-f"]),
    ("btrfs", "btrfs", 256, ["mkfs.btrfs", "-q", "-f"]),
]


def make_probe(tmp_path: Path, size_mib: int, command: list[str]) -> bytes:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    image = tmp_path / "fs.img"
    with open(image, "wb") as handle:
        handle.truncate(size_mib * MiB)
    subprocess.run(command + [str(image)], check=True, capture_output=True)
    with open(image, "rb") as handle:
        return handle.read(PROBE_BYTES)


@pytest.mark.parametrize("expected,size_mib,command",
                         [m[1:] for m in MKFS], ids=[m[0] for m in MKFS])
def test_detects_real_filesystems(tmp_path, expected, size_mib, command):
    assert detect_filesystem(make_probe(tmp_path, size_mib, command)) == expected


# (id, the filesystem's own sector or block size, size in MiB, mkfs command)
UNITS = [
    ("ext4-1k", 1024, 16, ["mkfs.ext4", "-q", "-F", "-b", "1024"]),
    ("ext4-4k", 4096, 16, ["mkfs.ext4", "-q", "-F", "-b", "4096"]),
    ("fat-512", 512, 64, ["mkfs.vfat", "-F", "32", "-S", "512"]),
    ("fat-4096", 4096, 64, ["mkfs.vfat", "-F", "32", "-S", "4096"]),
    ("ntfs-512", 512, 16, ["mkntfs", "-F", "-Q", "-q", "-s", "512"]),
    ("ntfs-4096", 4096, 16, ["mkntfs", "-F", "-Q", "-q", "-s", "4096"]),
    ("xfs-512", 512, 300, ["mkfs.xfs", "-q", "-f", "-s", "size=512"]),
    ("xfs-4096", 4096, 300, ["mkfs.xfs", "-q", "-f", "-s", "size=4096"]),
    ("btrfs", 4096, 256, ["mkfs.btrfs", "-q", "-f"]),
]


@pytest.mark.parametrize("unit,size_mib,command", [u[1:] for u in UNITS], ids=[u[0] for u in UNITS])
def test_filesystem_unit_of_real_filesystems(tmp_path, unit, size_mib, command):
    assert filesystem_unit(make_probe(tmp_path, size_mib, command)) == unit


@pytest.mark.parametrize("data", [b"", bytes(PROBE_BYTES), b"\xff" * PROBE_BYTES])
def test_filesystem_unit_of_no_filesystem_is_none(data):
    assert filesystem_unit(data) is None


@pytest.mark.parametrize("command, size_mib, fat12", [
    (["mkfs.vfat", "-F", "12"], 8, True),
    (["mkfs.vfat", "-F", "12", "-S", "4096"], 32, True),
    (["mkfs.vfat", "-F", "16"], 32, False),
    (["mkfs.vfat", "-F", "32"], 64, False),
], ids=["fat12", "fat12-4096", "fat16", "fat32"])
def test_fat12_is_not_left_to_partclone(tmp_path, command, size_mib, fat12):
    probe = make_probe(tmp_path, size_mib, command)
    clusters = fat_cluster_count(probe)
    assert clusters is not None and (clusters <= 4084) == fat12
    reason = partclone_distrusted("vfat", probe)
    assert bool(reason) == fat12 and ("FAT12" in reason) == fat12


def test_fat_cluster_count_of_no_fat_is_none():
    assert fat_cluster_count(bytes(PROBE_BYTES)) is None
    assert partclone_distrusted("ext4", bytes(PROBE_BYTES)) == ""


@settings(max_examples=300)
@given(st.sampled_from([b"XFSB", b"\xebX\x90NTFS    ", b""]), st.binary(max_size=200))
def test_filesystem_unit_never_raises(start, rest):
    unit = filesystem_unit(start + rest)
    assert unit is None or unit >= 0


@pytest.mark.parametrize("command", [["mkfs.ext4", "-q", "-F"], ["mkfs.vfat", "-F", "32"]])
def test_detection_survives_a_short_probe(tmp_path, command):
    probe = make_probe(tmp_path, 64, command)
    assert detect_filesystem(probe[:4096]) is not None
    assert detect_filesystem(probe[:600]) in (None, "vfat")  # FAT needs only its boot sector


def test_ext_journal_device_is_not_a_filesystem(tmp_path):
    probe = make_probe(tmp_path, 16, ["mkfs.ext4", "-q", "-F", "-O", "journal_dev"])
    assert detect_filesystem(probe) is None


def test_ntfs_checked_before_its_fat_like_boot_sector(tmp_path):
    probe = make_probe(tmp_path, 16, ["mkntfs", "-F", "-Q", "-q"])
    assert probe[510:512] == b"\x55\xaa"
    assert detect_filesystem(probe) == "ntfs"


def _fat_boot_sector() -> bytearray:
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x3c\x90"
    sector[3:11] = b"mkfs.fat"
    struct.pack_into("<HBHB", sector, 11, 512, 4, 1, 2)
    sector[21] = 0xF8
    sector[54:62] = b"FAT16   "
    sector[510:512] = b"\x55\xaa"
    return sector


def _with(data: bytes | bytearray, offset: int, patch: bytes) -> bytes:
    changed = bytearray(data)
    changed[offset:offset + len(patch)] = patch
    return bytes(changed)


NOT_FILESYSTEMS = {
    "empty": b"",
    "zeros": bytes(PROBE_BYTES),
    "ones": b"\xff" * PROBE_BYTES,
    "random": random.Random(7).randbytes(PROBE_BYTES),
    "mbr-only": _with(bytes(512), 510, b"\x55\xaa"),
    "fat-without-signature": _with(_fat_boot_sector(), 510, b"\0\0"),
    "fat-bad-sector-size": _with(_fat_boot_sector(), 11, struct.pack("<H", 500)),
    "fat-no-fats": _with(_fat_boot_sector(), 16, b"\0"),
    "fat-bad-media": _with(_fat_boot_sector(), 21, b"\x12"),
    "fat-no-type-string": _with(_fat_boot_sector(), 54, b"XYZ12   "),
    "exfat": _with(_with(_fat_boot_sector(), 3, b"EXFAT   "), 11, bytes(53)),
    "ntfs-without-signature": _with(bytes(512), 3, b"NTFS    "),
    "ext-magic-truncated": _with(bytes(1024 + 60), 1024 + 56, b"\x53\xef"),
    "ext-magic-bad-block-size": _with(_with(bytes(2048), 1024 + 56, b"\x53\xef"), 1024 + 24,
                                      struct.pack("<I", 12)),
    "xfs-magic-elsewhere": _with(bytes(4096), 512, b"XFSB"),
    "btrfs-magic-truncated": bytes(0x10040) + b"_BHRfS",
}


@pytest.mark.parametrize("data", NOT_FILESYSTEMS.values(), ids=NOT_FILESYSTEMS.keys())
def test_non_filesystems_are_unknown(data):
    assert detect_filesystem(data) is None


def test_handmade_fat_sector_is_vfat():
    assert detect_filesystem(bytes(_fat_boot_sector())) == "vfat"


@given(st.binary(max_size=4096))
def test_detect_never_raises(data):
    assert detect_filesystem(data) in (None, "ext2", "ext3", "ext4", "vfat", "ntfs", "xfs", "btrfs")


# --- domain log ---------------------------------------------------------------------------

PARTCLONE_LOG = """\
# Domain logfile created by unset_name v0.3.23
# Source: e.img
# Offset: 0x00000000
# current_pos  current_status
0x04000000     ?
#      pos        size  status
0x00000000  0x00448400  +
0x00448400  0x003B8000  ?
0x00800400  0x00040800  +
0x00840C00  0x007BF800  ?
0x03800400  0x00040800  +
0x03840C00  0x007BF400  ?
"""


def E(*pairs: int) -> tuple[Extent, ...]:  # noqa: N802 - reads like a literal
    return tuple(Extent(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))


PARSE_CASES = {
    "partclone-ext4-1k": (PARTCLONE_LOG, 0x4000000,
                          E(0, 0x448400, 0x800400, 0x40800, 0x3800400, 0x40800)),
    "status-line-only": ("0x0 ?\n", 100, ()),
    "touching-merge": ("0 ?\n0 10 +\n10 5 +\n20 5 +\n", 100, E(0, 15, 20, 5)),
    "overlap-and-unsorted": ("0 ?\n50 10 +\n0 20 +\n10 20 +\n55 1 +\n", 100, E(0, 30, 50, 10)),
    "other-statuses-ignored": ("0 +\n0 10 ?\n10 10 *\n20 10 /\n30 10 -\n40 10 +\n", 100, E(40, 10)),
    "clipped-at-size": ("0 ?\n0x50 0x100 +\n0x200 0x10 +\n", 0x60, E(0x50, 0x10)),
    "zero-size-dropped": ("0 ?\n5 0 +\n", 100, ()),
    "three-field-status-line": ("0x10 ? 1\n0x0 0x4 +\n", 100, E(0, 4)),
    "crlf-blank-and-indented": ("# c\r\n\r\n  0x0  ?  \r\n\t0x0\t0x8\t+\r\n", 100, E(0, 8)),
    "uppercase-hex": ("0X0 ?\n0X1A 0XA +\n", 100, E(26, 10)),
    "size-zero-partition": ("0 ?\n0 10 +\n", 0, ()),
}


@pytest.mark.parametrize("text,size,expected", PARSE_CASES.values(), ids=PARSE_CASES.keys())
def test_parse_domain_log(text, size, expected):
    assert parse_domain_log(text, size) == expected


MALFORMED = {
    "empty": ("", "no 'current_pos status'"),
    "comments-only": ("# a\n# b\n", "no 'current_pos status'"),
    "bad-status-line": ("# x\nhello\n", "line 2"),
    "status-line-bad-char": ("0x0 !\n", "line 1"),
    "missing-status": ("0 ?\n0 10\n", "line 2"),
    "bad-hex": ("0 ?\n0 10 +\n0xZZ 10 +\n", "line 3"),
    "unknown-block-status": ("0 ?\n# c\n\n0 10 F\n", "line 4"),
    "extra-field": ("0 ?\n0 10 + extra\n", "line 2"),
    "negative": ("0 ?\n-5 10 +\n", "line 2"),
    "unicode-digits": ("0 ?\n\u0663 10 +\n", "line 2"),
    "glued": ("0 ?\n0x010+\n", "line 2"),
}


@pytest.mark.parametrize("text,message", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_domain_log_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_domain_log(text, 1000)


def _assert_canonical(extents: tuple[Extent, ...], size: int) -> None:
    UsedMap("ext4", size, extents, "check")  # validates sorted, merged, within [0, size)


@given(st.text(max_size=300), st.integers(0, 2**40))
def test_parse_random_text_raises_only_value_error(text, size):
    try:
        extents = parse_domain_log(text, size)
    except ValueError:
        return
    _assert_canonical(extents, size)


LINE = st.tuples(st.integers(0, 300), st.integers(0, 60), st.sampled_from("+?*/-"))


@settings(max_examples=200)
@given(st.lists(LINE, max_size=30), st.integers(0, 400))
def test_parse_matches_a_bitmap(lines, size):
    text = "# generated\n0x0 ?\n" + "".join(
        f"{hex(pos) if i % 2 else pos}  {hex(length)}  {status}\n"
        for i, (pos, length, status) in enumerate(lines))
    extents = parse_domain_log(text, size)
    _assert_canonical(extents, size)
    wanted = bytearray(size)
    for pos, length, status in lines:
        if status == "+":
            for byte in range(pos, min(pos + length, size)):
                wanted[byte] = 1
    got = bytearray(size)
    for extent in extents:
        got[extent.offset:extent.end] = b"\x01" * extent.length
    assert got == wanted


# --- extents, maps, safety areas -------------------------------------------------------------

def test_merge_extents_clips_sorts_and_merges():
    assert merge_extents([Extent(90, 20), Extent(-5, 10), Extent(5, 5), Extent(40, 0)], 100) \
        == E(0, 10, 90, 10)


def test_used_map_rejects_non_canonical_extents():
    with pytest.raises(ValueError):
        UsedMap("ext4", 100, E(0, 10, 10, 5), "touching")
    with pytest.raises(ValueError):
        UsedMap("ext4", 100, E(20, 5, 0, 5), "unsorted")
    with pytest.raises(ValueError):
        UsedMap("ext4", 100, E(95, 10), "beyond size")


def test_raw_map_covers_everything():
    result = raw_map(12345, "unknown filesystem: x; raw")
    assert result.filesystem == "raw" and result.extents == E(0, 12345)
    assert result.used_bytes() == 12345
    assert raw_map(0, "empty").extents == ()


def test_safety_extents_keep_boot_area():
    extents, note = safety_extents("ext4", b"", 10 * MiB)
    assert extents == E(0, 65536) and "64 KiB" in note
    assert safety_extents("vfat", b"", 1000)[0] == E(0, 1000)


def test_safety_extents_keep_ntfs_backup_boot_sector(tmp_path):
    probe = make_probe(tmp_path, 16, ["mkntfs", "-F", "-Q", "-q"])
    extents, note = safety_extents("ntfs", probe, 16 * MiB)
    assert extents == E(0, 65536, 16 * MiB - 512, 512)
    assert "backup boot sector" in note
    # A partition bigger than the volume: keep the sector past the volume and the last one.
    extents, _ = safety_extents("ntfs", probe, 32 * MiB)
    assert extents == E(0, 65536, 16 * MiB - 512, 512, 32 * MiB - 512, 512)


def test_format_map_lists_first_extents():
    result = UsedMap("ext4", 1 << 20, E(0, 4096, 8192, 4096, 65536, 10),
                     "partclone.ext4 domain log")
    text = format_map(result, limit=2)
    assert "filesystem: ext4" in text and "8202" in text and "... 1 more" in text
