"""One renderer for every command: rich tables for people, JSON for scripts.

Commands build plain rows and hand them here; they never ``print`` directly, so ``--json``
output is never mixed with decoration (progress and warnings go to stderr).

Everything that comes from the user's files (paths, key names, metadata values, messages that
quote them) is text, not rich markup: ``char [v2].safetensors`` must print as it is, and a
``[/x]`` in a training comment must not crash the renderer. ``table``, ``warn`` and ``info``
escape what they are given; commands pass any other such string through ``plain``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (non-JSON values become strings)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def plain(value: Any) -> str:
    """``value`` as literal text for a rich console (brackets escaped, never read as markup)."""
    return escape(str(value))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
          justify_right: Sequence[str] = ()) -> Table:
    """Build a rich table of literal text; numbers in ``justify_right`` columns are right-aligned.
    All-empty column names give a table without a header row (a key/value listing)."""
    t = Table(title=None if title is None else plain(title), title_justify="left", show_lines=False,
              show_header=any(columns))
    for c in columns:
        t.add_column(plain(c), justify="right" if c in justify_right else "left", overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else plain(v) for v in r))
    return t


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    err_console.print(f"[yellow]warning:[/yellow] {plain(message)}", soft_wrap=True)


def info(message: str) -> None:
    """A one-line note on stderr (keeps stdout clean for --json)."""
    err_console.print(plain(message), soft_wrap=True)


def human_bytes(n: float) -> str:
    """Binary units, as file managers and the seeds' guides quote LoRA sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
