"""Options shared by several commands, as ``Annotated`` aliases so each is spelled once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
