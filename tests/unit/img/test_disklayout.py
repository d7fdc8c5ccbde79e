"""The partition table codec (img/disklayout.py): MBR, EBR chains, GPT, growth, robustness."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from img.disklayout import (
    HEAD_BYTES, TAIL_BYTES, DiskLayout, DiskLayoutError, Partition, head_bytes, parse_layout,
    read_layout, table_writes, tail_bytes,
)

MiB = 1024 * 1024
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BASIC = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
DISK_GUID = "11111111-2222-3333-4444-555555555555"


class SparseDisk:
    """A disk of any size held as the writes made to it; unwritten bytes read as zero."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: dict[int, bytes] = {}

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size, (offset, len(data))
        for old in [o for o in self.chunks if o < offset + len(data)
                    and offset < o + len(self.chunks[o])]:
            old_data = self.chunks.pop(old)
            if old < offset:
                self.chunks[old] = old_data[:offset - old]
            if old + len(old_data) > offset + len(data):
                cut = offset + len(data) - old
                self.chunks[offset + len(data)] = old_data[cut:]
        self.chunks[offset] = bytes(data)

    def apply(self, writes) -> SparseDisk:
        for offset, data in writes:
            self.write(offset, data)
        return self

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, data in self.chunks.items():
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset:hi - offset] = data[lo - start:hi - start]
        return bytes(out)

    def parse(self, sector_size: int = 512, read_at: bool = True) -> DiskLayout:
        head = self.read(0, min(self.size, HEAD_BYTES))
        tail_len = min(self.size, TAIL_BYTES)
        tail = self.read(self.size - tail_len, tail_len)
        return parse_layout(head, tail, self.size, sector_size,
                            self.read if read_at else None)


def written(layout: DiskLayout, boot_code: bytes = b"") -> SparseDisk:
    return SparseDisk(layout.disk_size).apply(table_writes(layout, boot_code))


def mbr_layout(size: int = 64 * MiB) -> DiskLayout:
    """Like sfdisk's: 1 bootable, 2 NTFS, 3 extended holding 5 (swap) and 6, 4 after it."""
    return DiskLayout("mbr", 512, size, "0x1234abcd", (
        Partition(1, 2048, 16384, "0x83", bootable=True),
        Partition(2, 18432, 16384, "0x07"),
        Partition(3, 34816, 81920, "0x05"),
        Partition(4, 116736, 8192, "0x83"),
        Partition(5, 36864, 8192, "0x82"),
        Partition(6, 47104, 69632, "0x83"),
    ))


def gpt_layout(size: int = 64 * MiB, sector_size: int = 512) -> DiskLayout:
    sectors = size // sector_size
    entry_sectors = 128 * 128 // sector_size
    last_usable = sectors - 2 - entry_sectors
    first = 2048 if sector_size == 512 else 256
    return DiskLayout("gpt", sector_size, size, DISK_GUID, (
        Partition(1, first, first * 8, ESP, "D03EB231-0BA9-4553-B3CD-2464C6F630B1", "EFI system"),
        Partition(2, first * 9, first * 16, LINUX, "B6257FE9-0024-40A4-BDF4-B78DAF65837E",
                  "Linux root", attributes=(1 << 60) | 4),
        Partition(3, first * 25, last_usable - first * 25 + 1, BASIC,
                  "21C2CBD3-D36E-4E02-A8F7-9E6A55E4A0CC", "Données ✓"),
    ), 2 + entry_sectors, last_usable)


# --- round trips ---------------------------------------------------------------------------------

def test_head_and_tail_sizes_cover_both_sector_sizes():
    assert head_bytes(512) == 34 * 512 and tail_bytes(512) == 33 * 512
    assert head_bytes(4096) == 6 * 4096 and tail_bytes(4096) == 5 * 4096
    assert HEAD_BYTES >= max(head_bytes(512), head_bytes(4096))
    assert TAIL_BYTES >= max(tail_bytes(512), tail_bytes(4096))


