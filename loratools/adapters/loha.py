"""LoHa (LyCORIS ``hada_*``): Hadamard product of two low-rank products, optionally Tucker.

Keys carry no ``.weight`` suffix. Plain: ``hada_w1_a``/``hada_w2_a`` ``(out, r)``,
``hada_w1_b``/``hada_w2_b`` ``(r, in*kh*kw)`` (conv factors stored flattened). Tucker adds
``hada_t1``/``hada_t2`` ``(r, r, kh, kw)`` and stores the ``a`` factors transposed ``(r, out)``
and the ``b`` factors as ``(r, in)``.

Scale: ``alpha / r`` with ``r = hada_w1_b.shape[0]``, applied ONCE, as LyCORIS' training
forward, ComfyUI and A1111 do. lycoris-lora's merge path (``LohaModule.get_diff_weight``) applies
it a second time, so ``lycoris/tools/merge.py`` output differs from ours whenever alpha != r;
ours is what the network computed while it was trained.

Directions (what resize reduces, ``LoHaDirections``): rank ``k`` truncates each pair product
``P_n = w_n_a @ w_n_b`` (or its Tucker rebuild) to its top ``k`` singular directions, both pairs
to the same ``k`` (LyCORIS stores one rank), written back as a rank-``k`` LoHa (Tucker kept,
``adapters.reduce``). The directions are nested: direction ``k-1`` is "rank k instead of k-1".
The error of rank ``k``, ``E(k) = ||scale (P1 o P2 - P1_k o P2_k)||_F``, is computed exactly
without the dense delta: ``P1 o P2 = sum_ij s1_i s2_j (u1_i o u2_j)(v1_i o v2_j)^T`` (Khatri-Rao,
rank r^2), so ``E(k)^2 = m_k^T (Gu o Gv) m_k`` with the r^2 x r^2 Gram matrices of the Khatri-Rao
vectors and ``m_k`` the coefficients ``scale s1_i s2_j`` of the terms rank ``k`` drops
(``max(i, j) >= k``); cost ``O((out + in) r^4)``. The strengths are the successive gains
``d_k = E(k-1)^2 - E(k)^2``, made non-increasing by pooling adjacent violators (block sums kept):
``S = sqrt(pooled d)``. Equivalently ``sum(S[k:]**2) = ||delta||^2 - H(k)`` with ``H`` the least
concave majorant of the kept energy ``||delta||^2 - E(k)^2``. So ``sqrt(sum(S[k:]**2)) = E(k)``
EXACTLY at every rank where ``H`` touches it, which is every rank whenever the gains already
decrease (as when both pairs' singular values decay fast); at a rank inside a pooled block
(one that gains less than the rank after it) the claimed left-out interpolates ``E^2`` linearly
between the block's ends and is BELOW the exact ``E(k)``: a lower bound there, never an upper one.
``E(0) = ||delta||_F``, so ``||S|| = ||delta||_F`` always. A pooled block has equal strengths, so
equal scores: threshold recipes (``thr=``, ``size=``) keep or drop it whole and land on block ends,
where the claim is exact; only fixed ranks, caps and kohya's criteria can cut inside a block. Flat
spectra (random factors) pool into one block: rank k of a pair keeps ~k/r of it, so the product
keeps ~(k/r)^2 of the delta, a convex gain, and such a LoHa is kept or dropped whole by thresholds.
A LoHa cannot drop an inner rank: ``tensors(keep)`` builds rank ``len(keep)``, the first
``len(keep)`` directions; with ``S`` non-increasing every recipe scoring by ``S`` keeps a prefix.
Converting to LoRA is never offered: the kept delta has rank up to k^2, which a LoRA stores in
no fewer elements than the LoHa's ``2k`` rows and columns once ``k >= 2`` (at ``k = 1`` a LoRA
would take half; one kind per module keeps the file one type).
``dora_scale`` is copied: ``S`` measures the delta before DoRA's base-dependent normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratools.adapters.base import (AdapterModule, apply_dora, read_alpha, require_join, require_ndim,
                                     require_shared, shape_error)
from loratools.adapters.directions import Directions
from loratools.threads import one_thread

if TYPE_CHECKING:
    import numpy as np
    import torch

    from loratools.adapters.reduce import ProductSVD

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True, eq=False, kw_only=True)
class LoHaModule(AdapterModule):
    """LoHa, optionally Tucker (``t1``/``t2``) and DoRA (``dora_scale``)."""

    kind = "loha"
    SUFFIXES = (*_NAMES, "hada_t1", "hada_t2")
    TAKES_ALPHA = True
    TAKES_DORA = True

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> LoHaModule | None:
        if cls._described(source_name or name, tensors) is None:
            return None
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        if alpha is None and "alpha" in tensors:
            alpha = read_alpha(tensors["alpha"])
        return cls(name=name, source_name=source_name or name, alpha=alpha,
                   w1_a=tensors["hada_w1_a"], w1_b=tensors["hada_w1_b"],
                   w2_a=tensors["hada_w2_a"], w2_b=tensors["hada_w2_b"],
                   t1=t1, t2=t2, dora_scale=tensors.get("dora_scale"))

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        if any(k not in shapes for k in _NAMES) or (("hada_t1" in shapes) != ("hada_t2" in shapes)):
            return None
        s = {k: tuple(v) for k, v in shapes.items()}
        for k in _NAMES:
            require_ndim(k, s[k], (2,))
        products = []
        for n in ("1", "2"):
            a, b, t = f"hada_w{n}_a", f"hada_w{n}_b", f"hada_t{n}"
            if t in s:  # Tucker: W[p,q,h,w] = sum t[i,j,h,w] b[j,q] a[i,p]
                require_ndim(t, s[t], (4,))
                require_join(t, s[t], 0, a, s[a], 0)
                require_join(t, s[t], 1, b, s[b], 0)
            else:
                require_join(a, s[a], 1, b, s[b], 0)
            products.append(_weight_shape(s[a], s[b], s.get(t)))
        if products[0] != products[1]:
            raise shape_error(f"the two Hadamard factors have different shapes: hada_w1 gives {products[0]}, "
                              f"hada_w2 gives {products[1]}")
        require_shared(s, products[0])
        return s["hada_w1_b"][0], products[0]

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        t1 = None if self.t1 is None else tuple(self.t1.shape)
        return _weight_shape(tuple(self.w1_a.shape), tuple(self.w1_b.shape), t1)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        w1 = _rebuild(self.w1_a, self.w1_b, self.t1)
        w2 = _rebuild(self.w2_a, self.w2_b, self.t2)
        diff = (w1 * w2 * self.scale).reshape(self.weight_shape)
        if self.dora_scale is not None:
            diff = apply_dora(self, base, diff, self.dora_scale)
        return self._finite(diff)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        if self.t1 is not None and self.t2 is not None:
            out.update(hada_t1=self.t1, hada_t2=self.t2)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        out.update(self._alpha_tensor(self.w1_a))
        return out


    @one_thread()
    def directions(self, device: str = "cpu") -> LoHaDirections:
        """Nested ranks of the two Hadamard pairs, strengths from the exact errors (module docstring)."""
        from loratools.adapters.reduce import antitonic, product_svd

        pairs = (product_svd(self.w1_a, self.w1_b, self.t1, device),
                 product_svd(self.w2_a, self.w2_b, self.t2, device))
        e2 = hadamard_left_out_sq(*pairs, self.scale)
        return LoHaDirections(self, pairs, antitonic(e2[:-1] - e2[1:]).clamp_min(0).sqrt().float().numpy())


class LoHaDirections(Directions):
    """A LoHa's nested ranks (see the module docstring); ``pairs`` are the two products' SVDs."""

    kind = "loha"

    def __init__(self, module: LoHaModule, pairs: tuple[ProductSVD, ProductSVD], S: np.ndarray) -> None:
        self.module, self.pairs, self.S = module, (pairs[0].compact(), pairs[1].compact()), S
        self.old_rank = module.rank
        self.full_len = int(S.size)
        self.keep_one = module.dora_scale is not None  # DoRA's magnitude would be orphaned at rank 0

    def specs(self, k: int, dtype: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
        from loratools.adapters.reduce import truncated_shapes
        from loratools.io.dtypes import from_torch

        dtype = from_torch(dtype)
        m = self.module
        out: dict[str, tuple[tuple[int, ...], Any]] = {}
        for n, a, b, t in (("1", m.w1_a, m.w1_b, m.t1), ("2", m.w2_a, m.w2_b, m.t2)):
            if t is None:
                first, second = truncated_shapes((tuple(a.shape), tuple(b.shape)), k, tucker=False)
                out.update({f"hada_w{n}_a": (first, dtype), f"hada_w{n}_b": (second, dtype)})
            else:
                first, core = truncated_shapes((tuple(a.shape), tuple(b.shape), tuple(t.shape)), k, tucker=True)
                out.update({f"hada_w{n}_a": (first, dtype), f"hada_t{n}": (core, dtype),
                            f"hada_w{n}_b": (tuple(b.shape), dtype)})
        out["alpha"] = ((), "F32")
        if m.dora_scale is not None:
            out["dora_scale"] = (tuple(m.dora_scale.shape), m.dora_scale.dtype)
        return out

    @one_thread()
    def tensors(self, keep: Sequence[int], dtype: Any, rescale: float = 1.0) -> dict[str, torch.Tensor]:
        import torch

        from loratools.adapters.reduce import truncated
        from loratools.io.dtypes import from_torch, to_torch

        m, k = self.module, len(keep)
        out: dict[str, torch.Tensor] = {}
        for n, p, b in (("1", self.pairs[0], m.w1_b), ("2", self.pairs[1], m.w2_b)):
            first, second = truncated(p, range(min(k, p.n)), rank=k, factor=rescale if n == "1" else 1.0)
            if p.tucker is None:
                out.update({f"hada_w{n}_a": first, f"hada_w{n}_b": second})
            else:
                out.update({f"hada_w{n}_a": first, f"hada_t{n}": second, f"hada_w{n}_b": b})
        out = {s: t.detach().to("cpu", to_torch(from_torch(dtype))).contiguous() for s, t in out.items()}
        out["alpha"] = torch.tensor(self.alpha(k), dtype=torch.float32)
        if m.dora_scale is not None:
            out["dora_scale"] = m.dora_scale.contiguous()
        return out


    def alpha(self, k: int, *, kohya: bool = False) -> float:
        """``scale * rank``: the old scale kept (a rescale goes into pair 1's factors); Tucker keeps
        ``b``, whose rows stay the rank. ``kohya`` changes nothing: no sd-scripts twin."""
        m = self.module
        return m.scale * (k if m.t1 is None else m.rank)


def hadamard_left_out_sq(p1: ProductSVD, p2: ProductSVD, scale: float) -> torch.Tensor:
    """``E(k)^2 = ||scale (P1 o P2 - P1_k o P2_k)||_F^2`` for ``k = 0 .. max(n1, n2)`` (float64),
    from the Khatri-Rao Gram matrices (module docstring); ``E(0)^2 = ||delta||_F^2``, the last 0."""
    import torch

    n1, n2 = p1.n, p2.n
    ku = (p1.U[:, :, None] * p2.U[:, None, :]).reshape(p1.U.shape[0], -1)
    kv = (p1.Vh[:, None, :] * p2.Vh[None, :, :]).reshape(n1 * n2, -1)
    gram = (ku.T @ ku) * (kv @ kv.T)
    coef = (scale * torch.outer(p1.S, p2.S)).reshape(-1)
    i = torch.arange(n1, device=coef.device).repeat_interleave(n2)
    j = torch.arange(n2, device=coef.device).repeat(n1)
    ks = torch.arange(max(n1, n2) + 1, device=coef.device)[:, None]
    dropped = ((i[None] >= ks) | (j[None] >= ks)) * coef
    return ((dropped @ gram) * dropped).sum(1).clamp_min(0).cpu()


def _rebuild(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """``a @ b``, or the Tucker rebuild ``W[p,q,h,w] = sum_ij t[i,j,h,w] b[j,q] a[i,p]``."""
    import torch

    a, b = a.detach().float(), b.detach().float()
    if t is None:
        return a @ b
    return torch.einsum("ijhw,jq,ip->pqhw", t.detach().float(), b, a)


def _weight_shape(w1_a: tuple[int, ...], w1_b: tuple[int, ...], t1: tuple[int, ...] | None) -> tuple[int, ...]:
    if t1 is not None:
        return (w1_a[1], w1_b[1], *t1[2:])
    return (w1_a[0], w1_b[1])
