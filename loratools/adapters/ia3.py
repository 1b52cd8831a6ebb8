"""IA3 (LyCORIS ``weight`` + ``on_input``): a learned per-channel rescaling of the base weight.

Merged weight ``W' = W * (1 + w)`` along the output axis (``on_input = 0``, the LyCORIS default)
or the input axis (``on_input = 1``), so ``dW = W * w`` depends on the base weight. Linear
stores ``w`` as ``(C,)``, conv as ``(1, C, 1, 1)``. No alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import AdapterModule, require_ndim, shape_error
from loratools.errors import InvalidFileError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False, kw_only=True)
class IA3Module(AdapterModule):
    """IA3; ``on_input`` says which axis ``weight`` scales."""

    kind = "ia3"
    SUFFIXES = ("weight", "on_input")

    weight: torch.Tensor
    on_input: bool = False

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> IA3Module | None:
        if cls._described(source_name or name, tensors) is None:
            return None
        on_input = bool(tensors["on_input"].reshape(-1)[0] != 0)  # any dtype, uint64 included
        return cls(name=name, source_name=source_name or name, weight=tensors["weight"], on_input=on_input)

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        if "weight" not in shapes or "on_input" not in shapes:
            return None
        require_ndim("weight", tuple(shapes["weight"]), (1, 2, 3, 4))
        if len([d for d in shapes["weight"] if d != 1]) > 1:
            raise shape_error(f"weight has shape {tuple(shapes['weight'])}; an IA3 vector has one axis longer than 1")
        if math.prod(shapes["on_input"]) != 1:
            raise shape_error(f"on_input has shape {tuple(shapes['on_input'])}; one flag is expected")
        return None, None  # the base weight's shape is not in an IA3 module's header

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise ValueError(f"module {self.name}: an IA3 module does not know its weight shape; use the base's")

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"module {self.name} (ia3) needs the base weight to compute its delta")
        w = base.detach().float()
        v = self.weight.detach().float().reshape(-1)
        axis = 1 if self.on_input else 0
        shape = [1] * w.dim()
        shape[axis] = v.numel()
        if w.shape[axis] != v.numel():
            raise InvalidFileError(
                f"module {self.name}: IA3 vector of {v.numel()} does not fit axis {axis} of the base "
                f"weight {tuple(w.shape)}; the adapter was made for another model"
            )
        return self._finite(w * v.reshape(shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch

        return {"weight": self.weight, "on_input": torch.tensor(int(self.on_input))}