def test_mbr_with_logical_partitions_round_trips():
    layout = mbr_layout()
    disk = written(layout, b"\xfa" * 440)
    parsed = disk.parse()
    assert parsed == layout and parsed.warnings == ()
    assert disk.read(0, 440) == b"\xfa" * 440
    assert disk.read(440, 4) == struct.pack("<I", 0x1234ABCD)
    # EBRs: the first at the extended partition's start, the next 2048 sectors before partition 6
    assert [o // 512 for o, _ in table_writes(layout)] == [0, 34816, 45056]


def test_logical_partitions_need_read_at():
    disk = written(mbr_layout())
    with pytest.raises(DiskLayoutError, match="read_at"):
        disk.parse(read_at=False)


def test_gpt_round_trips_with_names_guids_attributes():
    layout = gpt_layout()
    disk = written(layout, b"\xeb\x63\x90" + bytes(437))
    parsed = disk.parse(read_at=False)
    assert parsed == layout and parsed.warnings == ()
    assert parsed.partition(3).name == "Données ✓"
    assert disk.read(0, 3) == b"\xeb\x63\x90"
    assert disk.read(450, 1) == b"\xee"
    assert disk.read(512, 8) == b"EFI PART" and disk.read(layout.disk_size - 512, 8) == b"EFI PART"


def test_short_head_or_tail_without_read_at_is_an_error():
    disk = written(gpt_layout())
    with pytest.raises(DiskLayoutError, match="too short"):
        parse_layout(disk.read(0, 512), disk.read(disk.size - TAIL_BYTES, TAIL_BYTES), disk.size)
    with pytest.raises(DiskLayoutError, match="too short"):
        parse_layout(disk.read(0, HEAD_BYTES), b"", disk.size)
    assert parse_layout(disk.read(0, 512), b"", disk.size, read_at=disk.read) == gpt_layout()


def test_gpt_with_4096_byte_sectors_round_trips():
    layout = gpt_layout(sector_size=4096)
    assert layout.first_usable_lba == 6
    assert written(layout).parse(4096, read_at=False) == layout


def test_gpt_with_a_small_entry_array_keeps_its_size():
    layout = DiskLayout("gpt", 512, 8 * MiB, DISK_GUID, (Partition(56, 16, 100, LINUX),),
                        16, 8 * MiB // 512 - 16)
    writes = dict(table_writes(layout))
    assert len(writes[1024]) == 14 * 512
    assert written(layout).parse() == layout
    assert layout.grown(16 * MiB).last_usable_lba == 16 * MiB // 512 - 16


def test_gpt_hint_when_the_sector_size_is_wrong():
    disk = written(gpt_layout(sector_size=4096))
    with pytest.raises(DiskLayoutError, match="4096-byte sectors"):
        disk.parse(512)


def test_empty_mbr_and_gpt_tables():
    mbr = DiskLayout("mbr", 512, 8 * MiB, "0x00000001", ())
    assert written(mbr).parse() == mbr
    gpt = DiskLayout("gpt", 512, 8 * MiB, DISK_GUID, (), 34, 8 * MiB // 512 - 34)
    assert written(gpt).parse() == gpt


def test_extended_partition_without_logicals_gets_an_empty_ebr():
    layout = DiskLayout("mbr", 512, 8 * MiB, "0x00000002", (Partition(1, 2048, 4096, "0x0f"),))
    writes = table_writes(layout)
    assert [o for o, _ in writes] == [0, 2048 * 512]
    assert writes[1][1][510:] == b"\x55\xaa" and writes[1][1][446:510] == bytes(64)
    assert written(layout).parse() == layout


def test_none_for_blank_disk_and_whole_disk_filesystems():
    blank = SparseDisk(8 * MiB)
    assert blank.parse() == DiskLayout("none", 512, 8 * MiB, "", ())
    assert table_writes(blank.parse()) == []
    fat = SparseDisk(8 * MiB)
    boot = bytearray(512)
    boot[0:11] = b"\xeb\x3c\x90mkfs.fat"
    boot[11:13], boot[16] = (512).to_bytes(2, "little"), 2
    boot[54:62], boot[510:] = b"FAT16   ", b"\x55\xaa"
    fat.write(0, boot)
    assert fat.parse().kind == "none"
    boot[11:13] = bytes(2)          # not a sane BIOS Parameter Block: an (empty) MBR after all
    fat.write(0, boot)
    assert fat.parse().kind == "mbr"
    ntfs = SparseDisk(8 * MiB)
    ntfs.write(0, b"\xeb\x52\x90NTFS    " + bytes(499) + b"\x55\xaa")
    assert ntfs.parse().kind == "none"
    bad_flag = SparseDisk(8 * MiB)
    bad_flag.write(446, b"\x12" + bytes(63) + b"\x55\xaa")
    assert bad_flag.parse().kind == "none"
    tiny = parse_layout(b"", b"", 100)
    assert tiny.kind == "none" and tiny.last_used_byte() == 100


def test_gpt_without_protective_mbr_is_ignored_with_a_warning():
    disk = written(gpt_layout())
    disk.write(0, bytes(512))
    layout = disk.parse()
    assert layout.kind == "none" and "without a protective MBR" in layout.warnings[0]


def test_hybrid_mbr_reads_as_gpt_with_a_warning():
    layout = gpt_layout()
    disk = written(layout)
    disk.write(462, struct.pack("<B3sB3sII", 0x80, bytes(3), 0x0C, bytes(3), 2048, 16384))
    parsed = disk.parse()
    assert parsed == layout and any("hybrid" in w for w in parsed.warnings)


# --- damage --------------------------------------------------------------------------------------

def _corrupt(disk: SparseDisk, offset: int) -> None:
    disk.write(offset, bytes([disk.read(offset, 1)[0] ^ 0xFF]))


@pytest.mark.parametrize("offset, reason", [
    (512, "signature"),             # "EFI PART"
    (512 + 40, "header CRC32"),     # FirstUsableLBA
    (1024 + 200, "entry array CRC32"),
])
def test_corrupt_primary_gpt_uses_the_backup(offset, reason):
    layout = gpt_layout()
    disk = written(layout)
    _corrupt(disk, offset)
    parsed = disk.parse()
    assert parsed == layout
    assert any("primary GPT header invalid" in w and "backup" in w for w in parsed.warnings)


def test_primary_my_lba_is_checked():
    layout = gpt_layout()
    disk = written(layout)
    header = bytearray(disk.read(512, 92))
    header[24:32] = struct.pack("<Q", 7)
    header[16:20] = bytes(4)
    header[16:20] = struct.pack("<I", zlib.crc32(header))
    disk.write(512, header)
    parsed = disk.parse()
    assert parsed == layout and "MyLBA" in parsed.warnings[0]


def test_corrupt_backup_is_a_warning():
    layout = gpt_layout()
    disk = written(layout)
    _corrupt(disk, layout.disk_size - 512 + 3)
    parsed = disk.parse()
    assert parsed == layout and any("backup GPT header" in w for w in parsed.warnings)


def test_both_gpt_headers_corrupt_is_an_error():
    layout = gpt_layout()
    disk = written(layout)
    _corrupt(disk, 512 + 60)
    _corrupt(disk, layout.disk_size - 512 + 60)
    with pytest.raises(DiskLayoutError, match="no valid GPT.*primary.*backup"):
        disk.parse()


def test_disk_enlarged_by_dd_keeps_the_primary_with_warnings():
    layout = gpt_layout()
    bigger = SparseDisk(128 * MiB).apply(table_writes(layout))
    parsed = bigger.parse()
    assert parsed.partitions == layout.partitions and parsed.disk_size == 128 * MiB
    assert any("not at the last LBA" in w for w in parsed.warnings)
    assert parsed.relocated(128 * MiB).last_usable_lba == 128 * MiB // 512 - 34


_HEADER_FIELDS = ["signature", "revision", "header_size", "header_crc", "reserved", "my_lba",
                  "alternate_lba", "first_usable", "last_usable", "disk_guid", "entries_lba",
                  "num_entries", "entry_size", "entries_crc"]
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")


def _rewrite_primary(disk: SparseDisk, entries: bytes | None = None, **changes) -> None:
    """Change primary GPT header fields (and the entry array) keeping every CRC32 valid."""
    fields = dict(zip(_HEADER_FIELDS, _HEADER.unpack(disk.read(512, 92))))
    if entries is not None:
        disk.write(fields["entries_lba"] * 512, entries)
        fields["entries_crc"] = zlib.crc32(entries)
    fields.update(changes, header_crc=0)
    fields["header_crc"] = zlib.crc32(_HEADER.pack(*fields.values()))
    disk.write(512, _HEADER.pack(*fields.values()))


@pytest.mark.parametrize("changes, reason", [
    (dict(header_size=60), "header size"),
    (dict(entry_size=100), "128 x 2^n"),
    (dict(num_entries=1 << 30), "too many"),
    (dict(first_usable=5000, last_usable=4000), "usable LBAs"),
    (dict(last_usable=1 << 40), "usable LBAs"),
    (dict(entries_lba=40), "overlaps usable"),
])
def test_primary_header_field_checks(changes, reason):
    layout = gpt_layout()
    disk = written(layout)
    _rewrite_primary(disk, **changes)
    parsed = disk.parse()
    assert parsed == layout and reason in parsed.warnings[0]


def test_entry_outside_the_usable_lbas_is_an_error():
    layout = gpt_layout()
    disk = written(layout)
    _corrupt(disk, layout.disk_size - 512 + 60)   # no backup to fall back on
    entries = bytearray(disk.read(1024, 16384))
    struct.pack_into("<Q", entries, 32, 10)       # partition 1 starts at LBA 10
    _rewrite_primary(disk, bytes(entries))
    with pytest.raises(DiskLayoutError, match="partition 1 .* outside the usable"):
        disk.parse()


def test_backup_that_differs_is_a_warning():
    layout = gpt_layout()
    disk = written(layout)
    entries = bytearray(disk.read(1024, 16384))
    entries[56:58] = "X".encode("utf-16-le")
    _rewrite_primary(disk, bytes(entries))
    parsed = disk.parse()
    assert parsed.partition(1).name == "XFI system"
    assert parsed.warnings == ("the backup GPT differs from the primary; the primary is used",)


def test_ebr_without_signature_ends_the_chain_with_a_warning():
    layout = mbr_layout()
    disk = written(layout)
    disk.write(45056 * 512 + 510, b"\0\0")          # the EBR of partition 6
    parsed = disk.parse()
    assert [p.number for p in parsed.partitions] == [1, 2, 3, 4, 5]
    assert parsed.warnings == ("no valid EBR at LBA 45056; the logical partitions end there",)


def _mbr_with(records: list[tuple[int, int, int, int]], size: int = 8 * MiB) -> SparseDisk:
    disk = SparseDisk(size)
    table = b"".join(struct.pack("<B3sB3sII", boot, bytes(3), ptype, bytes(3), start, count)
                     for boot, ptype, start, count in records)
    disk.write(446, table.ljust(64, b"\0") + b"\x55\xaa")
    return disk


@pytest.mark.parametrize("records, match", [
    ([(0, 0x83, 2048, 1 << 30)], "beyond the disk"),
    ([(0, 0x05, 2048, 4096), (0, 0x0F, 8192, 4096)], "extended partitions"),
    ([(0, 0xEE, 1, 16383)], "no valid GPT"),
    ([(0, 0x05, 1 << 20, 4096)], "beyond the end of the disk"),
])
def test_malformed_mbr_tables(records, match):
    with pytest.raises(DiskLayoutError, match=match):
        _mbr_with(records).parse()


def test_ebr_chain_loop_and_escape_are_errors():
    disk = _mbr_with([(0, 0x05, 2048, 8192)])
    ebr = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, 100)
    loop = struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), 0, 100)
    disk.write(2048 * 512 + 446, (ebr + loop).ljust(64, b"\0") + b"\x55\xaa")
    with pytest.raises(DiskLayoutError, match="loops"):
        disk.parse()
    escape = struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), 9000, 100)
    disk.write(2048 * 512 + 446, (ebr + escape).ljust(64, b"\0") + b"\x55\xaa")
    with pytest.raises(DiskLayoutError, match="outside the extended"):
        disk.parse()
    outside = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, 9000)
    disk.write(2048 * 512 + 446, outside.ljust(64, b"\0") + b"\x55\xaa")
    with pytest.raises(DiskLayoutError, match="outside its extended"):
        disk.parse()


