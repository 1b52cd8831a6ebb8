"""LoRA + LoRA -> one adapter file: ``loratools merge --to-lora A[:w] B[:w] ... -o OUT``.

Default is exact: for every base weight, the members that change it are combined so that the
output's delta is ``sum_j w_j * delta_j`` (user-asks 19: different ranks, modules present in only some
inputs, conv layers). Members are matched by the weight they change, not by their spelling: a PEFT
``unet.down_blocks.1...to_q`` and a kohya ``lora_unet_input_blocks_4_1_..._to_q`` are one layer,
written once under the kohya name ``loratools.keys`` chooses (``keys.resolve``; against ``base``
when given, else the released model of the inputs' architecture). How a layer is combined depends
on its members' types:

* all LoRA/LoCon/Tucker (no DoRA): rank concatenation (``concat.concat_factors``; ranks add);
* a single member of any type: its weight folded into one factor (``hada_w1_a``, ``lokr_w1``, ``diff``,
  IA3 ``weight``...), which is exact because each delta is linear in that factor;
* LoRA and full ``diff`` members together, or only full ``diff``: one full ``diff`` holding the sum;
* only norm deltas: their sum.

Anything else (two LoHa members, a DoRA member at a ratio other than 1, LoHa with LoRA) has no
exact combination in a single module of any stored type; it is refused (merge such files into a
checkpoint instead).

With a recipe (``-r``, the resize mini-language) the exact combination is written to a hidden temp
file next to the output and handed to the resize engine (``loratools.ops.resize.Resizer``), so
re-compression is the resize code path itself, with its recipes, scores and output naming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import ArchitectureMismatchError, UnmatchedModulesError, UsageError
from loratools.ops.merge.concat import LoraFactors, concat_factors
from loratools.ops.merge.provenance import InputRecord, hash_input, lora_metadata, title_of
from loratools.ops.merge.ratios import WeightedPath

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile, AdapterModule
    from loratools.io import WrittenFile
    from loratools.ops.merge.blocks import BlockWeights
    from loratools.ops.resize import LoraOutcome

#: The factor of each type that its delta is linear in (scaling it scales the delta).
_LINEAR_FACTOR = {"loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a"), "full": ("diff", "diff_b"),
                  "norm": ("w_norm", "b_norm"), "ia3": ("weight",)}


@dataclass(frozen=True)
class LoraMergeOptions:
    """Inputs, output and mode of a LoRA + LoRA merge.

    Attributes:
        adapters: adapter files with weights, in order (the first one's metadata is kept).
        output: ``.safetensors`` file.
        dtype: ``fp16``/``bf16``/``fp32``; default: the first input's factor dtype.
        allow_unmatched: drop (and report) tensors no adapter parser recognised instead of refusing.
        overwrite: replace an existing output.
        title: ``modelspec.title`` (default: output file stem).
        recipe: resize recipe(s) to re-compress the combination with (None: exact, ranks add); with
            several recipes (``:``-separated) ``output`` is a folder.
        base: the base model: module names are resolved against it (needed for custom-layout models
            whose inputs spell modules differently) and recipe scores that need it (``fro_ckpt``,
            ``spn_ckpt``, ``subspace``) read it.
        device: where the re-compression's decompositions run (``cpu``, ``cuda``).
        te_scale: factor on every weight for text-encoder modules (0: the UNet part only).
        metadata_from: which input's metadata the output keeps (``ema`` keeps the newest file's).
        provenance: extra fields for the ``loratools.merge`` record (``ema``: its mode and schedule).
    """

    adapters: Sequence[WeightedPath]
    output: Path
    dtype: str | None = None
    allow_unmatched: bool = False
    overwrite: bool = False
    title: str | None = None
    recipe: str | None = None
    base: Path | None = None
    device: str = "cpu"
    te_scale: float = 1.0
    metadata_from: int = 0
    provenance: Mapping[str, object] | None = None


@dataclass
class LoraMergeResult:
    """What was written: module counts per kind, ranks, and what each input contributed."""

    output: Path
    arch: str
    inputs: list[InputRecord]
    modules: int
    kinds: dict[str, int]
    ranks: list[int]
    dropped: list[str] = field(default_factory=list)
    omitted: list[str] = field(default_factory=list)
    file: WrittenFile | None = None
    resized: LoraOutcome | None = None
    warnings: list[str] = field(default_factory=list)

_OUTPUT_KINDS = (("lora_up.weight", "lora"), ("diff", "full"), ("w_norm", "norm"))


def _factors(module: AdapterModule) -> LoraFactors:
    return LoraFactors(up=module.up, down=module.down, scale=module.scale, mid=module.mid)


def _is_plain_lora(module: AdapterModule) -> bool:
    return module.kind == "lora" and getattr(module, "dora_scale", None) is None


def _scaled(module: AdapterModule, weight: float) -> dict[str, torch.Tensor]:
    """A single member's tensors with ``weight`` folded into the factor its delta is linear in."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in module.tensors().items()}
    if weight == 1.0:
        return tensors
    if getattr(module, "dora_scale", None) is not None:
        raise UsageError(f"{module.name}: a DoRA module cannot be merged at weight {weight:g} exactly "
                         "(its delta is not linear in the weight); use weight 1")
    keys = [k for k in _LINEAR_FACTOR.get(module.kind, ()) if k in tensors]
    if not keys:
        raise UsageError(f"{module.name}: cannot scale a {module.kind} module by {weight:g}")
    if module.kind in ("loha", "lokr"):
        keys = keys[:1]  # a product: scale one factor only
    for key in keys:
        tensors[key] = tensors[key] * weight
    return tensors


