"""Sizes as people read them; shared by the CLI and the operations' summary lines (no torch)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units, as file managers and the seeds' guides quote LoRA sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def size_change(before: int, after: int) -> str:
    """``484.5 KiB -> 465.4 KiB``: both sizes in the larger one's unit, with as many decimals as it
    takes to show that they differ (``144.02 MiB -> 143.98 MiB``, not ``144.0 MiB -> 144.0 MiB``)."""
    big = max(abs(before), abs(after))
    unit, scale = "B", 1
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if big < scale * 1024:
            break
        unit, scale = name, scale * 1024
    if unit == "B":
        return f"{before} B -> {after} B"
    for decimals in range(1, 4):
        a, b = f"{before / scale:.{decimals}f}", f"{after / scale:.{decimals}f}"
        if a != b or before == after:
            return f"{a} {unit} -> {b} {unit}"
    return f"{a} {unit} -> {b} {unit} ({after - before:+d} bytes)"
