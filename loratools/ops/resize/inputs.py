"""Which command-line paths are the base checkpoint and which are LoRAs.

elias' command is ``resize_lora.py CHECKPOINT LORA...``; ours takes the same files in any order
and tells them apart by content: a safetensors file whose keys are a checkpoint's
(``model.diffusion_model.*``, ``conditioner.embedders.*``, ``cond_stage_model.*``), a ``.ckpt``
file, or a diffusers folder is the base; everything else is a LoRA. Folders of LoRAs and globs
expand to their ``.safetensors`` files, sorted. Paths are never split, so spaces, commas and
drive letters are safe.
"""

from __future__ import annotations

import glob
from pathlib import Path

from loratools.errors import InvalidFileError, UsageError

_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.", "cond_stage_model.",
                        "first_stage_model.")


def is_checkpoint(path: Path) -> bool:
    """True for a base model: a diffusers folder, a ``.ckpt``, or a checkpoint-keyed safetensors file."""
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    if path.suffix.lower() == ".ckpt":
        return True
    if path.suffix.lower() != ".safetensors":
        return False
    from loratools.io import read_header

    return any(k.startswith(_CHECKPOINT_PREFIXES) for k in read_header(path).tensors)


def _already_resized(path: Path) -> bool:
    from loratools.io import read_header

    return '"operation": "resize"' in read_header(path).metadata.get("loratools", "")


def resolve_inputs(paths: list[str], base: str | None = None) -> tuple[Path | None, list[Path], list[Path]]:
    """``(base, loras, skipped)``: skipped are earlier resize outputs found in folders and globs (a file
    named on its own is resized whatever it is), so running the same command twice never resizes its
    own outputs.

    Raises:
        UsageError: no LoRA, two base checkpoints, or a glob that matches nothing.
        InvalidFileError: a path that does not exist.
    """
    found_base = Path(base) if base is not None else None
    if found_base is not None and not found_base.exists():
        raise InvalidFileError("base checkpoint not found", path=found_base)
    loras: list[Path] = []
    skipped: list[Path] = []
    for text in paths:
        p = Path(text)
        if not p.exists() and any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text))
            if not matches:
                raise UsageError(f"no file matches {text!r}")
            for m in matches:
                if m.is_file():
                    (skipped if _already_resized(m) else loras).append(m)
            continue
        if not p.exists():
            raise InvalidFileError("file not found", path=p)
        if is_checkpoint(p):
            if found_base is not None and found_base.resolve() != p.resolve():
                what = "--base is given" if base is not None else f"{found_base} is one already"
                raise UsageError(f"{p} is a base checkpoint but {what}; give one base checkpoint", path=p)
            found_base = p
        elif p.is_dir():
            for f in sorted(p.glob("*.safetensors")):
                (skipped if _already_resized(f) else loras).append(f)
        else:
            loras.append(p)
    unique = list(dict.fromkeys(loras))
    if not unique:
        raise UsageError("no LoRA file given (pass LoRA files, folders or globs after the base checkpoint)")
    return found_base, unique, skipped
