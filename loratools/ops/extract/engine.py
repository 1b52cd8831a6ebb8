"""The extract engine: stream weight pairs, decompose each difference, keep what the recipe says, write.

1. Pair the models' weights (``pairs``); refuse another architecture or layout before any work.
2. Text encoders: the largest ``|tuned - base|`` of each encoder decides whether it is extracted
   (above ``min_diff``, sd-scripts' rule, per encoder here: an SDXL fine-tune may change only one).
3. One pass over the pairs, one at a time: read both weights (pages dropped after), decompose the
   difference (``decompose``: randomized for a fixed rank on large layers, else the exact Gram
   route), choose the kept directions (``select``, the resize engine's rules), and keep only the
   output factors (``up = U sqrt(S)``, ``down = sqrt(S) Vh``, alpha = rank, so scale 1). ``size=``
   needs every layer's spectrum first: a first pass keeps the singular values only, a second one
   the chosen directions.
4. Write the kohya-named file (``keys`` names) with sd-scripts-style metadata and sshs hashes,
   atomically; report per layer the share of the difference kept.

Peak memory is one layer's difference (plus its float64 Gram) and the output's own factors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import NonFiniteError, UsageError

if TYPE_CHECKING:
    import torch

    from loratools.io import ModelSource, WrittenFile
    from loratools.ops.extract.pairs import Pair
    from loratools.ops.resize.recipe import Recipe

Progress = Callable[[str, int, int], None]

DEFAULT_RECIPE = "rank=32"
SCOPES = ("all", "attn")
#: sd-scripts' --min_diff default: a text encoder whose largest change is not above it is left out.
MIN_DIFF = 0.01
#: A stored factor pair whose delta differs from the computed one by more than this (relative)
#: lost it to the output dtype (fp16 underflow); the summary says so.
STORAGE_TOLERANCE = 0.01


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how.

    Attributes:
        tuned: the fine-tuned model (single file or diffusers folder).
        base: the model it was tuned from.
        output: the ``.safetensors`` LoRA to write.
        recipe: one resize recipe (``rank=32``, ``sv_fro=0.9,max_rank=128``, ``fro_ckpt=1,thr=-2``, ``size=64``).
        scope: "all" (attention, MLP and the ResNet/sampler convs: a LoCon) or "attn" (sd-scripts'
            default without ``--conv_dim``).
        min_diff: a text encoder whose largest change is not above this is not extracted.
        clamp_quantile: sd-scripts' clamp of the factors to their q-quantile (None: no clamp).
        dtype: fp16 (default), bf16 or fp32 for the factors.
        device: where the decompositions run ("cpu", "cuda").
        exact: the exact route for fixed ranks too (no randomized SVD).
        overwrite: replace an existing output.
        title: ``modelspec.title`` (default: the output's stem).
        v_parameterization: mark the file v-prediction (default: what the models' metadata says).
    """

    tuned: Path
    base: Path
    output: Path
    recipe: str = DEFAULT_RECIPE
    scope: str = "all"
    min_diff: float = MIN_DIFF
    clamp_quantile: float | None = None
    dtype: str | None = None
    device: str = "cpu"
    exact: bool = False
    overwrite: bool = False
    title: str | None = None
    v_parameterization: bool | None = None


@dataclass
class LayerReport:
    """One extracted weight: its rank and how much of its difference the file keeps.

    ``kept`` = ||kept part of D||_F / ||D||_F (after ``clamp_quantile``, when given); ``stored`` the
    relative change of the kept delta from writing its factors in the output dtype.
    """

    name: str
    label: str
    shape: tuple[int, ...]
    rank: int
    kept: float
    diff_norm: float
    base_norm: float
    route: str
    stored: float = 0.0

    @property
    def relative_diff(self) -> float:
        """||D||_F / ||W||_F: how much the fine-tune changed this weight."""
        return self.diff_norm / self.base_norm if self.base_norm else math.inf

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "component": self.label, "shape": list(self.shape), "rank": self.rank,
                "kept_fro": self.kept, "diff_norm": self.diff_norm, "relative_diff": self.relative_diff,
                "route": self.route, "storage_error": self.stored}


