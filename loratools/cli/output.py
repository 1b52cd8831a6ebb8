"""The one output object of every command: ``out``.

Commands build plain rows and strings and hand them to ``out``; they never ``print`` or build rich
objects from strings themselves. Three rules follow from that:

* Everything is text. The consoles interpret neither rich markup nor emoji codes, so a user's
  path (``char [v2].safetensors``, ``style:smile:.safetensors``), a key, a metadata value or a
  module name prints exactly as it is, in tables, progress lines, warnings and errors. Our own
  words get colour through ``rich.text.Text`` spans (``styled``), never through markup in strings.
* Tables fit the terminal (80 columns when piped). ``out.table`` lays rows out as columns when the
  columns that must not wrap (names, numbers) fit the width, and otherwise as one stacked record per
  row: the first cell on its own line, the others as ``label: value`` below it. Names are never cut.
  Scripts read ``--json`` / ``--csv``, which are complete whatever the width.
* ``--json`` goes to stdout alone: progress, warnings and notes go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.padding import Padding
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

_PROSE_MIN = 16  # narrowest a wrapping column may get before the stacked layout reads better
_STACK_INDENT = 4


def make_console(*, stderr: bool = False, file: IO[str] | None = None, width: int | None = None,
                 record: bool = False) -> Console:
    """A console that prints strings literally: no markup, no emoji codes, no highlighting.
    (Tests build recording ones with this, so they see what users see.)"""
    return Console(stderr=stderr, file=file, width=width, record=record, markup=False, emoji=False,
                   highlight=False)


def styled(text: str, style: str) -> Text:
    """``text`` (literal) drawn in ``style`` ("red", "bold", ...)."""
    return Text(text, style=style)


@dataclass(frozen=True)
class _Column:
    header: str
    right: bool  # numbers: right-aligned
    wrap: bool  # prose: may wrap between words


class FitTable:
    """Rows under column headers, laid out for the width it is printed at (see the module docstring).

    A rich renderable: ``out.show(t)``, or print it on any console.
    """

    def __init__(self, title: str | None, columns: Sequence[_Column], rows: Sequence[Sequence[str]]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]

    def natural_widths(self) -> list[int]:
        """Each column's width without wrapping (its widest line, header included)."""
        return [max([_width(c.header), *(_width(r[i]) for r in self.rows)]) for i, c in enumerate(self.columns)]

    def fits(self, width: int) -> bool:
        """Whether the column layout fits ``width`` without wrapping a name or a number."""
        natural = self.natural_widths()
        need = sum(min(n, max(_PROSE_MIN, _longest_word(self.rows, i))) if c.wrap else n
                   for i, (c, n) in enumerate(zip(self.columns, natural)))
        return need + _column_gaps(len(self.columns)) <= width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:
            yield Text(self.title, style="bold")
        if self.fits(options.max_width):
            yield self._columns()
        else:
            yield from self._stacked(options.max_width)

    def _columns(self) -> Table:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, show_header=True)
        for c in self.columns:
            t.add_column(Text(c.header), justify="right" if c.right else "left", no_wrap=not c.wrap,
                         overflow="fold")
        for r in self.rows:
            t.add_row(*(Text(v) for v in r))
        return t

    def _stacked(self, width: int) -> Iterator[RenderableType]:
        """Each row as its first cell on a line, then ``label: value`` pairs packed into indented lines
        (a pair is only split when it is longer than a line by itself)."""
        room = max(width - _STACK_INDENT, 20)
        for r in self.rows:
            yield Text(r[0] or "-", style="bold")
            lines: list[str] = []
            for c, v in zip(self.columns[1:], r[1:]):
                if not v:
                    continue
                pair = (f"{c.header}: {v}" if c.header else v).replace("\n", "; ")
                if lines and cell_len(lines[-1]) + 3 + cell_len(pair) <= room:
                    lines[-1] += "   " + pair
                else:
                    lines.append(pair)
            for line in lines:
                yield Padding(Text(line), (0, 0, 0, _STACK_INDENT), expand=False)


class KeyValues:
    """A two-column listing without header (``metadata show``'s sections): keys never wrap, values
    fold at the width (hashes and paths are long single words)."""

    def __init__(self, title: str | None, rows: Sequence[tuple[str, str]]) -> None:
        self.title = title
        self.rows = list(rows)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:
            yield Text(self.title, style="bold")
        t = Table.grid(padding=(0, 2))
        t.add_column(no_wrap=True, style="bold")
        t.add_column(overflow="fold")
        for k, v in self.rows:
            t.add_row(Text(k), Text(v))
        yield t


