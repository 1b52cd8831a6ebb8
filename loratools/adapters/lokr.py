"""LoKr (LyCORIS ``lokr_*``): Kronecker product of a small and a (low-rank) large factor.

Factors (no ``.weight`` suffix): ``lokr_w1`` ``(a, c)`` or ``lokr_w1_a`` ``(a, r)`` @ ``lokr_w1_b``
``(r, c)``; ``lokr_w2`` ``(b, d[, kh, kw])`` or ``lokr_w2_a`` ``(b, r)`` @ ``lokr_w2_b``
``(r, d*kh*kw)``, or Tucker ``lokr_t2`` ``(r, r, kh, kw)`` with ``lokr_w2_a`` ``(r, b)``,
``lokr_w2_b`` ``(r, d)``. ``dW = scale * kron(W1, W2)`` with ``out = a*b``, ``in = c*d``.

Scale rule (formats-spec 1.4 item 6): rank is ``lokr_w2_b.shape[0]`` when w2 is split, else
``lokr_w1_b.shape[0]`` when w1 is split; when neither is split there is no rank and the scale
is 1 whatever alpha says (LyCORIS forces alpha := dim then). The scale is applied once, as in
LyCORIS' training forward; its ``LokrModule.get_diff_weight`` applies it twice (see loha.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import AdapterModule, apply_dora, read_alpha, require_join, require_ndim, require_shared

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class LoKrModule(AdapterModule):
    """LoKr with every factor variant; fields that a variant lacks are None."""

    kind = "lokr"
    SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    TAKES_ALPHA = True
    TAKES_DORA = True

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> LoKrModule | None:
        if cls._described(source_name or name, tensors) is None:
            return None
        if alpha is None and "alpha" in tensors:
            alpha = read_alpha(tensors["alpha"])
        fields = {f: tensors.get(f"lokr_{f}") for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
        if fields["w1"] is not None:
            fields["w1_a"] = fields["w1_b"] = None
        if fields["w2"] is not None:
            fields["w2_a"] = fields["w2_b"] = fields["t2"] = None
        return cls(name=name, source_name=source_name or name, alpha=alpha,
                   dora_scale=tensors.get("dora_scale"), **fields)

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        if _shapes_incomplete(shapes):
            return None
        s = {k.removeprefix("lokr_"): tuple(v) for k, v in shapes.items() if k.startswith("lokr_")}
        if "w1" in s:  # a full factor wins over a split one, as in parse
            s = {k: v for k, v in s.items() if k not in ("w1_a", "w1_b")}
        if "w2" in s:
            s = {k: v for k, v in s.items() if k not in ("w2_a", "w2_b", "t2")}
        _check_factors(s)
        weight = _weight_shape(s)
        require_shared(shapes, weight)
        return _rank(s), weight

    @property
    def rank(self) -> int | None:
        return _rank({k: tuple(v.shape) for k, v in self._factors().items()})

    @property
    def scale(self) -> float:
        if self.rank is None:  # neither factor split: LyCORIS and ComfyUI use scale 1
            return 1.0
        return super().scale

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return _weight_shape({k: tuple(v.shape) for k, v in self._factors().items()})

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        f = {k: v.detach().float() for k, v in self._factors().items()}
        w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = torch.einsum("ijhw,ip,jr->prhw", f["t2"], f["w2_a"], f["w2_b"])
        else:
            w2 = f["w2_a"] @ f["w2_b"]
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        diff = (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.weight_shape)
        if self.dora_scale is not None:
            diff = apply_dora(self, base, diff, self.dora_scale)
        return self._finite(diff)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"lokr_{k}": v for k, v in self._factors().items()}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        first = self.w1 if self.w1 is not None else self.w1_a
        assert first is not None
        out.update(self._alpha_tensor(first))
        return out

    def _factors(self) -> dict[str, torch.Tensor]:
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def _shapes_incomplete(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    has_w1 = "lokr_w1" in shapes or ("lokr_w1_a" in shapes and "lokr_w1_b" in shapes)
    has_w2 = "lokr_w2" in shapes or ("lokr_w2_a" in shapes and "lokr_w2_b" in shapes)
    return not (has_w1 and has_w2)


def _check_factors(s: Mapping[str, tuple[int, ...]]) -> None:
    """The Kronecker factors are matrices (w2 may be a conv kernel) whose split parts share a rank."""
    for key, ndim in (("w1", (2,)), ("w1_a", (2,)), ("w1_b", (2,)), ("w2", (2, 4)), ("w2_a", (2,)),
                      ("w2_b", (2,)), ("t2", (4,))):
        if key in s:
            require_ndim(f"lokr_{key}", s[key], ndim)
    if "w1" not in s:
        require_join("lokr_w1_a", s["w1_a"], 1, "lokr_w1_b", s["w1_b"], 0)
    if "t2" in s:  # Tucker: w2[p,r,h,w] = sum t2[i,j,h,w] w2_a[i,p] w2_b[j,r]
        require_join("lokr_t2", s["t2"], 0, "lokr_w2_a", s["w2_a"], 0)
        require_join("lokr_t2", s["t2"], 1, "lokr_w2_b", s["w2_b"], 0)
    elif "w2" not in s:
        require_join("lokr_w2_a", s["w2_a"], 1, "lokr_w2_b", s["w2_b"], 0)


def _rank(s: Mapping[str, tuple[int, ...]]) -> int | None:
    if "w2" not in s and "w2_b" in s:
        return s["w2_b"][0]
    if "w1" not in s and "w1_b" in s:
        return s["w1_b"][0]
    return None


def _weight_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """``(a*b, c*d[, kh, kw])``; a flattened conv w2 gives ``(a*b, c*d*kh*kw)``."""
    a, c = (s["w1"][0], s["w1"][1]) if "w1" in s else (s["w1_a"][0], s["w1_b"][1])
    if "w2" in s:
        b, d, *k = s["w2"]
    elif "t2" in s:
        b, d, k = s["w2_a"][1], s["w2_b"][1], list(s["t2"][2:])
    else:
        b, d, k = s["w2_a"][0], s["w2_b"][1], []
    return (a * b, c * d, *k)