@dataclass(frozen=True)
class EncoderCheck:
    """A text encoder's largest change and whether it was extracted."""

    label: str
    layers: int
    max_diff: float
    included: bool


@dataclass
class ExtractResult:
    """What was written: per-layer reports, what was left out and why."""

    output: Path
    arch: str
    recipe: str
    layers: list[LayerReport]
    unchanged: list[str]
    text_encoders: list[EncoderCheck]
    missing: list[str]
    threshold: float | None
    file: WrittenFile | None
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank > 0]

    @property
    def kept(self) -> float:
        """The share of the whole difference (every compared layer) the file holds, by Frobenius norm."""
        total = sum(r.diff_norm ** 2 for r in self.layers)
        held = sum((r.kept * r.diff_norm) ** 2 for r in self.layers)
        return math.sqrt(held / total) if total else 1.0

    def summary(self) -> dict[str, Any]:
        """Per component: layers, written layers, rank range, Frobenius share kept."""
        out: dict[str, Any] = {}
        for label in sorted({r.label for r in self.layers}):
            rows = [r for r in self.layers if r.label == label]
            total = sum(r.diff_norm ** 2 for r in rows)
            held = sum((r.kept * r.diff_norm) ** 2 for r in rows)
            ranks = [r.rank for r in rows if r.rank]
            out[label] = {"layers": len(rows), "written": len(ranks), "rank_min": min(ranks, default=0),
                          "rank_max": max(ranks, default=0), "kept_fro": math.sqrt(held / total) if total else 1.0}
        return out


def _recipe(text: str) -> Recipe:
    from loratools.ops.resize.recipe import parse_recipes

    recipes = parse_recipes(text)
    if len(recipes) != 1:
        raise UsageError(f"extract writes one file: give one recipe, not {len(recipes)} ('{text}')")
    return recipes[0]