def combine_layer(name: str, members: Sequence[tuple[float, AdapterModule]], dtype: torch.dtype
                  ) -> dict[str, torch.Tensor] | None:
    """Combine one layer's members into ``suffix -> tensor`` (float32, alpha in ``dtype`` precision).

    Returns None when every member has weight 0 (the layer contributes nothing).

    Raises:
        UsageError: the members have no exact combination in one module (see the module docstring).
    """
    import torch

    if all(_is_plain_lora(m) for _, m in members):
        try:
            res = concat_factors([(w, _factors(m)) for w, m in members], alpha_dtype=dtype, name=name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if res is None:
            return None
        out = {"lora_down.weight": res.down, "lora_up.weight": res.up, "alpha": torch.tensor(res.alpha)}
        if res.mid is not None:
            out["lora_mid.weight"] = res.mid
        return out
    live = [(w, m) for w, m in members if w != 0.0]
    if not live:
        return None
    if len(live) == 1:
        return _scaled(live[0][1], live[0][0])
    kinds = {m.kind for _, m in live}
    if all(m.kind == "full" or _is_plain_lora(m) for _, m in live):
        diff = sum(w * m.delta().reshape(_full_shape(live)) for w, m in live)
        out = {"diff": diff}
        biases = [(w, m.bias_delta()) for w, m in live if m.bias_delta() is not None]
        if biases:
            out["diff_b"] = sum(w * b for w, b in biases)
        return out
    if kinds == {"norm"}:
        out = {"w_norm": sum(w * m.delta() for w, m in live)}
        biases = [(w, m.bias_delta()) for w, m in live if m.bias_delta() is not None]
        if biases:
            out["b_norm"] = sum(w * b for w, b in biases)
        return out
    raise UsageError(f"{name}: {' + '.join(sorted(m.kind for _, m in live))} members have no exact "
                     "combination in one module; merge them into a checkpoint instead")


def _full_shape(live: Sequence[tuple[float, AdapterModule]]) -> tuple[int, ...]:
    """The diff's shape: a full member's own (the real weight shape), else the first LoRA's."""
    for _, m in live:
        if m.kind == "full":
            return tuple(m.diff.shape)
    return live[0][1].weight_shape


def _load(opts: LoraMergeOptions) -> tuple[list[tuple[WeightedPath, AdapterFile]], str]:
    from loratools.adapters import load_adapter
    from loratools.keys.arch import guess_adapter_arch

    if len(opts.adapters) < 1:
        raise UsageError("give at least one adapter to merge")
    loaded, archs = [], []
    for wp in opts.adapters:
        adapter = load_adapter(wp.path)  # refuses NaN/Inf factors, naming the tensor
        info = guess_adapter_arch(adapter)
        archs.append(info.arch if info is not None else None)
        loaded.append((wp, adapter))
    if len({a for a in archs if a is not None}) > 1:
        listing = ", ".join(f"{wp.path.name}={a}" for (wp, _), a in zip(loaded, archs))
        raise ArchitectureMismatchError(f"adapters are for different architectures ({listing}); "
                                        "merge only adapters of one base model")
    return loaded, next((a for a in archs if a is not None), "unknown")


def _out_dtype(opts: LoraMergeOptions, loaded: Sequence[tuple[WeightedPath, AdapterFile]]) -> torch.dtype:
    import torch

    from loratools.io.dtypes import parse_dtype_name

    chosen = parse_dtype_name(opts.dtype)
    if chosen is not None:
        return chosen
    for _, adapter in loaded:
        for module in adapter.modules.values():
            for t in module.tensors().values():
                if t.is_floating_point():
                    return t.dtype
    return torch.float16


def merge_loras(opts: LoraMergeOptions) -> LoraMergeResult:
    """Combine several adapters into one file, exactly (see the module docstring).

    Args:
        opts: validated options.

    Returns:
        ``LoraMergeResult``.

    Raises:
        InvalidFileError: a missing or malformed input.
        ArchitectureMismatchError: the inputs are for different base models.
        UnmatchedModulesError: unrecognised tensors in an input (unless ``allow_unmatched``).
        UsageError: a layer whose members cannot be combined exactly; bad options.
        NonFiniteError: NaN/Inf in an input or the result.

    Example:
        >>> merge_loras(LoraMergeOptions([WeightedPath(Path("a.safetensors"), 0.7),
        ...                               WeightedPath(Path("b.safetensors"), 0.3)], Path("ab.safetensors")))
    """
    import torch

    from loratools.errors import NonFiniteError
    from loratools.io import save_tensors
    from loratools.ops.merge.fuse import finite_range
    from loratools.io.writer import check_output_path

    protected = [wp.path for wp in opts.adapters] + ([opts.base] if opts.base is not None and opts.base.is_file() else [])
    if opts.recipe is None:
        check_output_path(opts.output, overwrite=opts.overwrite, protected=protected)
    elif opts.output.suffix.lower() == ".safetensors":
        check_output_path(opts.output, overwrite=opts.overwrite, protected=protected)
    loaded, arch = _load(opts)
    dropped = [f"{wp.path.name}: {key}" for wp, a in loaded for key in sorted(a.unknown)]
    if dropped and not opts.allow_unmatched:
        raise UnmatchedModulesError(f"{len(dropped)} tensor(s) are no adapter module: {'; '.join(dropped[:12])}. "
                                    "Pass --allow-unmatched to leave them out", dropped)
    dtype = _out_dtype(opts, loaded)
    final_dtype = dtype
    if opts.recipe is not None:
        dtype = torch.float32  # the resize engine reads the exact combination; it casts at the end

    blocks = _blocks(opts, arch)
    layers, naming_notes = _layers(opts, loaded, arch, blocks)
    names = sorted(layers)
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    ranks, alphas, omitted = [], [], []
    for name in names:
        members = layers[name]
        combined = combine_layer(name, members, dtype)
        if combined is None:
            omitted.append(name)
            continue
        kind = next((k for suffix, k in _OUTPUT_KINDS if suffix in combined), members[0][1].kind)
        kinds[kind] = kinds.get(kind, 0) + 1
        if "lora_down.weight" in combined:
            ranks.append(int(combined["lora_down.weight"].shape[0]))
            if "alpha" in combined:
                alphas.append(float(combined["alpha"]))
        for suffix, t in combined.items():
            if t.is_floating_point():
                t = t.to(dtype)
                if not finite_range(t, torch.finfo(dtype).max):
                    raise NonFiniteError(f"{name}.{suffix}: combined tensor overflows {dtype}; "
                                         "lower the weights or use --dtype fp32")
            tensors[f"{name}.{suffix}"] = t.contiguous()

    records = []
    for (wp, adapter), bw in zip(loaded, blocks):
        sha, short = hash_input(wp.path)
        records.append(InputRecord(wp.path, wp.ratio, sha, short, len(adapter.modules), len(adapter.modules),
                                   title_of(wp.path, adapter.metadata), blocks=bw))
    meta = lora_metadata(loaded[opts.metadata_from][1].metadata, arch=arch, adapters=records, output=opts.output,
                         ranks=ranks, alphas=alphas, title=opts.title, recipe=opts.recipe, extra=opts.provenance)
    result = LoraMergeResult(opts.output, arch, records, len(names) - len(omitted), kinds, ranks, dropped, omitted,
                             warnings=[f"{wp.path.name}: {w}" for wp, adapter in loaded for w in adapter.warnings]
                             + naming_notes)
    if opts.recipe is None:
        result.file = save_tensors(opts.output, tensors, meta, overwrite=opts.overwrite, protected=protected,
                                   sshs_hashes=True)
    else:
        result.resized = _recompress(opts, tensors, meta, final_dtype)
    return result


def _blocks(opts: LoraMergeOptions, arch: str) -> list[BlockWeights | None]:
    """Each input's block weights (they need the inputs' architecture)."""
    from loratools.ops.merge.checkpoint import parse_blocks

    if not any(wp.blocks for wp in opts.adapters):
        return [None] * len(opts.adapters)
    if arch == "unknown" and opts.base is not None:
        from loratools.io import open_model
        from loratools.keys.arch import detect_checkpoint_arch

        arch = detect_checkpoint_arch(open_model(opts.base)).arch
    if arch == "unknown":
        raise UsageError("block weights need the adapters' architecture, which their files do not tell; "
                         "pass --base with the model they were made for")
    return parse_blocks(opts.adapters, arch)


def _layers(opts: LoraMergeOptions, loaded: Sequence[tuple[WeightedPath, AdapterFile]], arch: str,
            blocks: Sequence[BlockWeights | None]) -> tuple[dict[str, list[tuple[float, AdapterModule]]], list[str]]:
    """``{kohya name to write: [(weight, module), ...]}``: every input module grouped with the
    other inputs' modules that change the same base weight, whatever their spelling; plus notes.
    Each weight is the input's ratio times the module's block weight (and ``te_scale`` for text
    encoders), as a merge into a checkpoint scales it (``plan.module_ratio``).

    Raises:
        UnmatchedModulesError: a module that names no weight of the base / released model, or
            (without a base) an SGM-spelled module whose layout cannot be known.
        InvalidFileError: two modules of one input change the same weight.
        UsageError: without any index, inputs spelling the UNet both ways.
    """
    from loratools.errors import InvalidFileError
    from loratools.keys.resolve import index_for, module_shapes, place_modules

    from loratools.ops.merge.plan import module_ratio

    index = index_for(arch if arch != "unknown" else None, _base_index(opts, loaded))
    if index is None:
        return _layers_by_name(loaded, opts.te_scale), []
    layers: dict[object, list[tuple[float, AdapterModule]]] = {}
    write: dict[object, str] = {}
    unresolved, notes = [], []
    for (wp, adapter), bw in zip(loaded, blocks):
        placements = place_modules(module_shapes(adapter), index)
        unresolved += [f"{wp.path.name}: {adapter.modules[n].source_name}" for n in placements.unresolved]
        if placements.unfit_note():
            notes.append(f"{wp.path.name}: {placements.unfit_note()}")
        owner: dict[object, str] = {}
        for name, placed in placements.placed.items():
            if placed.target in owner:
                raise InvalidFileError(f"modules {owner[placed.target]} and {name} both change {placed.target.key}; "
                                       "the file mixes naming styles; keep one of them", path=wp.path)
            owner[placed.target] = name
            weight = module_ratio(wp.ratio, index.info(placed.target).kohya_name, index.arch.arch, opts.te_scale, bw)
            layers.setdefault(placed.target, []).append((weight, adapter.modules[name]))
            write.setdefault(placed.target, placed.write_name)
    if unresolved:
        raise UnmatchedModulesError(f"{len(unresolved)} module(s) cannot be matched to a weight of "
                                    f"{index.arch.label} (first: {unresolved[0]}): "
                                    f"{place_modules({}, index).hint()}", unresolved)
    return {write[t]: members for t, members in layers.items()}, notes


def _base_index(opts: LoraMergeOptions, loaded: Sequence[tuple[WeightedPath, AdapterFile]]):
    """The base model's index when ``--base`` is given (every input must be for its architecture)."""
    if opts.base is None:
        return None
    from loratools.io import open_model
    from loratools.keys.arch import check_compatible, guess_adapter_arch
    from loratools.keys.index import BaseIndex

    index = BaseIndex.from_model(open_model(opts.base))
    for wp, adapter in loaded:
        try:
            check_compatible(guess_adapter_arch(adapter), index.arch)
        except ArchitectureMismatchError as exc:
            raise ArchitectureMismatchError(str(exc), path=wp.path) from None
    return index


def _layers_by_name(loaded: Sequence[tuple[WeightedPath, AdapterFile]], te_scale: float = 1.0
                    ) -> dict[str, list[tuple[float, AdapterModule]]]:
    """Without any architecture to resolve against, modules are matched by name; that is exact
    only while every input spells the UNet one way (an SGM name and a diffusers name of one
    weight cannot be related without the UNet's layout)."""
    from loratools.keys.naming import unet_spelling

    spellings: dict[str, str] = {}
    for wp, adapter in loaded:
        for name in adapter.modules:
            spelling = unet_spelling(name)
            if spelling is not None:
                spellings.setdefault(spelling, wp.path.name)
    if len(spellings) > 1:
        raise UsageError(f"{spellings['sgm']} names UNet modules by their SGM path (input_blocks_...) and "
                         f"{spellings['diffusers']} by their diffusers path (down_blocks_...); pass --base with the "
                         "model they were made for so each weight is merged once")
    names = sorted({n for _, a in loaded for n in a.modules})
    from loratools.ops.merge.plan import module_ratio

    return {n: [(module_ratio(wp.ratio, n, "unknown", te_scale, None), a.modules[n]) for wp, a in loaded
                if n in a.modules] for n in names}


_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _recompress(opts: LoraMergeOptions, tensors: dict, meta: dict[str, str], dtype: torch.dtype) -> LoraOutcome:
    """Resize the exact combination with ``opts.recipe`` in memory (no temporary file).

    The combination is named after the output, so the resize engine's own output naming (one file
    per recipe in a folder output) reads as ``<output stem>_<recipe>...``; it is the merge's result
    whatever its size, so the resize's "larger than the input" rule does not apply.
    """
    from loratools.adapters import parse_adapter
    from loratools.ops.resize import Resizer

    single = opts.output.suffix.lower() == ".safetensors"
    folder = opts.output.parent if single else opts.output
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist; create it first", path=opts.output)
    name = folder / f"{opts.output.stem if single else 'merged'}.safetensors"
    combined = parse_adapter(tensors, meta, path=name)
    resizer = Resizer(opts.base, device=opts.device, allow_larger=True)
    return resizer.resize(combined, opts.recipe, output=opts.output, overwrite=opts.overwrite,
                          dtype=_DTYPE_NAMES[str(dtype).removeprefix("torch.")])
