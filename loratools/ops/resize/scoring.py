"""Per-dimension scores of elias-gaeros/resize_lora (spec A2.5), computed the same way.

``score_i = log10(S_i) + log10(rescale) - sum_k w_k * log10(ref_k)`` where ``S`` are the
alpha-scaled singular values of one layer and the references are the base layer's norms
(``fro_ckpt``, ``spn_ckpt``), the layer's own (``fro_lora`` = ||S||, ``spn_lora`` = S_0), the
per-rank element count (``params`` = out + in*kh*kw) or, for ``subspace``, the base weight
projected on each singular pair (|u_i^T W v_i|). The terms are applied in elias' order, in
float32, each reference a Python double times its weight, so thresholds reproduce elias'
choices bit for bit. Because the weights sum to 1 the score is log10 of sigma over a weighted
geometric mean of the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loratools.io.arrays import as_numpy
from loratools.ops.resize.recipe import SCORE_TERMS

_ACTIVE = 1e-6


@dataclass(frozen=True)
class BaseRefs:
    """A base layer's references: ``fro`` = ||W||_F, ``spn`` = sigma_max(W), ``subspace`` [c]."""

    fro: float
    spn: float | None  # measured only when a recipe scores with spn_ckpt
    subspace: np.ndarray | None = None


def subspace_projection(U: np.ndarray, Vh: np.ndarray, weight: Any) -> np.ndarray:
    """``|u_i^T W v_i|`` for each singular pair (W, a torch tensor or numpy array, flattened from dim 1), float32."""
    w = as_numpy(weight)
    w = w.reshape(w.shape[0], -1).astype(np.float32)
    if w.shape != (U.shape[0], Vh.shape[1]):
        raise ValueError(f"base weight {tuple(w.shape)} does not match the LoRA delta "
                         f"{(U.shape[0], Vh.shape[1])}")
    return np.abs(((w @ Vh.T.astype(np.float32)) * U.astype(np.float32)).sum(0))


def layer_scores(S: np.ndarray, weights: dict[str, float], *, rescale: float, params: int,
                 base: BaseRefs | None) -> np.ndarray:
    """Scores of one layer's singular values (float32, same length as ``S``).

    Args:
        S: alpha-scaled singular values, descending.
        weights: normalised score weights (recipe.weights).
        rescale: the recipe's strength multiplier (shifts every score by log10(rescale)).
        params: ``out + in*kh*kw``.
        base: the paired base layer's references, or None for a layer with no base weight:
            then each checkpoint reference is replaced by the LoRA's own (``fro_ckpt`` ->
            ||S||, ``spn_ckpt`` -> S_0, ``subspace`` -> S_i), which keeps such layers unless
            they are tiny relative to themselves.

    Returns:
        ``log10`` scores; zero singular values score ``-inf``.
    """
    s = np.asarray(S, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # log10(0) = -inf and -inf - -inf = NaN, as torch gives
        return _scores(s, weights, rescale, params, base)


def _scores(s: np.ndarray, weights: dict[str, float], rescale: float, params: int,
            base: BaseRefs | None) -> np.ndarray:
    scores = np.log10(s)
    scores += np.float32(math.log10(rescale))
    s0 = float(s[0]) if s.size else 0.0
    fro_lora = float(np.linalg.norm(s))  # float32, as elias
    for key in SCORE_TERMS:
        w = weights.get(key, 0.0)
        if abs(w) <= _ACTIVE:
            continue
        if key == "subspace":
            proj = base.subspace if base is not None and base.subspace is not None else s
            scores -= np.float32(w) * np.log10(np.asarray(proj, dtype=np.float32))
            continue
        if key == "spn_ckpt":
            ref = base.spn if base is not None else s0
        elif key == "spn_lora":
            ref = s0
        elif key == "fro_ckpt":
            ref = base.fro if base is not None else fro_lora
        elif key == "fro_lora":
            ref = fro_lora
        else:
            ref = float(params)
        scores -= np.float32(w * (math.log10(ref) if ref > 0 else -math.inf))
    return scores
