"""LoRA and LoCon: ``lora_down`` / ``lora_up`` (+ Tucker ``lora_mid``, + DoRA ``dora_scale``).

One type covers kohya LoRA, LoCon on 1x1 and k x k convs (non-square kernels too), LyCORIS
LoCon with ``use_tucker``, DyLoRA files and PEFT/diffusers ``lora_A``/``lora_B`` files (the
parser renames their suffixes to these). DoRA is a variant of this type, not a new type, as in
PEFT.

Delta (formats-spec 1.3): ``scale * flatten(up) @ flatten(down)`` reshaped to
``(out, in, kh, kw)`` (conv) or ``(out, in)``; with Tucker,
``dW[o,i,h,w] = scale * sum_ab up[o,a] mid[a,b,h,w] down[b,i]``. ``scale = alpha / rank``
with ``rank = down.shape[0]``; no alpha means scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.adapters.base import (AdapterModule, apply_dora, read_alpha, require_join, require_ndim,
                                     require_shared, shape_error)

if TYPE_CHECKING:
    import torch

    from loratools.adapters.lora_directions import LoRADirections


@dataclass(frozen=True, eq=False, kw_only=True)
class LoRAModule(AdapterModule):
    """LoRA / LoCon / Tucker LoCon, optionally DoRA.

    Attributes:
        down: ``(r, in)`` or ``(r, in, kh, kw)`` (Tucker: ``(r, in, 1, 1)``).
        up: ``(out, r)`` or ``(out, r, 1, 1)``.
        mid: Tucker core ``(r, r, kh, kw)`` or None.
        dora_scale: DoRA magnitude, ``(out, 1, ...)`` / ``(out,)`` or ``(1, in, ...)``, or None.
    """

    kind = "lora"
    SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    TAKES_ALPHA = True
    TAKES_DORA = True

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> LoRAModule | None:
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if cls._described(source_name or name, tensors) is None:
            return None
        if alpha is None and "alpha" in tensors:
            alpha = read_alpha(tensors["alpha"])
        return cls(name=name, source_name=source_name or name, alpha=alpha, down=down, up=up,
                   mid=tensors.get("lora_mid.weight"), dora_scale=tensors.get("dora_scale"))

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        down, up, mid = shapes.get("lora_down.weight"), shapes.get("lora_up.weight"), shapes.get("lora_mid.weight")
        if down is None or up is None:
            return None
        down, up = tuple(down), tuple(up)
        require_ndim("lora_down.weight", down, (2, 4))
        require_ndim("lora_up.weight", up, (2, 4))
        if up[2:] not in ((), (1, 1)):
            raise shape_error(f"lora_up.weight has shape {up}; a conv up factor must be 1x1")
        if mid is None:
            require_join("lora_up.weight", up, 1, "lora_down.weight", down, 0)
        else:
            mid = tuple(mid)
            require_ndim("lora_mid.weight", mid, (4,))
            if down[2:] not in ((), (1, 1)):
                raise shape_error(f"lora_down.weight has shape {down}; with a Tucker lora_mid it must be 1x1")
            require_join("lora_up.weight", up, 1, "lora_mid.weight", mid, 0)
            require_join("lora_mid.weight", mid, 1, "lora_down.weight", down, 0)
        weight = _weight_shape(down, up, mid)
        require_shared(shapes, weight)
        return down[0], weight

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        mid = None if self.mid is None else tuple(self.mid.shape)
        return _weight_shape(tuple(self.down.shape), tuple(self.up.shape), mid)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        up = self.up.detach().float().flatten(1)
        if self.mid is None:
            core = up @ self.down.detach().float().flatten(1)
        else:
            down = self.down.detach().float().flatten(1)
            core = torch.einsum("oa,abhw,bi->oihw", up, self.mid.detach().float(), down)
        diff = core.reshape(self.weight_shape) * self.scale
        if self.dora_scale is not None:
            diff = apply_dora(self, base, diff, self.dora_scale)
        return self._finite(diff)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        out.update(self._alpha_tensor(self.down))
        return out

    def directions(self, device: str = "cpu") -> LoRADirections:
        return LoRAModule.directions_many([self], device)[0]

    @classmethod
    def directions_many(cls, modules: Sequence[LoRAModule], device: str = "cpu") -> list[LoRADirections]:
        """``directions()`` of many modules, those of one factor shape in one batched call
        (``linalg.factored``): a thousand layers cost tens of calls, not thousands."""
        from loratools.adapters.lora_directions import lora_directions

        return lora_directions(modules, device)


def _weight_shape(down: tuple[int, ...], up: tuple[int, ...], mid: tuple[int, ...] | None) -> tuple[int, ...]:
    if mid is not None:
        return (up[0], down[1], *mid[2:])
    return (up[0], *down[1:])
