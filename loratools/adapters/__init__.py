"""Adapter files -> typed modules with exact weight deltas.

``parse_adapter`` turns any LoRA / LyCORIS / PEFT state dict into ``AdapterModule`` objects keyed by
canonical kohya name; every key no parser consumed is kept verbatim in ``AdapterFile.unknown``.
``describe_header`` does the same grouping from names and shapes alone, for multi-GB files whose
tensors nobody wants to read just to count modules and ranks.

Example:
    >>> f = load_adapter("my_lora.safetensors")
    >>> m = f.modules["lora_unet_input_blocks_4_1_proj_in"]
    >>> m.kind, m.rank, m.scale, m.delta().shape
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loratools.adapters.base import (
    SHARED_SUFFIXES,
    AdapterModule,
    ModuleSummary,
    read_alpha,
    registry,
)
from loratools.adapters.full import FullModule
from loratools.adapters.ia3 import IA3Module
from loratools.adapters.loha import LoHaModule
from loratools.adapters.lokr import LoKrModule
from loratools.adapters.lora import LoRAModule
from loratools.adapters.names import ModuleKeys, group_keys
from loratools.adapters.norm import NormModule
from loratools.errors import InvalidFileError, NonFiniteError

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdapterFile", "AdapterModule", "FullModule", "HeaderSummary", "IA3Module", "LoHaModule",
    "LoKrModule", "LoRAModule", "ModuleSummary", "NormModule", "describe_header",
    "load_adapter", "parse_adapter", "require_modules",
]


@dataclass
class AdapterFile:
    """A parsed adapter file.

    Attributes:
        modules: canonical kohya name -> module.
        unknown: keys no parser consumed, with their tensors, untouched.
        metadata: the file's ``__metadata__`` (str -> str).
        naming: how the file names its modules: "kohya", "lycoris", "peft" (``lora_A``/``lora_B``),
            "diffusers" (``lora.down``/``lora_linear_layer``), "diffusers_legacy" (``to_q_lora``),
            "mixed", or "none" for a file without modules.
        path: where it was read from, if anywhere.
        warnings: what the file stores that loads but is probably not what its author meant
            (a stored alpha of 0: read literally, the module does nothing); callers print them.
    """

    modules: dict[str, AdapterModule]
    unknown: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    naming: str = "kohya"
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


_A = TypeVar("_A")


@dataclass
class HeaderSummary:
    """``describe_header``'s answer: one ``ModuleSummary`` per module, and the unclaimed keys."""

    modules: dict[str, ModuleSummary]
    unknown: list[str]
    naming: str


def _naming(styles: set[str]) -> str:
    if not styles:
        return "none"
    return styles.pop() if len(styles) == 1 else "mixed"


def _type_of(group: ModuleKeys, path: Any) -> type[AdapterModule] | None:
    reg = registry()
    types = {reg[s] for s in group.keys if s in reg}
    if len(types) > 1:
        kinds = ", ".join(sorted(t.kind for t in types))
        raise InvalidFileError(
            f"module {group.source_name} mixes the keys of several adapter types ({kinds}); "
            "the file is not one a known trainer writes", path=path)
    return types.pop() if types else None


def _usable(cls: type[AdapterModule], suffixes: Any) -> list[str]:
    return [s for s in suffixes if s in cls.SUFFIXES or (s == "alpha" and cls.TAKES_ALPHA)
            or (s == "dora_scale" and cls.TAKES_DORA)]


def _groups(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None, path: Any):
    try:
        return group_keys(shapes, metadata)
    except ValueError as exc:
        raise InvalidFileError(str(exc), path=path) from None


def _tensor(tensors: Mapping[str, torch.Tensor], group: ModuleKeys, suffix: str) -> torch.Tensor:
    """The tensor for a kohya suffix, in the shape ``_kohya_shape`` gives (PEFT's DoRA magnitude)."""
    key = group.keys[suffix]
    t = tensors[key]
    shape = _kohya_shape(group, suffix, lambda k: tuple(t.shape) if k == key else _shape_of(tensors, k))
    return t if shape == tuple(t.shape) else t.reshape(shape)


def _kohya_shape(group: ModuleKeys, suffix: str, shape_of: Any) -> tuple[int, ...]:
    """A suffix's shape as the kohya-family types read it; PEFT's DoRA magnitude becomes LyCORIS'
    output-axis form.

    PEFT stores ``lora_magnitude_vector`` as ``(out,)`` for Linear but ``(1, out, 1, 1)`` for Conv2d,
    always per output channel; as ``dora_scale`` that conv shape would read as the input axis.
    """
    key = group.keys[suffix]
    shape = tuple(shape_of(key))
    if suffix == "dora_scale" and key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight")):
        down = group.keys.get("lora_down.weight")
        ndim = len(shape_of(down)) if down is not None else 2
        return (math.prod(shape), *([1] * (ndim - 1)))
    return shape


