"""Shared maths of the LyCORIS types' ``directions()``: one factor product's SVD, and the factors of
its truncation written back in the layout the product was stored in (plain or Tucker).

A LoHa Hadamard pair and a LoKr low-rank Kronecker factor are each a product ``P = up @ down``
(convs flattened to ``(out, in*kh*kw)``), or a Tucker product ``P[p,q,h,w] = sum_ij t[i,j,h,w]
b[j,q] a[i,p]`` with ``a (r, out)``, ``b (r', in)``. Both are a thin product of rank <= r, so
``linalg.lowrank_svd`` gives their SVD without forming ``P`` (in float64: these are the r x r
cores of small layers, and LoHa's error bookkeeping subtracts nearly equal sums of squares).

Truncating ``P`` to the singular directions ``K`` gives ``P_K = U_K U_K^T P``. Plain layout:
``up = U_K sqrt(s_K)``, ``down = sqrt(s_K) Vh_K`` (rank ``|K|``, both factors the same
magnitude so fp16 holds them). Tucker layout: ``a' = U_K^T`` ``(|K|, out)`` and the core
``t' = (U_K^T a^T) x_1 t`` ``(|K|, r', kh, kw)`` with ``b`` unchanged; that is exactly ``P_K``
again (``U_K^T P = (U_K^T a^T) C``), the Tucker form kept, never larger than the input. The core
is no longer square below full rank: ComfyUI's and A1111's einsum rebuilds read it, and so does
our parser (the rank the scale divides by, ``b``'s rows, is unchanged), but lycoris-lora's own
modules, built with one square ``(r, r)`` core, do not load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProductSVD:
    """``P = U diag(S) Vh`` (float64, ``S`` unscaled and descending) and, for a Tucker product,
    its stored ``a`` and ``t`` (``b`` is reused as is)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    tucker: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.S.numel())

    def compact(self) -> ProductSVD:
        """The same in float32: what ``truncated`` needs to write fp16/bf16/fp32 factors, at half the
        memory of float64 for every module the engine holds (SDXL LoHa fixture resize: peak RSS
        0.97 -> 0.68 GB)."""
        import torch

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.float32)

        tucker = None if self.tucker is None else (f32(self.tucker[0]), f32(self.tucker[1]))
        return ProductSVD(f32(self.U), f32(self.S), f32(self.Vh), tucker)


def product_svd(up: torch.Tensor, down: torch.Tensor, core: torch.Tensor | None = None,
                device: str = "cpu") -> ProductSVD:
    """SVD of ``up @ down`` (``up (m, r)``, ``down (r, N)``), or of the Tucker product with ``up``
    = the stored ``a (r, m)``, ``down`` = ``b (r', in)`` and ``core`` = ``t (r, r', kh, kw)``."""
    import torch

    from loratools.linalg.lowrank import lowrank_svd

    up, down = up.detach().to(device, torch.float64), down.detach().to(device, torch.float64)
    if core is None:
        U, S, Vh = lowrank_svd(up, down.reshape(down.shape[0], -1))
        return ProductSVD(U, S, Vh)
    t = core.detach().to(device, torch.float64)
    U, S, Vh = lowrank_svd(up.T, down, t)
    return ProductSVD(U, S, Vh, tucker=(up, t))


def truncated(p: ProductSVD, keep: Sequence[int], rank: int | None = None,
              factor: float = 1.0) -> tuple[torch.Tensor, ...]:
    """The factors of ``factor * P`` truncated to the directions ``keep``: ``(up, down)`` in the plain
    layout, ``(a', t')`` in the Tucker one (``b`` unchanged). ``rank`` pads with zero directions up to
    that rank (a LoHa pair with fewer directions than its partner; the pair shares one rank).
    ``factor`` is a recipe's ``rescale``: it goes into the factors, so the alpha depends on the rank
    alone (``Directions.alpha(k)`` is known before any tensor)."""
    import torch

    idx = torch.as_tensor(sorted(keep), dtype=torch.long, device=p.S.device)
    U, s, Vh = p.U[:, idx], p.S[idx], p.Vh[idx]
    pad = (rank or len(idx)) - len(idx)
    if p.tucker is None:
        root = (s.clamp_min(0) * abs(factor)).sqrt()
        up, down = U * (root * (1.0 if factor >= 0 else -1.0)), root[:, None] * Vh
        if pad:
            up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
            down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
        return up, down
    a, t = p.tucker
    a_new = U.T  # (k, m)
    core = torch.einsum("ki,ijhw->kjhw", a_new @ a.T, t) * factor
    if pad:
        a_new = torch.cat([a_new, a_new.new_zeros(pad, a_new.shape[1])], 0)
        core = torch.cat([core, core.new_zeros(pad, *core.shape[1:])], 0)
    return a_new, core


def truncated_shapes(p_shapes: tuple[tuple[int, ...], ...], k: int, tucker: bool) -> tuple[tuple[int, ...], ...]:
    """Shapes of ``truncated``'s result at rank ``k`` from the stored ``(up, down[, core])`` shapes."""
    if not tucker:
        up, down = p_shapes[0], p_shapes[1]
        return (up[0], k), (k, *down[1:])
    a, _, core = p_shapes
    return (k, a[1]), (k, *core[1:])


def antitonic(d: torch.Tensor) -> torch.Tensor:
    """The non-increasing sequence nearest to ``d`` in least squares (pool adjacent violators).

    Every pooled block keeps its sum, so partial sums of the result equal those of ``d`` at the
    ends of each block: what LoHa's strengths rely on (see ``loha.py``).
    """
    import torch

    blocks: list[list[float]] = []  # [sum, count]
    for v in d.tolist():
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] < blocks[-1][0] * blocks[-2][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out = [s / c for s, c in blocks for _ in range(c)]
    return torch.tensor(out, dtype=d.dtype)
