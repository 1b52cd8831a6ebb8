"""How many singular directions each layer keeps.

Score recipes (elias): a layer keeps its dimensions whose score is >= ``thr`` (inclusive,
compared in float32 as elias does); ``size=`` picks the lowest threshold whose *exact* output
file size (header, alphas and pass-through tensors included, computed by the caller's
``size_of``) does not exceed the budget, so the result is reproducible as ``thr=<reached>``.

kohya methods, corrected: each keeps exactly the singular values its criterion needs and never
more than the old rank, and singular values below 1e-6 * S_0 (numerical noise) never count:

- ``sv_ratio=t``: keep sigma_i with sigma_0 / sigma_i <= t;
- ``sv_fro=t``: the fewest sigma whose squared sum reaches t^2 of the total (Frobenius share t);
- ``sv_cumulative=t``: the fewest sigma whose sum reaches t of the total;
- ``rank=k``: k (``conv_rank`` gives k x k conv layers their own k).

``kohya_compat=True`` reproduces sd-scripts' ranks bit for bit instead: its criteria on the
full spectrum (length min(out, in*k*k), zeros past the old rank), its +1, its minimum of 2, its
rank 1 for all-zero layers, a fixed rank not limited by the old rank, and ``conv_rank`` for
every 4-D layer. Ranks above the old rank are padded with zero directions (sd-scripts writes
~1e-7 noise there).

Ties are resolved with a relative tolerance of 1e-6, so a criterion met "exactly" in exact
arithmetic is met despite float rounding of the decomposition (and, in compat mode, a strict
``>`` is not met).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loratools.ops.resize.recipe import Recipe

ZERO_SIGMA = 1e-6  # alpha-scaled sigma_0 below this: an all-zero layer (elias' rule)
NOISE = 1e-6  # sigma below NOISE * sigma_0 is numerical noise
TIE = 1e-6


@dataclass(frozen=True)
class LayerShape:
    """What selection needs to know about a layer besides its spectrum.

    ``full_len`` = min(out, in*kh*kw); ``kxk`` = a conv with a kernel larger than 1x1;
    ``is_4d`` = stored as 4-D (kohya's test for ``--new_conv_rank``); ``keep_one`` = DoRA layers,
    whose magnitude vector would be orphaned at rank 0.
    """

    old_rank: int
    full_len: int
    kxk: bool = False
    is_4d: bool = False
    keep_one: bool = False
    scale: float = 1.0


def is_zero(S: np.ndarray) -> bool:
    """elias' all-zero test on the alpha-scaled spectrum."""
    return S.size == 0 or float(S[0]) < ZERO_SIGMA


def significant(S: np.ndarray) -> int:
    """Number of singular values above the noise floor NOISE * sigma_0."""
    if is_zero(S):
        return 0
    return int((S > float(S[0]) * NOISE).sum())


def _first_reaching(cum: np.ndarray, target: float, total: int) -> int:
    """1-based count of entries up to the first ``cum_i >= target`` (``total`` if none)."""
    hit = np.flatnonzero(cum >= target)
    return int(hit[0]) + 1 if hit.size else total


def kohya_criterion(S: np.ndarray, method: str, t: float) -> int:
    """Corrected kohya rank: exactly the singular values the criterion needs."""
    s = np.asarray(S, dtype=np.float64)
    n = significant(S)
    if n == 0:
        return 0
    s = s[:n]
    if method == "sv_ratio":
        k = int((s >= float(s[0]) / t * (1 - TIE)).sum())
    elif method == "sv_cumulative":
        k = _first_reaching(np.cumsum(s) / s.sum(), t * (1 - TIE), n)
    elif method == "sv_fro":
        sq = s * s
        k = _first_reaching(np.cumsum(sq) / sq.sum(), t * t * (1 - TIE), n)
    else:
        raise ValueError(method)
    return min(k, n)


def kohya_compat_rank(S: np.ndarray, layer: LayerShape, method: str, t: float,
                      cap: int | None) -> int:
    """sd-scripts' ``resize_lora.py`` rank rule, +1 and all (spec B2.6)."""
    L = layer.full_len
    s = np.zeros(L, dtype=np.float64)
    s[: min(L, S.size)] = np.asarray(S, dtype=np.float64)[:L]
    raw0 = float(s[0]) / layer.scale if layer.scale else float(s[0])
    if method == "rank":
        new_rank = min(int(t), L)
    else:
        if method == "sv_ratio":
            idx = int((s > float(s[0]) / t * (1 + TIE)).sum())
        elif method == "sv_cumulative":
            idx = _first_reaching(np.cumsum(s) / s.sum(), t * (1 - TIE), L) if s.sum() > 0 else L
        else:
            sq = s * s
            idx = _first_reaching(np.cumsum(sq) / sq.sum(), t * t * (1 - TIE), L) if sq.sum() > 0 else L
        idx = max(1, min(idx, L - 1))
        new_rank = idx + 1
    if raw0 <= 1e-6:
        return 1
    if cap is not None and new_rank > cap:
        new_rank = cap
    return min(new_rank, L)


def layer_cap(layer: LayerShape, recipe: Recipe, compat: bool) -> int | None:
    """The cap for one layer: ``conv_rank`` for k x k convs (every 4-D layer in compat mode)."""
    conv = layer.is_4d if compat else layer.kxk
    if conv and recipe.conv_rank is not None:
        return recipe.conv_rank
    return recipe.max_rank


def clamp_rank(k: int, S: np.ndarray, layer: LayerShape, recipe: Recipe) -> int:
    """Apply caps and floors to a corrected rank: never above the old rank or the noise floor."""
    n = significant(S)
    cap = layer_cap(layer, recipe, compat=False)
    if cap is not None:
        k = min(k, cap)
    k = max(k, recipe.min_rank, 1 if layer.keep_one else 0)
    return max(0, min(k, n if n else (1 if layer.keep_one else 0), layer.old_rank))


def kohya_rank(S: np.ndarray, layer: LayerShape, recipe: Recipe, compat: bool = False) -> int:
    """Rank a kohya-method recipe gives one layer (``S`` alpha-scaled, descending)."""
    if compat:
        if recipe.method == "rank":
            t = recipe.conv_rank if (layer.is_4d and recipe.conv_rank is not None) else recipe.param
            cap = recipe.max_rank
        else:
            t, cap = recipe.param, layer_cap(layer, recipe, compat=True)
        return max(kohya_compat_rank(S, layer, recipe.method, t, cap), recipe.min_rank)
    if recipe.method == "rank":
        k = recipe.conv_rank if (layer.kxk and recipe.conv_rank is not None) else int(recipe.param)
    else:
        k = kohya_criterion(S, recipe.method, recipe.param)
    return clamp_rank(k, S, layer, recipe)


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score (stable, so equal scores keep sigma order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")


def threshold_rank(scores: np.ndarray, thr: float, S: np.ndarray, layer: LayerShape,
                   recipe: Recipe) -> int:
    """Dimensions with ``score >= thr`` (float32 comparison, inclusive), then caps.

    The kept dimensions are the first ``k`` of ``score_order(scores)``.
    """
    if is_zero(S):
        return 1 if layer.keep_one else 0
    k = int((np.asarray(scores, dtype=np.float32) >= np.float32(thr)).sum())
    return clamp_rank(k, S, layer, recipe)


def fit_size(layer_scores: Sequence[np.ndarray], spectra: Sequence[np.ndarray],
             layers: Sequence[LayerShape], recipe: Recipe,
             size_of: Callable[[list[int], float], int], budget: int) -> tuple[float, list[int], int]:
    """The lowest threshold whose output fits ``budget`` bytes.

    Args:
        layer_scores: each layer's scores.
        spectra: each layer's alpha-scaled singular values.
        layers: each layer's shape facts.
        recipe: the ``size=`` recipe (for caps).
        size_of: exact output file size for given per-layer ranks and the threshold reached.
        budget: the limit in bytes.

    Returns:
        ``(threshold, ranks, size)``; threshold ``-inf`` when everything fits.

    Raises:
        ValueError: when not even rank 0 everywhere fits (the caller names the minimum).
    """
    def ranks_at(t: float) -> list[int]:
        return [threshold_rank(sc, t, s, ly, recipe) for sc, s, ly in zip(layer_scores, spectra, layers)]

    everything = ranks_at(-math.inf)
    full = size_of(everything, -math.inf)
    if full <= budget:
        return -math.inf, everything, full
    finite = [np.asarray(sc, dtype=np.float32)[np.isfinite(sc)] for sc in layer_scores]
    cands = np.unique(np.concatenate(finite)) if finite else np.empty(0, np.float32)
    cands = [float(c) for c in cands[::-1]]  # descending: more kept as the index grows
    lo, hi = -1, len(cands) - 1  # invariant: cands[lo] fits (lo = -1: keep nothing), find the last fitting
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(ranks_at(cands[mid]), cands[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    while lo >= 0:
        ranks = ranks_at(cands[lo])
        size = size_of(ranks, cands[lo])
        if size <= budget:
            return cands[lo], ranks, size
        lo -= 1
    ranks = ranks_at(math.inf)
    size = size_of(ranks, math.inf)
    if size <= budget:
        return math.inf, ranks, size
    raise ValueError(size)