def test_overlapping_primaries_are_a_warning():
    parsed = _mbr_with([(0, 0x83, 2048, 4096), (0, 0x83, 4096, 4096)]).parse()
    assert [p.number for p in parsed.partitions] == [1, 2]
    assert parsed.warnings == ("partitions 1 and 2 overlap",)


@pytest.mark.parametrize("change, match", [
    (dict(first_usable_lba=1), "first usable"),
    (dict(last_usable_lba=10**9), "last usable"),
    (dict(disk_id="not-a-guid"), "disk GUID"),
])
def test_unwritable_gpt_layouts(change, match):
    with pytest.raises(DiskLayoutError, match=match):
        table_writes(dataclasses.replace(gpt_layout(), **change))


def test_a_partition_ending_on_the_last_usable_512_byte_lba_does_not_convert():
    # sgdisk's and parted's "to the end of the disk" ends 17 KiB before it, off a 4 KiB boundary
    with pytest.raises(DiskLayoutError, match="partition 3 .* does not start and end on a "
                                              "4096-byte sector boundary"):
        gpt_layout().converted(4096)


@pytest.mark.parametrize("part, match", [
    (Partition(4, 10, 100, LINUX), "outside the usable"),
    (Partition(4, 200000, 100, "zzz"), "type"),
    (Partition(4, 200000, 100, LINUX, name="x" * 37), "36 UTF-16"),
    (Partition(1, 200000, 100, LINUX), "duplicate"),
    (Partition(4, 200000, 100, "00000000-0000-0000-0000-000000000000"), "unused type"),
])
def test_unwritable_gpt_partitions(part, match):
    layout = gpt_layout(size=256 * MiB)
    with pytest.raises(DiskLayoutError, match=match):
        table_writes(dataclasses.replace(layout, partitions=layout.partitions + (part,)))