#: Suffixes that may hold integers or booleans: scalars read as numbers, IA3's axis flag.
_NUMBER_SUFFIXES = frozenset({"alpha", "scale", "on_input"})


def _dtype_name(dtype: Any) -> str:
    from loratools.io.dtypes import from_torch

    try:
        return from_torch(dtype)
    except ValueError:
        return str(dtype).removeprefix("torch.")


def _require_float(group: ModuleKeys, path: Any, dtypes: Mapping[str, str | None]) -> None:
    """Factors are floating point (F16, BF16, F32, F64, F8): no trainer stores a LoRA factor as
    integers, and every maths path (delta, SVD, the alpha written in the factors' dtype) needs floats.
    ``dtypes``: suffix -> safetensors dtype name, None when only shapes are known."""
    for suffix, dtype in dtypes.items():
        if dtype is not None and suffix not in _NUMBER_SUFFIXES and not dtype.startswith(("F", "BF")):
            raise InvalidFileError(f"module {group.source_name}: {suffix} is stored as {dtype}; adapter factors "
                                   "are floating point (F16, BF16, F32); the file is damaged or was not written by "
                                   "a LoRA trainer", path=path)


def _in_module(group: ModuleKeys, path: Any, call: Any) -> Any:
    """Run ``call`` (a type's ``parse``/``describe``); a shape error gets the file and module named."""
    try:
        return call()
    except InvalidFileError as exc:
        if exc.path is not None:
            raise
        message = str(exc)
        if not message.startswith("module "):
            message = f"module {group.source_name}: {message}"
        raise InvalidFileError(message, path=path) from None


def _shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    info = getattr(tensors, "info", None)
    return tuple(info(key).shape) if info is not None else tuple(tensors[key].shape)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes without reading data: ``loratools.io``'s lazy reader answers from its header."""
    return {k: _shape_of(tensors, k) for k in tensors.keys()}


#: What ``parse_adapter`` does with a module whose factors hold NaN or Inf.
NONFINITE_POLICIES = ("keep", "error", "skip")