class _Extractor:
    """The per-layer work, shared by the one-pass and the two-pass (``size=``) flows."""

    def __init__(self, opts: ExtractOptions, recipe: Recipe, tuned: ModelSource, base: ModelSource,
                 dtype: torch.dtype) -> None:
        self.opts, self.recipe, self.tuned, self.base, self.dtype = opts, recipe, tuned, base, dtype

    @contextmanager
    def read(self, pair: Pair) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(D, W)`` of one pair (``pairs.read_difference``); both weights' pages dropped after."""
        from loratools.ops.extract.pairs import read_difference, release

        try:
            yield read_difference(self.tuned, self.base, pair)
        finally:
            release(self.tuned, self.base, pair)

    def _base_refs(self, W: torch.Tensor, base_norm: float, U=None, Vh=None):
        from loratools.linalg.norms import spectral_norm
        from loratools.ops.resize.scoring import BaseRefs, subspace_projection

        weights = self.recipe.weights
        spn = spectral_norm(W) if abs(weights.get("spn_ckpt", 0.0)) > 1e-6 else None
        sub = subspace_projection(U.float().cpu(), Vh.float().cpu(), W) if U is not None else None
        return BaseRefs(fro=base_norm, spn=spn, subspace=sub)

    def spectrum(self, pair: Pair) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
        """``size=`` pass 1: ``(S, scores, ||D||, ||W||)`` of one layer (values only unless subspace)."""
        with self.read(pair) as (D, W):
            return self._spectrum(pair, D, W)

    def _spectrum(self, pair: Pair, D: torch.Tensor, W: torch.Tensor):
        from loratools.ops.extract.decompose import frobenius, gram_svd, gram_triplets
        from loratools.ops.extract.select import needs, scores

        dn, wn = frobenius(D), frobenius(W)
        if dn == 0.0:
            return D.new_zeros(0), None, 0.0, wn
        if needs(self.recipe).vectors_for_scores:
            g = gram_svd(D.to(self.opts.device))
            U, _, Vh = gram_triplets(D.to(self.opts.device), g, list(range(g.spectrum.S.numel())))
            S, refs = g.spectrum.S.cpu(), self._base_refs(W, wn, U, Vh)
        else:
            S = gram_svd(D.to(self.opts.device), vectors=False).S.cpu()
            refs = self._base_refs(W, wn)
        return S, scores(self.recipe, S, pair.params, refs), dn, wn

    def layer(self, pair: Pair, keep: list[int] | None = None
              ) -> tuple[LayerReport | None, dict[str, torch.Tensor] | None]:
        """Decompose one pair and build its factors; ``(None, None)`` when the weights are equal.
        ``keep``: the directions chosen already (``size=``'s first pass), else the recipe chooses."""
        with self.read(pair) as (D, W):
            return self._layer(pair, D, W, keep)

    def _layer(self, pair: Pair, D: torch.Tensor, W: torch.Tensor, keep: list[int] | None
               ) -> tuple[LayerReport | None, dict[str, torch.Tensor] | None]:
        from loratools.ops.extract.decompose import frobenius, gram_svd, gram_triplets, randomized_svd
        from loratools.ops.extract.select import choose, fixed_rank, layer_shape, needs, scores, use_randomized

        dn, wn = frobenius(D), frobenius(W)
        if dn == 0.0:
            return None, None
        shape = layer_shape(pair.shape)
        if keep is not None and not keep:
            return LayerReport(pair.name, pair.label, pair.shape, 0, 0.0, dn, wn, "exact"), None
        dev = D.to(self.opts.device)
        if keep is not None:
            idx = keep
            U, S, Vh = gram_triplets(dev, gram_svd(dev), idx)
            route = "exact"
        elif use_randomized(self.recipe, shape, self.opts.exact):
            U, S, Vh, spec = randomized_svd(dev, fixed_rank(self.recipe, shape))
            idx = choose(self.recipe, spec.S.cpu(), shape, None)
            U, S, Vh, route = U[:, idx], S[idx], Vh[idx], "randomized"
        else:
            g = gram_svd(dev)
            S_all = g.spectrum.S.cpu()
            sc = None
            if self.recipe.uses_scores:
                if needs(self.recipe).vectors_for_scores:
                    U_all, _, Vh_all = gram_triplets(dev, g, list(range(S_all.numel())))
                    refs = self._base_refs(W, wn, U_all, Vh_all)
                    del U_all, Vh_all
                else:
                    refs = self._base_refs(W, wn)
                sc = scores(self.recipe, S_all, pair.params, refs)
            idx = choose(self.recipe, S_all, shape, sc)
            U, S, Vh = gram_triplets(dev, g, idx)
            route = "exact"
        k = len(idx)
        kept = math.sqrt(min(float((S.double() ** 2).sum()) / dn ** 2, 1.0)) if k else 0.0
        report = LayerReport(pair.name, pair.label, pair.shape, k, kept, dn, wn, route)
        if k == 0:
            return report, None
        tensors, report.kept, report.stored = self._factors(pair, U, S, Vh, D, dn, kept)
        return report, tensors

    def _factors(self, pair: Pair, U, S, Vh, D, dn: float, kept: float
                 ) -> tuple[dict[str, torch.Tensor], float, float]:
        import torch

        from loratools.linalg.lowrank import balanced_factors

        up, down = balanced_factors(U.double().cpu(), S.double().cpu() * self.recipe.rescale, Vh.double().cpu())
        if self.opts.clamp_quantile is not None:
            up, down = _clamp(up, down, self.opts.clamp_quantile)
            kept = math.sqrt(max(0.0, 1.0 - (_residual(D, up / self.recipe.rescale, down) / dn) ** 2))
        k = up.shape[1]
        shape = pair.shape
        up_s = up.to(self.dtype)
        down_s = down.to(self.dtype)
        stored = _storage_error(up, down, up_s.double(), down_s.double())
        for name, t in (("lora_up", up_s), ("lora_down", down_s)):
            if not bool(torch.isfinite(t).all()):
                dtype = str(self.dtype).removeprefix("torch.")
                raise NonFiniteError(f"{pair.name}.{name}: a factor overflows {dtype}; write with --save_precision "
                                     "bf16 or fp32")
        up_s = up_s.reshape((shape[0], k, 1, 1) if len(shape) == 4 else (shape[0], k))
        down_s = down_s.reshape((k, *shape[1:]))
        tensors = {f"{pair.name}.lora_down.weight": down_s.contiguous(),
                   f"{pair.name}.lora_up.weight": up_s.contiguous(),
                   f"{pair.name}.alpha": torch.tensor(float(k), dtype=torch.float32)}
        return tensors, kept, stored