@pytest.mark.parametrize("parts, match", [
    ((Partition(5, 2048, 100, "0x83"),), "without an extended"),
    ((Partition(1, 2048, 4096, "0x05"), Partition(6, 3000, 100, "0x83")), "numbered 5, 6"),
    ((Partition(1, 2048, 4096, "0x05"), Partition(5, 2048, 100, "0x83")), "first sector"),
    ((Partition(1, 2048, 4096, "0x05"), Partition(5, 2050, 100, "0x83"),
      Partition(6, 2150, 100, "0x83")), "no free sector"),
    ((Partition(1, 2048, 4096, "83"),), "hex byte"),
    ((Partition(1, 2048, 1 << 20, "0x83"),), "beyond the disk"),
])
def test_unwritable_mbr_layouts(parts, match):
    with pytest.raises(DiskLayoutError, match=match):
        table_writes(DiskLayout("mbr", 512, 8 * MiB, "0x1", parts))


def test_bad_mbr_disk_id():
    with pytest.raises(DiskLayoutError, match="disk id"):
        table_writes(DiskLayout("mbr", 512, 8 * MiB, "0x123456789", ()))


# --- fits / relocated / grown --------------------------------------------------------------------

def test_fits():
    mbr, gpt = mbr_layout(), gpt_layout()
    assert mbr.last_used_byte() == 124928 * 512
    assert mbr.fits(124928 * 512) and not mbr.fits(124928 * 512 - 1)
    assert gpt.last_used_byte() == (gpt.last_usable_lba + 1) * 512
    assert gpt.fits(gpt.disk_size) and not gpt.fits(gpt.disk_size - 512)
    assert gpt.fits(gpt.disk_size + 512)


def test_relocated_gpt_moves_the_backup_only():
    layout = gpt_layout()
    moved = layout.relocated(1 << 40)
    assert moved.partitions == layout.partitions
    assert moved.last_usable_lba == (1 << 40) // 512 - 34
    disk = written(moved)
    assert disk.read((1 << 40) - 512, 8) == b"EFI PART"
    assert disk.parse() == moved
    with pytest.raises(DiskLayoutError, match="does not fit"):
        layout.relocated(layout.disk_size - 512)


def test_grown_gpt_fills_the_disk():
    grown = gpt_layout().grown(128 * MiB)
    last = grown.partition(3)
    assert last.end_lba - 1 == grown.last_usable_lba == 128 * MiB // 512 - 34
    assert grown.partitions[:2] == gpt_layout().partitions[:2]
    assert written(grown).parse() == grown


