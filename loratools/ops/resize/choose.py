"""Step 2 of a resize: the ranks one recipe gives every layer, and which directions they keep.

Score recipes (elias) score each direction (``scoring``) and keep those at or above a threshold,
or the lowest threshold whose exact file fits ``size=``; kohya methods apply their criterion to
each layer's strengths (``selection``). Every adapter type's directions are scored the same way:
a direction's strength is the share of the layer's delta it carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError

if TYPE_CHECKING:
    from loratools.ops.resize.decompose import Layer
    from loratools.ops.resize.recipe import Recipe

_QUANTILES = (0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.99)


@dataclass
class Choice:
    """One recipe's selection: rank per layer, each layer's direction order (None: by strength),
    the threshold reached (score recipes) and the score quantiles (``-v`` prints them)."""

    ranks: list[int]
    orders: list[Any]
    threshold: float | None
    quantiles: dict[str, float] = field(default_factory=dict)

    def kept(self, i: int, layer: Layer) -> list[int]:
        """The directions layer ``i`` keeps, in strength order (at most as many as it has)."""
        n = layer.d.S.size
        k = min(self.ranks[i], n)
        order = self.orders[i]
        return list(range(k)) if order is None else sorted(int(j) for j in order[:k])


def choose(recipe: Recipe, layers: Sequence[Layer], compat: bool,
           size_of: Callable[[list[int], float], int]) -> Choice:
    """Ranks and kept directions of every layer under ``recipe`` (``size_of(ranks, threshold)`` is
    the exact output size, for ``size=``)."""
    import numpy as np

    from loratools.ops.resize.scoring import layer_scores
    from loratools.ops.resize.selection import fit_size, kohya_rank, score_order, threshold_rank

    if not recipe.uses_scores:
        return Choice([kohya_rank(ly.d.S, ly.shape, recipe, compat) for ly in layers], [None] * len(layers), None)
    scores = [layer_scores(ly.d.S, recipe.weights, rescale=recipe.rescale, params=ly.params, base=ly.base)
              for ly in layers]
    quant: dict[str, float] = {}
    live = [s for s, ly in zip(scores, layers) if float(ly.d.S[0]) >= 1e-6]
    if live:
        allsc = np.concatenate(live).astype(np.float32)
        allsc = allsc[np.isfinite(allsc)]
        if allsc.size:
            quant = {f"{q:.2f}": float(v) for q, v in zip(_QUANTILES, np.quantile(allsc, _QUANTILES))}
    if recipe.method == "thr":
        ranks = [threshold_rank(sc, recipe.param, ly.d.S, ly.shape, recipe) for sc, ly in zip(scores, layers)]
        threshold = recipe.param
    else:
        budget = int(math.floor(recipe.param * (1 << 20)))
        try:
            threshold, ranks, _ = fit_size(scores, [ly.d.S for ly in layers], [ly.shape for ly in layers],
                                           recipe, size_of, budget)
        except ValueError as exc:
            minimum = exc.args[0]
            raise UsageError(f"size={recipe.param:g} MiB ({budget} bytes) is below the smallest file this "
                             f"LoRA can give ({minimum} bytes: header, metadata and pass-through tensors); "
                             "raise size=") from None
    return Choice(ranks, [score_order(sc) for sc in scores], threshold, quant)
