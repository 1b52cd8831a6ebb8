"""``--verify``: re-open the written output and check that merged - base equals the intended delta.

Users have had merges that "finished" but applied nothing (user-asks 5); this reads the file back
from disk, so it catches a wrong key, a dropped tensor or a bad cast, not just our arithmetic. For a
sample of each adapter's modules (evenly spread over its sorted names, so the same run checks the
same modules), every patch on the sampled key is recomputed and compared elementwise: the only
allowed difference is the final rounding to the output dtype, ``|err| <= eps * |merged|``, plus float32
rounding relative to the delta's scale (a missing or wrong delta is off by the delta itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.io import ModelSource
    from loratools.ops.merge.plan import MergePlan


@dataclass(frozen=True)
class VerifyRow:
    """One checked module: the largest deviation from the intended delta and the delta's own size."""

    adapter: str
    module: str
    key: str
    max_error: float
    max_delta: float
    ok: bool


def _sample(names: Sequence[str], count: int) -> list[str]:
    ordered = sorted(names)
    if len(ordered) <= count:
        return ordered
    step = (len(ordered) - 1) / max(count - 1, 1)
    return [ordered[round(i * step)] for i in range(count)]


def verify_output(output: Path, base: ModelSource, plan: MergePlan, out_dtype: torch.dtype | None,
                  names: Sequence[str], samples: int) -> list[VerifyRow]:
    """Check ``samples`` modules per adapter in the written ``output`` against ``base``.

    Returns:
        One row per checked module; ``ok`` False means the file on disk does not hold the merge.
    """
    import torch

    from loratools.io import open_model
    from loratools.ops.merge.fuse import patch_delta

    merged_model = open_model(output)
    by_module = {(p.lora, p.module.name): (component, key)
                 for (component, key), patches in plan.patches.items() for p in patches if not p.bias}
    rows = []
    for i, adapter in enumerate(plan.adapters):
        for module in _sample(adapter.applied, samples):
            component, key = by_module[(i, module)]
            original = base.components[component][key]
            merged = merged_model.components[component][key].float()
            expected = torch.zeros_like(merged)
            for p in plan.patches[(component, key)]:
                rows_ = slice(None) if p.rows is None else slice(*p.rows)
                expected[rows_] += p.ratio * patch_delta(p, original[rows_])
            dtype = out_dtype or original.dtype
            info = torch.finfo(dtype)
            before = original.float()
            err = (merged - before - expected).abs()
            # one rounding to the output dtype, plus float32 rounding of the delta (relative to its scale:
            # the merge may sum the factors' products in another order) and of this subtraction
            eps32 = torch.finfo(torch.float32).eps
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            bound = info.eps * merged.abs() + 2 * eps32 * before.abs() + 16 * eps32 * scale
            ok = bool((err <= bound + info.tiny * info.eps).all())
            rows.append(VerifyRow(names[i], module, key, float(err.max()), float(expected.abs().max()), ok))
    return rows
