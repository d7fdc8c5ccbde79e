"""An offline Windows registry hive file, read and written through libhivex (the libguestfs
project's hive library, Debian's libhivex0), loaded with ctypes.

Why libhivex through ctypes rather than its Python binding (python3-hivex) or hivexsh: the
binding is built for one interpreter (Debian's python3.11), so the engine could not use it
under another Python (the tests' or a developer's); hivexsh's `setval` replaces every value of
a key at once, so setting one value would mean re-writing all the others from their text form.
The C library's hivex_node_set_value sets one value and leaves the rest as they were, and
libhivex0 is 84 KB with only libc as a dependency. docs/identity.md says more.

Changes stay in memory until commit(), which writes the whole hive back (hivex writes a new
file and renames it into place): a failure before commit leaves the file as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from typing import Iterator

from .regvalue import BadRegValue, decode

LIBRARY = "libhivex.so.0"
OPEN_WRITE = 4          # HIVEX_OPEN_WRITE
_PAGE = 0x1000          # a hive's header, and its smallest hbin


class HiveError(Exception):
    """A hive that cannot be opened, read or written; the text names the file and the key."""


class _SetValue(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("t", ctypes.c_int), ("len", ctypes.c_size_t),
                ("value", ctypes.c_char_p)]


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        raise HiveError(f"{LIBRARY} not found: install libhivex0 (the hive library img edits "
                        "Windows' registry with)") from None
    node, handle = ctypes.c_size_t, ctypes.c_void_p
    signatures = {
        "hivex_open": ([ctypes.c_char_p, ctypes.c_int], handle),
        "hivex_close": ([handle], ctypes.c_int),
        "hivex_root": ([handle], node),
        "hivex_node_name": ([handle, node], ctypes.c_void_p),
        "hivex_node_children": ([handle, node], ctypes.c_void_p),
        "hivex_node_get_child": ([handle, node, ctypes.c_char_p], node),
        "hivex_node_add_child": ([handle, node, ctypes.c_char_p], node),
        "hivex_node_get_value": ([handle, node, ctypes.c_char_p], node),
        "hivex_value_value": ([handle, node, ctypes.POINTER(ctypes.c_int),
                               ctypes.POINTER(ctypes.c_size_t)], ctypes.c_void_p),
        "hivex_node_set_value": ([handle, node, ctypes.POINTER(_SetValue), ctypes.c_int],
                                 ctypes.c_int),
        "hivex_commit": ([handle, ctypes.c_char_p, ctypes.c_int], ctypes.c_int),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    return libc


class Hive:
    """One open hive; use as a context manager. Keys are paths of names from the root,
    ("ControlSet001", "Services", "Tcpip"); names compare without case, as Windows does."""

    def __init__(self, path: str, writable: bool = False):
        self.path = path
        self._lib = _library()
        self._libc = _libc()
        ctypes.set_errno(0)
        self._h = self._lib.hivex_open(os.fsencode(path), OPEN_WRITE if writable else 0)
        if not self._h:
            raise HiveError(f"{path}: not a registry hive libhivex can open "
                            f"({os.strerror(ctypes.get_errno()) or 'unknown error'})")

    def __enter__(self) -> "Hive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._h:
            self._lib.hivex_close(self._h)
            self._h = None

    def _fail(self, what: str) -> HiveError:
        return HiveError(f"{self.path}: {what}: {os.strerror(ctypes.get_errno())}")

    def root(self) -> int:
        return self._lib.hivex_root(self._h)

    def child(self, node: int, name: str) -> int | None:
        """The child key called name, None when there is none."""
        ctypes.set_errno(0)
        found = self._lib.hivex_node_get_child(self._h, node, name.encode("utf-8"))
        if not found and ctypes.get_errno():
            raise self._fail(f"cannot read key {name}")
        return found or None

    def key(self, path: tuple[str, ...] | list[str]) -> int | None:
        """The key at path from the root, None when a part of it is missing."""
        node: int | None = self.root()
        for name in path:
            node = self.child(node, name)
            if node is None:
                return None
        return node

    def children(self, node: int) -> Iterator[tuple[str, int]]:
        """(name, key) of each child key."""
        array = self._lib.hivex_node_children(self._h, node)
        if not array:
            raise self._fail("cannot list child keys")
        try:
            handles = ctypes.cast(array, ctypes.POINTER(ctypes.c_size_t))
            index = 0
            found = []
            while handles[index]:
                found.append(handles[index])
                index += 1
        finally:
            self._libc.free(array)
        for handle in found:
            yield self._name(handle), handle

    def _name(self, node: int) -> str:
        raw = self._lib.hivex_node_name(self._h, node)
        if not raw:
            raise self._fail("cannot read a key's name")
        try:
            return ctypes.string_at(raw).decode("utf-8", "replace")
        finally:
            self._libc.free(raw)

    def add_child(self, node: int, name: str) -> int:
        ctypes.set_errno(0)
        added = self._lib.hivex_node_add_child(self._h, node, name.encode("utf-8"))
        if not added:
            raise self._fail(f"cannot add key {name}")
        return added

    def ensure_key(self, path: tuple[str, ...] | list[str]) -> int:
        """The key at path, adding the missing ones (tests build hives with it)."""
        node = self.root()
        for name in path:
            node = self.child(node, name) or self.add_child(node, name)
        return node

    def raw_value(self, node: int, name: str) -> tuple[int, bytes] | None:
        """(type, bytes) of the value called name, None when there is none."""
        ctypes.set_errno(0)
        value = self._lib.hivex_node_get_value(self._h, node, name.encode("utf-8"))
        if not value:
            if ctypes.get_errno():
                raise self._fail(f"cannot read value {name}")
            return None
        kind, size = ctypes.c_int(), ctypes.c_size_t()
        data = self._lib.hivex_value_value(self._h, value, ctypes.byref(kind), ctypes.byref(size))
        if not data:
            raise self._fail(f"cannot read value {name}")
        try:
            return kind.value, ctypes.string_at(data, size.value)
        finally:
            self._libc.free(data)

    def value(self, node: int, name: str) -> str | int | list[str] | bytes | None:
        """The decoded value (img/regvalue.py), None when there is none."""
        found = self.raw_value(node, name)
        if found is None:
            return None
        try:
            return decode(*found)
        except BadRegValue as exc:
            raise HiveError(f"{self.path}: value {name}: {exc}") from None

    def set_value(self, node: int, name: str, kind: int, data: bytes) -> None:
        """Set one value (adding it or replacing it); the key's other values stay."""
        buffer = ctypes.create_string_buffer(data, len(data))
        record = _SetValue(name.encode("utf-8"), kind, len(data),
                           ctypes.cast(buffer, ctypes.c_char_p))
        ctypes.set_errno(0)
        if self._lib.hivex_node_set_value(self._h, node, ctypes.byref(record), 0) != 0:
            raise self._fail(f"cannot set value {name}")

    def commit(self) -> None:
        """Write the changes to the file."""
        ctypes.set_errno(0)
        if self._lib.hivex_commit(self._h, None, 0) != 0:
            raise self._fail("cannot write the hive")


