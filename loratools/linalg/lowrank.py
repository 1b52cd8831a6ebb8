"""Exact SVD of a low-rank product without forming the full matrix.

A LoRA layer's delta is ``scale * up @ down`` with ``up`` ``[out, r]`` and ``down`` ``[r, n]``
(``n = in * kh * kw`` for convs). Its SVD follows from two thin QRs and one SVD of an
``r x r`` core (what elias-gaeros/resize_lora calls ``fast_decompose``)::

    up = Qu Ru,   down^T = Qd Rd,   Ru Rd^T = Uc diag(S) Vhc
    =>  up @ down = (Qu Uc) diag(S) (Vhc Qd^T)

That is O((out + n) r^2) instead of the O(out n min(out, n)) of a dense SVD, and it is exact:
the top ``r`` singular values agree with a dense SVD to float precision, and everything past
``r`` is exactly zero instead of ~1e-7 noise. Works for ``r`` above ``min(out, n)`` too (the
thin factors then have ``min`` columns). All maths in float32 unless the inputs are float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LowRankSVD(NamedTuple):
    """``U [out, c]``, ``S [c]`` (descending), ``Vh [c, n]`` with ``c = min(r, out, n)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_up(up: torch.Tensor) -> torch.Tensor:
    """``[out, r]`` or ``[out, r, 1, 1]`` -> ``[out, r]`` (LoCon ups have trailing 1x1 kernels)."""
    if up.dim() == 2:
        return up
    if up.dim() == 4 and up.shape[2:] == (1, 1):
        return up.reshape(up.shape[0], up.shape[1])
    raise ValueError(f"up factor must be [out, r] or [out, r, 1, 1], got {tuple(up.shape)}")


def flatten_down(down: torch.Tensor) -> torch.Tensor:
    """``[r, in]`` or ``[r, in, kh, kw]`` -> ``[r, in*kh*kw]`` (the conv kernel's row layout)."""
    return down.reshape(down.shape[0], -1)


def contract_tucker(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker ``lora_mid [r, r, kh, kw]`` into ``down [r, in, 1, 1]``: an equivalent LoCon down.

    ``delta[o, i, h, w] = sum_{a,b} up[o, a] mid[a, b, h, w] down[b, i]``, so the plain-LoCon
    down is ``D[a, i, h, w] = sum_b mid[a, b, h, w] down[b, i]`` with the same ``up``.
    Returns ``[r_up, in, kh, kw]`` in the compute dtype.
    """
    dt = _compute_dtype(mid, down)
    d2 = flatten_down(down).to(dt)  # [r, in]
    return torch.einsum("abhw,bi->aihw", mid.to(dt), d2)


def lowrank_svd(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None,
                scale: float = 1.0) -> LowRankSVD:
    """SVD of ``scale * up @ down`` (convs flattened, Tucker ``mid`` contracted first).

    Args:
        up: ``[out, r]`` or ``[out, r, 1, 1]``.
        down: ``[r, in]``, ``[r, in, kh, kw]``, or ``[r, in, 1, 1]`` when ``mid`` is given.
        mid: optional Tucker core ``[r, r, kh, kw]``.
        scale: multiplies the singular values (``alpha / rank`` for kohya LoRAs).

    Returns:
        ``LowRankSVD(U, S, Vh)`` with ``U @ diag(S) @ Vh == scale * up_flat @ down_flat``.
        Reshape ``Vh`` rows to ``down``'s trailing shape to get conv kernels back.

    Example:
        >>> U, S, Vh = lowrank_svd(up, down, scale=alpha / down.shape[0])
    """
    dt = _compute_dtype(up, down, *(() if mid is None else (mid,)))
    if mid is not None:
        down = contract_tucker(mid, down)
    u = flatten_up(up).to(dt)
    d = flatten_down(down).to(dt)
    if u.shape[1] != d.shape[0]:
        raise ValueError(f"rank mismatch: up has {u.shape[1]} columns, down has {d.shape[0]} rows")
    qu, ru = torch.linalg.qr(u)  # [out, a], [a, r]
    qd, rd = torch.linalg.qr(d.T)  # [n, b], [b, r]
    uc, s, vhc = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return LowRankSVD(qu @ uc, s * scale, vhc @ qd.T)


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``up = U diag(sqrt S)``, ``down = diag(sqrt S) Vh``: both factors share the magnitude.

    Square-root balancing keeps fp16/bf16 factors in range (kohya puts all of ``S`` on ``up``).
    """
    r = S.clamp_min(0).sqrt()
    return U * r, r[:, None] * Vh
