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

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from loratools.errors import InvalidFileError

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
    """The tensor for a kohya suffix; PEFT's DoRA magnitude is reshaped to LyCORIS' output-axis form.

    PEFT stores ``lora_magnitude_vector`` as ``(out,)`` for Linear but ``(1, out, 1, 1)`` for Conv2d,
    always per output channel; as ``dora_scale`` that conv shape would read as the input axis.
    """
    key = group.keys[suffix]
    t = tensors[key]
    if suffix == "dora_scale" and key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight")):
        down = group.keys.get("lora_down.weight")
        ndim = len(_shape_of(tensors, down)) if down is not None else 2
        t = t.reshape(-1, *([1] * (ndim - 1)))
    return t


def _shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    info = getattr(tensors, "info", None)
    return tuple(info(key).shape) if info is not None else tuple(tensors[key].shape)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes without reading data: ``loratools.io``'s lazy reader answers from its header."""
    return {k: _shape_of(tensors, k) for k in tensors.keys()}


def parse_adapter(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                  path: str | Path | None = None) -> AdapterFile:
    """Parse a state dict of any supported adapter format.

    Args:
        tensors: key -> tensor (a dict, or ``loratools.io``'s lazy reader).
        metadata: the file's ``__metadata__``; PEFT alphas come from its ``lora_adapter_metadata``.
        path: only for error messages and ``AdapterFile.path``.
    Returns:
        An ``AdapterFile``; nothing is dropped: unconsumed keys are in ``.unknown``.
    Example:
        >>> parse_adapter({"lora_unet_x.lora_down.weight": d, "lora_unet_x.lora_up.weight": u}).modules
    """
    groups = _groups(_shapes(tensors), metadata, path)
    modules: dict[str, AdapterModule] = {}
    unknown: dict[str, torch.Tensor] = {k: tensors[k] for k in groups.unclaimed}
    styles: set[str] = set()
    for name, group in groups.modules.items():
        cls = _type_of(group, path)
        used = _usable(cls, group.keys) if cls is not None else []
        module = cls.parse(name, {s: _tensor(tensors, group, s) for s in used}, source_name=group.source_name,
                           alpha=group.alpha) if cls is not None else None
        if module is not None and _takes_scale(cls, group, module.rank):
            module = replace(module, scale_override=read_alpha(tensors[group.keys["scale"]]))
        consumed = set(module.tensors()) if module is not None else set()
        if module is not None and module.scale_override is not None:
            consumed.add("scale")
        for suffix, key in group.keys.items():
            if suffix not in consumed:
                unknown[key] = tensors[key]
        if module is not None:
            modules[name] = module
            styles.add(group.style)
    return AdapterFile(modules=modules, unknown=unknown, metadata=dict(metadata or {}),
                       naming=_naming(styles), path=Path(path) if path is not None else None,
                       warnings=alpha_warnings({n: m.alpha for n, m in modules.items()
                                                if m.scale_override is None and m.rank}))


def _takes_scale(cls: type[AdapterModule] | None, group: ModuleKeys, rank: int | None) -> bool:
    """A1111 reads ``<module>.scale`` for the alpha-scaled types; a module without a rank (LoKr with
    both factors full) has no alpha to fold it into, so its ``scale`` key stays in ``unknown``."""
    return cls is not None and cls.TAKES_ALPHA and "scale" in group.keys and bool(rank)


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


def require_modules(adapter: AdapterFile) -> AdapterFile:
    """``adapter`` itself, or ``InvalidFileError`` when no key belongs to any adapter type: the
    operations that need modules say "not an adapter" instead of failing later on a side issue
    (an undetectable architecture, an empty report)."""
    if not adapter.modules:
        first = next(iter(adapter.unknown), None)
        raise InvalidFileError(
            f"no LoRA/LyCORIS module among its {len(adapter.unknown)} keys"
            + (f" (first: {first})" if first else "")
            + ": not an adapter file (a checkpoint?); `loratools metadata show` tells what it is",
            path=adapter.path)
    return adapter


def load_adapter(path: str | Path) -> AdapterFile:
    """Read an adapter file (``.safetensors`` lazily, or a pickle) and parse it.

    Example:
        >>> load_adapter("lora.safetensors").naming
        'kohya'
    """
    from loratools.io.checkpoint import open_state_dict

    sd = open_state_dict(path)
    metadata = getattr(sd, "metadata", None) or {}
    return parse_adapter(sd, metadata, path=path)


def describe_header(tensor_infos: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> HeaderSummary:
    """Module kinds, ranks and weight shapes from a header alone (no tensor data read).

    Args:
        tensor_infos: key -> shape tuple, or an object with ``.shape`` (``loratools.io`` ``TensorInfo``).
        metadata: the file's ``__metadata__`` (PEFT alphas live there).
    Returns:
        A ``HeaderSummary``; ``ModuleSummary.alpha_key`` names the alpha scalar to read if wanted.
    Example:
        >>> describe_header(read_header(p).tensors, read_header(p).metadata).modules
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in tensor_infos.items()}
    groups = _groups(shapes, metadata, None)
    modules: dict[str, ModuleSummary] = {}
    unknown = list(groups.unclaimed)
    styles: set[str] = set()
    for name, group in groups.modules.items():
        cls = _type_of(group, None)
        used = _usable(cls, group.keys) if cls is not None else []
        described = cls.describe({s: shapes[group.keys[s]] for s in used}) if cls is not None else None
        if cls is None or described is None:
            unknown.extend(group.keys.values())
            continue
        rank, weight_shape = described
        scale_key = group.keys["scale"] if _takes_scale(cls, group, rank) else None
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
