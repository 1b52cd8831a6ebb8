"""Rename an adapter between kohya and diffusers/PEFT naming, numerically unchanged.

kohya output uses the most compatible names (formats-spec 5.5): SD1/SD2 ``lora_unet_`` +
diffusers-style UNet path and ``lora_te_``; SDXL ``lora_unet_`` + SGM path and
``lora_te1_``/``lora_te2_`` (q/k/v separate). Every adapter type carries over, tensors unchanged;
a LoRA without alpha gets ``alpha = rank`` written out (the same scale, stated explicitly).

PEFT output (``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder[_2].text_model....``) holds
LoRA only, and PEFT has no per-module alpha: the scale ``alpha / rank`` is folded into the
factors (split between both, exactly for power-of-two scales, see ``_split_scale``), and no ``lora_adapter_metadata`` is
written, so diffusers uses alpha = rank (scale 1), exactly as it does for any PEFT file without
that metadata. Tucker LoCon folds its core into ``lora_A`` (same rank, exact). DoRA and the
LyCORIS types have no diffusers/PEFT form and are refused with the fix.

Metadata is carried over, except ``lora_adapter_metadata`` (its alphas are now in the tensors)
and ``sshs_*`` hashes (recomputed for kohya output, dropped for PEFT output).

Module names are resolved through the one vocabulary (``loratools.keys``): against ``--base`` when
given, else against the released model of the architecture, where a name spelled by its SGM path
must also fit the released shapes (a tiny or custom-layout model uses the same words for other
blocks). A module that cannot be resolved is an error naming it, never a silent guess.

PEFT output is for diffusers/PEFT users: ComfyUI does not map PEFT UNet attention keys and A1111
no dotted key at all (``loratools check keys --loader``), so the run says so in a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import UnmatchedModulesError, UsageError
from loratools.io.dtypes import parse_dtype_name

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile, AdapterModule
    from loratools.keys.index import BaseIndex

TARGETS: tuple[str, ...] = ("kohya", "peft")
#: Said when PEFT names are written (help text and one warning per run).
PEFT_LOADERS_NOTE = ("PEFT names load in diffusers/PEFT only: ComfyUI skips their UNet attention keys and A1111 "
                     "every key; use --to kohya for files that must load everywhere")

# UNet modules outside the down/mid/up blocks (formats-spec 7.2, 7.3)
_OUTSIDE_BLOCKS = ("conv_in", "conv_out", "conv_norm_out", "time_embedding.", "add_embedding.")
_DROPPED_METADATA = ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")


@dataclass(frozen=True)
class ConvertOptions:
    """What ``convert`` does.

    Attributes:
        input: the adapter file.
        output: the file to write (never one of the inputs).
        to: "kohya" or "peft".
        arch: "sd1", "sd2" or "sdxl" to override detection.
        base: a base model (file or diffusers folder) the names are resolved against; needed only
            for models that are not the released SD1/SD2/SDXL layout.
        dtype: "fp16", "bf16" or "fp32" for every float tensor; None keeps each tensor's dtype.
        overwrite: replace an existing output.
    """

    input: Path
    output: Path
    to: str
    arch: str | None = None
    base: Path | None = None
    dtype: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.to not in TARGETS:
            raise UsageError(f"--to {self.to!r} is not a naming loratools writes; use one of: {', '.join(TARGETS)}")
        if self.arch is not None and self.arch not in ("sd1", "sd2", "sdxl"):
            raise UsageError(f"--arch {self.arch!r} is not supported; use sd1, sd2 or sdxl")
        parse_dtype_name(self.dtype)  # a typo fails before any file is read


@dataclass
class ConvertResult:
    """What was written."""

    input: Path
    output: Path
    to: str
    arch: str
    source_naming: str
    modules: int
    kinds: dict[str, int]
    tensors: int
    unknown: list[str] = field(default_factory=list)  # passed through verbatim
    warnings: list[str] = field(default_factory=list)
    bytes: int = 0
    sshs_model_hash: str | None = None


def convert(options: ConvertOptions) -> ConvertResult:
    """Convert an adapter's naming, writing a new file.

    Args:
        options: a validated ``ConvertOptions``.
    Returns:
        ``ConvertResult``.
    Raises:
        UsageError: a module that the target naming cannot hold (PEFT: non-LoRA, DoRA).
        UnmatchedModulesError: modules whose names are not SD1/SD2/SDXL UNet or CLIP modules.
        ArchitectureMismatchError: the architecture cannot be told (pass ``arch``).
    Example:
        >>> convert(ConvertOptions(Path("a.safetensors"), Path("a_peft.safetensors"), "peft"))
    """
    from loratools.adapters import load_adapter
    from loratools.io.writer import check_output_path, save_tensors
    from loratools.keys.resolve import module_shapes, place_modules

    check_output_path(options.output, overwrite=options.overwrite, protected=_protected(options))
    adapter = load_adapter(options.input)  # refuses a file without modules, malformed factors, NaN/Inf
    index = _index(adapter, options)
    arch = index.arch.arch
    placements = place_modules(module_shapes(adapter), index)
    if placements.unresolved:
        first = adapter.modules[placements.unresolved[0]].source_name
        raise UnmatchedModulesError(
            f"{len(placements.unresolved)} module(s) cannot be named for {index.arch.label} (first: {first}): "
            f"{placements.hint()}", [adapter.modules[n].source_name for n in placements.unresolved],
            path=options.input)
    _refuse_two_on_one_weight(adapter, placements, options.input)
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    outside_blocks: list[str] = []
    for module in adapter.modules.values():
        placed = placements.placed[module.name]
        info = index.info(placed.target)
        kinds[module.kind] = kinds.get(module.kind, 0) + 1
        if info.component == "unet" and info.path.startswith(_OUTSIDE_BLOCKS):
            outside_blocks.append(module.source_name)
        if options.to == "kohya":
            tensors.update(_kohya_tensors(module, placed.write_name))
        else:
            tensors.update(_peft_tensors(module, info.peft_name, options.dtype, options.input))
    for key, t in adapter.unknown.items():
        if key in tensors:
            raise UsageError(f"unknown key {key!r} collides with a converted key; remove it from the input",
                             path=options.input)
        tensors[key] = t
    if options.dtype is not None:
        tensors = _cast(tensors, options.dtype)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in _DROPPED_METADATA}
    if options.to == "peft":
        metadata["format"] = "pt"
    written = save_tensors(options.output, {k: tensors[k].contiguous() for k in sorted(tensors)}, metadata,
                           overwrite=options.overwrite, protected=_protected(options),
                           sshs_hashes=options.to == "kohya")
    warnings = list(adapter.warnings)
    if placements.unfit_note():
        warnings.append(placements.unfit_note())
    if options.to == "peft":
        warnings.append(PEFT_LOADERS_NOTE)
    if outside_blocks and options.to == "kohya":
        warnings.append(f"{len(outside_blocks)} module(s) outside the UNet blocks (first: {outside_blocks[0]}): "
                        "ComfyUI and A1111 load them, diffusers' kohya loader refuses such files")
    if adapter.unknown:
        warnings.append(f"{len(adapter.unknown)} key(s) no adapter type reads were copied unchanged "
                        f"(first: {sorted(adapter.unknown)[0]})")
    return ConvertResult(input=options.input, output=written.path, to=options.to, arch=arch,
                         source_naming=adapter.naming, modules=sum(kinds.values()), kinds=kinds,
                         tensors=len(tensors), unknown=sorted(adapter.unknown), warnings=warnings,
                         bytes=written.size, sshs_model_hash=written.sshs_model_hash)


def _protected(options: ConvertOptions) -> list[Path]:
    return [options.input] + ([options.base] if options.base is not None and options.base.is_file() else [])


def _index(adapter: AdapterFile, options: ConvertOptions) -> BaseIndex:
    """The vocabulary to name modules by: the base model's (its architecture must match
    ``--arch`` and the adapter's), else the released model of ``--arch`` or the detected one."""
    from loratools.keys.arch import check_compatible, detect_adapter_arch, guess_adapter_arch
    from loratools.keys.index import BaseIndex

    if options.base is not None:
        from loratools.io.checkpoint import open_model

        index = BaseIndex.from_model(open_model(options.base))
        if options.arch is not None and options.arch != index.arch.arch:
            raise UsageError(f"--arch {options.arch} but the base {options.base.name} is {index.arch.label}",
                             path=options.base)
        check_compatible(guess_adapter_arch(adapter), index.arch)
        return index
    return BaseIndex.standard(options.arch or detect_adapter_arch(adapter).arch)