def parse_adapter(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                  path: str | Path | None = None, nonfinite: str = "keep", nonfinite_fix: str = "") -> AdapterFile:
    """Parse a state dict of any supported adapter format.

    Args:
        tensors: key -> tensor (a dict, or ``loratools.io``'s lazy reader).
        metadata: the file's ``__metadata__``; PEFT alphas come from its ``lora_adapter_metadata``.
        path: only for error messages and ``AdapterFile.path``.
        nonfinite: "keep" reads no tensor data (check weights reports NaN itself); "error" raises
            ``NonFiniteError`` naming the first tensor with NaN/Inf; "skip" leaves such modules out
            (their keys too) with one warning in ``.warnings``. "error" and "skip" read every factor once.
        nonfinite_fix: appended to the "error" message: what the caller's user can do (a flag).
    Returns:
        An ``AdapterFile``; nothing is dropped (except under "skip"): unconsumed keys are in ``.unknown``.
    Raises:
        InvalidFileError: factor shapes that do not fit together, naming the module and shapes.
        NonFiniteError: NaN/Inf with ``nonfinite="error"``.
    Example:
        >>> parse_adapter({"lora_unet_x.lora_down.weight": d, "lora_unet_x.lora_up.weight": u}).modules
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, not {nonfinite!r}")
    groups = _groups(_shapes(tensors), metadata, path)
    modules: dict[str, AdapterModule] = {}
    unknown: dict[str, torch.Tensor] = {k: tensors[k] for k in groups.unclaimed}
    styles: set[str] = set()
    skipped: list[str] = []
    as_numpy = getattr(tensors, "numpy", False) is True
    for name, group in groups.modules.items():
        cls = _type_of(group, path)
        if as_numpy and cls is not LoRAModule:
            raise _TorchNeeded(name)
        used = _usable(cls, group.keys) if cls is not None else []
        parts = {s: _tensor(tensors, group, s) for s in used}
        _require_float(group, path, {s: _dtype_name(t.dtype) for s, t in parts.items()})
        module = _in_module(group, path, lambda: cls.parse(name, parts, source_name=group.source_name,
                                                            alpha=group.alpha)) if cls is not None else None
        scale = _scale_key(cls, group, module.rank if module is not None else None, lambda k: _shape_of(tensors, k))
        if module is not None and scale is not None:
            module = replace(module, scale_override=read_alpha(tensors[scale]))
        if module is not None and nonfinite != "keep":
            bad = _nonfinite_key(group, parts, tensors, scale)
            if bad is not None:
                if nonfinite == "error":
                    where = bad if bad.startswith(group.source_name) else f"{bad} (module {group.source_name})"
                    raise NonFiniteError(f"tensor {where} holds NaN or Inf: the file is broken (`loratools check "
                                         "weights` lists every such tensor)"
                                         + (f"; {nonfinite_fix}" if nonfinite_fix else ""), path=path)
                skipped.append(bad)
                continue
        consumed = set(module.tensors()) if module is not None else set()
        if module is not None and module.scale_override is not None:
            consumed.add("scale")
        for suffix, key in group.keys.items():
            if suffix not in consumed:
                unknown[key] = tensors[key]
        if module is not None:
            modules[name] = module
            styles.add(group.style)
    warnings = alpha_warnings({n: m.alpha for n, m in modules.items() if m.scale_override is None and m.rank})
    if skipped:
        warnings.append(f"skipped {len(skipped)} module(s) whose tensors hold NaN or Inf (first: {skipped[0]}); "
                        "the output leaves them out")
    return AdapterFile(modules=modules, unknown=unknown, metadata=dict(metadata or {}),
                       naming=_naming(styles), path=Path(path) if path is not None else None, warnings=warnings)


def _nonfinite_key(group: ModuleKeys, parts: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                   scale: str | None) -> str | None:
    """The file key of the first tensor of a module that holds NaN or Inf, or None."""
    for suffix, t in parts.items():
        if not _all_finite(t):
            return group.keys[suffix]
    if scale is not None and not _all_finite(tensors[scale]):
        return scale
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction (``aminmax`` propagates NaN and shows Inf as a bound) instead of ``isfinite().all()``."""
    if not hasattr(t, "is_floating_point"):  # a numpy array (resize reads LoRAs without torch)
        from loratools.io.arrays import all_finite

        return all_finite(t)
    import torch

    if t.numel() == 0 or not t.is_floating_point():
        return True
    try:
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # dtypes aminmax lacks on this build (float8)
        return bool(torch.isfinite(t.float()).all())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _scale_key(cls: type[AdapterModule] | None, group: ModuleKeys, rank: int | None,
               shape_of: Callable[[str], tuple[int, ...]]) -> str | None:
    """The file key of A1111's ``<module>.scale`` when it applies, else None.

    A1111 reads it for the alpha-scaled types; a module without a rank (LoKr with both factors
    full) has no alpha to fold it into, and a ``scale`` that is not one number is no scale: such
    keys stay in ``unknown``.
    """
    key = group.keys.get("scale")
    if cls is None or not cls.TAKES_ALPHA or key is None or not rank:
        return None
    return key if math.prod(shape_of(key)) == 1 else None


def alpha_warnings(alphas: Mapping[str, float | None]) -> list[str]:
    """One warning for the modules whose stored alpha is 0 (``name -> alpha``, rank-scaled types).

    kohya substitutes the rank for 0 before saving, so no trainer writes 0; ComfyUI and kohya's
    merge scripts read it literally (scale 0), and so do we (formats-spec 1.4 item 3), but the
    user should know those modules do nothing.
    """
    zero = sorted(n for n, a in alphas.items() if a == 0)
    if not zero:
        return []
    return [f"{len(zero)} module(s) store alpha 0 (first: {zero[0]}): read literally, their scale is 0 and "
            "they change nothing; kohya never writes 0 (it uses the rank), so the file was edited or made "
            "by another tool: set their alpha (e.g. to the rank) if they should act"]


def require_modules(adapter: _A, path: str | Path | None = None) -> _A:
    """``adapter`` itself, or ``InvalidFileError`` when no key belongs to any adapter type: the
    operations that need modules say "not a LoRA" instead of failing later on a side issue
    (an undetectable architecture, an empty report) or writing an empty output.

    ``adapter``: an ``AdapterFile``, or a ``describe_header`` summary (give ``path`` for the message).
    """
    if not adapter.modules:
        where = path if path is not None else getattr(adapter, "path", None)
        if not adapter.unknown:
            raise InvalidFileError("holds no tensors (a header only): not a LoRA", path=where)
        first = next(iter(adapter.unknown), None)
        raise InvalidFileError(
            f"no LoRA/LyCORIS module among its {len(adapter.unknown)} keys (first: {first}): not a LoRA "
            "(a checkpoint?); `loratools metadata show` tells what it is", path=where)
    return adapter