def test_grown_mbr_with_the_last_partition_primary():
    grown = mbr_layout().grown(128 * MiB)
    assert grown.partition(4).end_lba == 128 * MiB // 512
    assert grown.partition(3) == mbr_layout().partition(3)
    assert written(grown).parse() == grown


def test_grown_mbr_with_a_logical_partition_last():
    layout = dataclasses.replace(mbr_layout(), partitions=tuple(
        p for p in mbr_layout().partitions if p.number != 4))
    grown = layout.grown(128 * MiB)
    assert grown.partition(6).end_lba == grown.partition(3).end_lba == 128 * MiB // 512
    assert grown.partition(5) == layout.partition(5)
    assert written(grown).parse() == grown


def test_grown_mbr_extended_last_with_free_space_inside():
    layout = DiskLayout("mbr", 512, 64 * MiB, "0x1", (
        Partition(1, 2048, 8192, "0x05"), Partition(5, 4096, 2048, "0x83")))
    grown = layout.grown(128 * MiB)
    assert grown.partition(1).end_lba == grown.partition(5).end_lba == 128 * MiB // 512


def test_grown_mbr_stops_at_the_32_bit_limit():
    grown = mbr_layout().grown(4 << 40)
    assert grown.partition(4).end_lba == 0xFFFFFFFF
    assert written(grown).parse() == grown


def test_grown_refuses_a_smaller_disk_and_is_identity_on_the_same_size():
    with pytest.raises(DiskLayoutError):
        mbr_layout().grown(32 * MiB)
    assert gpt_layout().grown(64 * MiB) == gpt_layout()
    none = DiskLayout("none", 512, 8 * MiB, "", ())
    assert none.grown(16 * MiB).disk_size == 16 * MiB
    assert not none.fits(4 * MiB)


# --- shrunk --------------------------------------------------------------------------------------

def logical_last_layout(size: int = 64 * MiB) -> DiskLayout:
    """1 primary, then an extended container to the disk end whose last logical ends there too."""
    return DiskLayout("mbr", 512, size, "0x00000001", (
        Partition(1, 2048, 16384, "0x83", bootable=True),
        Partition(2, 18432, size // 512 - 18432, "0x05"),
        Partition(5, 20480, 8192, "0x82"),
        Partition(6, 30720, size // 512 - 30720, "0x83"),
    ))


def test_shrunk_mbr_cuts_the_logical_partition_and_its_container_at_the_end():
    layout = logical_last_layout()
    shrunk = layout.shrunk(40 * MiB + 12345)
    assert shrunk.disk_size == 40 * MiB + 12345
    assert shrunk.partition(6).end_lba == shrunk.partition(2).end_lba == 40 * MiB // 512
    assert shrunk.partition(6).start_lba == layout.partition(6).start_lba
    assert [shrunk.partition(n) for n in (1, 5)] == [layout.partition(n) for n in (1, 5)]
    assert written(shrunk).parse() == shrunk


def test_shrunk_mbr_primary_last_ends_on_a_mib_boundary():
    layout = mbr_layout()          # partition 4 ends at 61 MiB of 64
    shrunk = layout.shrunk(60 * MiB + 300 * 512)
    assert shrunk.partition(4).end_lba == 60 * MiB // 512
    assert shrunk.partition(4).end_lba * 512 % MiB == 0
    assert [p for p in shrunk.partitions if p.number != 4] == [
        p for p in layout.partitions if p.number != 4]
    assert written(shrunk).parse() == shrunk


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_shrunk_gpt_puts_the_backup_at_the_new_end(sector_size):
    layout = gpt_layout(sector_size=sector_size)
    target = 40 * MiB
    shrunk = layout.shrunk(target)
    last = shrunk.partition(3)
    assert last.start_lba == layout.partition(3).start_lba
    assert last.end_bytes(sector_size) == 39 * MiB       # the backup needs the last sectors
    assert shrunk.last_usable_lba == target // sector_size - 2 - 16384 // sector_size
    assert shrunk.partitions[:2] == layout.partitions[:2]
    disk = written(shrunk)
    assert disk.read(target - sector_size, 8) == b"EFI PART"
    assert disk.parse(sector_size) == shrunk


def test_shrunk_checks_each_partitions_floor():
    layout = logical_last_layout()
    room = 40 * MiB - 30720 * 512                        # what partition 6 gets
    assert layout.shrunk(40 * MiB, {6: room}).partition(6).size_bytes(512) == room
    with pytest.raises(DiskLayoutError, match="partition 6 would get 25 MiB but its data "
                                              "needs at least 26 MiB"):
        layout.shrunk(40 * MiB, {6: room + 1})
    assert layout.shrunk(40 * MiB, {1: 64 * MiB}) == layout.shrunk(40 * MiB), \
        "a partition that is not cut is not judged"


def test_min_disk_size_is_where_fits_starts():
    for layout in (mbr_layout(), gpt_layout(), gpt_layout(sector_size=4096),
                   logical_last_layout()):
        size = layout.min_disk_size()
        assert layout.fits(size) and not layout.fits(size - layout.sector_size)
    assert gpt_layout().min_disk_size() == gpt_layout().disk_size


def test_shrunk_never_moves_a_partition():
    with pytest.raises(DiskLayoutError, match="partition 4 starts at byte 59768832.*never moved"):
        mbr_layout().shrunk(50 * MiB)
    with pytest.raises(DiskLayoutError, match="partition 6 starts"):
        logical_last_layout().shrunk(15 * MiB)


def test_shrunk_on_a_disk_that_needs_no_cut_is_relocated():
    layout = gpt_layout()
    assert layout.shrunk(128 * MiB) == layout.relocated(128 * MiB)
    with pytest.raises(DiskLayoutError, match="without a partition table"):
        DiskLayout("none", 512, 8 * MiB, "", ()).shrunk(4 * MiB)


def test_shrink_limit_is_aligned_and_stays_within_the_32_bit_mbr_limit():
    assert mbr_layout().shrink_limit_lba(40 * MiB + 511) == 40 * MiB // 512
    assert mbr_layout().shrink_limit_lba(40 * MiB, align_bytes=512) == 40 * MiB // 512
    assert mbr_layout().shrink_limit_lba(4 << 40) == 0xFFFFFFFF // 2048 * 2048
    assert gpt_layout().shrink_limit_lba(40 * MiB, align_bytes=512) == 40 * MiB // 512 - 33


# --- to_dict / from_dict -------------------------------------------------------------------------

def test_dict_round_trip_through_json():
    for layout in (mbr_layout(), gpt_layout(), dataclasses.replace(
            gpt_layout(), warnings=("primary GPT header invalid",))):
        data = json.loads(json.dumps(layout.to_dict()))
        back = DiskLayout.from_dict(data)
        assert back == layout and back.warnings == layout.warnings
        assert back.to_dict() == layout.to_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("kind"), "missing key 'kind'"),
    (lambda d: d.update(kind="apm"), "unknown kind"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(disk_size="64M"), "disk_size"),
    (lambda d: d.update(sector_size=True), "sector_size"),
    (lambda d: d.update(sector_size=256), "sector size"),
    (lambda d: d.update(partitions="none"), "partitions"),
    (lambda d: d.update(warnings=[1]), "warnings"),
    (lambda d: d["partitions"][0].update(start_lba=-1), "start_lba"),
    (lambda d: d["partitions"][0].update(bootable="yes"), "bootable"),
    (lambda d: d["partitions"][0].pop("type"), "missing key 'type'"),
    (lambda d: d["partitions"].append([]), "expected an object"),
])
def test_from_dict_rejects_bad_shapes(mutate, match):
    data = mbr_layout().to_dict()
    mutate(data)
    with pytest.raises(DiskLayoutError, match=match):
        DiskLayout.from_dict(data)