def _clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' ``--clamp_quantile``: both factors clamped to +-(the q-quantile of their signed
    entries, linear interpolation as ``torch.quantile``; computed by sorting, no size limit)."""
    import torch

    values = torch.cat([up.flatten(), down.flatten()]).sort().values
    pos = q * (values.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, values.numel() - 1)
    bound = float(values[lo] + (values[hi] - values[lo]) * (pos - lo))
    return up.clamp(-bound, bound), down.clamp(-bound, bound)


def _residual(D: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||D - up @ down||_F`` over slices of rows (no out x n float64 product at once)."""
    from loratools.ops.extract.decompose import slices

    total = 0.0
    for rows in slices(D.shape[0], D.shape[1]):
        total += float((D[rows].double() - up[rows] @ down).square().sum())
    return math.sqrt(total)


def _storage_error(up, down, up_s, down_s) -> float:
    """``||A B - A' B'||_F / ||A B||_F`` from k x k Gram matrices (the out x n product is never formed)."""
    def inner(a, b, c, d):  # <A B, C D>_F = trace((A^T C)(D B^T))
        return float(((a.T @ c) * (b @ d.T)).sum())

    exact = inner(up, down, up, down)
    if exact <= 0:
        return 0.0
    diff = exact - 2 * inner(up, down, up_s, down_s) + inner(up_s, down_s, up_s, down_s)
    return math.sqrt(max(diff, 0.0) / exact)


def _check_encoders(ex: _Extractor, pairs: list[Pair], min_diff: float, progress: Progress | None
                    ) -> list[EncoderCheck]:
    """Each text encoder's largest change (one read of its weights) against ``min_diff``."""
    checks = []
    te = [p for p in pairs if p.component != "unet"]
    done = 0
    for label in sorted({p.label for p in te}):
        largest = 0.0
        mine = [p for p in te if p.label == label]
        for p in mine:
            with ex.read(p) as (D, _):
                largest = max(largest, float(D.abs().max()))
            done += 1
            if progress:
                progress("comparing text encoders", done, len(te))
        checks.append(EncoderCheck(label, len(mine), largest, largest > min_diff))
    return checks


