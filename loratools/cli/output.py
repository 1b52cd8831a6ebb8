"""One renderer for every command: rich tables for people, JSON for scripts.

Commands build plain rows and hand them here; they never ``print`` directly, so ``--json``
output is never mixed with decoration (progress and warnings go to stderr).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (non-JSON values become strings)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
          justify_right: Sequence[str] = ()) -> Table:
    """Build a rich table; numbers in ``justify_right`` columns are right-aligned. All-empty column
    names give a table without a header row (a key/value listing)."""
    t = Table(title=title, title_justify="left", show_lines=False, show_header=any(columns))
    for c in columns:
        t.add_column(c, justify="right" if c in justify_right else "left", overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    err_console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def info(message: str) -> None:
    """A one-line note on stderr (keeps stdout clean for --json)."""
    err_console.print(message, soft_wrap=True)


def human_bytes(n: float) -> str:
    """Binary units, as file managers and the seeds' guides quote LoRA sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
