"""LoHa (LyCORIS ``hada_*``): Hadamard product of two low-rank products, optionally Tucker.

Keys carry no ``.weight`` suffix. Plain: ``hada_w1_a``/``hada_w2_a`` ``(out, r)``,
``hada_w1_b``/``hada_w2_b`` ``(r, in*kh*kw)`` (conv factors stored flattened). Tucker adds
``hada_t1``/``hada_t2`` ``(r, r, kh, kw)`` and stores the ``a`` factors transposed ``(r, out)``
and the ``b`` factors as ``(r, in)``.

Scale: ``alpha / r`` with ``r = hada_w1_b.shape[0]``, applied ONCE, as LyCORIS' training
forward, ComfyUI and A1111 do. lycoris-lora's merge path (``LohaModule.get_diff_weight``) applies
it a second time, so ``lycoris/tools/merge.py`` output differs from ours whenever alpha != r;
ours is what the network computed while it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import (AdapterModule, apply_dora, read_alpha, require_join, require_ndim,
                                     require_shared, shape_error)

if TYPE_CHECKING:
    import torch

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
