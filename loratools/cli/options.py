"""Options shared by several commands, as ``Annotated`` aliases so each is spelled once, and the
command class that reads sd-scripts' space-separated lists (``--models a b --ratios 0.7 0.3``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Optional

import typer
from typer.core import TyperCommand

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file.", metavar="FILE")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def expand_lists(args: list[str], names: frozenset[str]) -> list[str]:
    """``--models a b --ratios 0.7 -0.3`` -> ``--models a --models b --ratios 0.7 --ratios -0.3``.

    sd-scripts' argparse takes ``nargs="*"`` lists; click takes one value per option. Each value
    after a list option belongs to it until the next option (a number such as ``-0.3`` is a value)
    or ``--``.
    """
    out: list[str] = []
    current: str | None = None
    for i, a in enumerate(args):
        if a == "--":
            out.extend(args[i:])
            return out
        if a in names:
            current = a
            continue
        if current is not None and (not a.startswith("-") or _is_number(a)):
            out += [current, a]
            continue
        current = None
        out.append(a)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ListOptionsCommand(TyperCommand):
    """A command whose ``LIST_OPTIONS`` take space-separated values, as sd-scripts spells them."""

    LIST_OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: D102 (click's hook)
        return super().parse_args(ctx, expand_lists(args, self.LIST_OPTIONS))