def test_from_dict_rejects_non_dicts():
    with pytest.raises(DiskLayoutError):
        DiskLayout.from_dict([])


# --- read_layout ---------------------------------------------------------------------------------

def test_read_layout_from_path_and_file(tmp_path):
    image = tmp_path / "disk.img"
    layout = mbr_layout()
    with open(image, "wb") as f:
        f.truncate(layout.disk_size)
        for offset, data in table_writes(layout):
            f.seek(offset)
            f.write(data)
    assert read_layout(image) == layout
    assert read_layout(str(image), sector_size=None) == layout
    with open(image, "rb") as f:
        assert read_layout(f) == layout


# --- properties ----------------------------------------------------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.binary(max_size=HEAD_BYTES), tail=st.binary(max_size=TAIL_BYTES),
       disk_size=st.integers(0, 1 << 42), sector_size=st.sampled_from([512, 4096]))
def test_random_bytes_raise_only_disk_layout_error(head, tail, disk_size, sector_size):
    try:
        parse_layout(head, tail, disk_size, sector_size)
    except DiskLayoutError:
        pass


@st.composite
def mutated_tables(draw):
    """A valid table with a few bytes changed: reaches deeper than random bytes do."""
    layout = draw(st.sampled_from([mbr_layout(), gpt_layout()]))
    disk = written(layout)
    offsets = [o for o, d in table_writes(layout) for o in range(o, o + min(len(d), 1024))]
    for _ in range(draw(st.integers(1, 6))):
        disk.write(draw(st.sampled_from(offsets)), bytes([draw(st.integers(0, 255))]))
    return disk


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_tables())
def test_mutated_tables_raise_only_disk_layout_error(disk):
    try:
        disk.parse()
    except DiskLayoutError:
        pass


