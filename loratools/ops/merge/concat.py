"""Exact LoRA + LoRA combination by rank concatenation (pure tensor maths, no files or names).

Stacking the factors of several LoRAs of one layer gives one LoRA whose delta is exactly the
weighted sum of theirs: ``[B1 B2] @ [A1; A2] = B1 A1 + B2 A2``. The per-member weights and
``alpha/rank`` scales have to be folded into the factors, because the output has one alpha. We
follow resize-spec A2.9 (the maths elias-gaeros/resize_lora intends): the output's per-rank scale is
the rank-weighted geometric mean of the members' effective scales, and each member's factors are
multiplied by ``sqrt(f_j)`` so that the factor magnitudes stay balanced (no member's up/down is
blown up or squashed by a large ratio). Two fixes over A2.9: negative weights put their sign on the
up factor only (A2.9 takes a log of a negative number), and zero-weight or zero-scale members are
dropped (A2.9 divides by zero). The alpha is rounded to the output dtype *before* the factors are
computed, so the stored alpha reproduces the weighted sum exactly.

Tucker members (``lora_mid``) stay Tucker when every member of the layer is Tucker (the mid cores
go on a block diagonal); otherwise they are contracted into an ordinary k x k down kernel first,
which keeps their rank and is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoraFactors:
    """The factors of one LoRA/LoCon layer in kohya layout.

    ``up`` is ``(out, r)`` or ``(out, r, 1, 1)``; ``down`` is ``(r, in)``, ``(r, in, kh, kw)`` or, with
    ``mid`` ``(r, r, kh, kw)`` (Tucker), ``(r, in, 1, 1)``. ``scale`` is the effective ``alpha / r``.
    The layer's delta is ``scale * up @ [mid] @ down``.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class ConcatResult:
    """The combined layer: factors in float32 plus the alpha to store (already in the output dtype's precision)."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _untucker(f: LoraFactors) -> LoraFactors:
    """Contract ``mid`` into ``down``: ``down'[a,i,h,w] = sum_b mid[a,b,h,w] down[b,i]`` (same rank, exact)."""
    import torch

    down = torch.einsum("abhw,bi->aihw", f.mid.float(), f.down.float().flatten(1))
    return LoraFactors(up=f.up, down=down, scale=f.scale)


def _as_layout(t: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    """Squeeze or unsqueeze 1x1 kernel dims so 2-D and 1x1-conv members can be stacked (SD2 proj_in/out)."""
    if t.ndim == ndim:
        return t
    if ndim == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1)
    if ndim == 4 and t.ndim == 2:
        return t[:, :, None, None]
    raise ValueError(f"{name}: members have incompatible factor shapes {tuple(t.shape)} (layout {ndim}-D)")


def concat_factors(members: Sequence[tuple[float, LoraFactors]], *, alpha_dtype: torch.dtype,
                   name: str = "layer") -> ConcatResult | None:
    """Combine weighted LoRA layers into one whose delta is ``sum_j w_j * delta_j``.

    Args:
        members: ``(weight, factors)`` pairs for one layer, in input order.
        alpha_dtype: the dtype the alpha will be stored in (its rounding is compensated).
        name: layer name for error messages.

    Returns:
        The combined factors in float32 (ranks add), or None when every member has weight or scale 0.

    Raises:
        ValueError: members' deltas have different shapes (a wrong pairing of files).

    Example:
        >>> import torch
        >>> a = LoraFactors(torch.ones(3, 1), torch.ones(1, 2), scale=0.5)
        >>> r = concat_factors([(1.0, a), (-2.0, a)], alpha_dtype=torch.float32)
        >>> r.rank, torch.allclose(r.alpha / r.rank * r.up @ r.down, torch.full((3, 2), -0.5))
        (2, True)
    """
    import torch

    live = [(w, f) for w, f in members if w != 0.0 and f.scale != 0.0]
    if not live:
        return None
    tucker = all(f.mid is not None for _, f in live)
    if not tucker:
        live = [(w, _untucker(f) if f.mid is not None else f) for w, f in live]
    up_ndim = live[0][1].up.ndim
    down_ndim = live[0][1].down.ndim
    ups = [_as_layout(f.up.float(), up_ndim, name) for _, f in live]
    downs = [_as_layout(f.down.float(), down_ndim, name) for _, f in live]
    if len({u.shape[0] for u in ups}) != 1 or len({d.shape[1:] for d in downs}) != 1:
        shapes = ", ".join(f"{tuple(u.shape)}x{tuple(d.shape)}" for u, d in zip(ups, downs))
        raise ValueError(f"{name}: members do not target the same weight shape ({shapes})")
    if tucker and len({f.mid.shape[2:] for _, f in live}) != 1:
        raise ValueError(f"{name}: Tucker members have different kernel sizes")

    ranks = [f.rank for _, f in live]
    total = sum(ranks)
    gains = [abs(w) * abs(f.scale) for w, f in live]
    signs = [math.copysign(1.0, w) * math.copysign(1.0, f.scale) for w, f in live]
    per_rank = math.exp(sum(d * math.log(g) for d, g in zip(ranks, gains)) / total)
    alpha = float(torch.tensor(per_rank * total, dtype=torch.float64).to(alpha_dtype).item())
    per_rank = alpha / total
    out_up, out_down = [], []
    for u, d, g, s in zip(ups, downs, gains, signs):
        root = math.sqrt(g / per_rank)
        out_up.append(u * (s * root))
        out_down.append(d * root)
    up = torch.cat(out_up, dim=1)
    down = torch.cat(out_down, dim=0)
    mid = None
    if tucker:
        kernel = live[0][1].mid.shape[2:]
        mid = torch.zeros((total, total, *kernel), dtype=torch.float32)
        start = 0
        for r, (_, f) in zip(ranks, live):
            mid[start:start + r, start:start + r] = f.mid.float()
            start += r
    return ConcatResult(up=up.contiguous(), down=down.contiguous(), alpha=alpha, mid=mid)
