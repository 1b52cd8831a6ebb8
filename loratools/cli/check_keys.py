"""`loratools check keys` (being built)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `keys` to the `check` group."""