@st.composite
def random_mbr_disks(draw):
    """An MBR signature over random records, and random sectors wherever EBRs are looked for."""
    records = b"".join(
        struct.pack("<B3sB3sII", draw(st.sampled_from([0, 0x80])), bytes(3),
                    draw(st.sampled_from([0x05, 0x0F, 0x85, 0x83, 0xEE, 0x00])), bytes(3),
                    draw(st.integers(0, 1 << 14)), draw(st.integers(0, 1 << 14)))
        for _ in range(4))
    head = bytes(446) + records + b"\x55\xaa"
    sectors = draw(st.lists(st.binary(min_size=512, max_size=512), min_size=1, max_size=8))
    signed = [s[:510] + b"\x55\xaa" if draw(st.booleans()) else s for s in sectors]
    return head, signed


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(random_mbr_disks(), st.integers(1 << 13, 1 << 16))
def test_random_ebr_chains_raise_only_disk_layout_error(disk, sectors):
    head, ebrs = disk
    size = sectors * 512

    def read_at(offset: int, length: int) -> bytes:
        return ebrs[(offset // 512) % len(ebrs)][:length].ljust(length, b"\0")

    try:
        parse_layout(head, b"", size, 512, read_at)
    except DiskLayoutError:
        pass


_guids = st.uuids().map(lambda u: str(u).upper())
_names = st.text(st.characters(codec="utf-16", exclude_characters="\0"), max_size=36).filter(
    lambda s: len(s.encode("utf-16-le")) <= 72)


@st.composite
def gpt_layouts(draw):
    sector_size = draw(st.sampled_from([512, 4096]))
    sectors = draw(st.integers(64, 1 << 36))
    entry_sectors = 128 * 128 // sector_size
    first, last = 2 + entry_sectors, sectors - 2 - entry_sectors
    assume(first <= last)
    bounds = sorted(draw(st.lists(st.integers(first, last + 1), max_size=12, unique=True)))
    spans = [(a, b) for a, b in zip(bounds[::2], bounds[1::2])]
    numbers = draw(st.lists(st.integers(1, 128), min_size=len(spans), max_size=len(spans),
                            unique=True))
    parts = tuple(sorted((
        Partition(n, a, b - a, draw(_guids), draw(_guids), draw(_names),
                  draw(st.integers(0, (1 << 64) - 1)))
        for n, (a, b) in zip(numbers, spans)), key=lambda p: p.number))
    return DiskLayout("gpt", sector_size, sectors * sector_size, draw(_guids), parts, first, last)


@st.composite
def mbr_layouts(draw):
    sector_size = draw(st.sampled_from([512, 4096]))
    sectors = draw(st.integers(16, 1 << 33))
    limit = min(sectors, 0xFFFFFFFF)
    bounds = sorted(draw(st.lists(st.integers(1, limit), max_size=10, unique=True)))
    spans = [(a, b) for a, b in zip(bounds[::2], bounds[1::2])]
    slots = draw(st.permutations([1, 2, 3, 4]))[:len(spans)]
    types = st.integers(0, 255).filter(lambda t: t not in (0x05, 0x0F, 0x85, 0xEE))
    parts = []
    for number, (a, b) in zip(slots, spans):
        parts.append(Partition(number, a, b - a, f"0x{draw(types):02x}",
                               bootable=draw(st.booleans())))
    if parts and draw(st.booleans()):
        # turn one primary into an extended partition holding logicals with EBR gaps
        ext = draw(st.sampled_from(parts))
        parts.remove(ext)
        ext = dataclasses.replace(ext, type=draw(st.sampled_from(["0x05", "0x0f", "0x85"])))
        parts.append(ext)
        inner = sorted(draw(st.lists(st.integers(ext.start_lba + 1, ext.end_lba), max_size=8,
                                     unique=True)))
        cuts = [(a, b) for a, b in zip(inner[::2], inner[1::2])]
        # later logicals need a free sector before them for their EBR
        cuts = [c for i, c in enumerate(cuts) if i == 0 or c[0] > cuts[i - 1][1]]
        for i, (a, b) in enumerate(cuts):
            parts.append(Partition(5 + i, a, b - a, f"0x{draw(types):02x}",
                                   bootable=draw(st.booleans())))
    signature = draw(st.integers(0, 0xFFFFFFFF))
    return DiskLayout("mbr", sector_size, sectors * sector_size, f"0x{signature:08x}",
                      tuple(sorted(parts, key=lambda p: p.number)))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(gpt_layouts(), mbr_layouts()), st.binary(max_size=440))
def test_random_layouts_round_trip(layout, boot_code):
    disk = written(layout, boot_code)
    parsed = disk.parse(layout.sector_size)
    assert parsed == layout, parsed.warnings
    assert parsed.warnings == ()
    assert disk.read(0, len(boot_code)) == boot_code
    assert DiskLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(gpt_layouts(), mbr_layouts()), st.integers(0, 1 << 36))
def test_random_layouts_grow_and_still_round_trip(layout, extra_sectors):
    target = layout.disk_size + extra_sectors * layout.sector_size
    grown = layout.grown(target)
    assert grown.fits(target) and grown.disk_size == target
    assert grown.last_used_byte() >= layout.last_used_byte()
    assert written(grown).parse(layout.sector_size) == grown
    assert written(layout.relocated(target)).parse(layout.sector_size).partitions == \
        layout.partitions


# --- converted to another logical sector size (4Kn <-> 512) --------------------------------------

def _byte_spans(layout: DiskLayout) -> list[tuple[int, int, int, str]]:
    ss = layout.sector_size
    return [(p.number, p.start_bytes(ss), p.size_bytes(ss), p.type) for p in layout.partitions]


