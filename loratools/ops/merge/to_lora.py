"""LoRA + LoRA -> one adapter file: ``loratools merge --to-lora A[:w] B[:w] ... -o OUT``.

Default is exact: for every module name, the members that have it are combined so that the
output's delta is ``sum_j w_j * delta_j`` (user-asks 19: different ranks, modules present in only some
inputs, conv layers). How a layer is combined depends on its members' types:

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

from collections.abc import Sequence
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
        base: checkpoint for recipe scores that need it (``fro_ckpt``, ``spn_ckpt``, ``subspace``).
        device: where the re-compression's decompositions run (``cpu``, ``cuda``).
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
    from loratools.ops.merge.plan import check_finite

    if len(opts.adapters) < 1:
        raise UsageError("give at least one adapter to merge")
    loaded, archs = [], []
    for wp in opts.adapters:
        adapter = load_adapter(wp.path)
        check_finite(adapter, wp.path)
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

    protected = [wp.path for wp in opts.adapters]
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

    names = sorted({n for _, a in loaded for n in a.modules})
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    ranks, alphas, omitted = [], [], []
    for name in names:
        members = [(wp.ratio, a.modules[name]) for wp, a in loaded if name in a.modules]
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
    for wp, adapter in loaded:
        sha, short = hash_input(wp.path)
        records.append(InputRecord(wp.path, wp.ratio, sha, short, len(adapter.modules), len(adapter.modules),
                                   title_of(wp.path, adapter.metadata)))
    meta = lora_metadata(loaded[0][1].metadata, arch=arch, adapters=records, output=opts.output, ranks=ranks,
                         alphas=alphas, title=opts.title, recipe=opts.recipe)
    result = LoraMergeResult(opts.output, arch, records, len(names) - len(omitted), kinds, ranks, dropped, omitted,
                             warnings=[f"{wp.path.name}: {w}" for wp, adapter in loaded for w in adapter.warnings])
    if opts.recipe is None:
        result.file = save_tensors(opts.output, tensors, meta, overwrite=opts.overwrite, protected=protected,
                                   sshs_hashes=True)
    else:
        result.resized = _recompress(opts, tensors, meta, final_dtype)
    return result


_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _recompress(opts: LoraMergeOptions, tensors: dict, meta: dict[str, str], dtype: torch.dtype) -> LoraOutcome:
    """Write the exact combination to a hidden temp folder and resize it with ``opts.recipe``.

    The temp file is named after the output, so the resize engine's own output naming (one file
    per recipe in a folder output) reads as ``<output stem>_<recipe>...``.
    """
    import shutil
    import uuid

    from loratools.io import save_tensors
    from loratools.ops.resize import Resizer

    single = opts.output.suffix.lower() == ".safetensors"
    folder = opts.output.parent if single else opts.output
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist; create it first", path=opts.output)
    tmp = folder / f".merge-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        combined = tmp / (opts.output.stem if single else "merged")
        combined = combined.with_suffix(".safetensors")
        save_tensors(combined, tensors, meta)
        resizer = Resizer(opts.base, device=opts.device)
        return resizer.resize(combined, opts.recipe, output=opts.output, overwrite=opts.overwrite,
                              dtype=_DTYPE_NAMES[str(dtype).removeprefix("torch.")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