def empty_hive(name: str = "SYSTEM") -> bytes:
    """A hive file holding only its root key: a regf header (checksummed) and one 4 KiB hbin
    with the root's nk cell, its security (sk) cell, which hivex copies to every key it adds,
    and the rest as one free cell. libhivex cannot make a hive from nothing; the tests and the
    imaging environment's self-test start from this one (pure: bytes out)."""
    root_off = 0x20                                    # cell offsets count from the first hbin
    root_name = b"ROOT"

    def nk(sk_off: int) -> bytes:
        return struct.pack("<2sHqIIIIIIIIIIHHIIIIHH", b"nk", 0x2C, 0, 0, 0xFFFFFFFF, 0, 0,
                           0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, sk_off, 0xFFFFFFFF, 0, 0,
                           0, 0, 0, 0, len(root_name), 0) + root_name

    nk_cell = (4 + len(nk(0)) + 7) // 8 * 8
    sk_off = root_off + nk_cell
    # a self-relative security descriptor with a NULL DACL
    descriptor = struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 0)
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_off, sk_off, 1, len(descriptor)) + descriptor
    sk_cell = (4 + len(sk) + 7) // 8 * 8
    hbin = bytearray(_PAGE)
    struct.pack_into("<4sII", hbin, 0, b"hbin", 0, _PAGE)
    for offset, size, body in ((root_off, nk_cell, nk(sk_off)), (sk_off, sk_cell, sk)):
        struct.pack_into("<i", hbin, offset, -size)
        hbin[offset + 4:offset + 4 + len(body)] = body
    free = sk_off + sk_cell
    struct.pack_into("<i", hbin, free, _PAGE - free)          # the rest: one free cell
    head = bytearray(_PAGE)
    struct.pack_into("<4sIIqIIIIIII", head, 0, b"regf", 1, 1, 0, 1, 3, 0, 1, root_off, _PAGE, 1)
    label = name.encode("utf-16-le")[:64]
    head[0x30:0x30 + len(label)] = label
    checksum = 0
    for (word,) in struct.iter_unpack("<I", head[:0x1FC]):
        checksum ^= word
    struct.pack_into("<I", head, 0x1FC, checksum)
    return bytes(head + hbin)
