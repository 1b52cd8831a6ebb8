"""Norm deltas (LyCORIS ``train_norm``): ``w_norm`` / ``b_norm`` added to a GroupNorm/LayerNorm.

Additive and unscaled (formats-spec 7.4): ``gamma += w_norm``, ``beta += b_norm`` (the maths is
``base.WholeDelta``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import WholeDelta

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class NormModule(WholeDelta):
    """A norm layer's weight (and bias) change."""

    kind = "norm"
    SUFFIXES = ("w_norm", "b_norm")

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None