def extract(opts: ExtractOptions, progress: Progress | None = None) -> ExtractResult:
    """Extract a LoRA/LoCon from the difference of a fine-tune and its base (see the module docstring).

    Raises:
        InvalidFileError: a missing or unreadable model.
        ArchitectureMismatchError: the models are different architectures or layouts.
        UsageError: a bad recipe, scope, output or option; models that do not differ.
        NonFiniteError: a factor overflows the output dtype (nothing is written).
        OutputExistsError: the output exists (without ``overwrite``) or is an input.

    Example:
        >>> extract(ExtractOptions(Path("tuned.safetensors"), Path("sd15.safetensors"), Path("x.safetensors"),
        ...                        recipe="sv_fro=0.9,max_rank=128"))
    """
    import torch

    from loratools.io import open_model
    from loratools.io.dtypes import parse_dtype_name
    from loratools.io.writer import check_output_path
    from loratools.ops.extract.pairs import pair_models

    t0 = time.perf_counter()
    _return_freed_memory()
    recipe = _recipe(opts.recipe)
    if opts.scope not in SCOPES:
        raise UsageError(f"--scope {opts.scope!r}: use all (attention, MLP and convs: a LoCon) or attn")
    if opts.clamp_quantile is not None and not 0 < opts.clamp_quantile <= 1:
        raise UsageError(f"--clamp_quantile {opts.clamp_quantile:g} must be in (0, 1]")
    if opts.min_diff < 0:
        raise UsageError(f"--min_diff {opts.min_diff:g} must be >= 0")
    if opts.output.suffix.lower() != ".safetensors":
        raise UsageError("the extracted LoRA is written as .safetensors; name the output *.safetensors",
                         path=opts.output)
    dtype = parse_dtype_name(opts.dtype, option="--save_precision") or torch.float16
    tuned, base = open_model(opts.tuned), open_model(opts.base)
    protected = [*tuned.all_files(), *base.all_files()]
    check_output_path(opts.output, overwrite=opts.overwrite, protected=protected)
    if opts.device != "cpu":
        _check_device(opts.device)
    pairing = pair_models(tuned, base, opts.scope)
    ex = _Extractor(opts, recipe, tuned, base, dtype)
    encoders = _check_encoders(ex, pairing.pairs, opts.min_diff, progress)
    skipped = {c.label for c in encoders if not c.included}
    pairs = [p for p in pairing.pairs if p.label not in skipped]

    hashes = _hashes(opts)
    threshold = recipe.param if recipe.uses_scores and recipe.method == "thr" else None
    chosen: dict[str, list[int]] = {}
    if recipe.method == "size":
        threshold, chosen = _size_threshold(ex, pairs, recipe, opts, pairing, encoders, hashes, progress)
    reports, unchanged, tensors = [], [], {}
    for i, pair in enumerate(pairs):
        report, produced = ex.layer(pair, chosen.get(pair.name) if chosen else None)
        if report is None:
            unchanged.append(pair.name)
        else:
            reports.append(report)
        if produced:
            tensors.update(produced)
        if progress:
            progress("extracting", i + 1, len(pairs))
    if not tensors:
        why = "the models are identical in every compared layer" if not reports else \
            f"the recipe '{recipe.text}' keeps no direction of any layer"
        raise UsageError(f"nothing to extract: {why}", path=opts.tuned)
    result = ExtractResult(opts.output, pairing.arch, recipe.text, reports, unchanged, encoders, pairing.missing,
                           threshold, None, 0.0)
    meta = _metadata(opts, pairing, result, [(r.rank, len(r.shape) == 4 and r.shape[2:] != (1, 1))
                                             for r in result.written], hashes)
    from loratools.io import save_tensors

    result.file = save_tensors(opts.output, tensors, meta, overwrite=opts.overwrite, protected=protected,
                               sshs_hashes=True)
    result.warnings = _warnings(result, opts, dtype)
    result.seconds = time.perf_counter() - t0
    return result


def _return_freed_memory() -> None:
    """The resize engine's glibc setting: allocations of 1 MiB and more come from mmap, so each
    layer's freed buffers go back to the OS instead of fragmenting the heap (issue 12 moves it to
    ``resize.runtime``; this adapter is the one line to change)."""
    from loratools.ops.resize.engine import _return_freed_memory as resize_setting

    resize_setting()


def _check_device(device: str) -> None:
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {device}: {str(exc).splitlines()[0]}; use cpu") from None


def _hashes(opts: ExtractOptions) -> dict[str, dict[str, str | None]]:
    from loratools.ops.extract.metadata import model_hashes

    return {"tuned": model_hashes(opts.tuned), "base": model_hashes(opts.base)}


