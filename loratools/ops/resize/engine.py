"""The resize engine: decompose each layer once, score, select per recipe, write.

Per LoRA file:

1. Every LoRA-family module (LoRA/LoCon, Tucker, DoRA; LoHa and LoKr converted exactly to
   low-rank factors first) is decomposed by ``linalg.lowrank_svd`` (QR + r x r SVD, the alpha
   scale included). Its paired base weight (``keys.BaseIndex``, TE2's fused q/k/v as row slices)
   gives the Frobenius and exact spectral norms (on-disk cache) and, for ``subspace``, the
   projections. The singular values and references are kept for every layer, the singular
   vectors only as far as some recipe can keep them (all of them for ``size=``) and while they
   fit ``factor_cache_bytes``; others are recomputed (same inputs, same result) when written, so
   memory stays bounded.
2. Each recipe selects ranks (``selection``): thresholds and ``size=`` over elias' scores, or
   kohya's criteria. All recipes share step 1.
3. Kept layers are written with sqrt(sigma)-balanced factors and ``alpha = scale * k`` in
   float32 (``alpha/rank`` is exactly the old scale; converted LoHa/LoKr get ``alpha = k``);
   PEFT files keep PEFT names with the scale folded in. Layers reduced to rank 0 are omitted
   and reported; IA3/full/norm modules and unknown tensors are copied verbatim. Nothing is
   dropped silently.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import ArchitectureMismatchError, NonFiniteError, UsageError
from loratools.io.checkpoint import release_pages
from loratools.io.dtypes import parse_dtype_name
from loratools.keys.naming import te_layer
from loratools.ops.resize.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile, AdapterModule
    from loratools.io import ModelSource

Progress = Callable[[str, int, int], None]
_CONVERTED = ("loha", "lokr")


@dataclass
class LayerRow:
    """One layer of one recipe: ranks and the error the selection costs."""

    name: str
    kind: str
    old_rank: int
    new_rank: int
    rle_lora: float  # ||dropped sigma|| / ||sigma||
    rle_ckpt: float | None  # ||dropped sigma|| / ||W||_F
    matched: bool


@dataclass
class RecipeOutcome:
    """One output file (or, with ``dry_run``, the prediction of it)."""

    recipe: str
    path: Path
    threshold: float | None
    status: str  # "written", "dry-run", "exists" (skipped), "empty" (nothing kept)
    size_before: int
    size_after: int
    rank_before: int
    rank_after: int
    fro_retained: float
    layers_kept: int
    layers_dropped: list[str] = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)
    quantiles: dict[str, float] = field(default_factory=dict)

    def summary_line(self) -> str:
        """``name: rank 1234 -> 321, 36.2 MiB -> 9.1 MiB, Frobenius 98.7 %, threshold -3.55`` (sizes in
        the unit that shows the change: ``484.5 KiB -> 465.4 KiB``, not ``0.5 MiB -> 0.5 MiB``)."""
        from loratools.units import size_change

        thr = "" if self.threshold is None else f", threshold {self.threshold:.4g}"
        verb = {"dry-run": " (dry run)", "exists": " (exists, skipped)"}.get(self.status, "")
        return (f"{self.path.name}: rank {self.rank_before} -> {self.rank_after}, "
                f"{size_change(self.size_before, self.size_after)}, "
                f"Frobenius {100 * self.fro_retained:.1f} %{thr}{verb}")


@dataclass
class LoraOutcome:
    """Everything about one input LoRA."""

    path: Path
    outcomes: list[RecipeOutcome]
    warnings: list[str] = field(default_factory=list)
    zero_layers: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)  # kind -> count (LoHa/LoKr -> LoRA)
    passthrough: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Layer:
    module: AdapterModule
    name: str
    kind: str
    old_rank: int
    weight_shape: tuple[int, ...]
    S: torch.Tensor
    scale_out: float  # alpha/rank of the written layer
    shape: Any  # selection.LayerShape
    base: Any  # scoring.BaseRefs | None
    factors: tuple[torch.Tensor, torch.Tensor] | None
    dora_scale: torch.Tensor | None

    @property
    def params(self) -> int:
        return self.weight_shape[0] + math.prod(self.weight_shape[1:])


class Resizer:
    """Resize LoRAs against one base checkpoint (or none), reusing the base across files.

    Args:
        base: a single-file checkpoint or a diffusers folder (or an open ``loratools.io.ModelSource``),
            or None (checkpoint-free recipes only).
        cache_dir: folder of the norm cache; ``"default"`` = user cache folder, None = no cache.
        device: "cpu" or a torch device for the decompositions ("cuda").
        factor_cache_bytes: singular vectors kept in memory between scoring and writing.

    Example:
        >>> rz = Resizer("sd_xl_base_1.0.safetensors")
        >>> out = rz.resize("lora.safetensors", "fro_ckpt=1,thr=-3.55", output="out/")
        >>> print(out.outcomes[0].summary_line())
    """

    def __init__(self, base: str | Path | ModelSource | None = None, *, cache_dir: str | Path | None = "default",
                 device: str = "cpu", factor_cache_bytes: int = 128 << 20) -> None:
        from loratools.ops.resize.cache import NormCache, checkpoint_identity, default_cache_dir

        from loratools.ops.device import check_device

        _return_freed_memory()
        self.device = check_device(device)
        self.factor_cache_bytes = factor_cache_bytes
        self.model = self.index = self.arch = None
        self.cache: NormCache | None = None
        self.base_path: Path | None = None
        if base is None:
            return
        from loratools.io import open_model
        from loratools.keys.arch import detect_checkpoint_arch
        from loratools.keys.index import BaseIndex

        self.model = open_model(base) if isinstance(base, (str, Path)) else base
        self.base_path = Path(self.model.path)
        self.arch = detect_checkpoint_arch(self.model)
        self.index = BaseIndex.from_model(self.model)
        files = self._base_files()
        folder = default_cache_dir() if cache_dir == "default" else (None if cache_dir is None else Path(cache_dir))
        if files and folder is not None:  # an in-memory source has no identity to key a cache by
            self.cache = NormCache(folder, checkpoint_identity(files))

    def _base_files(self) -> list[Path]:
        return list(self.model.all_files()) if self.model is not None else []

    # ------------------------------------------------------------------------------------
    def resize(self, lora: str | Path, recipes: str | Sequence[Recipe], *, output: str | Path | None = None,
               dtype: str | None = None, overwrite: bool = False, kohya_compat: bool = False,
               dry_run: bool = False, progress: Progress | None = None, skip_nonfinite: bool = False) -> LoraOutcome:
        """Resize one LoRA file with every recipe.

        Args:
            lora: the adapter file.
            recipes: a recipe string (``:`` separates several) or parsed recipes.
            output: output folder, or a ``.safetensors`` path (one recipe); default: the LoRA's folder.
            dtype: "fp16", "bf16" or "fp32" for the factors (default: the input's); alphas are fp32.
            overwrite: replace existing outputs (they are skipped otherwise).
            kohya_compat: sd-scripts' ranks for kohya methods (+1 included).
            dry_run: compute everything, write nothing.
            progress: ``callback(phase, done, total)``.
            skip_nonfinite: leave out modules whose factors hold NaN/Inf (with a warning) instead
                of refusing the file.

        Returns:
            A ``LoraOutcome`` with one ``RecipeOutcome`` per recipe.
        """
        from loratools.ops.resize.recipe import parse_recipes

        t0 = time.perf_counter()
        recipes = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
        lora = Path(lora)
        out = None if output is None else Path(output)
        if out is not None and out.suffix.lower() == ".safetensors" and len(recipes) > 1:
            raise UsageError(f"output {out} is one file but {len(recipes)} recipes were given; "
                             "give an output folder instead")
        folder = out.parent if out is not None and out.suffix.lower() == ".safetensors" else (out or lora.parent)
        if not dry_run:
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"output folder {folder} is a file; give a folder or a .safetensors name", path=folder)
            if not folder.is_dir():
                raise UsageError(f"output folder {folder} does not exist; create it first", path=folder)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UsageError(f"cannot write to folder {folder} (permission denied); choose another -o",
                                 path=folder)
        if any(r.needs_checkpoint for r in recipes) and self.model is None:
            names = ", ".join(sorted({k for r in recipes for k in r.weights if k.endswith(("_ckpt", "subspace"))}))
            raise UsageError(f"recipe scores {names} compare with the base checkpoint; pass it "
                             "(as the first file or with --base) or use fro_lora/spn_lora/params scores")
        pending = self._pending(lora, recipes, out, overwrite, kohya_compat, dry_run)
        if not pending:
            return LoraOutcome(lora, [self._existing(lora, r, out, kohya_compat) for r in recipes],
                               seconds=time.perf_counter() - t0)

        from loratools.adapters import load_adapter

        adapter = load_adapter(lora, nonfinite="skip" if skip_nonfinite else "error",
                               nonfinite_fix="pass --skip-nonfinite to resize the rest without those modules")
        result = LoraOutcome(lora, [])
        result.warnings.extend(adapter.warnings)  # e.g. a stored alpha of 0 (scale 0) resizes to nothing
        self._check_arch(adapter, lora)
        layers, passthrough = self._decompose(adapter, recipes, kohya_compat, result, progress)
        if self.cache is not None:
            self.cache.save()
        from loratools.io import file_sha256

        sha = file_sha256(lora)
        out_dtype = self._dtype(dtype, adapter)
        for recipe in recipes:
            result.outcomes.append(self._apply(recipe, lora, adapter, layers, passthrough, out, out_dtype,
                                               overwrite, kohya_compat, dry_run, sha, progress))
        result.seconds = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------------------------
    def _pending(self, lora: Path, recipes: Sequence[Recipe], out: Path | None, overwrite: bool,
                 compat: bool, dry_run: bool) -> bool:
        """False when every output is known to exist already (batch re-runs skip the work)."""
        from loratools.ops.resize.naming import output_path

        if overwrite or dry_run:
            return True
        for r in recipes:
            if r.method == "size":
                return True
            if not output_path(lora, r, r.param if r.method == "thr" else None, output=out,
                               kohya_compat=compat).exists():
                return True
        return False

    def _existing(self, lora: Path, recipe: Recipe, out: Path | None, compat: bool) -> RecipeOutcome:
        from loratools.io import read_header
        from loratools.ops.resize.naming import output_path

        path = output_path(lora, recipe, recipe.param if recipe.method == "thr" else None, output=out,
                           kohya_compat=compat)
        size = path.stat().st_size
        return RecipeOutcome(recipe.text, path, None, "exists", lora.stat().st_size, size, 0,
                             _total_rank(read_header(path)), float("nan"), 0)

    def _check_arch(self, adapter: AdapterFile, path: Path) -> None:
        if self.arch is None:
            return
        from loratools.keys.arch import guess_adapter_arch

        info = guess_adapter_arch(adapter)
        if info is not None and info.arch != self.arch.arch:
            raise ArchitectureMismatchError(
                f"this is a {info.label} LoRA ({info.evidence}) but the base checkpoint {self.base_path.name} "
                f"is {self.arch.label}; pass the checkpoint the LoRA was trained on", path=path)

    def _dtype(self, dtype: str | None, adapter: AdapterFile) -> torch.dtype:
        import torch

        if dtype is not None:
            return parse_dtype_name(dtype, option="--save_precision")
        for m in adapter.modules.values():
            if m.kind in ("lora", *_CONVERTED):
                t = next(iter(_factor_tensors(m)))
                if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
                    return t.dtype
        return torch.float16

    # ------------------------------------------------------------------------------------
    def _decompose(self, adapter: AdapterFile, recipes: Sequence[Recipe], compat: bool, result: LoraOutcome,
                   progress: Progress | None) -> tuple[list[_Layer], dict[str, torch.Tensor]]:
        import torch

        from loratools.ops.resize.scoring import BaseRefs, subspace_projection
        from loratools.ops.resize.selection import LayerShape, is_zero

        want_subspace = any(abs(r.weights.get("subspace", 0.0)) > 1e-6 for r in recipes)
        # sigma_max of every base layer is the one expensive checkpoint statistic: only spn_ckpt needs it
        want_spn = any(abs(r.weights.get("spn_ckpt", 0.0)) > 1e-6 for r in recipes)
        if adapter.naming == "peft" and any(getattr(m, "dora_scale", None) is not None
                                            for m in adapter.modules.values()):
            raise UsageError("PEFT DoRA adapters (lora_magnitude_vector) cannot be resized yet: "
                             "convert the file to kohya names first (loratools convert)", path=adapter.path)
        layers: list[_Layer] = []
        passthrough: dict[str, torch.Tensor] = dict(adapter.unknown)
        names = sorted(adapter.modules)
        cached = 0
        for i, name in enumerate(names):
            m = adapter.modules[name]
            if progress:
                progress("decompose", i, len(names))
            if m.kind not in ("lora", *_CONVERTED):
                passthrough.update({f"{m.source_name}.{s}": t for s, t in m.tensors().items()})
                result.passthrough.append(name)
                continue
            target = self.index.resolve(name) if self.index is not None else None
            weight_shape = tuple(target.shape) if target is not None else tuple(m.weight_shape)
            if math.prod(weight_shape) != math.prod(m.weight_shape):
                raise ArchitectureMismatchError(
                    f"module {name}: the LoRA's weight shape {tuple(m.weight_shape)} does not fit the base "
                    f"weight {target.key} {weight_shape}; pass the checkpoint the LoRA was made for",
                    path=adapter.path)
            U, S, Vh, old_rank = self._svd(m)
            if not bool(torch.isfinite(S).all()):
                raise NonFiniteError(f"module {name}: its factors hold NaN or Inf; the LoRA is broken "
                                     "(loratools check weights shows where)", path=adapter.path)
            base = None
            if target is not None:
                fro, spn = self._norms(target, want_spn)
                proj = subspace_projection(U, Vh, self._base_weight(target)) if want_subspace else None
                base = BaseRefs(fro=fro, spn=spn, subspace=proj)
            elif self.index is not None:
                result.unmatched.append(name)
            if m.kind in _CONVERTED:
                result.converted[m.kind] = result.converted.get(m.kind, 0) + 1
            if is_zero(S):
                result.zero_layers.append(name)
            kxk = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
            is_4d = len(weight_shape) == 4
            scale_out = m.scale if m.kind == "lora" else 1.0
            dora = getattr(m, "dora_scale", None)
            layer = _Layer(
                module=m, name=name, kind=m.kind, old_rank=old_rank, weight_shape=weight_shape, S=S,
                scale_out=scale_out,
                shape=LayerShape(old_rank=old_rank, full_len=min(weight_shape[0], math.prod(weight_shape[1:])),
                                 kxk=kxk, is_4d=is_4d, keep_one=dora is not None, scale=m.scale or 1.0),
                base=base, factors=None, dora_scale=dora)
            need = _needed(layer, recipes, compat)
            nbytes = (U.shape[0] + Vh.shape[1]) * need * 4
            if need and cached + nbytes <= self.factor_cache_bytes:  # else rebuilt when written
                layer.factors, cached = (U[:, :need].clone(), Vh[:need].clone()), cached + nbytes
            layers.append(layer)
            del U, Vh
        if progress:
            progress("decompose", len(names), len(names))
        if result.unmatched:
            ckpt = any(r.needs_checkpoint for r in recipes)
            result.warnings.append(
                f"{len(result.unmatched)} layer(s) match no base weight (e.g. {result.unmatched[0]})"
                + ("; they are scored against themselves instead of the checkpoint" if ckpt else ""))
        if result.converted:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.converted.items()))
            result.warnings.append(f"converted {kinds} module(s) to LoRA (exact low-rank factors; the "
                                   "per-layer error of the chosen ranks is in the table)")
        if result.zero_layers:
            te_last = [n for n in result.zero_layers if te_layer(n) in (("te1", 11), ("te", 11))]
            note = " (the untrained last text-encoder layer of a clip-skip-2 LoRA)" \
                if len(te_last) == len(result.zero_layers) else ""
            result.warnings.append(f"{len(result.zero_layers)} all-zero layer(s) omitted{note}: "
                                   f"{', '.join(result.zero_layers[:3])}{' ...' if len(result.zero_layers) > 3 else ''}")
        return layers, passthrough

    def _svd(self, m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Singular triplets of one module's delta (scale included) and its factor rank."""
        import torch

        from loratools.linalg.lowrank import khatri_rao_factors, kron_factors, lowrank_svd, thin_factors

        dev = self.device
        if m.kind == "lora":
            up, down, mid = m.up, m.down, m.mid
            r = int(down.shape[0])
        elif m.kind == "loha" and m.t1 is None:
            up, down = khatri_rao_factors(m.w1_a.to(dev).float(), m.w1_b.to(dev).float(),
                                          m.w2_a.to(dev).float(), m.w2_b.to(dev).float())
            mid, r = None, int(up.shape[1])
        else:  # LoKr (any variant) and Tucker LoHa: small dense pieces, exact factors
            up, down = _kron_or_dense(m, dev, thin_factors, kron_factors)
            mid, r = None, int(up.shape[1])
        U, S, Vh = lowrank_svd(up.to(dev).float(), down.to(dev).float(),
                               None if mid is None else mid.to(dev).float(), m.scale)
        return U.cpu(), S.cpu(), Vh.cpu(), min(r, S.numel()) if m.kind != "lora" else r

    def _base_weight(self, target: Any) -> torch.Tensor:
        """One base weight (TE2's fused q/k/v: its row block), read only when needed."""
        w = self.model.components[target.component][target.key]
        return w[target.rows[0]:target.rows[1]] if target.rows is not None else w

    def _norms(self, target: Any, want_spn: bool) -> tuple[float, float | None]:
        """Cached norms, or the base weight read and measured (then cached).

        The Frobenius norm is one pass over the weight; the exact spectral norm needs a Gram
        matrix per layer (minutes for a whole SDXL UNet), so it is computed only when asked for
        and the cache fills in whichever norms the recipes needed.
        """
        from loratools.linalg.norms import frobenius_norm, spectral_norm
        from loratools.ops.resize.cache import NormCache

        key = NormCache.key(target.component, target.key, target.rows)
        hit = dict(self.cache.get(key) or {}) if self.cache is not None else {}
        if "fro" not in hit or (want_spn and "spn" not in hit):
            W = self._base_weight(target)
            hit.setdefault("fro", frobenius_norm(W))
            if want_spn:
                hit.setdefault("spn", spectral_norm(W))
            del W
            release_pages(self.model.components[target.component], target.key)  # a cold run reads the whole base
            if self.cache is not None:
                self.cache.put(key, **hit)
        return float(hit["fro"]), (float(hit["spn"]) if want_spn else None)

    # ------------------------------------------------------------------------------------
    def _ranks(self, recipe: Recipe, layers: Sequence[_Layer], compat: bool,
               size_of: Callable[[list[int], float], int]) -> tuple[list[int], list[Any], float | None, dict[str, float]]:
        """Per-layer ranks and kept-index orders for one recipe, and the threshold reached."""
        import torch

        from loratools.ops.resize.scoring import layer_scores
        from loratools.ops.resize.selection import fit_size, kohya_rank, score_order, threshold_rank

        if not recipe.uses_scores:
            ranks = [kohya_rank(ly.S, ly.shape, recipe, compat) for ly in layers]
            return ranks, [None] * len(layers), None, {}
        scores = [layer_scores(ly.S, recipe.weights, rescale=recipe.rescale, params=ly.params, base=ly.base)
                  for ly in layers]
        live = [s for s, ly in zip(scores, layers) if float(ly.S[0]) >= 1e-6] if layers else []
        quant: dict[str, float] = {}
        if live:
            allsc = torch.cat(live).float()
            allsc = allsc[torch.isfinite(allsc)]
            if allsc.numel():
                qs = (0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.99)
                quant = {f"{q:.2f}": float(v) for q, v in zip(qs, torch.quantile(allsc, torch.tensor(qs)))}
        if recipe.method == "thr":
            ranks = [threshold_rank(sc, recipe.param, ly.S, ly.shape, recipe) for sc, ly in zip(scores, layers)]
            threshold = recipe.param
        else:
            budget = int(math.floor(recipe.param * (1 << 20)))
            try:
                threshold, ranks, _ = fit_size(scores, [ly.S for ly in layers], [ly.shape for ly in layers],
                                               recipe, size_of, budget)
            except ValueError as exc:
                minimum = exc.args[0]
                raise UsageError(f"size={recipe.param:g} MiB ({budget} bytes) is below the smallest file this "
                                 f"LoRA can give ({minimum} bytes: header, metadata and pass-through tensors); "
                                 "raise size=") from None
        return ranks, [score_order(sc) for sc in scores], threshold, quant

    def _apply(self, recipe: Recipe, lora: Path, adapter: AdapterFile, layers: list[_Layer],
               passthrough: dict[str, torch.Tensor], out: Path | None, out_dtype: torch.dtype,
               overwrite: bool, compat: bool, dry_run: bool, sha: str,
               progress: Progress | None) -> RecipeOutcome:
        import torch

        from loratools.io import TensorSpec, write_safetensors
        from loratools.io.writer import check_output_path
        from loratools.ops.resize.metadata import KeptLayer, resized_metadata
        from loratools.keys.resolve import output_names
        from loratools.ops.resize.naming import factor_keys, output_path
        from loratools.ops.resize.sizing import file_size

        naming = output_names(adapter, self.index)  # kohya names from the one vocabulary, whatever the input's
        old_max = max((ly.old_rank for ly in layers), default=0)
        pass_specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in passthrough.items()]

        def alpha_for(ly: _Layer, k: int) -> float:
            if compat and ly.kind == "lora":
                return float(torch.tensor(ly.scale_out, dtype=torch.float32) * k)
            return float(torch.tensor(ly.scale_out * k, dtype=torch.float32))

        def plan(ranks: Sequence[int], threshold: float | None) -> tuple[list[TensorSpec], dict[str, str]]:
            specs = list(pass_specs)
            kept: list[KeptLayer] = []
            for ly, k in zip(layers, ranks):
                if k == 0:
                    continue
                keys = factor_keys(naming[ly.name])
                ws = ly.weight_shape
                specs.append(TensorSpec(keys["down"], out_dtype, (k, *ws[1:])))
                specs.append(TensorSpec(keys["up"], out_dtype, (ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k)))
                alpha = alpha_for(ly, k)
                specs.append(TensorSpec(keys["alpha"], torch.float32, ()))
                if ly.dora_scale is not None:
                    specs.append(TensorSpec(keys["dora_scale"], ly.dora_scale.dtype, tuple(ly.dora_scale.shape)))
                kept.append(KeptLayer(k, alpha, ly.shape.kxk))
            drop = ("lora_adapter_metadata",)  # a PEFT input's alphas are in the kohya alphas now
            meta = resized_metadata(adapter.metadata, recipe=recipe, threshold=threshold, kept=kept,
                                    old_max_rank=old_max, dropped=sum(1 for k in ranks if k == 0),
                                    source_name=lora.name, source_sha256=sha, kohya_compat=compat,
                                    drop_keys=drop)
            return specs, meta

        def size_of(ranks: list[int], threshold: float) -> int:
            specs, meta = plan(ranks, threshold)
            return file_size(specs, meta)

        ranks, orders, threshold, quant = self._ranks(recipe, layers, compat, size_of)
        path = output_path(lora, recipe, threshold, output=out, kohya_compat=compat)
        specs, meta = plan(ranks, threshold)
        rows, kept_sq, all_sq, dropped = [], 0.0, 0.0, []
        for ly, k, order in zip(layers, ranks, orders):
            idx = _kept_indices(ly, k, order)
            s = ly.S.double()
            err = float(s[[i for i in range(s.numel()) if i not in set(idx)]].norm()) if s.numel() else 0.0
            total = float(s.norm())
            kept_sq += max(total * total - err * err, 0.0)
            all_sq += total * total
            rows.append(LayerRow(ly.name, ly.kind, ly.old_rank, k, err / total if total else 0.0,
                                 err / ly.base.fro if ly.base is not None and ly.base.fro else None,
                                 ly.base is not None))
            if k == 0:
                dropped.append(ly.name)
        outcome = RecipeOutcome(
            recipe=recipe.text, path=path, threshold=threshold, status="dry-run", size_before=lora.stat().st_size,
            size_after=file_size(specs, meta), rank_before=sum(ly.old_rank for ly in layers), rank_after=sum(ranks),
            fro_retained=math.sqrt(kept_sq / all_sq) if all_sq else 1.0, layers_kept=sum(1 for k in ranks if k),
            layers_dropped=dropped, rows=rows, quantiles=quant)
        if dry_run:
            return outcome
        if path.exists() and not overwrite:
            outcome.status = "exists"
            outcome.size_after = path.stat().st_size
            return outcome
        check_output_path(path, overwrite=overwrite, protected=[lora, *self._base_files()])
        produced = self._producer(layers, ranks, orders, recipe, naming, out_dtype, passthrough, alpha_for,
                                  progress, len(specs))
        written = write_safetensors(path, specs, produced, meta, overwrite=overwrite,
                                    protected=[lora, *self._base_files()], sshs_hashes=True)
        outcome.status = "written"
        outcome.size_after = written.size
        return outcome

    def _producer(self, layers: list[_Layer], ranks: list[int], orders: list[Any], recipe: Recipe, naming: Mapping[str, str],
                  out_dtype: torch.dtype, passthrough: Mapping[str, torch.Tensor],
                  alpha_for: Callable[[_Layer, int], float], progress: Progress | None,
                  total: int) -> Callable[[str], torch.Tensor]:
        """``produce(name)`` for the writer: rebuilds each layer's factors when first asked."""
        import torch

        from loratools.ops.resize.naming import factor_keys

        owner: dict[str, tuple[int, str]] = {}
        for i, (ly, k) in enumerate(zip(layers, ranks)):
            if k:
                for part, key in factor_keys(naming[ly.name]).items():
                    owner[key] = (i, part)
        current: dict[str, Any] = {"i": None, "tensors": {}}
        done = [0]

        def build(i: int) -> dict[str, torch.Tensor]:
            ly, k = layers[i], ranks[i]
            idx = _kept_indices(ly, k, orders[i])
            if ly.factors is not None and (not idx or max(idx) < ly.factors[0].shape[1]):
                U, Vh = ly.factors
            else:
                U, _, Vh, _ = self._svd(ly.module)
            s = ly.S[idx].double() * recipe.rescale / ly.scale_out
            root = s.clamp_min(0).sqrt()
            up = U[:, idx].double() * root
            down = root[:, None] * Vh[idx].double()
            if k > len(idx):  # kohya-compat ranks above the decomposition: zero directions
                up = torch.cat([up, up.new_zeros(up.shape[0], k - len(idx))], 1)
                down = torch.cat([down, down.new_zeros(k - len(idx), down.shape[1])], 0)
            ws = ly.weight_shape
            up = up.reshape((ws[0], k, 1, 1) if len(ws) == 4 else (ws[0], k)).to(out_dtype)
            down = down.reshape(k, *ws[1:]).to(out_dtype)
            for t in (up, down):
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"module {ly.name}: a factor overflows {out_dtype} "
                                         "(write with --save_precision fp32 or bf16)")
            keys = factor_keys(naming[ly.name])
            res = {keys["up"]: up.contiguous(), keys["down"]: down.contiguous()}
            res[keys["alpha"]] = torch.tensor(alpha_for(ly, k), dtype=torch.float32)
            if ly.dora_scale is not None:
                res[keys["dora_scale"]] = ly.dora_scale.contiguous()
            return res

        def produce(key: str) -> torch.Tensor:
            done[0] += 1
            if progress:
                progress("write", done[0], total)
            if key in passthrough:
                return passthrough[key].contiguous()
            i, _ = owner[key]
            if current["i"] != i:
                current["i"], current["tensors"] = i, build(i)
            return current["tensors"].pop(key)

        return produce


