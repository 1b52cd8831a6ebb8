"""Which base tensor each adapter module patches, decided before a single weight is read.

Planning first means every refusal (architecture mismatch, unmatched modules, two modules of one file
hitting the same weight, NaN in an adapter) happens before the output is opened, so a failed merge
costs seconds and leaves nothing behind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import ArchitectureMismatchError, InvalidFileError

if TYPE_CHECKING:
    from loratools.adapters import AdapterFile
    from loratools.adapters.base import AdapterModule
    from loratools.ops.merge.blocks import BlockWeights


@dataclass(frozen=True)
class Patch:
    """One adapter module's contribution to one base tensor.

    ``rows`` is a row slice of the base tensor (TE2 q/k/v inside a fused ``in_proj_weight``) or None
    for the whole tensor; ``bias`` marks a ``diff_b``/``b_norm`` patch of the matching bias key.
    """

    lora: int
    module: AdapterModule
    ratio: float
    rows: tuple[int, int] | None
    bias: bool = False


@dataclass
class AdapterPlan:
    """What one adapter file contributes: the module count, and the names that found no target.

    ``applied`` modules patch a weight; ``zeroed`` ones matched a weight but have an effective ratio
    of 0 (a block weight of 0, ``--te-scale 0``), so their weights are copied unchanged;
    ``unnamed`` ones sit in a block the block-weight list did not name (they keep weight 1).
    """

    path: Path
    ratio: float
    modules: int
    applied: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    zeroed: list[str] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)


@dataclass
class MergePlan:
    """Patches grouped by ``(component, key)`` plus per-adapter bookkeeping."""

    patches: dict[tuple[str, str], list[Patch]]
    adapters: list[AdapterPlan]

    def unmatched(self) -> list[str]:
        return [f"{a.path.name}: {name}" for a in self.adapters for name in a.unmatched]


def check_arch(base_arch: str, base_path: Path, adapter_arch: str, adapter_path: Path) -> None:
    """Refuse an adapter made for another architecture (an SD1 LoRA on SDXL matches nothing or garbage)."""
    if adapter_arch != base_arch:
        raise ArchitectureMismatchError(
            f"adapter is for {adapter_arch} but the base {base_path.name} is {base_arch}; "
            f"use a {adapter_arch} base or a {base_arch} adapter", path=adapter_path)


def _fits(module: AdapterModule, target) -> bool:
    """Whether the module's delta can be added to the target (reshape, or inpainting in-channel padding)."""
    from loratools.keys.index import shapes_compatible

    try:
        shape = tuple(module.weight_shape)
    except ValueError:  # IA3: shaped by the base itself
        return True
    if shapes_compatible(shape, target.shape):
        return True
    t = tuple(target.shape)
    return len(shape) == 4 and len(t) == 4 and shape[0] == t[0] and shape[2:] == t[2:] and shape[1] < t[1]


def module_ratio(ratio: float, kohya_name: str, arch: str, te_scale: float, blocks: BlockWeights | None
                 ) -> float:
    """One module's effective ratio: the adapter's, times its block weight, times ``te_scale`` for
    text-encoder modules (``merge --to-lora`` uses the same rule)."""
    from loratools.keys.naming import component_of

    if blocks is not None:
        ratio *= blocks.factor(kohya_name, arch)
    return ratio * te_scale if component_of(kohya_name) not in (None, "unet") else ratio


def build_plan(index, adapters: list[tuple[Path, float, AdapterFile]], te_scale: float = 1.0,
               blocks: Sequence[BlockWeights | None] = ()) -> MergePlan:
    """Resolve every module of every adapter against the base index.

    A module whose effective ratio is 0 patches nothing (its weight is copied byte for byte).

    Args:
        index: a ``loratools.keys.index.BaseIndex`` of the base model.
        adapters: ``(path, ratio, parsed file)`` in command-line order.
        te_scale: extra factor on the ratio of text-encoder modules (A1111/ComfyUI's separate TE
            strength; 0 merges the UNet part only).
        blocks: block weights per adapter (None or missing: none).

    Raises:
        InvalidFileError: two modules of one file patch the same weight (mixed naming styles would
            apply it twice, formats-spec 7.13).
    """
    patches: dict[tuple[str, str], list[Patch]] = defaultdict(list)
    plans: list[AdapterPlan] = []
    for i, (path, ratio, adapter) in enumerate(adapters):
        plan = AdapterPlan(path=path, ratio=ratio, modules=len(adapter.modules) + len(adapter.unknown))
        weights = blocks[i] if i < len(blocks) else None
        seen: dict[tuple[str, str, tuple[int, int] | None, bool], str] = {}
        for name in sorted(adapter.modules):
            module = adapter.modules[name]
            target = index.resolve(name)
            if target is None:
                plan.unmatched.append(name)
                continue
            if not _fits(module, target):
                plan.unmatched.append(f"{name} (delta shape {tuple(module.weight_shape)} does not fit "
                                      f"{target.key} {tuple(target.shape)})")
                continue
            kohya = index.info(target).kohya_name
            scaled = module_ratio(ratio, kohya, index.arch.arch, te_scale, weights)
            if weights is not None and not weights.covers(kohya, index.arch.arch):
                plan.unnamed.append(name)
            if scaled == 0.0:
                plan.zeroed.append(name)
                continue
            wanted = [(target.key, False)]
            if module.bias_delta() is not None:
                bias = target.bias_key
                if bias is None:
                    plan.unmatched.append(f"{name} (bias delta, base has no bias for {target.key})")
                    continue
                wanted.append((bias, True))
            for key, is_bias in wanted:
                slot = (target.component, key, target.rows, is_bias)
                if slot in seen:
                    raise InvalidFileError(
                        f"modules {seen[slot]} and {name} both patch {key}"
                        f"{'' if target.rows is None else f' rows {target.rows[0]}:{target.rows[1]}'}; "
                        "the file mixes naming styles; keep one of them", path=path)
                seen[slot] = name
                patches[(target.component, key)].append(Patch(i, module, scaled, target.rows, is_bias))
            plan.applied.append(name)
        plan.unmatched.extend(f"{key} (unrecognised tensor)" for key in sorted(adapter.unknown))
        plans.append(plan)
    return MergePlan(patches=dict(patches), adapters=plans)
