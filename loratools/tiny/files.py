"""Write tiny pipelines to disk as diffusers folders or single-file checkpoints, and load them back.

Single files use the original LDM (SD1/SD2) / SGM (SDXL) layout produced by
``loratools.keys.state_dict``, the same converter the tools use to read checkpoints, so a test
that round-trips through a tiny single file exercises the real conversion code. Loading a single
file back with diffusers' own ``from_single_file`` needs a local ``config=`` folder (a diffusers
folder of the same model) because nothing may come from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


def _prepare(pipe: DiffusionPipeline) -> DiffusionPipeline:
    import torch

    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers(pipe: DiffusionPipeline, directory: str | Path) -> Path:
    """Write ``pipe`` as a diffusers folder (safetensors weights, configs, tokenizer files)."""
    from loratools.tiny.tokenizer import write_tokenizer_files

    directory = Path(directory)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; released SD folders also carry vocab.json and
    # merges.txt, which older loaders and tools read, so write them as well.
    for name in ("tokenizer", "tokenizer_2"):
        if (directory / name).is_dir():
            write_tokenizer_files(directory / name)
    return directory


def load_diffusers(directory: str | Path) -> DiffusionPipeline:
    """Load a diffusers folder written by ``save_diffusers`` (local files only, eval mode)."""
    from diffusers import DiffusionPipeline

    return _prepare(DiffusionPipeline.from_pretrained(str(directory), local_files_only=True))
