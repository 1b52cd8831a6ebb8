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
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from loratools.adapters.directions import Directions
from loratools.io.arrays import as_numpy, cast
from loratools.threads import one_blas_thread

if TYPE_CHECKING:
    import torch

    from loratools.adapters.lora import LoRAModule
    from loratools.linalg.factored import Factored

#: Float64 bytes of stacked factors per batched call: bounds the memory of a batch of large convs.
BATCH_BYTES = 64 << 20
#: Batches solved at once, each on one BLAS thread: numpy's float16 casts are single-threaded.
WORKERS = os.cpu_count() or 1


class LoRADirections(Directions):
    """The singular directions of one LoRA-family module (see the module docstring)."""

    kind = "lora"
    pads = True
    threadsafe = True

    def __init__(self, module: LoRAModule, factored: Factored, up: np.ndarray, down: np.ndarray) -> None:
        self.module = module
        self._f = factored
        self._up, self._down = up, down  # flattened [out, r] and [r, n] (Tucker contracted), file dtype
        scale = module.scale
        self._scale = scale
        self.S = (factored.S * abs(scale)).astype(np.float32)
        self.old_rank = module.rank
        self.full_len = min(up.shape[0], down.shape[1])
        self.weight_shape = tuple(module.weight_shape)
        self.keep_one = module.dora_scale is not None

    def specs(self, k: int, dtype: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        from loratools.io.dtypes import from_torch

        dtype = from_torch(dtype)
        ws = self.weight_shape
        out = {"lora_down.weight": ((k, *ws[1:]), dtype),
               "lora_up.weight": ((ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k), dtype),
               "alpha": ((), "F32")}
        if self.module.dora_scale is not None:
            out["dora_scale"] = (tuple(self.module.dora_scale.shape), from_torch(self.module.dora_scale.dtype))
        return out

    def alpha(self, k: int, *, kohya: bool = False) -> float:
        """``scale * k`` as the float32 the file stores; ``kohya`` rounds the scale to float32 first,
        as sd-scripts does (its alpha is ``float32(scale) * rank``)."""
        if kohya:
            return float(np.float32(self._scale) * np.float32(k))
        return float(np.float32(self._scale * k))

    def tensors(self, keep: Sequence[int], dtype: Any, rescale: float = 1.0, *,
                rank: int | None = None, kohya: bool = False) -> dict[str, Any]:
        """The reduced LoRA; ``rank`` above ``len(keep)`` pads with zero directions (sd-scripts'
        ranks above the decomposition), ``kohya`` rounds the alpha as sd-scripts does."""
        from loratools.io.dtypes import from_torch

        dtype = from_torch(dtype)
        keep = list(keep)
        k = len(keep) if rank is None else rank
        ws = self.weight_shape
        U, Vh = self._f.pieces(keep)  # U = up @ U_piece, Vh = Vh_piece @ down
        root = np.sqrt(np.clip(self.S[keep].astype(np.float64) * rescale / (abs(self._scale) or 1.0), 0.0, None))
        up = self._up.astype(np.float32) @ (U * root).astype(np.float32)
        down = (root[:, None] * Vh).astype(np.float32) @ self._down.astype(np.float32)
        if k > len(keep):  # zero directions up to the rank asked for
            up = np.concatenate([up, np.zeros((up.shape[0], k - len(keep)), np.float32)], 1)
            down = np.concatenate([down, np.zeros((k - len(keep), down.shape[1]), np.float32)], 0)
        res = {"lora_up.weight": cast(up.reshape((ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k)), dtype),
               "lora_down.weight": cast(down.reshape(k, *ws[1:]), dtype),
               "alpha": np.array(self.alpha(k, kohya=kohya), dtype=np.float32)}
        if self.module.dora_scale is not None:
            res["dora_scale"] = self.module.dora_scale
        return res

    def projections(self, weight: torch.Tensor) -> np.ndarray:
        from loratools.ops.resize.scoring import subspace_projection

        U, Vh = self._f.pieces(range(self.S.size))
        return subspace_projection(self._up.astype(np.float64) @ U, Vh @ self._down.astype(np.float64), weight)


def _flat(module: LoRAModule) -> tuple[np.ndarray, np.ndarray]:
    """``up [out, r]`` and ``down [r, n]`` of a module as numpy, a Tucker core folded into ``down``:
    ``D[a, i, h, w] = sum_b mid[a, b, h, w] down[b, i]`` (the same delta with the same ``up``)."""
    up, down = as_numpy(module.up), as_numpy(module.down)
    if module.mid is not None:
        wide = np.float64 if np.float64 in (up.dtype, down.dtype) else np.float32
        down = np.einsum("abhw,bi->aihw", as_numpy(module.mid).astype(wide),
                         down.reshape(down.shape[0], -1).astype(wide))
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def lora_directions(modules: Sequence[LoRAModule], device: str = "cpu") -> list[LoRADirections]:
    """``LoRADirections`` of every module, one ``factored_svd`` call per factor shape and batch
    (on the CPU: after the Gram products the work is r x r; ``device`` is not used)."""
    from loratools.linalg.factored import factored_svd

    flat = [_flat(m) for m in modules]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (up, down) in enumerate(flat):
        groups[(up.shape, down.shape)].append(i)
    chunks = []
    for (ushape, dshape), members in groups.items():
        per = 8 * (ushape[0] * ushape[1] + dshape[0] * dshape[1])
        step = max(1, BATCH_BYTES // max(per, 1))
        chunks.extend(members[start:start + step] for start in range(0, len(members), step))

    def solve(chunk: list[int]) -> list[Factored]:
        return factored_svd(np.stack([flat[i][0] for i in chunk]), np.stack([flat[i][1] for i in chunk]))

    result: list[LoRADirections | None] = [None] * len(modules)
    with one_blas_thread(), ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="loratools-svd") as pool:
        for chunk, found in zip(chunks, pool.map(solve, chunks)):
            for i, f in zip(chunk, found):
                result[i] = LoRADirections(modules[i], f, *flat[i])
    return result  # type: ignore[return-value]
