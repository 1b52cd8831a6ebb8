"""Opt-in speed and memory features of the frozen UNet: fp8 weight storage and regional compilation.

`--fp8_base` / `--fp8_base_unet` (sd-scripts' flags): the frozen Linear and Conv2d weights are
stored in float8 (e4m3), half of bf16's memory; under autocast every such layer casts its weight
to the compute dtype on the fly, so the maths is bf16/fp16 with fp8-rounded base weights. Norms,
biases and embeddings keep the compute dtype (they are small, and embeddings have no fp8 kernel).

`--torch_compile` (sd-scripts' flag, with `--dynamo_backend`): each transformer block of
the UNet is compiled separately (regional compilation). Blocks of one kind share their compiled
code, so compilation takes seconds per distinct block shape instead of minutes for the whole
UNet, and a compiled block runs as a few fused kernels and one autograd node instead of dozens:
what matters when a step is bound by the host. The network's adapters are inside the blocks and
are compiled with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loratools.errors import UsageError

#: diffusers block classes compiled by `--torch_compile`.
COMPILED_BLOCKS = ("BasicTransformerBlock",)


def store_fp8(model: nn.Module, session: Any) -> int:
    """Store the weights of `model`'s Linear/Conv2d layers in float8_e4m3fn; returns how many."""
    if session.weight_dtype == torch.float32:
        raise UsageError("--fp8_base needs --mixed_precision bf16 or fp16 (the fp8 weights are cast to it "
                         "layer by layer under autocast)")
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.is_floating_point():
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
            count += 1
    return count


def compile_blocks(unet: nn.Module, cfg: Any, session: Any) -> int:
    """`torch.compile` every transformer/ResNet block of `unet` in place; returns how many."""
    backend = (cfg.dynamo_backend or "inductor").lower()
    if backend == "no":
        return 0
    count = 0
    for module in unet.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(backend=backend, dynamic=None)
            count += 1
    session.say(f"--torch_compile: {count} UNet blocks compiled with {backend} (the first steps of each "
                "resolution include the compilation)")
    return count