def _metadata(opts: ExtractOptions, pairing, result: ExtractResult, ranks: list[tuple[int, bool]],
              hashes: dict) -> dict[str, str]:
    from loratools.ops.extract.metadata import extract_metadata

    v_pred = opts.v_parameterization if opts.v_parameterization is not None else pairing.prediction == "v_prediction"
    thr = result.threshold if result.threshold is not None and math.isfinite(result.threshold) else None
    return extract_metadata(arch=pairing.arch, v_pred=bool(v_pred), ranks=ranks, recipe=result.recipe, threshold=thr,
                            tuned=opts.tuned, base=opts.base, hashes=hashes,
                            title=opts.title or opts.output.stem, scope=opts.scope, kept=result.kept,
                            text_encoders={c.label: c.included for c in result.text_encoders})


def _size_threshold(ex: _Extractor, pairs: list[Pair], recipe: Recipe, opts: ExtractOptions, pairing,
                    encoders: list[EncoderCheck], hashes: dict, progress: Progress | None
                    ) -> tuple[float, dict[str, list[int]]]:
    """``size=``: every layer's spectrum, then the lowest threshold whose exact file fits, and the
    directions each layer keeps at it (the second pass builds exactly these, so the size holds)."""
    import torch

    from loratools.io.writer import TensorSpec
    from loratools.ops.extract.select import choose, fit_size, layer_shape
    from loratools.ops.resize.sizing import file_size

    spectra, all_scores, shapes, live = [], [], [], []
    for i, pair in enumerate(pairs):
        S, sc, _, _ = ex.spectrum(pair)
        if sc is not None:
            spectra.append(S)
            all_scores.append(sc)
            shapes.append(layer_shape(pair.shape))
            live.append(pair)
        if progress:
            progress("measuring spectra", i + 1, len(pairs))
    if not live:
        return recipe.param, {}
    stub = ExtractResult(opts.output, pairing.arch, recipe.text, [], [], encoders, [], None, None, 0.0)

    def size_of(ranks: list[int], threshold: float) -> int:
        specs = []
        for pair, k in zip(live, ranks):
            if k:
                shape = pair.shape
                specs += [TensorSpec(f"{pair.name}.lora_down.weight", ex.dtype, (k, *shape[1:])),
                          TensorSpec(f"{pair.name}.lora_up.weight", ex.dtype,
                                     (shape[0], k, 1, 1) if len(shape) == 4 else (shape[0], k)),
                          TensorSpec(f"{pair.name}.alpha", torch.float32, ())]
        stub.threshold = threshold
        meta = _metadata(opts, pairing, stub, [(k, p.kxk) for p, k in zip(live, ranks) if k], hashes)
        return file_size(specs, meta)

    budget = int(math.floor(recipe.param * (1 << 20)))
    try:
        threshold, _ = fit_size(all_scores, spectra, shapes, recipe, size_of, budget)
    except ValueError as exc:
        raise UsageError(f"size={recipe.param:g} MiB ({budget} bytes) is below the smallest file possible "
                         f"({exc.args[0]} bytes: header and metadata); raise size=") from None
    return threshold, {pair.name: choose(recipe, S, shape, sc, threshold)
                       for pair, S, sc, shape in zip(live, spectra, all_scores, shapes)}


def _warnings(result: ExtractResult, opts: ExtractOptions, dtype: torch.dtype) -> list[str]:
    notes = []
    if result.missing:
        notes.append(f"{len(result.missing)} base weight(s) have no counterpart in the tuned model and were not "
                     f"compared (e.g. {result.missing[0]})")
    lossy = [r for r in result.written if r.stored > STORAGE_TOLERANCE]
    if lossy:
        worst = max(lossy, key=lambda r: r.stored)
        name = str(dtype).removeprefix("torch.")
        notes.append(f"{len(lossy)} layer(s) lose more than {STORAGE_TOLERANCE:.0%} of their delta to {name} storage "
                     f"(worst {worst.name}: {worst.stored:.1%}); write with --save_precision bf16 or fp32")
    if result.unchanged:
        notes.append(f"{len(result.unchanged)} layer(s) are identical in both models and were left out")
    return notes
