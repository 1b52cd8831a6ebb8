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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratools.adapters.base import AdapterModule, apply_dora, read_alpha, require_join, require_ndim, require_shared
from loratools.adapters.directions import Directions
from loratools.threads import one_thread

if TYPE_CHECKING:
    import numpy as np
    import torch

    from loratools.adapters.reduce import ProductSVD


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

    @one_thread()
    def directions(self, device: str = "cpu") -> LoKrDirections:
        """The directions of the low-rank Kronecker factor (module docstring), strengths exact."""
        import torch

        from loratools.adapters.reduce import ProductSVD, product_svd

        f = self._factors()
        if "w2" not in f:
            cut, p = "w2", product_svd(f["w2_a"], f["w2_b"], f.get("t2"), device)
            other = f["w1"] if "w1" in f else f["w1_a"].double() @ f["w1_b"].double()
        elif "w1" not in f:
            cut, p, other = "w1", product_svd(f["w1_a"], f["w1_b"], None, device), f["w2"]
        else:
            w2 = f["w2"].detach().to(device, torch.float64)
            U, S, Vh = torch.linalg.svd(w2.reshape(w2.shape[0], -1), full_matrices=False)
            cut, p, other = "w2_full", ProductSVD(U, S, Vh), f["w1"]
        norm = float(torch.linalg.vector_norm(other.detach().double()))
        return LoKrDirections(self, cut, p.compact(), (p.S * abs(self.scale) * norm).float().cpu().numpy())


class LoKrDirections(Directions):
    """A LoKr's directions: those of its low-rank factor, weighted by the other factor's norm.

    ``cut``: "w2" (split ``W2``, plain or Tucker), "w1" (split ``W1``, full ``W2``) or "w2_full"
    (neither split; written low-rank only where smaller).
    """

    kind = "lokr"

    def __init__(self, module: LoKrModule, cut: str, product: ProductSVD, S: np.ndarray) -> None:
        self.module, self.cut, self.product, self.S = module, cut, product, S
        self.full_len = product.n
        self.old_rank = module.rank or product.n
        self.keep_one = module.dora_scale is not None  # DoRA's magnitude would be orphaned at rank 0

    def _lowrank(self, k: int) -> bool:
        """Whether the cut factor is written as ``a @ b`` (always, unless a full ``W2`` is smaller)."""
        if self.cut != "w2_full":
            return True
        rows, cols = self.product.U.shape[0], self.product.Vh.shape[1]
        return k * (rows + cols) < rows * cols

    def specs(self, k: int, dtype: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
        from loratools.adapters.reduce import truncated_shapes
        from loratools.io.dtypes import from_torch

        dtype = from_torch(dtype)
        f = {s: tuple(t.shape) for s, t in self.module._factors().items()}
        name = self._cut_name()
        out = {s: (tuple(t.shape), dtype) for s, t in self._kept_factor(k).items()}
        if self.cut == "w2_full" and not self._lowrank(k):
            out["lokr_w2"] = (f["w2"], dtype)
        elif "t2" in f:
            a, core = truncated_shapes((f["w2_a"], f["w2_b"], f["t2"]), k, tucker=True)
            out.update(lokr_w2_a=(a, dtype), lokr_t2=(core, dtype), lokr_w2_b=(f["w2_b"], dtype))
        else:
            up = (self.product.U.shape[0], k)
            out.update({f"lokr_{name}_a": (up, dtype), f"lokr_{name}_b": ((k, self.product.Vh.shape[1]), dtype)})
        if self.alpha(k) is not None:
            out["alpha"] = ((), "F32")
        if self.module.dora_scale is not None:
            out["dora_scale"] = (tuple(self.module.dora_scale.shape), self.module.dora_scale.dtype)
        return out

    @one_thread()
    def tensors(self, keep: Sequence[int], dtype: Any, rescale: float = 1.0) -> dict[str, torch.Tensor]:
        import torch

        from loratools.adapters.reduce import truncated
        from loratools.io.dtypes import from_torch, to_torch

        m, k, p = self.module, len(keep), self.product
        f = m._factors()
        name = self._cut_name()
        out = self._kept_factor(k)
        if not self._lowrank(k):  # a full W2 stays full: the rescale goes into it (no rank, scale 1)
            idx = torch.as_tensor(sorted(keep), dtype=torch.long, device=p.S.device)
            w2 = (p.U[:, idx] * (p.S[idx] * rescale)) @ p.Vh[idx]
            out["lokr_w2"] = w2.reshape(f["w2"].shape)
        elif "t2" in f:
            a, core = truncated(p, keep, factor=rescale)
            out.update(lokr_w2_a=a, lokr_t2=core, lokr_w2_b=f["w2_b"])
        else:
            up, down = truncated(p, keep, factor=rescale)
            out.update({f"lokr_{name}_a": up, f"lokr_{name}_b": down})
        out = {s: t.detach().to("cpu", to_torch(from_torch(dtype))).contiguous() for s, t in out.items()}
        alpha = self.alpha(k)
        if alpha is not None:
            out["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if m.dora_scale is not None:
            out["dora_scale"] = m.dora_scale.contiguous()
        return out

    def _kept_factor(self, k: int) -> dict[str, torch.Tensor]:
        """The Kronecker factor not cut, as written: copied, except that a split ``W1`` beside ``W2`` cut
        to another rank is written full (``a x c``, tiny): LyCORIS keeps one rank for both split
        factors, so the result is its usual layout (full ``w1``, split ``w2``) and loads at rank k."""
        m = self.module
        if self.cut == "w1":
            return {"lokr_w2": m.w2}
        if m.w1 is not None:
            return {"lokr_w1": m.w1}
        if m.w1_b.shape[0] == k:
            return {"lokr_w1_a": m.w1_a, "lokr_w1_b": m.w1_b}
        return {"lokr_w1": m.w1_a.detach().double() @ m.w1_b.detach().double()}

    def _cut_name(self) -> str:
        return "w1" if self.cut == "w1" else "w2"

    def alpha(self, k: int, *, kohya: bool = False) -> float | None:
        """The alpha that keeps ``alpha / rank`` at the old scale (a rescale goes into the factors);
        the input's alpha for a module with no rank (both factors full: scale 1, alpha ignored by
        every loader), None when it had none. ``kohya`` changes nothing: no sd-scripts twin."""
        m = self.module
        if self.cut == "w2_full":
            if not self._lowrank(k):
                return m.alpha
            return float(k)  # the old scale was 1
        rank = m.w2_b.shape[0] if m.t2 is not None else k
        return m.scale * rank


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
