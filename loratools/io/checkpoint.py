"""Open any model or adapter the user points at: a safetensors file, a pickle checkpoint, or a
diffusers folder, always as ``Mapping[str, Tensor]`` so operations never care which.

Pickle checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) are loaded only with
``torch.load(weights_only=True)``: a file that needs arbitrary pickle code to load is refused with an
explanation instead of being allowed to run that code.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import InvalidFileError
from loratools.io.header import directory_hint
from loratools.io.reader import SafetensorsReader, open_safetensors

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Diffusers components we know, and the weight file names each may use (first match wins).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
_STEMS = ("diffusion_pytorch_model", "model")


def open_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """One file's tensors: lazy for ``.safetensors``, loaded (weights only) for pickle formats.

    Args:
        path: ``.safetensors``, ``.ckpt``, ``.pt``, ``.pth`` or ``.bin`` file.
    Returns:
        Mapping of key to tensor (a ``{"state_dict": ...}`` wrapper is removed; non-tensor
        entries such as ``global_step`` are dropped).
    Raises:
        InvalidFileError: missing, malformed, or needing pickle code to load.
    Example:
        >>> sd = open_state_dict("v1-5-pruned-emaonly.ckpt"); len(sd)
    """
    p = Path(path)
    if p.is_dir():
        raise InvalidFileError(f"is a directory; {directory_hint(p)}", path=p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(p)
    return open_safetensors(p)


def _unpickler_detail(message: str) -> str:
    """The one useful line of torch's long weights_only error."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, re.S)
    text = m.group(1) if m else (message.strip().splitlines() or ["unpickling failed"])[0]
    return " ".join(text.split())[:200]


def _load_pickle(p: Path) -> dict[str, torch.Tensor]:
    import torch

    if not p.exists():
        raise InvalidFileError("file not found", path=p)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol UserWarning would break the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "Unsupported global" in detail:
            what = re.search(r"GLOBAL (\S+)", detail)
            raise InvalidFileError(
                "refusing to load: this checkpoint needs pickle code to load "
                f"({what.group(1) if what else 'a non-tensor object'}), which could run code from the file; "
                "convert it to .safetensors with a tool you trust", path=p) from None
        raise InvalidFileError(f"not a readable PyTorch checkpoint ({detail}): loratools reads pickles only with "
                               "torch's safe loader (tensors and plain containers); convert it to .safetensors "
                               "with a tool you trust", path=p) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InvalidFileError(f"not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})", path=p) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InvalidFileError(f"checkpoint holds a {type(obj).__name__}, not a state dict", path=p)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class _Shards(Mapping[str, "torch.Tensor"]):
    """Several safetensors shards of one component seen as one lazy Mapping."""

    def __init__(self, readers: list[SafetensorsReader]) -> None:
        self._where: dict[str, SafetensorsReader] = {}
        for r in readers:
            for k in r:
                self._where[k] = r
        self.readers = readers

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def key_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.info(k).shape for k, r in self._where.items()}

    def release(self, key: str) -> None:
        """``SafetensorsReader.release`` on the shard holding ``key``."""
        self._where[key].release(key)


def release_pages(sd: Mapping[str, torch.Tensor], key: str) -> None:
    """Drop ``key``'s pages from the process when ``sd`` is a mapped file (a no-op for in-memory dicts).

    Streaming operations (merge, resize's base norms) call it once they are done with a base
    tensor, so reading a whole 7 GB checkpoint never shows as 7 GB resident.
    """
    release = getattr(sd, "release", None)
    if release is not None:
        release(key)


@dataclass
class ModelSource:
    """A base model, whatever its layout.

    ``layout`` is ``"single_file"`` (``components == {"": sd}``) or ``"diffusers"``
    (``{"unet": ..., "text_encoder": ..., "text_encoder_2": ..., "vae": ...}``, those present).
    ``files`` lists the weight files per component (for messages and ``protected``).
    """

    path: Path
    layout: str
    components: dict[str, Mapping[str, torch.Tensor]]
    files: dict[str, list[Path]] = field(default_factory=dict)

    def key_shapes(self, component: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of every key of a component, from headers when possible (no tensor data read)."""
        sd = self.components[component]
        if isinstance(sd, (SafetensorsReader, _Shards)):
            return sd.key_shapes()
        return {k: tuple(v.shape) for k, v in sd.items()}

    def all_files(self) -> list[Path]:
        return [f for fs in self.files.values() for f in fs]


def open_model(path: str | Path, *, variant: str | None = None) -> ModelSource:
    """Open a single-file checkpoint or a diffusers folder lazily.

    Args:
        path: a ``.safetensors``/``.ckpt`` file, or a diffusers folder (``unet/``, ``text_encoder/``...).
        variant: prefer ``<stem>.<variant>.safetensors`` (e.g. ``"fp16"``) in a diffusers folder;
            without it the plain file is preferred and a variant file is used when it is the only one.
    Returns:
        ``ModelSource``.
    Raises:
        InvalidFileError: missing path, or a folder with no recognisable weights.
    Example:
        >>> open_model("models/sdxl-base").components["unet"]
    """
    p = Path(path)
    if not p.exists():
        raise InvalidFileError("not found", path=p)
    if not p.is_dir():
        return ModelSource(p, "single_file", {"": open_state_dict(p)}, {"": [p]})
    components: dict[str, Mapping[str, torch.Tensor]] = {}
    files: dict[str, list[Path]] = {}
    for comp in COMPONENTS:
        folder = p / comp
        if folder.is_dir():
            found = _component_files(folder, variant)
            if found:
                files[comp] = found
                components[comp] = _open_component(found)
    if not components:
        raise InvalidFileError(
            "folder has no diffusers weights (expected unet/, text_encoder/, vae/ with "
            "diffusion_pytorch_model.safetensors or model.safetensors); pass a checkpoint file instead", path=p)
    return ModelSource(p, "diffusers", components, files)


def _component_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight files of one component, preferring safetensors, then the requested variant."""
    variants = [variant, None] if variant else [None, "fp16"]
    for ext in ("safetensors", "bin"):
        for var in variants:
            for stem in _STEMS:
                name = f"{stem}.{var}.{ext}" if var else f"{stem}.{ext}"
                if (folder / name).is_file():
                    return [folder / name]
                index = folder / f"{name}.index.json"
                if index.is_file():
                    return _shard_files(index)
    return []


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / f for f in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidFileError("sharded-weights index is not valid JSON with a weight_map", path=index) from None


def _open_component(found: list[Path]) -> Mapping[str, torch.Tensor]:
    if len(found) == 1:
        return open_state_dict(found[0])
    if all(f.suffix == ".safetensors" for f in found):
        return _Shards([open_safetensors(f) for f in found])
    merged: dict[str, torch.Tensor] = {}
    for f in found:
        merged.update(open_state_dict(f))
    return merged
