"""Sizes for people: binary units (KiB, MiB, GiB, TiB), as img, preboot-dir and zmgmcast print
them. Standard library only (the foundation)."""

from __future__ import annotations


def human(n: float) -> str:
    """1536 -> "1.5 KiB", 512 -> "512 B", 3 << 30 -> "3.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_exact(n: int) -> str:
    """The human size with the exact bytes a script can read: "1.5 KiB (1536 bytes)"."""
    return f"{human(n)} ({n} bytes)"


def ratio(raw: int, stored: int) -> str:
    """The compression ratio raw:stored, "3.2:1" ("-" when nothing was stored)."""
    return f"{raw / stored:.1f}:1" if stored else "-"
