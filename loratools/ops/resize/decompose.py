"""Step 1 of a resize: every module as ranked directions, paired with its base weight's norms.

Each adapter type answers for its own modules (``AdapterModule.directions_many``: LoRA in
batches of one factor shape, LoHa/LoKr in their own form); types without directions (IA3,
full and norm diffs) and unknown tensors pass through unchanged. The base weights' norms of
the whole LoRA are asked for at once, so a cold run reads the checkpoint in one pass.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loratools.errors import ArchitectureMismatchError, NonFiniteError, UsageError
from loratools.keys.naming import te_layer

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile, AdapterModule
    from loratools.adapters.directions import Directions
    from loratools.ops.resize.basenorms import BaseNorms
    from loratools.ops.resize.outcome import LoraOutcome
    from loratools.ops.resize.recipe import Recipe

Progress = Callable[[str, int, int], None]


@dataclass
class Layer:
    """One resizable module: its directions and what selection and scoring need besides them."""

    name: str
    kind: str  # the input module's type
    d: Directions
    shape: Any  # selection.LayerShape
    params: int  # out + in*kh*kw (elias' ``params`` score)
    base: Any  # scoring.BaseRefs | None


def decompose(adapter: AdapterFile, base: BaseNorms | None, recipes: Sequence[Recipe], device: str,
              result: LoraOutcome, progress: Progress | None = None) -> tuple[list[Layer], dict[str, torch.Tensor]]:
    """``(layers, pass-through tensors)`` of one adapter; notes go to ``result`` (warnings,
    pass-through, unmatched, all-zero and converted modules)."""
    from loratools.ops.resize.scoring import BaseRefs
    from loratools.ops.resize.selection import LayerShape, is_zero

    if adapter.naming == "peft" and any(getattr(m, "dora_scale", None) is not None for m in adapter.modules.values()):
        raise UsageError("PEFT DoRA adapters (lora_magnitude_vector) cannot be resized yet: "
                         "convert the file to kohya names first (loratools convert)", path=adapter.path)
    names = sorted(adapter.modules)
    found = _directions([adapter.modules[n] for n in names], device, progress)
    passthrough: dict[str, torch.Tensor] = dict(adapter.unknown)
    layers: list[Layer] = []
    targets: list[Any] = []
    for name, d in zip(names, found):
        m = adapter.modules[name]
        if d is None:
            passthrough.update({f"{m.source_name}.{s}": t for s, t in m.tensors().items()})
            result.passthrough.append(name)
            continue
        if not bool(np.isfinite(d.S).all()):
            raise NonFiniteError(f"module {name}: its factors hold NaN or Inf; the LoRA is broken "
                                 "(loratools check weights shows where)", path=adapter.path)
        target = base.resolve(name) if base is not None else None
        weight_shape = _weight_shape(m, target, adapter)
        d.weight_shape = weight_shape if d.weight_shape is not None else None
        layers.append(Layer(
            name=name, kind=m.kind, d=d, params=weight_shape[0] + math.prod(weight_shape[1:]), base=None,
            shape=LayerShape(old_rank=d.old_rank, full_len=d.full_len,
                             kxk=len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1),
                             is_4d=len(weight_shape) == 4, keep_one=d.keep_one, scale=m.scale or 1.0)))
        targets.append(target)
        if d.kind != m.kind:
            result.converted[m.kind] = result.converted.get(m.kind, 0) + 1
        if is_zero(d.S):
            result.zero_layers.append(name)
    if base is not None:
        want_spn = any(abs(r.weights.get("spn_ckpt", 0.0)) > 1e-6 for r in recipes)
        want_subspace = any(abs(r.weights.get("subspace", 0.0)) > 1e-6 for r in recipes)
        matched = [i for i, t in enumerate(targets) if t is not None]
        if any(r.needs_checkpoint for r in recipes):
            norms = base.norms([targets[i] for i in matched], want_spn,
                               (lambda done, total: progress("base norms", done, total)) if progress else None)
        else:  # no score reads the base: the table's rle_ckpt shows what the cache knows (0 = unknown)
            norms = [(fro or 0.0, None) for fro in base.cached_fro([targets[i] for i in matched])]
        for i, (fro, spn) in zip(matched, norms):
            proj = layers[i].d.projections(base.weight(targets[i])) if want_subspace else None
            layers[i].base = BaseRefs(fro=fro, spn=spn, subspace=proj)
        result.unmatched.extend(ly.name for ly, t in zip(layers, targets) if t is None)
    _notes(result, recipes)
    return layers, passthrough


def _directions(modules: Sequence[AdapterModule], device: str,
                progress: Progress | None) -> list[Directions | None]:
    """Each module's directions, computed per adapter type (a type batches its own)."""
    by_type: dict[type, list[int]] = defaultdict(list)
    for i, m in enumerate(modules):
        by_type[type(m)].append(i)
    out: list[Directions | None] = [None] * len(modules)
    done = 0
    for cls, members in by_type.items():
        if progress:
            progress("decompose", done, len(modules))
        for i, d in zip(members, cls.directions_many([modules[i] for i in members], device)):
            out[i] = d
        done += len(members)
    if progress:
        progress("decompose", len(modules), len(modules))
    return out


def _weight_shape(m: AdapterModule, target: Any, adapter: AdapterFile) -> tuple[int, ...]:
    """The base weight's shape (the layout the output takes), or the module's without a base."""
    own = tuple(m.weight_shape)
    if target is None:
        return own
    shape = tuple(target.shape)
    if math.prod(shape) != math.prod(own):
        raise ArchitectureMismatchError(
            f"module {m.name}: the LoRA's weight shape {own} does not fit the base weight {target.key} "
            f"{shape}; pass the checkpoint the LoRA was made for", path=adapter.path)
    return shape


def _notes(result: LoraOutcome, recipes: Sequence[Recipe]) -> None:
    """The warnings a user should read about this file."""
    if result.unmatched:
        ckpt = any(r.needs_checkpoint for r in recipes)
        result.warnings.append(
            f"{len(result.unmatched)} layer(s) match no base weight (e.g. {result.unmatched[0]})"
            + ("; they are scored against themselves instead of the checkpoint" if ckpt else ""))
    if result.converted:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.converted.items()))
        result.warnings.append(f"wrote {kinds} module(s) as LoRA (smaller than their own form for the same "
                               "delta; the per-layer error of the chosen ranks is in the table)")
    if result.zero_layers:
        te_last = [n for n in result.zero_layers if te_layer(n) in (("te1", 11), ("te", 11))]
        note = " (the untrained last text-encoder layer of a clip-skip-2 LoRA)" \
            if len(te_last) == len(result.zero_layers) else ""
        result.warnings.append(f"{len(result.zero_layers)} all-zero layer(s) omitted{note}: "
                               f"{', '.join(result.zero_layers[:3])}{' ...' if len(result.zero_layers) > 3 else ''}")
