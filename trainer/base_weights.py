"""`--base_weights A.safetensors B.safetensors --base_weights_multiplier 1 0.5`: merge LoRAs (any
type `loratools.adapters` reads) into the frozen base before training, as sd-scripts does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loratools.errors import NonFiniteError, UnmatchedModulesError, UsageError
from loratools.keys.index import BaseIndex


def _module_of(index: BaseIndex, models: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The live module a file's module name changes, through the one vocabulary (kohya SGM or
    diffusers spelling, PEFT, LyCORIS names alike), or None."""
    target = index.resolve(name)
    if target is None:
        return None
    return models[target.component].get_submodule(target.key.removesuffix(".weight"))


def merge_base_weights(arch: str, unet, text_encoders: Sequence, files: Sequence[str],
                       multipliers: Sequence[float] | None) -> int:
    """Add every module's delta × multiplier to the base weights; returns the modules merged."""
    from loratools.adapters import load_adapter

    multipliers = list(multipliers or [])
    if multipliers and len(multipliers) != len(files):
        raise UsageError(f"--base_weights_multiplier has {len(multipliers)} values for {len(files)} --base_weights "
                         "files; give one per file")
    index = BaseIndex.from_modules(arch, unet, text_encoders)
    models = {"unet": unet, **dict(zip(("text_encoder", "text_encoder_2"), text_encoders))}
    merged = 0
    for n, file in enumerate(files):
        ratio = float(multipliers[n]) if multipliers else 1.0
        adapter = load_adapter(Path(file))
        table = {name: _module_of(index, models, name) for name in adapter.modules}
        missing = [name for name, module in table.items() if module is None]
        if missing:
            raise UnmatchedModulesError(f"{len(missing)} modules match nothing in the base model (first: {missing[0]}); "
                                        "is it for another architecture?", path=file)
        with torch.no_grad():
            for name, module in adapter.modules.items():
                target = table[name]
                weight = target.weight
                delta = module.delta(weight.detach().float()).reshape(weight.shape) * ratio
                new = weight.float() + delta
                if not torch.isfinite(new).all():
                    raise NonFiniteError(f"merging {name} gives NaN/inf weights", path=file)
                weight.copy_(new.to(weight.dtype))
                bias = module.bias_delta()
                if bias is not None and target.bias is not None:
                    target.bias.add_((bias * ratio).to(target.bias.dtype))
                merged += 1
    return merged