def load_adapter(path: str | Path, *, nonfinite: str = "error", nonfinite_fix: str = "",
                 numpy: bool = False) -> AdapterFile:
    """Read an adapter file (``.safetensors`` lazily, or a pickle, weights only) and parse it.

    Every command that uses the factors goes through here, so a file without modules ("not a
    LoRA"), with factor shapes that do not fit, or (by default) with NaN/Inf factors stops here
    with one message naming the file, module and tensor.

    Args:
        path: the adapter file.
        nonfinite: ``parse_adapter``'s policy: "error" (default), "skip" or "keep".
        nonfinite_fix: what to suggest after a NaN/Inf error (e.g. a flag of the caller's command).
        numpy: hold the tensors as numpy arrays, without importing torch (``resize``), where the
            file allows it: a ``.safetensors`` file of LoRA-family modules whose tensors numpy
            can hold (BF16 as tagged bits, ``io.arrays``; no float8); any other file is read with
            torch as usual.
    Raises:
        InvalidFileError: unreadable, not an adapter, or malformed factors.
        NonFiniteError: NaN/Inf in a factor (with the default policy).
    Example:
        >>> load_adapter("lora.safetensors").naming
        'kohya'
    """
    from loratools.io.checkpoint import open_state_dict
    from loratools.io.reader import numpy_readable, open_safetensors

    if numpy and Path(path).suffix.lower() == ".safetensors":
        sd = open_safetensors(path, numpy=True)
        if numpy_readable(sd.header):
            try:
                return require_modules(parse_adapter(sd, sd.metadata, path=path, nonfinite=nonfinite,
                                                     nonfinite_fix=nonfinite_fix))
            except _TorchNeeded:
                pass
    sd = open_state_dict(path)
    metadata = getattr(sd, "metadata", None) or {}
    return require_modules(parse_adapter(sd, metadata, path=path, nonfinite=nonfinite,
                                         nonfinite_fix=nonfinite_fix))


class _TorchNeeded(Exception):
    """A numpy-read file holds a module whose type needs torch tensors (not LoRA-family)."""


def describe_header(tensor_infos: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                    path: str | Path | None = None) -> HeaderSummary:
    """Module kinds, ranks and weight shapes from a header alone (no tensor data read).

    Args:
        tensor_infos: key -> shape tuple, or an object with ``.shape`` (``loratools.io`` ``TensorInfo``).
        metadata: the file's ``__metadata__`` (PEFT alphas live there).
        path: only for error messages.
    Returns:
        A ``HeaderSummary``; ``ModuleSummary.alpha_key`` names the alpha scalar to read if wanted.
    Raises:
        InvalidFileError: factor shapes that do not fit together (the same check as ``parse_adapter``).
    Example:
        >>> describe_header(read_header(p).tensors, read_header(p).metadata).modules
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in tensor_infos.items()}
    groups = _groups(shapes, metadata, path)
    modules: dict[str, ModuleSummary] = {}
    unknown = list(groups.unclaimed)
    styles: set[str] = set()
    for name, group in groups.modules.items():
        cls = _type_of(group, path)
        used = _usable(cls, group.keys) if cls is not None else []
        parts = {s: _kohya_shape(group, s, shapes.__getitem__) for s in used}
        _require_float(group, path, {s: getattr(tensor_infos[group.keys[s]], "dtype", None) for s in used})
        described = _in_module(group, path, lambda: cls.describe(parts)) if cls is not None else None
        if cls is None or described is None:
            unknown.extend(group.keys.values())
            continue
        rank, weight_shape = described
        scale_key = _scale_key(cls, group, rank, shapes.__getitem__)
        unknown.extend(k for s, k in group.keys.items() if s not in used and k != scale_key)
        if cls is LoKrModule and rank is None:
            alpha_key = None  # both factors full: alpha is ignored (scale 1)
        else:
            alpha_key = group.keys.get("alpha") if cls.TAKES_ALPHA else None
        modules[name] = ModuleSummary(
            name=name, source_name=group.source_name, kind=cls.kind, rank=rank, weight_shape=weight_shape,
            factor_shapes={s: shapes[group.keys[s]] for s in used if s not in SHARED_SUFFIXES},
            alpha_key=alpha_key if group.alpha is None else None, alpha=group.alpha,
            dora="dora_scale" in used, scale_key=scale_key)
        styles.add(group.style)
    return HeaderSummary(modules=modules, unknown=unknown, naming=_naming(styles))
