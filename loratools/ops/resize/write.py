"""Step 3 of a resize: one recipe's output file, planned exactly and written by streaming.

The plan (every tensor's name, shape and dtype, and the metadata) is known before any tensor
is built, so ``size=`` can size the file exactly and the table can be printed for a dry run.
The writer asks for tensors in file order; each layer's reduced tensors are built by its
``Directions`` when first asked for, so at most one layer's tensors are held at a time (plus
the scalars a type cannot give before building: rare, and small).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from loratools.errors import NonFiniteError
from loratools.io.arrays import all_finite

if TYPE_CHECKING:
    from loratools.io import TensorSpec
    from loratools.ops.resize.choose import Choice
    from loratools.ops.resize.decompose import Layer
    from loratools.ops.resize.outcome import LayerRow

Progress = Callable[[str, int, int], None]


def written_rank(layer: Layer, k: int) -> int:
    """The rank the layer's file tensors get for a chosen rank ``k`` (``--kohya-compat`` can pad
    above the directions a type has; a type that cannot pad is capped at them)."""
    return k if layer.d.pads else min(k, layer.d.S.size)


def plan_specs(layers: Sequence[Layer], ranks: Sequence[int], names: Mapping[str, str], dtype: str,
               passthrough: Sequence[TensorSpec]) -> tuple[list[TensorSpec], list[tuple[Layer, int]]]:
    """Every output tensor's spec, and the ``(layer, written rank)`` of the kept layers."""
    from loratools.io import TensorSpec

    specs = list(passthrough)
    kept = []
    for ly, k in zip(layers, ranks):
        k = written_rank(ly, k)
        if k == 0:
            continue
        prefix = names[ly.name]
        specs.extend(TensorSpec(f"{prefix}.{suffix}", dt, shape) for suffix, (shape, dt) in ly.d.specs(k, dtype).items())
        kept.append((ly, k))
    return specs, kept


def rows(layers: Sequence[Layer], choice: Choice) -> tuple[list[LayerRow], float]:
    """The per-layer table and the share of the whole delta's Frobenius norm kept."""
    from loratools.ops.resize.outcome import LayerRow

    out, kept_sq, all_sq = [], 0.0, 0.0
    for i, ly in enumerate(layers):
        s = ly.d.S.astype(np.float64)
        mask = _dropped_mask(s.size, choice.kept(i, ly))
        err = float(np.linalg.norm(s[mask])) if s.size else 0.0
        total = float(np.linalg.norm(s))
        kept_sq += max(total * total - err * err, 0.0)
        all_sq += total * total
        out.append(LayerRow(ly.name, ly.kind, ly.d.old_rank, choice.ranks[i], err / total if total else 0.0,
                            err / ly.base.fro if ly.base is not None and ly.base.fro else None, ly.base is not None))
    return out, (math.sqrt(kept_sq / all_sq) if all_sq else 1.0)


def _dropped_mask(n: int, kept: Sequence[int]) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    if kept:
        mask[np.asarray(kept, dtype=np.int64)] = False
    return mask


def producer(layers: Sequence[Layer], choice: Choice, names: Mapping[str, str], dtype: str,
             rescale: float, compat: bool, passthrough: Mapping[str, Any],
             progress: Progress | None, total: int) -> Callable[[str], Any]:
    """``produce(key)`` for ``io.write_safetensors``: pass-through tensors as they are, a layer's
    tensors built by its directions when one of them is first asked for."""
    owner: dict[str, int] = {}
    for i, ly in enumerate(layers):
        k = written_rank(ly, choice.ranks[i])
        if k:
            for suffix in ly.d.specs(k, dtype):
                owner[f"{names[ly.name]}.{suffix}"] = i
    built: dict[int, dict[str, Any]] = {}
    served: set[str] = set()  # alphas given before their layer was built
    done = [0]

    def build(i: int) -> dict[str, Any]:
        ly = layers[i]
        k = written_rank(ly, choice.ranks[i])
        keep = choice.kept(i, ly)
        extra = {"rank": k, "kohya": compat} if ly.d.pads else {}
        made = ly.d.tensors(keep, dtype, rescale, **extra)
        for suffix, t in made.items():
            if not all_finite(t):
                raise NonFiniteError(f"module {ly.name}: {suffix} overflows {dtype} "
                                     "(write with --save_precision fp32 or bf16)")
        prefix = names[ly.name]
        return {key: t for key, t in ((f"{prefix}.{s}", t) for s, t in made.items()) if key not in served}

    def produce(key: str) -> Any:
        done[0] += 1
        if progress:
            progress("write", done[0], total)
        if key in passthrough:
            return passthrough[key]
        i = owner[key]
        if i not in built:
            scalar = _scalar_alpha(layers[i], key, names, choice.ranks[i], compat)
            if scalar is not None:
                served.add(key)
                return scalar
            built[i] = build(i)
        t = built[i].pop(key)
        if not built[i]:
            del built[i]
        return t

    return produce


def _scalar_alpha(layer: Layer, key: str, names: Mapping[str, str], k: int, compat: bool) -> np.ndarray | None:
    """A layer's alpha without building its tensors, where its type knows it in advance (the
    writer asks for every float32 scalar before the fp16 factors)."""
    if key != f"{names[layer.name]}.alpha":
        return None
    value = layer.d.alpha(written_rank(layer, k), kohya=compat)
    return None if value is None else np.array(value, dtype=np.float32)