def _refuse_two_on_one_weight(adapter: AdapterFile, placements, path: Path) -> None:
    """A file naming one weight twice (mixed spellings) has no single converted form."""
    owner: dict = {}
    for name, placed in placements.placed.items():
        other = owner.setdefault(placed.target, name)
        if other != name:
            raise UsageError(f"modules {adapter.modules[other].source_name} and {adapter.modules[name].source_name} "
                             "both change the same weight (the file mixes naming styles); keep one of them",
                             path=path)


def _kohya_tensors(module: AdapterModule, name: str) -> dict[str, torch.Tensor]:
    import torch

    tensors = module.tensors()
    if module.kind == "lora" and "alpha" not in tensors:
        tensors["alpha"] = torch.tensor(float(module.rank), dtype=tensors["lora_down.weight"].dtype)
    return {f"{name}.{suffix}": t for suffix, t in tensors.items()}


def _peft_tensors(module: AdapterModule, name: str, dtype: str | None, source: Path) -> dict[str, torch.Tensor]:
    import torch

    from loratools.adapters import LoRAModule

    if not isinstance(module, LoRAModule):
        raise UsageError(f"module {module.source_name} is {module.kind}: diffusers/PEFT files hold LoRA only; "
                         "convert with --to kohya (ComfyUI and A1111 load LyCORIS types)", path=source)
    if module.dora_scale is not None:
        raise UsageError(f"module {module.source_name} is DoRA: diffusers' SD/SDXL loaders drop `dora_scale`; "
                         "convert with --to kohya", path=source)
    down, up = module.down.detach().float(), module.up.detach().float()
    if module.mid is not None:  # Tucker: core folded into a kxk lora_A, same rank
        down = torch.einsum("abhw,bi->aihw", module.mid.detach().float(), down.flatten(1))
    to_down, to_up = _split_scale(module.scale)
    out = parse_dtype_name(dtype)  # one rounding, from float32
    return {f"{name}.lora_A.weight": (down * to_down).to(out or module.down.dtype),
            f"{name}.lora_B.weight": (up * to_up).to(out or module.up.dtype)}


def _split_scale(s: float) -> tuple[float, float]:
    """Two factors whose product is ``s``, balanced so neither factor under/overflows in fp16.

    A power of two (the usual ``alpha = rank / 2^k``) is split into two powers of two, so the
    folded factors are bit-exact in any float dtype; other scales split as ``sqrt(|s|)``.
    """
    if s == 0:
        return 0.0, 0.0
    mantissa, exp = math.frexp(abs(s))
    if mantissa == 0.5:
        k = exp - 1
        return 2.0 ** (k // 2), math.copysign(2.0 ** (k - k // 2), s)
    root = math.sqrt(abs(s))
    return root, math.copysign(root, s)


def _cast(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    target = parse_dtype_name(dtype)
    return {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
