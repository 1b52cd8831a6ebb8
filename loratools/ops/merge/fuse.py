"""Add the deltas of every module that targets one base tensor, in float32, and cast once.

Every delta is computed against the *original* base tensor (not one already patched by an earlier
adapter), so the result does not depend on the order of the adapters, also for the types whose delta
depends on the weight (DoRA, IA3). Row slices (TE2 q/k/v inside ``in_proj_weight``) patch only their
rows. The result is checked for NaN/Inf after fusing and again after the cast, because an fp16
output can overflow to Inf where the float32 sum was finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from loratools.errors import ArchitectureMismatchError, NonFiniteError

if TYPE_CHECKING:
    import torch

    from loratools.ops.merge.plan import Patch


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
        NonFiniteError: a delta or the result holds NaN/Inf (names key, module and adapter).
        ArchitectureMismatchError: a delta does not fit the base tensor.
    """
    import torch

    out = base.to(torch.float32, copy=True)
    for patch in patches:
        rows = slice(None) if patch.rows is None else slice(*patch.rows)
        delta = patch_delta(patch, base[rows])
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteError(f"{adapter_names[patch.lora]}: module {patch.module.name} gives a NaN/Inf delta "
                                 f"for {key}; nothing was written", path=None)
        out[rows].add_(delta, alpha=patch.ratio)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"{key}: merged weight holds NaN/Inf (ratios too large?); nothing was written")
    result = out.to(out_dtype)
    if not bool(torch.isfinite(result).all()):
        raise NonFiniteError(f"{key}: merged weight overflows {str(out_dtype).removeprefix('torch.')}; "
                             "lower the ratio or write with --dtype fp32/bf16; nothing was written")
    return result
