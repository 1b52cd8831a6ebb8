"""Full / diff (LyCORIS ``full``): the weight change stored whole, ``diff`` and optional ``diff_b``.

No alpha, no rank: ``dW = diff`` and ``db = diff_b`` (the maths is ``base.WholeDelta``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import WholeDelta

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class FullModule(WholeDelta):
    """A stored full weight difference (and bias difference)."""

    kind = "full"
    SUFFIXES = ("diff", "diff_b")

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
