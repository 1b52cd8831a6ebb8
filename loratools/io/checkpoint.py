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
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import InvalidFileError
from loratools.io.header import directory_hint
from loratools.io.paths import missing_reason, os_problem
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


def _load_pickle(p: Path) -> dict[str, torch.Tensor]:
    import torch

    if not p.is_file():
        raise InvalidFileError(missing_reason(p) if not p.exists() else "is not a regular file", path=p)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol UserWarning would break the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as exc:
        raise _refusal(p, str(exc)) from None
    except OSError as exc:
        raise InvalidFileError(f"cannot read the checkpoint ({os_problem(exc, p)})", path=p) from None
    except (RuntimeError, EOFError, ValueError, AttributeError, ImportError, TypeError, KeyError,
            IndexError, struct.error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidFileError(f"not a readable PyTorch checkpoint ({first[:200]}); the file is truncated or "
                               "damaged", path=p) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InvalidFileError(f"checkpoint holds a {type(obj).__name__}, not a state dict", path=p)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _refusal(p: Path, torch_message: str) -> InvalidFileError:
    """Why torch's safe loader refused ``p``, said plainly: the code the file would run, by name.

    torch's own message suggests re-running with ``weights_only=False``, which is exactly what
    must not be done with a file from the internet; the import it refused is what the user needs.
    """
    globals_ = [g for g in pickle_globals(p) if not g.startswith(_TENSOR_GLOBALS)]
    named = re.search(r"GLOBAL ([\w.]+)", torch_message)
    if not globals_ and named:
        globals_ = [named.group(1)]
    if globals_:
        shown = ", ".join(globals_[:3]) + (f" and {len(globals_) - 3} more" if len(globals_) > 3 else "")
        return InvalidFileError(
            f"refused: loading this checkpoint would run code from it ({shown}); nothing was run. loratools "
            "loads pickles only as plain tensors. To use it safely, get a .safetensors version from its author, "
            "or, if you trust where it came from, convert it inside a throwaway container or VM", path=p)
    reason = " ".join(torch_message.split("WeightsUnpickler error:")[-1].split()).split(" Check the ")[0]
    return InvalidFileError(f"not a readable PyTorch checkpoint ({reason[:160]}); the file is damaged or not a "
                            "checkpoint (nothing in it was run)", path=p)


#: Globals that torch's safe loader itself uses to rebuild tensors; anything else is worth naming.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.dict",
                   "builtins.list", "builtins.tuple")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING"}


def pickle_globals(path: str | Path, limit: int = 50) -> list[str]:
    """The ``module.name`` globals a pickle (or a torch zip's ``data.pkl``) imports, read without unpickling.

    ``pickletools.genops`` only decodes opcodes; nothing in the file is imported or called. Used to
    name what a refused checkpoint would have run. Unreadable streams give what was read so far.
    """
    import pickletools

    found: list[str] = []
    try:
        data = _pickle_bytes(Path(path))
    except (OSError, zipfile.BadZipFile, KeyError):
        return found
    strings: list[str] = []
    memo: dict[int, str] = {}
    pos = 0
    try:
        while pos < len(data) and len(found) < limit:  # torch's legacy format: several pickles in a row
            for op, arg, at in pickletools.genops(data[pos:]):
                name = op.name
                if name in _STRING_OPS:
                    strings.append(str(arg))
                elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
                elif name in ("GLOBAL", "INST"):
                    found.append(_py3(*str(arg).split(" ", 1)))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(_py3(strings[-2], strings[-1]))
                elif name == "STOP":
                    pos += at + 1
                    break
            else:
                break
    except Exception:  # noqa: BLE001 - a damaged stream ends the scan; what was found is still true
        pass
    return list(dict.fromkeys(found))


def _py3(module: str, name: str = "") -> str:
    """``module.name`` as Python 3 spells it (protocol-2 pickles say ``__builtin__``)."""
    return f"{'builtins' if module == '__builtin__' else module}.{name}" if name else module


def _pickle_bytes(p: Path) -> bytes:
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return zf.read(member) if member is not None else b""
    with open(p, "rb") as fh:
        return fh.read(64 << 20)  # the pickles lead a legacy file; the storages that follow are not needed


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
        raise InvalidFileError(missing_reason(p), path=p)
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