def _width(cell: str) -> int:
    return max((cell_len(line) for line in cell.split("\n")), default=0)


def _longest_word(rows: Sequence[Sequence[str]], i: int) -> int:
    return max((cell_len(w) for r in rows for w in r[i].split()), default=0)


@lru_cache(maxsize=None)
def _column_gaps(n: int) -> int:
    """Characters a table of ``n`` columns adds around its cells (measured, not assumed)."""
    if n == 0:
        return 0
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for _ in range(n):
        t.add_column("x")
    t.add_row(*["x"] * n)
    c = make_console(width=10 * n + 10)
    with c.capture() as cap:
        c.print(t)
    return max(cell_len(line) for line in cap.get().splitlines()) - n


class _Count(ProgressColumn):
    """``done/total``; nothing while the total is unknown (instead of ``0/?``)."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")


class _Eta(ProgressColumn):
    """``eta 0:01:23`` once the rate is known."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if task.total is None or left is None or task.finished:
            return Text("")
        m, s = divmod(int(left + 0.5), 60)
        h, m = divmod(m, 60)
        return Text(f"eta {h}:{m:02d}:{s:02d}")


class Output:
    """Where commands print: stdout for results, stderr for progress, warnings and errors."""

    def __init__(self, console: Console | None = None, err_console: Console | None = None) -> None:
        self.console = console or make_console()
        self.err_console = err_console or make_console(stderr=True)

    # results (stdout)
    def print(self, *parts: str | Text) -> None:
        """One line of results, printed as text; it wraps in the terminal, not in a pipe."""
        self.console.print(Text.assemble(*parts), soft_wrap=True)

    def show(self, renderable: RenderableType) -> None:
        """A table (``table``/``key_values``) or any rich renderable."""
        self.console.print(renderable)

    def rule(self, title: str) -> None:
        """A horizontal line naming what follows (one per file)."""
        self.console.rule(Text(title, style="bold"))

    def json(self, data: Any) -> None:
        """``data`` as indented JSON on stdout (non-JSON values become strings)."""
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    @staticmethod
    def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
              justify_right: Sequence[str] = (), wrap: Sequence[str] = ()) -> FitTable | KeyValues:
        """Rows of literal text under ``columns``. ``justify_right``: number columns; ``wrap``: prose
        columns that may wrap between words (every other column keeps its cells on one line). All
        column names empty: a key/value listing."""
        text_rows = [["" if v is None else str(v) for v in r] for r in rows]
        if not any(columns):
            return KeyValues(title, [(r[0], " ".join(r[1:])) for r in text_rows])
        return FitTable(title, [_Column(c, c in justify_right, c in wrap) for c in columns], text_rows)

    @staticmethod
    def key_values(title: str | None, rows: Iterable[tuple[str, Any]]) -> KeyValues:
        """A key/value listing (values printed as text)."""
        return KeyValues(title, [(str(k), str(v)) for k, v in rows])

    # diagnostics (stderr)
    def warn(self, message: str) -> None:
        """A one-line warning."""
        self.err_console.print(Text.assemble(styled("warning:", "yellow"), " ", message), soft_wrap=True)

    def info(self, message: str) -> None:
        """A one-line note (keeps stdout clean for --json)."""
        self.err_console.print(Text(message), soft_wrap=True)

    def error(self, message: str) -> None:
        """The one line of an error the program stops on."""
        self.err_console.print(Text.assemble(styled("error:", "red"), " ", message), soft_wrap=True)

    def problem(self, message: str) -> None:
        """One finding of a check that failed (exit code 1)."""
        self.err_console.print(Text.assemble(styled("problem:", "red"), " ", message), soft_wrap=True)

    def progress(self, *, disable: bool = False) -> Progress:
        """A transient progress line on stderr: description (text), bar, done/total, elapsed, ETA. Only on a
        terminal: a log file or a pipe gets no progress (nor the blank line a stopped display leaves)."""
        return Progress(TextColumn("{task.description}", markup=False), BarColumn(), _Count(), TimeElapsedColumn(),
                        _Eta(), console=self.err_console, transient=True,
                        disable=disable or not self.err_console.is_terminal)


out = Output()
