"""How many directions of each difference a resize recipe keeps, with the resize engine's own rules.

The recipe grammar, the kohya criteria, the elias scores and the ``size=`` search are
``loratools.ops.resize``'s (``recipe``, ``selection``, ``scoring``); this module only feeds them a
difference's spectrum instead of a LoRA's. The layer's "old rank" is its full rank ``min(out, n)``.

Which decomposition a recipe needs:

* ``rank=k`` (and ``conv_rank``): the top ``k`` directions only, whatever the spectrum: the
  randomized route when it is much cheaper than the Gram one (``k + oversample <= min(out, n) / 4``),
  unless ``exact`` is asked for;
* ``sv_ratio``, ``sv_fro``, ``sv_cumulative``, ``thr=`` scores: every singular value (the total
  ``||D||_F`` or nuclear norm, or where sigma crosses a threshold, is only known from the whole
  spectrum), so the exact Gram route;
* ``subspace`` scores: also every singular *vector* (the base projected on each direction);
* ``size=``: a threshold over every layer at once, so the spectra of all layers first (values
  only) and the kept directions in a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratools.ops.extract.decompose import OVERSAMPLE

if TYPE_CHECKING:
    import torch

    from loratools.ops.resize.recipe import Recipe
    from loratools.ops.resize.selection import LayerShape


@dataclass(frozen=True)
class Needs:
    """What a recipe needs of each layer's decomposition."""

    randomized_ok: bool  # a fixed rank: the top directions suffice
    vectors_for_scores: bool  # subspace scores project the base on every direction
    global_threshold: bool  # size=: all layers' spectra before any rank


def needs(recipe: Recipe) -> Needs:
    return Needs(randomized_ok=recipe.method == "rank",
                 vectors_for_scores=recipe.uses_scores and abs(recipe.weights.get("subspace", 0.0)) > 1e-6,
                 global_threshold=recipe.method == "size")


def layer_shape(shape: tuple[int, ...]) -> LayerShape:
    """The resize selection's view of a full weight (every direction of it can be kept)."""
    import math

    from loratools.ops.resize.selection import LayerShape

    m = min(shape[0], math.prod(shape[1:]))
    return LayerShape(old_rank=m, full_len=m, kxk=len(shape) == 4 and tuple(shape[2:]) != (1, 1),
                      is_4d=len(shape) == 4)


def fixed_rank(recipe: Recipe, shape: LayerShape) -> int:
    """The rank a ``rank=`` recipe gives a layer before its spectrum is known (caps included)."""
    from loratools.ops.resize.selection import layer_cap

    k = recipe.conv_rank if shape.kxk and recipe.conv_rank is not None else int(recipe.param)
    cap = layer_cap(shape, recipe, compat=False)
    if cap is not None:
        k = min(k, cap)
    return max(0, min(max(k, recipe.min_rank), shape.old_rank))


def use_randomized(recipe: Recipe, shape: LayerShape, exact: bool) -> bool:
    """Whether the randomized route is used for this layer (see the module docstring)."""
    return (not exact and needs(recipe).randomized_ok
            and fixed_rank(recipe, shape) + OVERSAMPLE <= shape.old_rank // 4)


def scores(recipe: Recipe, S: torch.Tensor, params: int, base: Any) -> torch.Tensor:
    """elias' scores of a full spectrum (``base``: ``resize.scoring.BaseRefs`` of the base weight)."""
    from loratools.ops.resize.scoring import layer_scores

    return layer_scores(S.float(), recipe.weights, rescale=recipe.rescale, params=params, base=base)


def choose(recipe: Recipe, S: torch.Tensor, shape: LayerShape, layer_scores: torch.Tensor | None,
           threshold: float | None = None) -> list[int]:
    """The kept directions (indices into ``S``, ascending) of one layer.

    Args:
        recipe: the parsed recipe.
        S: the singular values (every one, except for ``rank=`` on the randomized route).
        shape: ``layer_shape`` of the weight.
        layer_scores: ``scores(...)`` for score recipes, else None.
        threshold: the threshold ``size=`` reached (score recipes: default ``recipe.param``).
    """
    from loratools.ops.resize.selection import kohya_rank, score_order, threshold_rank

    s = S.float()
    if layer_scores is None:
        return list(range(kohya_rank(s, shape, recipe)))
    thr = recipe.param if threshold is None else threshold
    k = threshold_rank(layer_scores, thr, s, shape, recipe)
    return sorted(int(i) for i in score_order(layer_scores)[:k])


def fit_size(all_scores: list[torch.Tensor], spectra: list[torch.Tensor], shapes: list[LayerShape],
             recipe: Recipe, size_of, budget: int) -> tuple[float, list[int]]:
    """``size=``: the lowest threshold whose exact file fits ``budget`` bytes, and each layer's rank.

    A thin adapter over ``resize.selection.fit_size`` (whose signature issue 12 changes: this is the
    one place to switch)."""
    from loratools.ops.resize.selection import fit_size as resize_fit_size

    threshold, ranks, _ = resize_fit_size(all_scores, [s.float() for s in spectra], shapes, recipe, size_of, budget)
    return threshold, ranks
