"""Full / diff (LyCORIS ``full``): the weight change stored whole, ``diff`` and optional ``diff_b``.

No alpha, no rank: ``dW = diff`` and ``db = diff_b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import AdapterModule

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class FullModule(AdapterModule):
    """A stored full weight difference (and bias difference)."""

    kind = "full"
    SUFFIXES = ("diff", "diff_b")

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> FullModule | None:
        if "diff" not in tensors:
            return None
        return cls(name=name, source_name=source_name or name, diff=tensors["diff"], diff_b=tensors.get("diff_b"))

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        if "diff" not in shapes:
            return None
        return None, tuple(shapes["diff"])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return self._finite(self.diff.detach().float())

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self._finite(self.diff_b.detach().float())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out
