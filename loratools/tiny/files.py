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


def _arch_of(pipe: DiffusionPipeline) -> str:
    """The tiny architecture a pipeline was built as (SD2 differs from SD1 by linear projections)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.unet.config.use_linear_projection else "sd1"


def save_single_file(pipe: DiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None,
                     *, arch: str | None = None) -> Path:
    """Write ``pipe`` as one LDM (SD1/SD2) or SGM (SDXL) ``.safetensors`` checkpoint.

    Args:
        pipe: a tiny pipeline (or any SD pipeline small enough to hold in memory).
        path: output file; refused if it exists (``loratools.io`` writer).
        dtype: tensor dtype in the file (default float32).
        arch: "sd1", "sd2" or "sdxl"; inferred from the pipeline when omitted.

    Example:
        >>> save_single_file(build_pipeline("sdxl"), tmp_path / "tiny-xl.safetensors", torch.float16)
    """
    import torch

    from loratools.io.writer import save_tensors
    from loratools.keys.state_dict import to_single_file
    from loratools.keys.unet_blocks import UNetBlockTable

    arch = arch or _arch_of(pipe)
    dtype = torch.float32 if dtype is None else dtype
    components = {name: getattr(pipe, name).state_dict()
                  for name in ("unet", "text_encoder", "text_encoder_2", "vae")
                  if getattr(pipe, name, None) is not None}
    state_dict = to_single_file(components, arch, unet_table=UNetBlockTable.from_config(pipe.unet.config))
    tensors = {k: v.to(dtype).contiguous() for k, v in state_dict.items()}
    save_tensors(Path(path), tensors)
    return Path(path)


def load_single_file(path: str | Path, arch: str, seed: int = 0) -> DiffusionPipeline:
    """Load a tiny single-file checkpoint through ``loratools.io`` + ``loratools.keys`` into a
    tiny pipeline skeleton of ``arch`` (every weight is replaced; ``seed`` only shapes the skeleton).

    Raises:
        InvalidFileError: the file lacks weights the tiny model needs, or has extra ones.
    """
    from loratools.errors import InvalidFileError
    from loratools.io.checkpoint import open_state_dict
    from loratools.keys.state_dict import align_text_model_level, from_single_file
    from loratools.tiny.models import build_pipeline

    pipe = build_pipeline(arch, seed=seed)
    split = from_single_file(open_state_dict(path))
    for name, state_dict in split.components.items():
        model = getattr(pipe, name)
        if name.startswith("text_encoder"):
            state_dict = align_text_model_level(state_dict, model.state_dict().keys())
        result = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise InvalidFileError(f"{name} weights do not fit the tiny {arch} model: missing "
                                   f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
                                   path=path)
    return pipe
