"""Image-safe data on a disk: where the record goes (slot_for, pure) and reading, writing and
clearing it (read_identity, write_identity, clear_identity), for img's own commands and for the
parts that carry an identity (img auto, applying it after a restore).

Where (docs/image-format.md, "Image-safe data"): the 4 KiB just below byte 1 MiB, bytes
1044480..1048575: LBAs 2040-2047 of a 512-byte-sector disk, LBA 255 of a 4Kn disk. The same
bytes whatever the sector size, so a restore that converts the table keeps them in place. That
is outside every partition when each partition starts at 1 MiB or later (what fdisk, sfdisk,
sgdisk, parted and Windows do), below the first partition, clear of the GPT's header and entry
array (at LBA 1 and 2..33, or 1 and 2..5 of 4Kn, wherever its header says) and past GRUB's core.img (GRUB embeds at most a few hundred
KiB after the MBR). A disk where that is not so (a first partition at sector 63, a GPT whose
usable space starts later, no partition table at all) has no room: writing is refused, reading
finds nothing. Bytes there that are not a record (another program's) are never overwritten.

The sector size a disk image file's table counts in is not written anywhere: unless the caller
says it, the table is read with 512-byte sectors and, where it reads right only with 4096
(img/sectors.py), with those.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from common import __version__
from common.identity import MachineIdentity

from .disk import Disk
from .disklayout import (DiskLayout, DiskLayoutError, gpt_entry_bytes, read_gpt_entry_bytes,
                         read_layout)
from .errors import DiskError, IsdError
from .isd import SLOT_BYTES, BadRecord, IsdRecord, decode, encode, has_magic, new_record
from .sectors import other_sector_size, table_mismatch

MIN_FIRST_START = 1 << 20                       # every partition at 1 MiB or later
SLOT_OFFSET = MIN_FIRST_START - SLOT_BYTES      # byte 1044480


@dataclass(frozen=True)
class Slot:
    """Where the record goes on a disk with this layout: offset None when there is no room,
    and the reason either way."""

    offset: int | None
    reason: str

    @property
    def length(self) -> int:
        return SLOT_BYTES


def slot_for(layout: DiskLayout, gpt_entries: tuple[int, int] | None = None) -> Slot:
    """The record's place on a disk with this table, or why there is none (pure).
    gpt_entries: (byte offset, length) of a GPT's primary entry array, as its header says
    (default: where img writes it, LBA 2 on)."""
    where = f"bytes {SLOT_OFFSET}..{SLOT_OFFSET + SLOT_BYTES - 1}"
    if layout.kind not in ("mbr", "gpt"):
        return Slot(None, "the disk has no partition table (a blank disk or a whole-disk "
                          "filesystem): no bytes lie outside the data")
    if layout.disk_size < MIN_FIRST_START:
        return Slot(None, f"the disk ({layout.disk_size} bytes) is smaller than 1 MiB")
    sector = layout.sector_size
    for part in sorted(layout.partitions, key=lambda p: p.start_lba):
        if part.start_bytes(sector) < MIN_FIRST_START:
            return Slot(None, f"partition {part.number} starts at sector {part.start_lba} "
                              f"(byte {part.start_bytes(sector)}), below 1 MiB, so {where} may "
                              "hold its data or a boot loader's; only a disk whose partitions "
                              "all start at 1 MiB or later has room")
    if layout.kind == "gpt":
        start, length = gpt_entries or gpt_entry_bytes(layout)
        if start < SLOT_OFFSET + SLOT_BYTES and SLOT_OFFSET < start + length:
            return Slot(None, f"the GPT's entry array (bytes {start}..{start + length - 1}) "
                              f"overlaps {where}")
    first, last = SLOT_OFFSET // sector, MIN_FIRST_START // sector - 1
    lbas = f"LBA {first}" if first == last else f"LBAs {first}-{last}"
    return Slot(SLOT_OFFSET, f"{where} ({lbas} of {sector}-byte sectors), below the first "
                             "partition")


def disk_layout(disk: Disk, explicit_sectors: bool) -> DiskLayout:
    """The disk's table; for a disk image file whose sector size nobody gave, read in the
    other size too when 512 reads wrong (img/sectors.py). DiskLayoutError when unreadable."""
    try:
        layout = disk.read_layout()
    except DiskLayoutError:
        if disk.is_device or explicit_sectors:
            raise
        return read_layout(disk.path, other_sector_size(disk.sector_size))
    if not disk.is_device and not explicit_sectors and layout.partitions \
            and table_mismatch(disk, layout):
        return read_layout(disk.path, other_sector_size(disk.sector_size))
    return layout


def disk_slot(disk: Disk, layout: DiskLayout) -> Slot:
    """slot_for() the disk's own table, the GPT's entry array where its header puts it."""
    entries = read_gpt_entry_bytes(disk.read, layout) if layout.kind == "gpt" else None
    return slot_for(layout, entries)


def occupied_slot(disk: Disk, layout: DiskLayout) -> tuple[int, int] | None:
    """(offset, length) of the slot when this layout leaves room for it and a record (possibly
    damaged) is there: what `img make` leaves out and `img restore` keeps."""
    slot = disk_slot(disk, layout)
    if slot.offset is None or disk.size < slot.offset + SLOT_BYTES:
        return None
    return (slot.offset, SLOT_BYTES) if has_magic(disk.read(slot.offset, SLOT_BYTES)) else None


def _open(path: str, writable: bool, sector_size: int | None) -> tuple[Disk, DiskLayout, Slot]:
    try:
        disk = Disk.open(path, writable=writable, sector_size=sector_size)
    except DiskError as exc:
        raise IsdError(str(exc)) from None
    try:
        layout = disk_layout(disk, sector_size is not None)
    except DiskLayoutError as exc:
        disk.close()
        raise IsdError(f"{path}: its partition table cannot be read ({exc}), so img cannot tell "
                       "where image-safe data may lie") from None
    return disk, layout, disk_slot(disk, layout)


def read_record(path: str, sector_size: int | None = None) -> tuple[IsdRecord | None, Slot]:
    """The record on the disk (None when there is none) and the slot it was looked for in.
    IsdError when a record is there but damaged, or the table cannot be read."""
    disk, _, slot = _open(path, False, sector_size)
    with disk:
        if slot.offset is None or disk.size < slot.offset + SLOT_BYTES:
            return None, slot
        data = disk.read(slot.offset, SLOT_BYTES)
    if not has_magic(data):
        return None, slot
    try:
        return decode(data), slot
    except BadRecord as exc:
        raise IsdError(f"{path}: image-safe data at byte {slot.offset} is damaged: {exc} "
                       "(`img isd set` writes a new one, `img isd clear` removes it)") from None


def read_identity(disk: str, sector_size: int | None = None) -> MachineIdentity | None:
    """The identity kept on disk, None when it has none (or no room for one); IsdError when a
    record is there but damaged."""
    record, _ = read_record(disk, sector_size)
    return None if record is None else record.identity


def write_identity(disk: str, identity: MachineIdentity, sector_size: int | None = None,
                   now: datetime.datetime | None = None) -> None:
    """Keep identity on disk, replacing the record there. IsdError, nothing written, when the
    disk has no room or the slot holds bytes that are not a record (another program's)."""
    record = new_record(identity, now or datetime.datetime.now(datetime.timezone.utc),
                        f"img {__version__}")
    data = encode(record)
    handle, _, slot = _open(disk, True, sector_size)
    with handle:
        offset = _writable_offset(handle, slot)
        handle.write(offset, data)
        handle.sync()


def clear_identity(disk: str, sector_size: int | None = None) -> bool:
    """Remove the record (zeros in its place); whether there was one. Bytes that are not a
    record are left alone."""
    handle, _, slot = _open(disk, True, sector_size)
    with handle:
        if slot.offset is None or handle.size < slot.offset + SLOT_BYTES:
            return False
        if not has_magic(handle.read(slot.offset, SLOT_BYTES)):
            return False
        handle.write(slot.offset, bytes(SLOT_BYTES))
        handle.sync()
    return True


def _writable_offset(disk: Disk, slot: Slot) -> int:
    if slot.offset is None:
        raise IsdError(f"{disk.path} has no room for image-safe data: {slot.reason} "
                       "(nothing was written)")
    if disk.size < slot.offset + SLOT_BYTES:
        raise IsdError(f"{disk.path} is too small for image-safe data (nothing was written)")
    present = disk.read(slot.offset, SLOT_BYTES)
    if any(present) and not has_magic(present):
        raise IsdError(f"{disk.path}: bytes {slot.offset}..{slot.offset + SLOT_BYTES - 1}, "
                       "where image-safe data goes, hold something else (another program's "
                       "data?); img does not overwrite them (nothing was written)")
    return slot.offset


__all__ = ["MIN_FIRST_START", "SLOT_OFFSET", "Slot", "clear_identity", "disk_layout",
           "occupied_slot", "read_identity", "read_record", "slot_for", "write_identity"]
