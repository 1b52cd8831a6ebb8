"""Norm deltas (LyCORIS ``train_norm``): ``w_norm`` / ``b_norm`` added to a GroupNorm/LayerNorm.

Additive and unscaled (formats-spec 7.4): ``gamma += w_norm``, ``beta += b_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import AdapterModule

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class NormModule(AdapterModule):
    """A norm layer's weight (and bias) change."""

    kind = "norm"
    SUFFIXES = ("w_norm", "b_norm")

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> NormModule | None:
        if "w_norm" not in tensors:
            return None
        return cls(name=name, source_name=source_name or name, w_norm=tensors["w_norm"], b_norm=tensors.get("b_norm"))

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        if "w_norm" not in shapes:
            return None
        return None, tuple(shapes["w_norm"])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.w_norm.shape)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return self._finite(self.w_norm.detach().float())

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.b_norm is None else self._finite(self.b_norm.detach().float())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"w_norm": self.w_norm}
        if self.b_norm is not None:
            out["b_norm"] = self.b_norm
        return out
