"""Parse ``PATH[:RATIO]`` arguments and the ``--ratio`` list into (path, ratio) pairs.

Why a module of its own: the obvious ``arg.split(":")`` breaks on Windows drive letters
(``C:\\loras\\a.safetensors:0.7``) and the obvious ``split(",")`` on file names with commas,
both of which users hit with other merge tools (resize-spec A1, row 17). The rule here is:

1. an argument that names an existing file or folder is a path, whole, with no ratio;
2. otherwise split at the LAST ``:``; if the tail parses as a finite float and the head is not
   empty, that is ``path:ratio``;
3. otherwise the whole argument is the path (missing files are reported later, by whoever opens it).

A third part names block weights: ``PATH:RATIO:PRESET`` (``style.safetensors:0.8:OUTD``) or a list
(``PATH:RATIO:1,0,0,...``, A1111's ``<lora:name:0.8:1,0,...>``); the part is taken only when it is a
known preset name or a list of numbers, so a path is never cut at a colon of its own.
Commas are never separators inside a path argument. ``--ratio`` takes one value per input
(repeated, or comma-separated in one option) or a single value for all inputs; giving a ratio both
inline and through ``--ratio`` for the same input is refused, because one of them would be ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import UsageError


@dataclass(frozen=True)
class WeightedPath:
    """One input file with its merge ratio (strength).

    Attributes:
        path: the file (or diffusers folder) as given.
        ratio: the multiplier applied to the adapter's delta; 1.0 when none was given.
        blocks: block weights as given (a preset name or a list; ``ops.merge.blocks`` parses
            them once the architecture is known), or None.
    """

    path: Path
    ratio: float = 1.0
    blocks: str | None = None


def finite_float(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def split_weighted(arg: str) -> tuple[str, float | None]:
    """Split ``PATH[:RATIO]`` into the path text and the ratio (None when the argument has none).

    Example:
        >>> split_weighted(r"C:\\loras\\a,b.safetensors:0.7")
        ('C:\\\\loras\\\\a,b.safetensors', 0.7)
        >>> split_weighted(r"C:\\loras\\a.safetensors")
        ('C:\\\\loras\\\\a.safetensors', None)
    """
    if not arg:
        raise UsageError("empty input argument; give PATH or PATH:RATIO")
    if os.path.exists(arg):
        return arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        value = finite_float(tail)
        if value is not None:
            return head, value
        if _looks_numeric(tail):
            raise UsageError(f"ratio {tail!r} in {arg!r} is not a finite number; write PATH:0.8")
    return arg, None


def split_blocks(arg: str) -> tuple[str, str | None]:
    """Split ``PATH[:RATIO]:BLOCKS`` into the rest and the block weights (None when there are none).

    Example:
        >>> split_blocks("style.safetensors:0.8:OUTD")
        ('style.safetensors:0.8', 'OUTD')
    """
    from loratools.ops.merge.blocks import is_preset, looks_like_list

    if not arg or os.path.exists(arg):
        return arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and head and (is_preset(tail) or looks_like_list(tail)):
        return head, tail
    return arg, None


def _looks_numeric(text: str) -> bool:
    """True for tails meant as ratios but malformed (``1..2``, ``nan``), never for path parts."""
    stripped = text.strip().lower()
    if stripped in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}:
        return True
    return bool(stripped) and all(c in "0123456789.+-e" for c in stripped) and any(c.isdigit() for c in stripped)


def parse_ratio_option(values: Sequence[str] | None) -> list[float]:
    """Flatten ``--ratio 0.7 --ratio 0.3`` and ``--ratio 0.7,0.3`` into floats.

    Raises:
        UsageError: a value is not a finite number.
    """
    ratios: list[float] = []
    for value in values or ():
        for part in value.split(","):
            number = finite_float(part.strip())
            if number is None:
                raise UsageError(f"--ratio value {part!r} is not a finite number; e.g. --ratio 0.8")
            ratios.append(number)
    return ratios


def resolve_inputs(args: Sequence[str], ratio_option: Sequence[str] | None = None,
                   lbws: Sequence[str] | None = None) -> list[WeightedPath]:
    """Combine ``PATH[:RATIO][:BLOCKS]`` arguments with ``--ratio`` and ``--lbws`` values.

    Args:
        args: the adapter arguments as typed.
        ratio_option: raw ``--ratio`` values (each may hold a comma-separated list).
        lbws: sd-scripts' ``--lbws``: block weights for the first ``len(lbws)`` adapters, in order
            (the ones after them have none, as in sd-scripts).

    Returns:
        One ``WeightedPath`` per argument, in order.

    Raises:
        UsageError: the number of ``--ratio`` values fits neither 1 nor the number of inputs, an
            input has a ratio (or block weights) both inline and in ``--ratio`` (``--lbws``), or
            there are more ``--lbws`` than inputs.

    Example:
        >>> [w.ratio for w in resolve_inputs(["a.safetensors", "b.safetensors"], ["0.8,0.5"])]
        [0.8, 0.5]
    """
    blocks = [split_blocks(a) for a in args]
    split = [split_weighted(rest) for rest, _ in blocks]
    given = [b for _, b in blocks]
    lbws = list(lbws or ())
    if len(lbws) > len(args):
        raise UsageError(f"--lbws has {len(lbws)} lists for {len(args)} adapters; give at most one per adapter")
    for i, value in enumerate(lbws):
        if given[i] is not None:
            raise UsageError(f"{split[i][0]}: block weights given twice (inline :{given[i]} and --lbws); keep one")
        given[i] = value
    extra = parse_ratio_option(ratio_option)
    if not extra:
        return [WeightedPath(Path(p), 1.0 if r is None else r, b) for (p, r), b in zip(split, given)]
    if len(extra) == 1:
        extra = extra * len(split)
    if len(extra) != len(split):
        raise UsageError(f"--ratio has {len(extra)} values for {len(split)} inputs; give one per input or one for all")
    out = []
    for (path, inline), ratio, b in zip(split, extra, given):
        if inline is not None:
            raise UsageError(f"{path}: ratio given twice (inline :{inline:g} and --ratio {ratio:g}); keep one")
        out.append(WeightedPath(Path(path), ratio, b))
    return out
