"""Which command-line paths are the base checkpoint and which are LoRAs.

elias' command is ``resize_lora.py CHECKPOINT LORA...``; ours takes the same files in any order
and tells them apart by content: a file (safetensors or pickle) whose keys are a checkpoint's
(``model.diffusion_model.*``, ``conditioner.embedders.*``, ``cond_stage_model.*``) or a diffusers
folder is the base; everything else is a LoRA. Folders of LoRAs and globs
expand to their ``.safetensors`` files, sorted. Paths are never split, so spaces, commas and
drive letters are safe.
"""

from __future__ import annotations

import glob
from pathlib import Path

from loratools.errors import InvalidFileError, UsageError
from loratools.io.paths import missing_reason

_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.", "cond_stage_model.",
                        "first_stage_model.")


def is_checkpoint(path: Path) -> bool:
    """True for a base model: a diffusers folder, or a file (safetensors or pickle) with a checkpoint's keys.

    A ``.ckpt``/``.pt`` LoRA (older trainers saved those) is a LoRA like any other: pickles are
    read with torch's safe loader, memory-mapped when they are zip files (the usual format), so
    telling them apart costs the key list, not the tensors.
    """
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    from loratools.io.checkpoint import PICKLE_SUFFIXES, open_state_dict

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return any(k.startswith(_CHECKPOINT_PREFIXES) for k in open_state_dict(path))
    if path.suffix.lower() != ".safetensors":
        return False
    from loratools.io import read_header

    return any(k.startswith(_CHECKPOINT_PREFIXES) for k in read_header(path).tensors)


def _outputs_of_others(loras: list[Path]) -> list[Path]:
    """The inputs that are earlier resize outputs of another input in the same folder (by the source
    file name in their provenance metadata): a shell glob names them one by one, and resizing them
    again is never what was meant. An output named without its source is still resized."""
    given = {(p.resolve().parent, p.name) for p in loras}
    out = []
    for p in loras:
        provenance = _resize_provenance(p)
        source = (provenance or {}).get("source")
        if isinstance(source, dict) and (p.resolve().parent, source.get("file")) in given:
            out.append(p)
    return out


def _resize_provenance(path: Path) -> dict | None:
    """The ``loratools`` metadata of an earlier resize output ({} when it is not valid JSON), or
    None for any other file."""
    import json

    from loratools.io import read_header

    if path.suffix.lower() != ".safetensors":  # we write only safetensors; a .ckpt is never our output
        return None
    text = read_header(path).metadata.get("loratools", "")
    if '"operation": "resize"' not in text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _already_resized(path: Path) -> bool:
    return _resize_provenance(path) is not None


def resolve_inputs(paths: list[str], base: str | None = None) -> tuple[Path | None, list[Path], list[Path]]:
    """``(base, loras, skipped)``: skipped are earlier resize outputs found in folders and globs, or
    named together with the file they came from (a shell's ``*.safetensors``); a resize output named
    on its own is resized like any LoRA. So running the same command twice never resizes its own
    outputs.

    Raises:
        UsageError: no LoRA, two base checkpoints, or a glob that matches nothing.
        InvalidFileError: a path that does not exist.
    """
    found_base = Path(base) if base is not None else None
    if found_base is not None and not found_base.exists():
        raise InvalidFileError(f"base checkpoint: {missing_reason(found_base)}", path=found_base)
    loras: list[Path] = []
    skipped: list[Path] = []
    given: list[str] = []  # what each non-LoRA input was, for the "no LoRA" message

    def take(found: list[Path], what: str, none: str) -> None:
        done = [f for f in found if _already_resized(f)]
        skipped.extend(done)
        loras.extend(f for f in found if f not in done)
        if not found:
            given.append(f"{what} {none}")
        elif len(done) == len(found):
            given.append(f"{what} holds only earlier resize outputs ({len(done)})")

    for text in paths:
        p = Path(text)
        if not p.exists() and any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text))
            if not matches:
                raise UsageError(f"no file matches {text!r}")
            take([m for m in matches if m.is_file()], f"glob {text!r}", "matches only folders")
            continue
        if not p.exists():
            raise InvalidFileError(missing_reason(p), path=p)
        if is_checkpoint(p):
            if found_base is not None and found_base.resolve() != p.resolve():
                what = "--base is given" if base is not None else f"{found_base} is one already"
                raise UsageError(f"{p} is a base checkpoint but {what}; give one base checkpoint", path=p)
            found_base = p
            given.append(f"{p} is a base checkpoint")
        elif p.is_dir():
            take(sorted(p.glob("*.safetensors")), f"folder {p}", "holds no .safetensors file")
        else:
            loras.append(p)
    unique = list(dict.fromkeys(loras))
    derived = _outputs_of_others(unique)  # `resize ... *.safetensors` run twice: the shell named our outputs
    skipped.extend(derived)
    unique = [p for p in unique if p not in derived]
    if not unique:
        raise UsageError("no LoRA file to resize: " + ("; ".join(given) or "none given")
                         + " (pass LoRA files, folders or globs after the base checkpoint)")
    return found_base, unique, skipped
