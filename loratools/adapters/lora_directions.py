"""A LoRA/LoCon/Tucker/DoRA module's delta as ranked directions: the singular triplets of
``scale * up @ down`` (``adapters.directions``), computed a batch of same-shaped layers at a time.

The spectrum comes from ``linalg.factored`` (two Gram products per layer, r x r work after
that); the singular vectors are formed only for the directions a recipe keeps, when the file is
written. A reduced module is a plain LoRA/LoCon: ``up = U sqrt(s)``, ``down = sqrt(s) Vh`` (both
factors share the magnitude, which keeps fp16 in range; kohya puts all of ``s`` on ``up``) and
``alpha = scale * k``, so ``alpha / rank`` is the old scale exactly. A Tucker core is contracted
into ``down`` first (the output is a plain LoCon with the same delta); a DoRA magnitude is copied
and the layer keeps at least one direction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loratools.adapters.directions import Directions

if TYPE_CHECKING:
    import torch

    from loratools.adapters.lora import LoRAModule
    from loratools.linalg.factored import Factored

#: Float64 bytes of stacked factors per batched call: bounds the memory of a batch of large convs.
BATCH_BYTES = 64 << 20


class LoRADirections(Directions):
    """The singular directions of one LoRA-family module (see the module docstring)."""

    kind = "lora"
    pads = True

    def __init__(self, module: LoRAModule, factored: Factored, up: torch.Tensor, down: torch.Tensor) -> None:
        self.module = module
        self._f = factored
        self._up, self._down = up, down  # flattened [out, r] and [r, n] (Tucker contracted), file dtype
        scale = module.scale
        self._scale = scale
        self.S = (factored.S * abs(scale)).float()
        self.old_rank = module.rank
        self.full_len = min(up.shape[0], down.shape[1])
        self.weight_shape = tuple(module.weight_shape)
        self.keep_one = module.dora_scale is not None

    def specs(self, k: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        import torch

        ws = self.weight_shape
        out = {"lora_down.weight": ((k, *ws[1:]), dtype),
               "lora_up.weight": ((ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k), dtype),
               "alpha": ((), torch.float32)}
        if self.module.dora_scale is not None:
            out["dora_scale"] = (tuple(self.module.dora_scale.shape), self.module.dora_scale.dtype)
        return out

    def alpha(self, k: int, *, kohya: bool = False) -> float:
        """``scale * k`` as the float32 the file stores; ``kohya`` rounds the scale to float32 first,
        as sd-scripts does (its alpha is ``float32(scale) * rank``)."""
        import torch

        if kohya:
            return float(torch.tensor(self._scale, dtype=torch.float32) * k)
        return float(torch.tensor(self._scale * k, dtype=torch.float32))

    def tensors(self, keep: Sequence[int], dtype: torch.dtype, rescale: float = 1.0, *,
                rank: int | None = None, kohya: bool = False) -> dict[str, torch.Tensor]:
        """The reduced LoRA; ``rank`` above ``len(keep)`` pads with zero directions (sd-scripts'
        ranks above the decomposition), ``kohya`` rounds the alpha as sd-scripts does."""
        import torch

        keep = list(keep)
        k = len(keep) if rank is None else rank
        ws = self.weight_shape
        U, Vh = self._f.pieces(keep)  # U = up @ U_piece, Vh = Vh_piece @ down
        root = (self.S[keep].double() * rescale / (abs(self._scale) or 1.0)).clamp_min(0).sqrt()
        up = self._up.float() @ (U * root).float()
        down = (root[:, None] * Vh).float() @ self._down.float()
        if k > len(keep):  # zero directions up to the rank asked for
            up = torch.cat([up, up.new_zeros(up.shape[0], k - len(keep))], 1)
            down = torch.cat([down, down.new_zeros(k - len(keep), down.shape[1])], 0)
        res = {"lora_up.weight": up.reshape((ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k)).to(dtype),
               "lora_down.weight": down.reshape(k, *ws[1:]).to(dtype),
               "alpha": torch.tensor(self.alpha(k, kohya=kohya), dtype=torch.float32)}
        if self.module.dora_scale is not None:
            res["dora_scale"] = self.module.dora_scale.contiguous()
        return res

    def projections(self, weight: torch.Tensor) -> torch.Tensor:
        from loratools.ops.resize.scoring import subspace_projection

        keep = range(self.S.numel())
        U, Vh = self._f.pieces(keep)
        return subspace_projection(self._up.double() @ U, Vh @ self._down.double(), weight)


def _flat(module: LoRAModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``up [out, r]`` and ``down [r, n]`` of a module (a Tucker core folded into ``down``)."""
    from loratools.linalg.lowrank import contract_tucker, flatten_down, flatten_up

    down = module.down if module.mid is None else contract_tucker(module.mid, module.down)
    return flatten_up(module.up), flatten_down(down)


def lora_directions(modules: Sequence[LoRAModule], device: str = "cpu") -> list[LoRADirections]:
    """``LoRADirections`` of every module, one ``factored_svd`` call per factor shape and batch."""
    import torch

    from loratools.linalg.factored import factored_svd

    flat = [_flat(m) for m in modules]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (up, down) in enumerate(flat):
        groups[(tuple(up.shape), tuple(down.shape))].append(i)
    result: list[LoRADirections | None] = [None] * len(modules)
    for (ushape, dshape), members in groups.items():
        per = 8 * (ushape[0] * ushape[1] + dshape[0] * dshape[1])
        step = max(1, BATCH_BYTES // max(per, 1))
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            ups = torch.stack([flat[i][0] for i in chunk]).to(device)
            downs = torch.stack([flat[i][1] for i in chunk]).to(device)
            for i, f in zip(chunk, factored_svd(ups, downs)):
                result[i] = LoRADirections(modules[i], f, *flat[i])
            del ups, downs
    return result  # type: ignore[return-value]
