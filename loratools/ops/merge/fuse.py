"""Add the deltas of every module that targets one base tensor, in float32, and cast once.

Every delta is computed against the *original* base tensor (not one already patched by an earlier
adapter), so the result does not depend on the order of the adapters, also for the types whose delta
depends on the weight (DoRA, IA3). Row slices (TE2 q/k/v inside ``in_proj_weight``) patch only their
rows. The result is checked for NaN/Inf after fusing, in the output dtype's range, because an fp16
output can overflow to Inf where the float32 sum was finite.

Speed matters here: an SDXL LoCon patches ~3 billion weights on two cores. Plain LoRA/LoCon modules
(no Tucker core, no DoRA) are therefore added with one in-place ``addmm_`` on the float32 copy of the
weight (``W += ratio * scale * up @ down``: kohya's merge formula, fused) instead of materialising
``module.delta()`` and adding it; every other type goes through ``module.delta()``. ``--verify``
recomputes the expected change through ``module.delta()``, so the fast path is checked against the
adapters' own implementation. Finiteness is checked with ``aminmax`` (one reduction) rather than
``isfinite().all()``, which costs several passes and allocations per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loratools.errors import ArchitectureMismatchError, NonFiniteError

if TYPE_CHECKING:
    import torch

    from loratools.ops.merge.plan import Patch


def finite_range(t: torch.Tensor, limit: float = math.inf) -> bool:
    """True when every element of a float tensor is finite and ``|x| <= limit`` (one pass).

    ``aminmax`` propagates NaN, so a NaN anywhere makes a bound NaN; an Inf shows as a bound.
    """
    import torch

    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi) and -limit <= lo and hi <= limit


def _fit(delta: torch.Tensor, region: torch.Tensor, where: str) -> torch.Tensor:
    """Reshape a delta to its target; zero-pad input channels for inpainting ``conv_in`` (A1111 does too)."""
    import torch

    if delta.numel() == region.numel():
        return delta.reshape(region.shape)
    if (delta.ndim == 4 and region.ndim == 4 and delta.shape[0] == region.shape[0]
            and delta.shape[2:] == region.shape[2:] and delta.shape[1] < region.shape[1]):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, region.shape[1] - delta.shape[1]))
    raise ArchitectureMismatchError(f"{where}: delta shape {tuple(delta.shape)} does not fit base shape "
                                    f"{tuple(region.shape)}; the adapter was made for another model")


def patch_delta(patch: Patch, region: torch.Tensor) -> torch.Tensor:
    """The float32 delta of one patch (ratio not applied), shaped like ``region`` (the base slice it patches)."""
    module = patch.module
    if patch.bias:
        delta = module.bias_delta()
    else:
        delta = module.delta(region.float() if module.needs_base else None)
    return _fit(delta.float(), region, module.name)


def _fused_lora(patch: Patch, target: torch.Tensor) -> bool:
    """``target += ratio * scale * up @ down`` in place for plain LoRA/LoCon; False when not applicable."""
    m = patch.module
    if patch.bias or m.kind != "lora" or getattr(m, "mid", None) is not None or getattr(m, "dora_scale", None) is not None:
        return False
    up, down = m.up.flatten(1), m.down.flatten(1)
    if up.shape[0] != target.shape[0] or up.shape[0] * down.shape[1] != target.numel():
        return False  # e.g. inpainting conv_in padding: the general path handles it
    target.view(target.shape[0], -1).addmm_(up.float(), down.float(), alpha=patch.ratio * m.scale)
    return True


def fuse(key: str, base: torch.Tensor, patches: Sequence[Patch], out_dtype: torch.dtype,
         adapter_names: Sequence[str]) -> torch.Tensor:
    """Return ``base + sum(ratio * delta)`` in ``out_dtype``.

    Args:
        key: the base key (for messages).
        base: the base tensor as read (any float dtype; never modified).
        patches: the modules targeting ``key``.
        out_dtype: the dtype to write.
        adapter_names: display names of the adapters, indexed by ``Patch.lora``.

    Raises:
        NonFiniteError: the result holds NaN/Inf or overflows ``out_dtype`` (names key and adapters).
        ArchitectureMismatchError: a delta does not fit the base tensor.
    """
    import torch

    out = base.to(torch.float32, copy=True)
    for patch in patches:
        rows = slice(None) if patch.rows is None else slice(*patch.rows)
        if not _fused_lora(patch, out[rows]):
            out[rows].add_(patch_delta(patch, base[rows]), alpha=patch.ratio)
    if not finite_range(out, torch.finfo(out_dtype).max):
        sources = ", ".join(sorted({f"{adapter_names[p.lora]}:{p.module.name}" for p in patches}))
        dtype = str(out_dtype).removeprefix("torch.")
        raise NonFiniteError(f"{key}: merged weight is NaN/Inf or overflows {dtype} (from {sources}); lower the "
                             "ratio, or write with --dtype fp32/bf16; nothing was written")
    return out if out_dtype == torch.float32 else out.to(out_dtype)
