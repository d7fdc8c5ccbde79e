"""The partition table codec of the imaging engine: MBR (with EBR chains) and GPT.

A whole-disk image stores the disk's partition table as a DiskLayout (to_dict() goes into the
image metadata) and restores it with table_writes(), usually onto a disk of the same or a larger
size (relocated() / grown() first), or onto a smaller one with the partitions at the end cut
short (shrunk(), once their filesystems have been shrunk). The codec is pure: parse_layout()
takes bytes and returns a typed value, table_writes() returns the (byte offset, data) writes and
touches no disk; read_layout() and apply_writes() are the thin I/O wrappers.

MBR layouts list the extended container itself (Partition.is_extended) next to the primaries and
the logical partitions inside it, as sfdisk and Linux do; it holds no filesystem of its own.

Formats, as cited below:

- MBR: the classic IBM PC layout as the UEFI spec restates it (UEFI 2.x section 5.2.1, "Legacy
  Master Boot Record"): 440 bytes of boot code, the 32-bit disk signature at 440, four 16-byte
  partition records at 446, 0x55 0xAA at 510. Extended partitions (types 0x05, 0x0F, 0x85) hold a
  chain of Extended Boot Records: in each EBR the first data record gives a logical partition
  relative to that EBR, and the extended record gives the next EBR relative to the start of the
  extended partition. Linux numbers primaries 1-4 by slot and logicals 5, 6, ... in chain order.
- Protective MBR (UEFI 2.x section 5.2.3): one record of type 0xEE starting at LBA 1. An MBR with
  an 0xEE record and other records (a "hybrid MBR") is read as GPT, with a warning.
- GPT (UEFI 2.x section 5.3): the header at LBA 1 (5.3.2, table "GPT Header"), the partition
  entry array (5.3.3, table "GPT Partition Entry"), and the backup entries and header at the end
  of the disk. A header is valid when its signature is "EFI PART", its HeaderCRC32 and
  PartitionEntryArrayCRC32 match (zlib.crc32), and MyLBA is the LBA it was read from (5.3.2,
  "GPT Header validity"). When the primary is invalid but the backup is valid, the backup is used
  and DiskLayout.warnings says so.

Units: Partition and DiskLayout positions are in logical blocks (LBAs) of DiskLayout.sector_size;
Partition.start_bytes(sector_size) and friends convert. Every malformed input raises
DiskLayoutError (a ValueError with a one-line reason), never IndexError or struct.error.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Mapping

__all__ = [
    "DiskLayoutError", "Partition", "DiskLayout", "parse_layout", "table_writes", "read_layout",
    "HEAD_BYTES", "TAIL_BYTES", "head_bytes", "tail_bytes", "apply_writes",
    "SECTOR_SIZES", "device_sector_size", "gpt_entry_bytes", "read_gpt_entry_bytes",
]

ReadAt = Callable[[int, int], bytes]

MBR_SIZE = 512
SECTOR_SIZES = (512, 4096)          # logical sector sizes of real disks: 512n/512e and 4Kn
BOOT_CODE_SIZE = 440
GPT_ENTRY_SIZE = 128
GPT_DEFAULT_ENTRIES = 128
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
GPT_HEADER_SIZE = 92
MBR_MAX_SECTORS = 0xFFFFFFFF        # 32-bit LBA fields: the "2 TiB limit" with 512-byte sectors
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
MAX_LOGICALS = 256                  # Linux's DISK_MAX_PARTS bounds the whole disk
MAX_ENTRY_ARRAY = 4 * 1024 * 1024   # refuse absurd GPT arrays before allocating them
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
SHRINK_ALIGN = 1 << 20              # shrunk partitions end on a 1 MiB boundary

_MBR_RECORD = struct.Struct("<B3sB3sII")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


def head_bytes(sector_size: int = 512) -> int:
    """Bytes to read from the start: protective MBR, GPT header, a default 128-entry array."""
    return sector_size * 2 + GPT_DEFAULT_ENTRIES * GPT_ENTRY_SIZE


def tail_bytes(sector_size: int = 512) -> int:
    """Bytes to read from the end: the backup 128-entry array and the backup header."""
    return sector_size + GPT_DEFAULT_ENTRIES * GPT_ENTRY_SIZE


# Enough for both 512- and 4096-byte sectors: 34 sectors of 512 (17408), 6 sectors of 4096.
HEAD_BYTES = max(head_bytes(512), head_bytes(4096))
TAIL_BYTES = max(tail_bytes(512), tail_bytes(4096))


class DiskLayoutError(ValueError):
    """A partition table that cannot be read, or a layout that cannot be written; one line."""


@dataclass(frozen=True)
class Partition:
    """One partition. Positions in LBAs of the layout's sector size (see start_bytes()).

    number: 1-based as Linux numbers it (MBR: primaries 1-4 by slot, logicals 5+ in EBR chain
    order, the extended container itself is listed too; GPT: entry index + 1).
    type: MBR "0x83" (lower-case hex byte); GPT the type GUID, upper-case canonical.
    guid, name, attributes: GPT only (an all-zero unique GUID reads and writes as "").
    bootable: the MBR active flag (0x80).
    """

    number: int
    start_lba: int
    size_lba: int
    type: str
    guid: str = ""
    name: str = ""
    attributes: int = 0
    bootable: bool = False

    @property
    def end_lba(self) -> int:
        """The first LBA after the partition (exclusive end)."""
        return self.start_lba + self.size_lba

    @property
    def is_extended(self) -> bool:
        """True for an MBR extended container (types 0x05, 0x0F, 0x85)."""
        return _mbr_type_or_none(self.type) in EXTENDED_TYPES

    def start_bytes(self, sector_size: int) -> int:
        return self.start_lba * sector_size

    def size_bytes(self, sector_size: int) -> int:
        return self.size_lba * sector_size

    def end_bytes(self, sector_size: int) -> int:
        return self.end_lba * sector_size


@dataclass(frozen=True)
class DiskLayout:
    """A disk's partition table. kind: "mbr", "gpt" or "none" (blank, or a whole-disk filesystem).

    disk_id: MBR signature "0x1234abcd", GPT disk GUID upper-case, "" for "none".
    partitions: sorted by number (as parse_layout() returns them; equality depends on order).
    first_usable_lba / last_usable_lba: from the GPT header, 0 for MBR and "none".
    warnings: what was odd but survivable when reading (a corrupt primary GPT, a hybrid MBR...);
    not part of equality, so a layout equals its re-read copy.
    """

    kind: str
    sector_size: int
    disk_size: int
    disk_id: str
    partitions: tuple[Partition, ...]
    first_usable_lba: int = 0
    last_usable_lba: int = 0
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def sectors(self) -> int:
        return self.disk_size // self.sector_size

    def partition(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise KeyError(number)

    def last_used_byte(self) -> int:
        """The end (exclusive, bytes) of the partition that ends last; 0 when there is none.

        For kind "none" the whole disk is content (a filesystem or nothing), so disk_size.
        """
        if self.kind == "none":
            return self.disk_size
        return max((p.end_bytes(self.sector_size) for p in self.partitions), default=0)

    def min_disk_size(self) -> int:
        """The smallest disk (bytes) fits() accepts: GPT adds its backup entries and header."""
        if self.kind != "gpt":
            return self.last_used_byte()
        end = max([p.end_lba for p in self.partitions] + [self.first_usable_lba])
        return (end + _gpt_entry_sectors(self) + 1) * self.sector_size

    def fits(self, target_size: int) -> bool:
        """Whether this table, unchanged, can be put on a disk of target_size bytes.

        GPT also needs room for the backup entries and header after the last partition
        (UEFI 2.x 5.3.1); MBR partitions must end within the disk.
        """
        sectors = target_size // self.sector_size
        if self.kind == "none":
            return target_size >= self.disk_size
        if self.kind == "mbr":
            return sectors >= 1 and all(p.end_lba <= sectors for p in self.partitions)
        last_usable = _gpt_last_usable(sectors, _gpt_entry_sectors(self))
        return (last_usable >= self.first_usable_lba - 1
                and all(p.end_lba - 1 <= last_usable for p in self.partitions))

    def relocated(self, target_size: int) -> DiskLayout:
        """The same partitions on a disk of target_size bytes (GPT: backup moved to its end).

        GPT's last usable LBA becomes the largest the new disk allows. Warnings are dropped:
        they described the source disk.
        """
        if not self.fits(target_size):
            raise DiskLayoutError(
                f"the partitions end at byte {self.last_used_byte()}, which does not fit a "
                f"{target_size}-byte disk")
        last_usable = self.last_usable_lba
        if self.kind == "gpt":
            last_usable = _gpt_last_usable(target_size // self.sector_size,
                                           _gpt_entry_sectors(self))
        return dataclasses.replace(self, disk_size=target_size, last_usable_lba=last_usable,
                                   warnings=())

    def grown(self, target_size: int) -> DiskLayout:
        """relocated(), with the partition that ends last extended to fill the new disk.

        GPT: up to the new last usable LBA. MBR: up to the end of the disk but no further than
        the 32-bit LBA limit (2 TiB with 512-byte sectors); a logical partition grows together
        with its extended container, and when the extended container ends last, it and its last
        logical partition grow. A partition never shrinks.
        """
        moved = self.relocated(target_size)
        if self.kind == "none" or not self.partitions:
            return moved
        if self.kind == "gpt":
            new_end = moved.last_usable_lba + 1
        else:
            new_end = min(moved.sectors, MBR_MAX_SECTORS)
        last = max(self.partitions, key=lambda p: (p.end_lba, not p.is_extended))
        growing = {last.number}
        if self.kind == "mbr" and last.is_extended:
            logicals = [p for p in self.partitions if p.number >= 5]
            if logicals:
                growing.add(max(logicals, key=lambda p: p.end_lba).number)
        elif self.kind == "mbr" and last.number >= 5:
            growing.update(p.number for p in self.partitions if p.is_extended and p.number <= 4)
        parts = tuple(
            dataclasses.replace(p, size_lba=max(p.size_lba, new_end - p.start_lba))
            if p.number in growing else p
            for p in self.partitions)
        return dataclasses.replace(moved, partitions=parts)

    def shrink_limit_lba(self, target_size: int, align_bytes: int = SHRINK_ALIGN) -> int:
        """Where partitions must end (exclusive LBA) on a target_size-byte disk after shrunk().

        GPT: before the backup entries and header; MBR: the disk end, at most the 32-bit limit.
        Rounded down to align_bytes (1 MiB, as partitioning tools align) so a shrunk partition
        ends on a boundary.
        """
        sectors = target_size // self.sector_size
        if self.kind == "gpt":
            end = _gpt_last_usable(sectors, _gpt_entry_sectors(self)) + 1
        else:
            end = min(sectors, MBR_MAX_SECTORS)
        align = max(1, align_bytes // self.sector_size)
        return max(0, end // align * align)

    def shrunk(self, target_size: int, min_sizes: Mapping[int, int] | None = None,
               align_bytes: int = SHRINK_ALIGN) -> DiskLayout:
        """relocated() onto a smaller disk: partitions ending past shrink_limit_lba() are cut.

        Nothing moves: every partition keeps its start; one that ends beyond the limit ends at
        the limit (an MBR extended container and the logical partitions inside it alike), the
        others keep their size. min_sizes (partition number -> bytes) is what each filesystem
        needs at least. A partition that starts at or past the limit, or that would get less
        than its minimum, raises DiskLayoutError with the reason (the partition and the sizes).
        """
        if self.kind == "none" or not self.partitions:
            raise DiskLayoutError("a disk without a partition table cannot be shrunk")
        limit = self.shrink_limit_lba(target_size, align_bytes)
        mib = 1 << 20
        parts = []
        for part in self.partitions:
            if part.end_lba <= limit:
                parts.append(part)
                continue
            if part.start_lba >= limit:
                raise DiskLayoutError(
                    f"partition {part.number} starts at byte {part.start_bytes(self.sector_size)}"
                    f", past the {limit * self.sector_size // mib} MiB the "
                    f"{target_size // mib} MiB disk leaves; partitions are never moved")
            new = dataclasses.replace(part, size_lba=limit - part.start_lba)
            need = (min_sizes or {}).get(part.number, 0)
            if new.size_bytes(self.sector_size) < need:
                raise DiskLayoutError(
                    f"partition {part.number} would get {_mib(new.size_bytes(self.sector_size))}"
                    f" MiB but its data needs at least {_mib(need, up=True)} MiB")
            parts.append(new)
        shrunk = dataclasses.replace(self, partitions=tuple(parts))
        return shrunk.relocated(target_size)

    def converted(self, sector_size: int) -> DiskLayout:
        """The same table in LBAs of another logical sector size (a 512-byte disk's image put
        on a 4Kn disk, or the other way round).

        Every partition keeps its byte offsets, so alignment and the data's place are kept;
        only the numbers in the table change. A partition that does not start and end on a
        boundary of the new sector size cannot be converted exactly, and raises DiskLayoutError
        naming it, as does a table the new size cannot hold (an MBR beyond its 32-bit LBAs, a
        partition inside the GPT's own tables). GPT: the first usable LBA is the old one's byte
        offset rounded up, at least past a 128-entry array (UEFI 2.x 5.3.1); the backup goes to
        the end of the disk as relocated() puts it. Warnings are dropped: they described the
        source disk.
        """
        if sector_size == self.sector_size:
            return self
        _check_sector_size(sector_size)
        if self.disk_size % sector_size:
            raise DiskLayoutError(f"the disk's {self.disk_size} bytes are not a whole number of "
                                  f"{sector_size}-byte sectors")
        parts = tuple(_converted_partition(p, self.sector_size, sector_size)
                      for p in self.partitions)
        new = dataclasses.replace(self, sector_size=sector_size, partitions=parts, warnings=())
        if self.kind == "gpt":
            new = _converted_gpt(self, new)
        if self.kind != "none":
            table_writes(new)          # raises what the new sector size cannot hold
        return new

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; from_dict(to_dict()) gives back an identical layout."""
        return {
            "kind": self.kind,
            "sector_size": self.sector_size,
            "disk_size": self.disk_size,
            "disk_id": self.disk_id,
            "first_usable_lba": self.first_usable_lba,
            "last_usable_lba": self.last_usable_lba,
            "warnings": list(self.warnings),
            "partitions": [dataclasses.asdict(p) for p in self.partitions],
        }

    @classmethod
    def from_dict(cls, data: Any) -> DiskLayout:
        """The inverse of to_dict(); a wrong shape or type is a DiskLayoutError."""
        layout = _fields_from(cls, data, "layout")
        if layout.get("kind") not in ("mbr", "gpt", "none"):
            raise DiskLayoutError(f"layout: unknown kind {layout.get('kind')!r}")
        parts = layout.get("partitions", [])
        warnings = layout.get("warnings", [])
        if not isinstance(parts, (list, tuple)):
            raise DiskLayoutError("layout: partitions must be a list")
        if not isinstance(warnings, (list, tuple)) or not all(isinstance(w, str)
                                                              for w in warnings):
            raise DiskLayoutError("layout: warnings must be a list of strings")
        layout["partitions"] = tuple(Partition(**_fields_from(Partition, p, "partition"))
                                     for p in parts)
        layout["warnings"] = tuple(warnings)
        if layout["sector_size"] < MBR_SIZE:
            raise DiskLayoutError(f"layout: sector size {layout['sector_size']} below 512")
        return cls(**layout)


def _check_sector_size(sector_size: int) -> None:
    if sector_size < MBR_SIZE or sector_size & (sector_size - 1):
        raise DiskLayoutError(f"unsupported sector size {sector_size}")


def _converted_partition(part: Partition, old: int, new: int) -> Partition:
    start, size = part.start_bytes(old), part.size_bytes(old)
    if start % new or size % new:
        raise DiskLayoutError(
            f"partition {part.number} (bytes {start}..{start + size}) does not start and end "
            f"on a {new}-byte sector boundary, so its table cannot be converted exactly")
    return dataclasses.replace(part, start_lba=start // new, size_lba=size // new)


def _converted_gpt(old: DiskLayout, new: DiskLayout) -> DiskLayout:
    """first/last usable LBAs of a converted GPT (see DiskLayout.converted())."""
    ss = new.sector_size
    highest = max((p.number for p in new.partitions), default=0)
    entry_sectors = -(-max(GPT_DEFAULT_ENTRIES, highest) * GPT_ENTRY_SIZE // ss)
    first_usable = max(-(-old.first_usable_lba * old.sector_size // ss), 2 + entry_sectors)
    for part in new.partitions:
        if part.start_lba < first_usable:
            raise DiskLayoutError(
                f"partition {part.number} starts at byte {part.start_bytes(ss)}, inside the "
                f"tables of a GPT with {ss}-byte sectors (first usable byte "
                f"{first_usable * ss}); its table cannot be converted")
    new = dataclasses.replace(new, first_usable_lba=first_usable)
    last_usable = _gpt_last_usable(new.sectors, _gpt_entry_sectors(new))
    return dataclasses.replace(new, last_usable_lba=last_usable)


def _mib(count: int, up: bool = False) -> int:
    """Bytes as whole MiB for messages; up rounds a requirement up so it is never understated."""
    return -(-count // (1 << 20)) if up else count // (1 << 20)


def _fields_from(cls: type, data: Any, what: str) -> dict[str, Any]:
    """Check a dict against a dataclass's fields: known keys, required ones present, types."""
    if not isinstance(data, dict):
        raise DiskLayoutError(f"{what}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DiskLayoutError(f"{what}: unknown key {unknown[0]!r}")
    out = {}
    for name, fld in known.items():
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise DiskLayoutError(f"{what}: missing key {name!r}")
            continue
        value = data[name]
        want = {"int": int, "str": str, "bool": bool}.get(str(fld.type))
        if want is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DiskLayoutError(f"{what}: {name} must be a non-negative integer")
        if want in (str, bool) and not isinstance(value, want):
            raise DiskLayoutError(f"{what}: {name} must be a {want.__name__}")
        out[name] = value
    return out


# --- reading -------------------------------------------------------------------------------------

class _Disk:
    """The bytes parse_layout may look at: head, tail, and read_at for anything in between."""

    def __init__(self, head: bytes, tail: bytes, size: int, read_at: ReadAt | None) -> None:
        self.head = bytes(head[:size])
        self.tail = bytes(tail[-size:]) if size and tail else b""
        self.size = size
        self.read_at = read_at

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < 0 or end > self.size:
            raise DiskLayoutError(f"bytes {offset}..{end} lie beyond the end of the disk "
                                  f"({self.size} bytes)")
        if end <= len(self.head):
            return self.head[offset:end]
        tail_start = self.size - len(self.tail)
        if offset >= tail_start:
            return self.tail[offset - tail_start:end - tail_start]
        if self.read_at is None:
            raise DiskLayoutError(f"bytes {offset}..{end} are outside the head and tail given; "
                                  "pass read_at")
        data = bytes(self.read_at(offset, length))
        if len(data) != length:
            raise DiskLayoutError(f"short read at byte {offset}: {len(data)} of {length}")
        return data


def parse_layout(head: bytes, tail: bytes, disk_size: int, sector_size: int = 512,
                 read_at: ReadAt | None = None) -> DiskLayout:
    """Read the partition table of a disk of disk_size bytes.

    head: the first HEAD_BYTES (or head_bytes(sector_size)) bytes of the disk, or more;
    tail: the last TAIL_BYTES (or tail_bytes(sector_size)) bytes, or more. read_at(offset,
    length) is needed for what lies elsewhere: the EBRs of logical partitions, GPT entry arrays
    away from their usual place. An MBR without the 0x55AA signature, or with boot indicators
    other than 0x00/0x80, or a FAT/NTFS/exFAT boot sector, is no table: kind "none".
    """
    _check_sector_size(sector_size)
    if disk_size < 0:
        raise DiskLayoutError(f"negative disk size {disk_size}")
    if disk_size < sector_size:
        return DiskLayout("none", sector_size, disk_size, "", ())
    if read_at is None:
        need_head, need_tail = head_bytes(sector_size), tail_bytes(sector_size)
    else:
        need_head, need_tail = MBR_SIZE, 0
    if len(head) < min(disk_size, need_head) or len(tail) < min(disk_size, need_tail):
        raise DiskLayoutError(f"head or tail too short ({len(head)}, {len(tail)} bytes; need "
                              f"{need_head}, {need_tail} without read_at)")
    disk = _Disk(head, tail, disk_size, read_at)
    mbr = disk.read(0, MBR_SIZE)
    records = _mbr_records(mbr)
    if records is None or (_is_filesystem_boot_sector(mbr)
                           and not any(r.type == PROTECTIVE_TYPE for r in records)):
        warnings = ()
        if _gpt_header_present(disk, sector_size):
            warnings = ("GPT header at LBA 1 without a protective MBR; ignored",)
        return DiskLayout("none", sector_size, disk_size, "", (), warnings=warnings)
    if any(r.type == PROTECTIVE_TYPE and r.size for r in records):
        return _parse_gpt(disk, sector_size, records)
    return _parse_mbr(disk, sector_size, mbr, records)


@dataclass(frozen=True)
class _Record:
    """One 16-byte MBR/EBR partition record (UEFI 2.x table "Legacy MBR Partition Record")."""

    boot: int
    type: int
    start: int
    size: int

    @property
    def used(self) -> bool:
        return self.size != 0


def _mbr_records(sector: bytes) -> list[_Record] | None:
    """The four records of an MBR or EBR, or None without 0x55AA or with a bad boot indicator."""
    if len(sector) < MBR_SIZE or sector[510:512] != b"\x55\xaa":
        return None
    records = []
    for i in range(4):
        boot, _chs1, ptype, _chs2, start, size = _MBR_RECORD.unpack_from(sector, 446 + 16 * i)
        if boot not in (0x00, 0x80):
            return None
        records.append(_Record(boot, ptype, start, size))
    return records


def _is_filesystem_boot_sector(sector: bytes) -> bool:
    """A FAT, NTFS or exFAT boot sector also ends in 0x55AA; libblkid refuses those as MBRs.

    FAT is recognised by its type string together with a sane BIOS Parameter Block (a jump
    instruction, 512..4096 bytes per sector, at least one FAT).
    """
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    fat_string = (sector[54:62] in (b"FAT12   ", b"FAT16   ", b"FAT     ")
                  or sector[82:90] == b"FAT32   ")
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    return (fat_string and sector[0] in (0xEB, 0xE9) and sector[16] >= 1
            and bytes_per_sector in (512, 1024, 2048, 4096))


def _gpt_header_present(disk: _Disk, sector_size: int) -> bool:
    try:
        return disk.read(sector_size, 8) == GPT_SIGNATURE
    except DiskLayoutError:
        return False


def _mbr_type(text: str) -> int:
    value = _mbr_type_or_none(text)
    if value is None:
        raise DiskLayoutError(f"MBR partition type {text!r} is not a hex byte like '0x83'")
    return value


def _mbr_type_or_none(text: str) -> int | None:
    if not isinstance(text, str) or not text.lower().startswith("0x"):
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    return value if 0 <= value <= 0xFF else None


def _parse_mbr(disk: _Disk, sector_size: int, mbr: bytes, records: list[_Record]) -> DiskLayout:
    """Primaries by slot (UEFI 2.x 5.2.1) and the logical partitions of the extended one."""
    sectors = disk.size // sector_size
    parts = [_partition(i + 1, r.start, r.size, r) for i, r in enumerate(records) if r.used]
    extended = [p for p in parts if p.is_extended]
    if len(extended) > 1:
        raise DiskLayoutError(f"{len(extended)} extended partitions; at most one is allowed")
    warnings: list[str] = []
    if extended:
        parts += _parse_ebr_chain(disk, sector_size, extended[0], warnings)
    for part in parts:
        if part.end_lba > sectors:
            raise DiskLayoutError(f"partition {part.number} ends at LBA {part.end_lba}, beyond "
                                  f"the disk's {sectors} sectors")
    warnings += _overlaps([p for p in parts if p.number <= 4])
    warnings += _overlaps([p for p in parts if p.number > 4])
    disk_id = f"0x{struct.unpack_from('<I', mbr, 440)[0]:08x}"
    return DiskLayout("mbr", sector_size, disk.size, disk_id, tuple(parts),
                      warnings=tuple(warnings))


def _partition(number: int, start: int, size: int, record: _Record) -> Partition:
    return Partition(number, start, size, f"0x{record.type:02x}", bootable=record.boot == 0x80)


def _parse_ebr_chain(disk: _Disk, sector_size: int, extended: Partition,
                     warnings: list[str]) -> list[Partition]:
    """Follow the EBRs from the start of the extended partition; logicals are 5, 6, ..."""
    logicals: list[Partition] = []
    ebr_lba = extended.start_lba
    seen: set[int] = set()
    while True:
        if ebr_lba in seen:
            raise DiskLayoutError(f"the EBR chain loops back to LBA {ebr_lba}")
        if len(seen) >= MAX_LOGICALS:
            raise DiskLayoutError(f"more than {MAX_LOGICALS} EBRs in the chain")
        if not extended.start_lba <= ebr_lba < extended.end_lba:
            raise DiskLayoutError(f"an EBR at LBA {ebr_lba} lies outside the extended partition")
        seen.add(ebr_lba)
        records = _mbr_records(disk.read(ebr_lba * sector_size, MBR_SIZE))
        if records is None:
            if ebr_lba != extended.start_lba or disk.read(ebr_lba * sector_size, MBR_SIZE).strip(
                    b"\0"):
                warnings.append(f"no valid EBR at LBA {ebr_lba}; the logical partitions end there")
            return logicals
        data = next((r for r in records if r.used and r.type not in EXTENDED_TYPES), None)
        link = next((r for r in records if r.used and r.type in EXTENDED_TYPES), None)
        if data is not None:
            part = _partition(5 + len(logicals), ebr_lba + data.start, data.size, data)
            if not (ebr_lba < part.start_lba and part.end_lba <= extended.end_lba):
                raise DiskLayoutError(f"logical partition {part.number} (LBA {part.start_lba}.."
                                      f"{part.end_lba}) lies outside its extended partition")
            logicals.append(part)
        if link is None:
            return logicals
        ebr_lba = extended.start_lba + link.start


def _overlaps(parts: list[Partition]) -> list[str]:
    ordered = sorted(parts, key=lambda p: p.start_lba)
    return [f"partitions {a.number} and {b.number} overlap"
            for a, b in zip(ordered, ordered[1:]) if b.start_lba < a.end_lba]


@dataclass(frozen=True)
class _GptHeader:
    """The fields of a GPT header (UEFI 2.x 5.3.2, table "GPT Header")."""

    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


def _parse_gpt(disk: _Disk, sector_size: int, records: list[_Record]) -> DiskLayout:
    """The primary GPT, or the backup at the last LBA when the primary is invalid."""
    last_lba = disk.size // sector_size - 1
    warnings: list[str] = []
    if sum(r.used for r in records) > 1:
        warnings.append("hybrid MBR: its non-GPT records are ignored")
    primary, primary_error = _read_gpt(disk, sector_size, 1)
    backup, backup_error = _read_gpt(disk, sector_size, last_lba) if last_lba > 1 else (
        None, "the disk has no room for a backup header")
    if primary is not None:
        header, entries = primary
        if header.alternate_lba != last_lba:
            warnings.append(f"the primary GPT header puts the backup at LBA "
                            f"{header.alternate_lba}, not at the last LBA {last_lba}")
        if backup is None:
            warnings.append(f"backup GPT header at LBA {last_lba} invalid: {backup_error}")
        elif (backup[0].disk_guid, backup[0].first_usable, backup[0].last_usable,
              backup[1]) != (header.disk_guid, header.first_usable, header.last_usable, entries):
            warnings.append("the backup GPT differs from the primary; the primary is used")
    elif backup is not None:
        header, entries = backup
        warnings.append(f"primary GPT header invalid ({primary_error}); "
                        f"using the backup at LBA {last_lba}")
    else:
        hint = _other_sector_size_hint(disk, sector_size)
        raise DiskLayoutError(f"protective MBR but no valid GPT: primary: {primary_error}; "
                              f"backup: {backup_error}{hint}")
    parts = _gpt_partitions(entries, header)
    warnings += _overlaps(parts)
    return DiskLayout("gpt", sector_size, disk.size, header.disk_guid, tuple(parts),
                      header.first_usable, header.last_usable, tuple(warnings))


def _other_sector_size_hint(disk: _Disk, sector_size: int) -> str:
    other = 4096 if sector_size == 512 else 512
    try:
        found = disk.read(other, 8) == GPT_SIGNATURE
    except DiskLayoutError:
        found = False
    return f" (a GPT header exists for {other}-byte sectors)" if found else ""


def _read_gpt(disk: _Disk, sector_size: int, lba: int
              ) -> tuple[tuple[_GptHeader, bytes] | None, str]:
    """(header, entry array) if the header at lba is valid (UEFI 2.x 5.3.2), else (None, why)."""
    try:
        header = _parse_gpt_header(disk.read(lba * sector_size, sector_size), lba, sector_size,
                                   disk.size // sector_size - 1)
        array = disk.read(header.entries_lba * sector_size, header.num_entries * header.entry_size)
    except DiskLayoutError as exc:
        return None, str(exc)
    if zlib.crc32(array) != header.entries_crc:
        return None, "partition entry array CRC32 mismatch"
    return (header, array), ""


def _parse_gpt_header(sector: bytes, lba: int, sector_size: int, last_lba: int) -> _GptHeader:
    (signature, _revision, header_size, header_crc, _reserved, my_lba, alternate, first_usable,
     last_usable, guid, entries_lba, num_entries, entry_size, entries_crc
     ) = _GPT_HEADER.unpack_from(sector)
    if signature != GPT_SIGNATURE:
        raise DiskLayoutError("no 'EFI PART' signature")
    if not GPT_HEADER_SIZE <= header_size <= sector_size:
        raise DiskLayoutError(f"header size {header_size} out of range")
    if zlib.crc32(sector[:16] + b"\0\0\0\0" + sector[20:header_size]) != header_crc:
        raise DiskLayoutError("header CRC32 mismatch")
    if my_lba != lba:
        raise DiskLayoutError(f"MyLBA is {my_lba}, read from LBA {lba}")
    if entry_size < GPT_ENTRY_SIZE or entry_size & (entry_size - 1):
        raise DiskLayoutError(f"partition entry size {entry_size} is not 128 x 2^n")
    if num_entries * entry_size > MAX_ENTRY_ARRAY:
        raise DiskLayoutError(f"{num_entries} partition entries is too many")
    if not 2 <= first_usable <= last_usable + 1 <= last_lba:
        raise DiskLayoutError(f"usable LBAs {first_usable}..{last_usable} do not fit the disk")
    array_end = entries_lba + -(-num_entries * entry_size // sector_size)
    if lba == 1 and not (2 <= entries_lba and array_end <= first_usable):
        raise DiskLayoutError(f"primary entry array at LBA {entries_lba} overlaps usable space")
    if lba != 1 and not (last_usable < entries_lba and array_end <= lba):
        raise DiskLayoutError(f"backup entry array at LBA {entries_lba} overlaps usable space")
    return _GptHeader(my_lba, alternate, first_usable, last_usable, _guid(guid), entries_lba,
                      num_entries, entry_size, entries_crc)


def _gpt_partitions(array: bytes, header: _GptHeader) -> list[Partition]:
    """The used entries (type GUID not zero), UEFI 2.x 5.3.3; number = index + 1."""
    parts = []
    for index in range(header.num_entries):
        type_guid, unique, first, last, attributes, raw_name = _GPT_ENTRY.unpack_from(
            array, index * header.entry_size)
        if type_guid == bytes(16):
            continue
        number = index + 1
        if not header.first_usable <= first <= last <= header.last_usable:
            raise DiskLayoutError(f"partition {number} (LBA {first}..{last}) is outside the "
                                  f"usable LBAs {header.first_usable}..{header.last_usable}")
        guid = "" if unique == bytes(16) else _guid(unique)
        parts.append(Partition(number, first, last - first + 1, _guid(type_guid), guid,
                               _decode_name(raw_name), attributes))
    return parts


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def _decode_name(raw: bytes) -> str:
    units = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    end = units.index(b"\0\0") if b"\0\0" in units else len(units)
    return b"".join(units[:end]).decode("utf-16-le", errors="surrogatepass")


# --- writing -------------------------------------------------------------------------------------

def table_writes(layout: DiskLayout, boot_code: bytes = b"") -> list[tuple[int, bytes]]:
    """The (byte offset, data) writes that put layout's table on a disk of layout.disk_size.

    MBR: sector 0 (boot_code's first 440 bytes kept, the rest of the 440 zero; a whole 512-byte
    sector may be passed) and, for logical partitions, one EBR each (the first at the start of
    the extended partition, the others as far before their partition as the first one is, but
    after any earlier logical partition). GPT: a protective MBR (UEFI 2.x 5.2.3), the primary
    header at LBA 1 and entries at LBA 2, the backup entries and the backup header at the last
    LBA (5.3.1), CRC32s computed. kind "none" writes nothing. A layout that cannot be written
    raises DiskLayoutError. Stale tables elsewhere on the disk (an old backup GPT at the end of a
    disk now getting an MBR) are not wiped.
    """
    if layout.kind == "none":
        return []
    _check_sector_size(layout.sector_size)
    boot = bytes(boot_code[:BOOT_CODE_SIZE]).ljust(BOOT_CODE_SIZE, b"\0")
    if layout.kind == "mbr":
        return _mbr_writes(layout, boot)
    if layout.kind == "gpt":
        return _gpt_writes(layout, boot)
    raise DiskLayoutError(f"unknown layout kind {layout.kind!r}")


def _chs(lba: int, limit: bytes = b"\xfe\xff\xff") -> bytes:
    """The CHS triple for lba in the 255-head, 63-sector geometry; limit beyond 1023 cylinders."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return limit
    head, sector = divmod(rest, 63)
    return bytes((head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF))


def _record(boot: bool, ptype: int, start: int, size: int, base: int = 0) -> bytes:
    """A 16-byte partition record; start is relative to base (for EBRs), CHS is absolute."""
    if not (0 <= start - base <= MBR_MAX_SECTORS and 0 <= size <= MBR_MAX_SECTORS):
        raise DiskLayoutError(f"LBA {start}+{size} does not fit a 32-bit MBR record")
    end = start + size - 1 if size else start
    return _MBR_RECORD.pack(0x80 if boot else 0, _chs(start), ptype, _chs(end), start - base, size)


def _boot_sector(boot: bytes, signature: int, records: list[bytes]) -> bytes:
    table = b"".join(records).ljust(64, b"\0")
    return boot + struct.pack("<IH", signature, 0) + table + b"\x55\xaa"


def _mbr_writes(layout: DiskLayout, boot: bytes) -> list[tuple[int, bytes]]:
    """The MBR sector and the EBR chain (UEFI 2.x 5.2.1)."""
    sectors = layout.sectors
    numbers = [p.number for p in layout.partitions]
    if len(set(numbers)) != len(numbers):
        raise DiskLayoutError("duplicate partition numbers")
    for part in layout.partitions:
        _mbr_type(part.type)
        if part.number < 1 or part.size_lba < 1:
            raise DiskLayoutError(f"partition {part.number}: bad number or empty")
        if part.end_lba > sectors:
            raise DiskLayoutError(f"partition {part.number} ends beyond the disk")
    primaries = {p.number: p for p in layout.partitions if p.number <= 4}
    logicals = sorted((p for p in layout.partitions if p.number >= 5), key=lambda p: p.number)
    extended = [p for p in primaries.values() if p.is_extended]
    if len(extended) > 1:
        raise DiskLayoutError("more than one extended partition")
    records = [bytes(16)] * 4
    for number, part in primaries.items():
        records[number - 1] = _record(part.bootable, _mbr_type(part.type), part.start_lba,
                                      part.size_lba)
    writes = [(0, _boot_sector(boot, _disk_signature(layout.disk_id), records))]
    if extended:
        writes += _ebr_writes(extended[0], logicals, layout.sector_size)
    elif logicals:
        raise DiskLayoutError(f"logical partition {logicals[0].number} without an extended one")
    return writes


def _disk_signature(disk_id: str) -> int:
    try:
        value = int(disk_id, 16) if disk_id else 0
    except (TypeError, ValueError):
        value = -1
    if not 0 <= value <= 0xFFFFFFFF:
        raise DiskLayoutError(f"MBR disk id {disk_id!r} is not a 32-bit hex number")
    return value


def _ebr_positions(extended: Partition, logicals: list[Partition]) -> list[int]:
    """Where each logical partition's EBR goes; see table_writes()."""
    if [p.number for p in logicals] != list(range(5, 5 + len(logicals))):
        raise DiskLayoutError("logical partitions must be numbered 5, 6, ... without gaps")
    for part in logicals:
        if not (extended.start_lba < part.start_lba and part.end_lba <= extended.end_lba):
            raise DiskLayoutError(f"logical partition {part.number} lies outside the extended "
                                  "partition or on its first sector")
    if not logicals:
        return []
    gap = logicals[0].start_lba - extended.start_lba
    positions = [extended.start_lba]
    for part in logicals[1:]:
        floor = max([extended.start_lba + 1] + [o.end_lba for o in logicals
                                                if o.end_lba <= part.start_lba])
        position = max(floor, part.start_lba - gap)
        if position >= part.start_lba or any(o.start_lba <= position < o.end_lba
                                             for o in logicals):
            raise DiskLayoutError(f"no free sector for the EBR of logical partition "
                                  f"{part.number}")
        positions.append(position)
    if len(set(positions)) != len(positions):
        raise DiskLayoutError("overlapping logical partitions leave no room for their EBRs")
    return positions


def _ebr_writes(extended: Partition, logicals: list[Partition],
                sector_size: int) -> list[tuple[int, bytes]]:
    positions = _ebr_positions(extended, logicals)
    if not logicals:
        return [(extended.start_lba * sector_size, _boot_sector(bytes(BOOT_CODE_SIZE), 0, []))]
    writes = []
    for i, (part, ebr) in enumerate(zip(logicals, positions)):
        records = [_record(part.bootable, _mbr_type(part.type), part.start_lba, part.size_lba,
                           base=ebr)]
        if i + 1 < len(logicals):
            nxt, nxt_ebr = logicals[i + 1], positions[i + 1]
            records.append(_record(False, 0x05, nxt_ebr, nxt.end_lba - nxt_ebr,
                                   base=extended.start_lba))
        writes.append((ebr * sector_size, _boot_sector(bytes(BOOT_CODE_SIZE), 0, records)))
    return writes


def _gpt_entry_sectors(layout: DiskLayout) -> int:
    """Sectors of the entry array table_writes() writes.

    128 entries (the 16 KiB minimum of UEFI 2.x 5.3.1), fewer when the first usable LBA leaves
    less room (tables made with a smaller array), more when partition numbers need them.
    """
    per_sector = layout.sector_size // GPT_ENTRY_SIZE
    highest = max((p.number for p in layout.partitions), default=0)
    room = min(GPT_DEFAULT_ENTRIES // per_sector, layout.first_usable_lba - 2)
    return max(room, -(-highest // per_sector))


def gpt_entry_bytes(layout: DiskLayout) -> tuple[int, int]:
    """(byte offset, length) of the primary entry array as table_writes() writes it."""
    return 2 * layout.sector_size, _gpt_entry_sectors(layout) * layout.sector_size


def read_gpt_entry_bytes(read_at: ReadAt, layout: DiskLayout) -> tuple[int, int]:
    """(byte offset, length) of the primary entry array a GPT disk's header at LBA 1 names
    (tools other than img may put it elsewhere, or size it otherwise); where that header is
    not valid (the backup was used), where table_writes() would put it."""
    sector = layout.sector_size
    try:
        header = _parse_gpt_header(read_at(sector, sector), 1, sector, layout.sectors - 1)
    except (DiskLayoutError, struct.error):
        return gpt_entry_bytes(layout)
    return header.entries_lba * sector, header.num_entries * header.entry_size


def _gpt_last_usable(sectors: int, entry_sectors: int) -> int:
    """The last usable LBA: before the backup array and the backup header (UEFI 2.x 5.3.1)."""
    return sectors - 1 - entry_sectors - 1


def _gpt_writes(layout: DiskLayout, boot: bytes) -> list[tuple[int, bytes]]:
    ss = layout.sector_size
    last_lba = layout.sectors - 1
    entry_sectors = _gpt_entry_sectors(layout)
    if layout.first_usable_lba < 2 + entry_sectors:
        raise DiskLayoutError(f"first usable LBA {layout.first_usable_lba} leaves no room for "
                              f"the {entry_sectors}-sector entry array")
    if not layout.first_usable_lba <= layout.last_usable_lba + 1 <= _gpt_last_usable(
            layout.sectors, entry_sectors) + 1:
        raise DiskLayoutError(f"last usable LBA {layout.last_usable_lba} does not fit a "
                              f"{layout.sectors}-sector disk")
    array = _gpt_entry_array(layout, entry_sectors * ss // GPT_ENTRY_SIZE)
    disk_guid = _guid_bytes(layout.disk_id, "disk GUID")
    backup_entries = last_lba - entry_sectors

    def header(my_lba: int, alternate: int, entries_lba: int) -> bytes:
        fields = [GPT_SIGNATURE, GPT_REVISION, GPT_HEADER_SIZE, 0, 0, my_lba, alternate,
                  layout.first_usable_lba, layout.last_usable_lba, disk_guid, entries_lba,
                  len(array) // GPT_ENTRY_SIZE, GPT_ENTRY_SIZE, zlib.crc32(array)]
        fields[3] = zlib.crc32(_GPT_HEADER.pack(*fields))
        return _GPT_HEADER.pack(*fields).ljust(ss, b"\0")

    protective = _record(False, PROTECTIVE_TYPE, 1, min(last_lba, MBR_MAX_SECTORS))
    protective = protective[:1] + b"\x00\x02\x00" + protective[4:5] + _chs(
        min(last_lba, MBR_MAX_SECTORS), b"\xff\xff\xff") + protective[8:]
    return [
        (0, _boot_sector(boot, 0, [protective])),
        (ss, header(1, last_lba, 2)),
        (2 * ss, array),
        (backup_entries * ss, array),
        (last_lba * ss, header(last_lba, 1, backup_entries)),
    ]


def _gpt_entry_array(layout: DiskLayout, count: int) -> bytes:
    array = bytearray(count * GPT_ENTRY_SIZE)
    numbers = [p.number for p in layout.partitions]
    if len(set(numbers)) != len(numbers):
        raise DiskLayoutError("duplicate partition numbers")
    for part in layout.partitions:
        if part.number < 1:
            raise DiskLayoutError(f"bad partition number {part.number}")
        if part.size_lba < 1 or not (layout.first_usable_lba <= part.start_lba
                                     and part.end_lba - 1 <= layout.last_usable_lba):
            raise DiskLayoutError(f"partition {part.number} is empty or outside the usable LBAs")
        type_guid = _guid_bytes(part.type, f"partition {part.number} type")
        if type_guid == bytes(16):
            raise DiskLayoutError(f"partition {part.number} has the unused type GUID")
        if not 0 <= part.attributes < 1 << 64:
            raise DiskLayoutError(f"partition {part.number} attributes out of range")
        _GPT_ENTRY.pack_into(array, (part.number - 1) * GPT_ENTRY_SIZE, type_guid,
                             _guid_bytes(part.guid or ZERO_GUID, f"partition {part.number} GUID"),
                             part.start_lba, part.end_lba - 1, part.attributes,
                             _encode_name(part.name, part.number))
    return bytes(array)


def _guid_bytes(text: str, what: str) -> bytes:
    try:
        return uuid.UUID(text).bytes_le
    except (TypeError, ValueError, AttributeError):
        raise DiskLayoutError(f"{what} {text!r} is not a GUID") from None


def _encode_name(name: str, number: int) -> bytes:
    try:
        raw = name.encode("utf-16-le", errors="surrogatepass")
    except (UnicodeError, AttributeError):
        raise DiskLayoutError(f"partition {number} name cannot be encoded as UTF-16") from None
    if len(raw) > 72 or b"\0\0" in [raw[i:i + 2] for i in range(0, len(raw), 2)]:
        raise DiskLayoutError(f"partition {number} name is longer than 36 UTF-16 units or "
                              "holds a NUL")
    return raw.ljust(72, b"\0")


# --- I/O -----------------------------------------------------------------------------------------

def read_layout(path_or_file: str | os.PathLike[str] | BinaryIO,
                sector_size: int | None = 512) -> DiskLayout:
    """Read the table of a disk image file, a block device or an open binary file.

    The size comes from stat, or from seeking to the end (block devices, file objects).
    sector_size None asks a block device for its logical sector size (BLKSSZGET), else 512.
    """
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        with open(path_or_file, "rb") as fileobj:
            return read_layout(fileobj, sector_size)
    fileobj = path_or_file
    size = fileobj.seek(0, os.SEEK_END)
    if sector_size is None:
        try:
            sector_size = device_sector_size(fileobj.fileno()) or 512
        except (AttributeError, OSError, ValueError):      # a file object without a descriptor
            sector_size = 512

    def read_at(offset: int, length: int) -> bytes:
        fileobj.seek(offset)
        return fileobj.read(length)

    head = read_at(0, min(size, max(HEAD_BYTES, head_bytes(sector_size))))
    tail_length = min(size, max(TAIL_BYTES, tail_bytes(sector_size)))
    tail = read_at(size - tail_length, tail_length)
    return parse_layout(head, tail, size, sector_size, read_at)


def device_sector_size(fd: int) -> int | None:
    """A block device's logical sector size (the BLKSSZGET ioctl), None for anything else:
    a disk image file has no sector size of its own to ask for."""
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            import fcntl
            blksszget = 0x1268
            return struct.unpack("i", fcntl.ioctl(fd, blksszget, b"\0" * 4))[0]
    except (OSError, ValueError):
        pass
    return None


def apply_writes(writes: Iterable[tuple[int, bytes]], fileobj: BinaryIO) -> None:
    """Put table_writes() on an open, writable disk or image (a convenience for callers)."""
    for offset, data in writes:
        fileobj.seek(offset)
        fileobj.write(data)
