"""`--base_weights A.safetensors B.safetensors --base_weights_multiplier 1 0.5`: merge LoRAs (any
type `loratools.adapters` reads) into the frozen base before training, as sd-scripts does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loratools.errors import NonFiniteError, UnmatchedModulesError, UsageError
from trainer.network.names import KohyaNamer


def _module_table(arch: str, unet, text_encoders: Sequence) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d module for every weight-bearing leaf of the base model."""
    namer = KohyaNamer(arch, unet.config)
    table: dict[str, nn.Module] = {}
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            try:
                table[namer.unet(path)] = module
            except UsageError:  # no SGM name: no kohya file can address it
                continue
    for i, te in enumerate(text_encoders):
        for path, module in te.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                table[namer.text_encoder(i, path)] = module
    return table


def merge_base_weights(arch: str, unet, text_encoders: Sequence, files: Sequence[str],
                       multipliers: Sequence[float] | None) -> int:
    """Add every module's delta × multiplier to the base weights; returns the modules merged."""
    from loratools.adapters import load_adapter

    multipliers = list(multipliers or [])
    if multipliers and len(multipliers) != len(files):
        raise UsageError(f"--base_weights_multiplier has {len(multipliers)} values for {len(files)} --base_weights "
                         "files; give one per file")
    table = _module_table(arch, unet, text_encoders)
    merged = 0
    for n, file in enumerate(files):
        ratio = float(multipliers[n]) if multipliers else 1.0
        adapter = load_adapter(Path(file))
        missing = [name for name in adapter.modules if name not in table]
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
