"""`loratools demo` (being built; see issue tracker)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
