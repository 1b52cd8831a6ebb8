"""Output file names (elias-gaeros' convention, spec A1) and output tensor keys per naming."""

from __future__ import annotations

import math
from pathlib import Path

from loratools.ops.resize.recipe import Recipe, fmt


def output_name(stem: str, recipe: Recipe, threshold: float | None, *, kohya_compat: bool = False) -> str:
    """``<stem>_<recipe>_th<threshold>.safetensors`` for score recipes (elias' names, so scripts
    written for resize_lora keep working), ``<stem>_<recipe>.safetensors`` for kohya methods
    (``_kc`` marks ``--kohya-compat`` ranks). ``threshold`` is the one reached (``-inf``: all kept).

    Example:
        >>> output_name("mylora", parse_recipe("fro_ckpt=1,thr=-3.5"), -3.5)
        'mylora_frockpt1_th-3.5.safetensors'
    """
    if recipe.uses_scores:
        thr = -math.inf if threshold is None else threshold
        return f"{stem}_{recipe.stem()}_th{fmt(thr)}.safetensors"
    return f"{stem}_{recipe.stem()}{'_kc' if kohya_compat else ''}.safetensors"


def output_path(lora: Path, recipe: Recipe, threshold: float | None, *, output: Path | None,
                kohya_compat: bool = False) -> Path:
    """Where one recipe's result goes: ``output`` itself when it names a ``.safetensors`` file,
    else ``output`` (or the LoRA's own folder) joined with ``output_name``."""
    if output is not None and output.suffix.lower() == ".safetensors":
        return output
    folder = output if output is not None else lora.parent
    return folder / output_name(lora.stem, recipe, threshold, kohya_compat=kohya_compat)


#: Output factor suffixes: every output is written with kohya keys, whatever the input's naming.
KOHYA_SUFFIXES = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha", "dora_scale": "dora_scale"}


def factor_keys(name: str) -> dict[str, str]:
    """Tensor keys of one resized LoRA layer written as module ``name`` (the kohya name
    ``loratools.keys.resolve.output_names`` chose)."""
    return {part: f"{name}.{suffix}" for part, suffix in KOHYA_SUFFIXES.items()}