def aligned_gpt_layout() -> DiskLayout:
    """gpt_layout() with its last partition ending on a 4 KiB boundary."""
    layout = gpt_layout()
    last = layout.partition(3)
    return dataclasses.replace(layout, partitions=layout.partitions[:2] + (
        dataclasses.replace(last, size_lba=last.size_lba // 8 * 8),))


@pytest.mark.parametrize("make", [mbr_layout, aligned_gpt_layout], ids=["mbr", "gpt"])
def test_converted_to_4096_and_back_keeps_every_byte_offset(make):
    layout = make()
    big = layout.converted(4096)
    assert big.sector_size == 4096 and big.disk_size == layout.disk_size
    assert _byte_spans(big) == _byte_spans(layout)
    assert written(big).parse(4096) == big, "the converted table reads back as written"
    back = big.converted(512)
    assert _byte_spans(back) == _byte_spans(layout)
    assert written(back).parse(512) == back
    assert layout.converted(512) is layout


def test_converted_gpt_usable_lbas_follow_the_new_sectors():
    big = aligned_gpt_layout().converted(4096)
    # 128 entries of 128 bytes fill 4 sectors of 4096: the first usable LBA is 6 (24 KiB),
    # the backup array and header take the last 5 sectors
    assert (big.first_usable_lba, big.last_usable_lba) == (6, big.sectors - 6)
    small = gpt_layout(sector_size=4096).converted(512)
    assert (small.first_usable_lba, small.last_usable_lba) == (48, small.sectors - 34)
    assert written(small).parse(512) == small


def test_converted_mbr_logical_partitions_keep_their_ebr_gap():
    big = mbr_layout().converted(4096)
    disk = written(big)
    assert big.partition(5).start_lba == 36864 // 8
    # the EBR of logical 5 sits at the start of the extended partition, in 4096-byte LBAs
    ebr = disk.read(big.partition(3).start_lba * 4096, 512)
    assert ebr[510:] == b"\x55\xaa"
    assert struct.unpack_from("<I", ebr, 446 + 8)[0] == (36864 - 34816) // 8


def test_a_partition_ending_on_the_last_usable_512_byte_lba_does_not_convert():
    # sgdisk's and parted's "to the end of the disk" ends 17 KiB before it, off a 4 KiB boundary
    with pytest.raises(DiskLayoutError, match="partition 3 .* does not start and end on a "
                                              "4096-byte sector boundary"):
        gpt_layout().converted(4096)


@pytest.mark.parametrize("part, match", [
    (Partition(1, 2049, 16384, "0x83"), "partition 1 .* does not start and end on a 4096-byte"),
    (Partition(1, 2048, 16383, "0x83"), "partition 1 .* does not start and end on a 4096-byte"),
])
def test_converting_a_misaligned_partition_is_refused(part, match):
    layout = DiskLayout("mbr", 512, 64 * MiB, "0x1234abcd", (part,))
    with pytest.raises(DiskLayoutError, match=match):
        layout.converted(4096)


def test_converting_a_gpt_partition_inside_the_new_tables_is_refused():
    # sgdisk -a 8 can start a partition at LBA 40 (20 KiB): 4096-byte sectors need 24 KiB
    layout = DiskLayout("gpt", 512, 64 * MiB, DISK_GUID, (Partition(1, 40, 2048, LINUX),),
                        34, 64 * MiB // 512 - 34)
    with pytest.raises(DiskLayoutError, match="partition 1 starts at byte 20480, inside the "
                                              "tables of a GPT with 4096-byte sectors"):
        layout.converted(4096)


def test_converting_beyond_the_32_bit_mbr_limit_is_refused():
    # 4 TiB of 4096-byte sectors fit an MBR; in 512-byte sectors they do not
    size = 4 << 40
    layout = DiskLayout("mbr", 4096, size, "0x00000001",
                        (Partition(1, 256, size // 4096 - 256, "0x83"),))
    with pytest.raises(DiskLayoutError, match="does not fit a 32-bit MBR record"):
        layout.converted(512)


@pytest.mark.parametrize("sector_size, match", [(1000, "unsupported sector size"),
                                                (256, "unsupported sector size")])
def test_converting_to_a_bad_sector_size_is_refused(sector_size, match):
    with pytest.raises(DiskLayoutError, match=match):
        mbr_layout().converted(sector_size)


def test_converting_a_disk_that_is_no_whole_number_of_sectors_is_refused():
    layout = DiskLayout("mbr", 512, 64 * MiB + 512, "0x1234abcd",
                        (Partition(1, 2048, 2048, "0x83"),))
    with pytest.raises(DiskLayoutError, match="not a whole number of 4096-byte sectors"):
        layout.converted(4096)


def test_a_4kn_table_read_with_512_byte_sectors_is_an_error_not_raw():
    # GPT: the protective MBR is there, the header is at byte 4096, not at LBA 1 of 512
    disk = written(gpt_layout(sector_size=4096))
    with pytest.raises(DiskLayoutError, match="protective MBR but no valid GPT.*4096-byte"):
        disk.parse(512)
    # MBR: partitions of a 512-byte disk read as 4096-byte LBAs end beyond the disk
    primaries = dataclasses.replace(mbr_layout(), partitions=mbr_layout().partitions[:2])
    with pytest.raises(DiskLayoutError, match="ends at LBA .* beyond the disk"):
        written(primaries).parse(4096)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(gpt_layouts(), mbr_layouts()))
def test_random_layouts_convert_exactly_or_say_why(layout):
    other = 4096 if layout.sector_size == 512 else 512
    try:
        new = layout.converted(other)
    except DiskLayoutError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert _byte_spans(new) == _byte_spans(layout)
    assert written(new).parse(other) == new