def _kept_indices(ly: _Layer, k: int, order: Any) -> list[int]:
    """The singular directions a rank-k selection keeps, in sigma order."""
    n = ly.S.numel()
    if order is None:
        return list(range(min(k, n)))
    return sorted(int(i) for i in order[: min(k, n)])


def _return_freed_memory() -> None:
    """Serve allocations of 1 MiB and more from mmap so freed layer buffers go back to the OS.

    glibc's default threshold adapts upwards to 32 MiB, after which every base weight, Gram
    matrix and factor temporary of up to 32 MiB comes from the heap; over a thousand layers that
    fragments into hundreds of MB of resident memory (measured: +740 MB heap on an SDXL LoCon).
    Process-wide, glibc only, harmless elsewhere.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


def _needed(ly: _Layer, recipes: Sequence[Recipe], compat: bool) -> int:
    """How many leading singular directions the recipes can keep (all of them with a ``size=``
    recipe, whose global threshold is not known yet); only those are kept in memory."""
    from loratools.ops.resize.scoring import layer_scores
    from loratools.ops.resize.selection import kohya_rank, score_order, threshold_rank

    if any(r.method == "size" for r in recipes):
        return ly.S.numel()
    need = 0
    for r in recipes:
        if r.uses_scores:
            sc = layer_scores(ly.S, r.weights, rescale=r.rescale, params=ly.params, base=ly.base)
            idx = _kept_indices(ly, threshold_rank(sc, r.param, ly.S, ly.shape, r), score_order(sc))
        else:
            idx = _kept_indices(ly, kohya_rank(ly.S, ly.shape, r, compat), None)
        need = max(need, max(idx) + 1 if idx else 0)
    return need


def _factor_tensors(m: AdapterModule) -> list[torch.Tensor]:
    return [t for s, t in m.tensors().items() if s not in ("alpha", "dora_scale")]


def _kron_or_dense(m: AdapterModule, dev: str, thin_factors: Callable, kron_factors: Callable,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a LoKr (``kron(W1, W2)``) or a Tucker LoHa, unscaled."""
    import torch

    if m.kind == "lokr":
        f = {k: v.to(dev).float() for k, v in m._factors().items()}
        if "w1" in f:
            u1, d1 = thin_factors(f["w1"])
        else:
            u1, d1 = f["w1_a"], f["w1_b"]
        if "w2" in f:
            u2, d2 = thin_factors(f["w2"].reshape(f["w2"].shape[0], -1))
        elif "t2" in f:
            w2 = torch.einsum("ijhw,ip,jr->prhw", f["t2"], f["w2_a"], f["w2_b"])
            u2, d2 = thin_factors(w2.reshape(w2.shape[0], -1))
        else:
            u2, d2 = f["w2_a"], f["w2_b"]
        return kron_factors(u1, d1, u2, d2)
    delta = m.delta() / (m.scale or 1.0)
    return thin_factors(delta.reshape(delta.shape[0], -1).to(dev))


def _total_rank(header: Any) -> int:
    return sum(int(i.shape[0]) for k, i in header.tensors.items()
               if k.endswith((".lora_down.weight", ".lora_A.weight")) and i.shape)


def resize(loras: Sequence[str | Path], recipes: str = "fro_ckpt=1,thr=-3.55", *, base: str | Path | None = None,
           **options: Any) -> list[LoraOutcome]:
    """Resize several LoRAs against one base, with the CLI's inputs: files, folders and globs, the base
    recognised among them, earlier resize outputs in folders and globs skipped (``resolve_inputs``);
    then ``Resizer(base).resize(lora, recipes, **options)`` for each."""
    from loratools.ops.resize.inputs import resolve_inputs

    found, files, _ = resolve_inputs([str(p) for p in loras], None if base is None else str(base))
    rz = Resizer(found, **{k: options.pop(k) for k in ("cache_dir", "device") if k in options})
    return [rz.resize(p, recipes, **options) for p in files]
