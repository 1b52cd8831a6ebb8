"""`loratools metadata` commands (being built; see issue tracker)."""

from __future__ import annotations

import typer

app = typer.Typer(help="metadata commands.", no_args_is_help=True)
