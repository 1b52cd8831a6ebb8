"""The resize engine: decompose each layer once, then per recipe select and write.

Per LoRA file (``Resizer.resize``):

1. ``decompose``: every module as ranked directions in its own form (``AdapterModule.directions``:
   LoRA/LoCon/Tucker/DoRA as singular triplets, batched per factor shape; LoHa by its Hadamard
   factor pairs; LoKr by its low-rank Kronecker factor), paired with its base weight
   (``keys.BaseIndex``, TE2's fused q/k/v as row blocks) and that weight's norms (on-disk cache,
   measured in one streamed pass when missing). Shared by every recipe.
2. ``choose``: each recipe's ranks (thresholds and ``size=`` over elias' scores, or kohya's
   criteria), the same for every adapter type.
3. ``write``: the exact plan (names, shapes, metadata) first, then the tensors built layer by layer
   as the writer streams them to a temporary file that is renamed at the end. Layers reduced to
   rank 0 are omitted and reported; IA3/full/norm modules and unknown tensors are copied verbatim.
   An output larger than its input is not written unless asked for (``allow_larger``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import ArchitectureMismatchError, NonFiniteError, UsageError
from loratools.io.dtypes import parse_precision
from loratools.ops.resize.outcome import LayerRow, LoraOutcome, RecipeOutcome
from loratools.ops.resize.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile
    from loratools.io import ModelSource
    from loratools.ops.resize.decompose import Layer

__all__ = ["LayerRow", "LoraOutcome", "RecipeOutcome", "Resizer", "resize"]

Progress = Callable[[str, int, int], None]


class Resizer:
    """Resize LoRAs against one base checkpoint (or none), reusing the base across files.

    Args:
        base: a single-file checkpoint or a diffusers folder (or an open ``loratools.io.ModelSource``),
            or None (checkpoint-free recipes only).
        cache_dir: folder of the norm cache; ``"default"`` = user cache folder, None = no cache.
        device: "cpu" or a torch device for LoHa/LoKr decompositions ("cuda"); LoRA-family layers
            are decomposed with numpy on the CPU (r x r work after one Gram product per factor).
        allow_larger: write outputs larger than their input (otherwise they are reported and skipped).

    Example:
        >>> rz = Resizer("sd_xl_base_1.0.safetensors")
        >>> out = rz.resize("lora.safetensors", "fro_ckpt=1,thr=-3.55", output="out/")
        >>> print(out.outcomes[0].summary_line())
    """

    def __init__(self, base: str | Path | ModelSource | None = None, *, cache_dir: str | Path | None = "default",
                 device: str = "cpu", allow_larger: bool = False) -> None:
        from loratools.ops.device import check_device
        from loratools.ops.resize.basenorms import BaseNorms

        _return_freed_memory()
        self.device = check_device(device)
        self.allow_larger = allow_larger
        self.base = BaseNorms(base, cache_dir) if base is not None else None

    def _base_files(self) -> list[Path]:
        return self.base.files if self.base is not None else []

    # ------------------------------------------------------------------------------------
    def resize(self, lora: str | Path | AdapterFile, recipes: str | Sequence[Recipe], *,
               output: str | Path | None = None, dtype: str | None = None, overwrite: bool = False,
               kohya_compat: bool = False, dry_run: bool = False, progress: Progress | None = None,
               skip_nonfinite: bool = False) -> LoraOutcome:
        """Resize one LoRA with every recipe.

        Args:
            lora: the adapter file, or an already parsed ``AdapterFile`` (its ``path`` names the
                outputs; it need not exist: ``merge --to-lora`` resizes its result in memory).
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
        from loratools.ops.resize.sizing import data_bytes

        t0 = time.perf_counter()
        recipes = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
        given = None if isinstance(lora, (str, Path)) else lora
        path = Path(lora) if given is None else _named(given)
        out = None if output is None else Path(output)
        _check_output(out, path, len(recipes), dry_run)
        if any(r.needs_checkpoint for r in recipes) and self.base is None:
            names = ", ".join(sorted({k for r in recipes for k in r.weights if k.endswith(("_ckpt", "subspace"))}))
            raise UsageError(f"recipe scores {names} compare with the base checkpoint; pass it "
                             "(as the first file or with --base) or use fro_lora/spn_lora/params scores")
        if given is None and not _pending(path, recipes, out, overwrite, kohya_compat, dry_run):
            return LoraOutcome(path, [_existing(path, r, out, kohya_compat) for r in recipes],
                               seconds=time.perf_counter() - t0)
        sha = _hash_later(path) if given is None else None
        try:
            adapter = given if given is not None else _load(path, skip_nonfinite)
            result = LoraOutcome(path, [])
            result.warnings.extend(adapter.warnings)  # e.g. a stored alpha of 0 (scale 0) resizes to nothing
            self._check_arch(adapter, path)
            from loratools.ops.resize.decompose import decompose

            try:
                layers, passthrough = decompose(adapter, self.base, recipes, self.device, result, progress)
            except NonFiniteError:
                if given is None and not skip_nonfinite:
                    _load(path, False, check=True)  # raises naming the tensor (parsing checked nothing)
                raise
            if self.base is not None:
                self.base.save()
            out_dtype = self._dtype(dtype, adapter)
            size_before = path.stat().st_size if given is None else _size_of(adapter)
            data_before = data_bytes(_adapter_specs(adapter))
            for recipe in recipes:
                result.outcomes.append(self._apply(
                    recipe, path, adapter, layers, passthrough, out, out_dtype, overwrite, kohya_compat, dry_run,
                    sha, size_before, data_before, progress))
        finally:
            if sha is not None:
                sha.cancel()
        result.seconds = time.perf_counter() - t0
        return result

    def _check_arch(self, adapter: AdapterFile, path: Path) -> None:
        if self.base is None or self.base.arch is None:
            return
        from loratools.keys.arch import guess_adapter_arch

        info = guess_adapter_arch(adapter)
        if info is not None and info.arch != self.base.arch.arch:
            raise ArchitectureMismatchError(
                f"this is a {info.label} LoRA ({info.evidence}) but the base checkpoint {self.base.path.name} "
                f"is {self.base.arch.label}; pass the checkpoint the LoRA was trained on", path=path)

    def _dtype(self, dtype: str | None, adapter: AdapterFile) -> str:
        """The factors' output dtype (safetensors name): the one asked for, else the input's first
        float factor's."""
        from loratools.io.dtypes import from_torch

        if dtype is not None:
            return parse_precision(dtype, option="--save_precision")
        for m in adapter.modules.values():
            for suffix, t in m.tensors().items():
                name = from_torch(t.dtype)
                if suffix not in ("alpha", "dora_scale") and name in ("F16", "BF16", "F32"):
                    return name
        return "F16"

    # ------------------------------------------------------------------------------------
    def _apply(self, recipe: Recipe, lora: Path, adapter: AdapterFile, layers: list[Layer],
               passthrough: dict[str, Any], out: Path | None, out_dtype: str,
               overwrite: bool, compat: bool, dry_run: bool, sha: Future | None, size_before: int,
               data_before: int, progress: Progress | None) -> RecipeOutcome:
        from loratools.io import TensorSpec, write_safetensors
        from loratools.io.writer import check_output_path
        from loratools.keys.resolve import output_names
        from loratools.ops.resize.choose import choose
        from loratools.ops.resize.metadata import KeptLayer, resized_metadata
        from loratools.ops.resize.naming import output_path
        from loratools.ops.resize.sizing import data_bytes, file_size
        from loratools.ops.resize.write import Producer, plan_specs, rows

        index = self.base.index if self.base is not None else None
        names = output_names(adapter, index)  # kohya names from the one vocabulary, whatever the input's
        old_max = max((ly.d.old_rank for ly in layers), default=0)
        pass_specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in passthrough.items()]
        digest: dict[str, str | None] = {"sha": None}  # a placeholder of the same length until the hash is done

        def plan(ranks: Sequence[int], threshold: float | None) -> tuple[list[TensorSpec], dict[str, str]]:
            specs, kept = plan_specs(layers, ranks, names, out_dtype, pass_specs)
            meta = resized_metadata(
                adapter.metadata, recipe=recipe, threshold=threshold,
                kept=[KeptLayer(k, ly.d.alpha(k, kohya=compat), ly.shape.kxk) for ly, k in kept],
                old_max_rank=old_max, dropped=sum(1 for k in ranks if k == 0), source_name=lora.name,
                source_sha256=digest["sha"] or ("0" * 64 if sha is not None else None), kohya_compat=compat,
                drop_keys=("lora_adapter_metadata",))  # a PEFT input's alphas are in the kohya alphas now
            return specs, meta

        def size_of(ranks: list[int], threshold: float) -> int:
            return file_size(*plan(ranks, threshold))

        choice = choose(recipe, layers, compat, size_of)
        path = output_path(lora, recipe, choice.threshold, output=out, kohya_compat=compat)
        table, fro = rows(layers, choice)
        outcome = RecipeOutcome(
            recipe=recipe.text, path=path, threshold=choice.threshold, status="dry-run", size_before=size_before,
            size_after=0, rank_before=sum(ly.d.old_rank for ly in layers), rank_after=sum(choice.ranks),
            fro_retained=fro, layers_kept=sum(1 for k in choice.ranks if k),
            layers_dropped=[ly.name for ly, k in zip(layers, choice.ranks) if k == 0], rows=table,
            quantiles=choice.quantiles)
        specs, meta = plan(choice.ranks, choice.threshold)
        outcome.size_after = file_size(specs, meta)
        if dry_run:
            return outcome
        if path.exists() and not overwrite:
            outcome.status = "exists"
            outcome.size_after = path.stat().st_size
            return outcome
        if data_bytes(specs) > data_before and not self.allow_larger:
            outcome.status = "larger"
            return outcome
        protected = [*([lora] if sha is not None else []), *self._base_files()]  # an in-memory input is no file
        check_output_path(path, overwrite=overwrite, protected=protected)
        if sha is not None:  # the source hash goes into the metadata: wait for it now
            digest["sha"] = sha.result()
            specs, meta = plan(choice.ranks, choice.threshold)
        with Producer(layers, choice, names, out_dtype, recipe.rescale, compat, passthrough, specs, progress) as produce:
            written = write_safetensors(path, specs, produce, meta, overwrite=overwrite, protected=protected,
                                        sshs_hashes=True)
        outcome.status = "written"
        outcome.size_after = written.size
        return outcome


def _named(adapter: AdapterFile) -> Path:
    if adapter.path is None:
        raise UsageError("an in-memory adapter needs a path (it names the outputs)")
    return Path(adapter.path)


def _check_output(out: Path | None, lora: Path, n_recipes: int, dry_run: bool) -> None:
    """One output file for several recipes, or an output folder that cannot take files: say so now."""
    if out is not None and out.suffix.lower() == ".safetensors" and n_recipes > 1:
        raise UsageError(f"output {out} is one file but {n_recipes} recipes were given; "
                         "give an output folder instead")
    folder = out.parent if out is not None and out.suffix.lower() == ".safetensors" else (out or lora.parent)
    if dry_run:
        return
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {folder} is a file; give a folder or a .safetensors name", path=folder)
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist; create it first", path=folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to folder {folder} (permission denied); choose another -o", path=folder)


def _pending(lora: Path, recipes: Sequence[Recipe], out: Path | None, overwrite: bool, compat: bool,
             dry_run: bool) -> bool:
    """False when every output is known to exist already (batch re-runs skip the work)."""
    from loratools.ops.resize.naming import output_path

    if overwrite or dry_run:
        return True
    for r in recipes:
        if r.method == "size":
            return True
        if not output_path(lora, r, r.param if r.method == "thr" else None, output=out, kohya_compat=compat).exists():
            return True
    return False


def _existing(lora: Path, recipe: Recipe, out: Path | None, compat: bool) -> RecipeOutcome:
    from loratools.io import read_header
    from loratools.ops.resize.naming import output_path

    path = output_path(lora, recipe, recipe.param if recipe.method == "thr" else None, output=out, kohya_compat=compat)
    size = path.stat().st_size
    return RecipeOutcome(recipe.text, path, None, "exists", lora.stat().st_size, size, 0,
                         _total_rank(read_header(path)), float("nan"), 0)


def _load(path: Path, skip_nonfinite: bool, *, check: bool = False) -> AdapterFile:
    """The parsed LoRA. NaN/Inf factors are found by the decomposition itself (a non-finite
    spectrum, no extra pass over the file); the parser checks every tensor only to skip such
    modules, or (``check``) to name the tensor once the decomposition found one."""
    from loratools.adapters import load_adapter

    policy = "skip" if skip_nonfinite else ("error" if check else "keep")
    return load_adapter(path, nonfinite=policy, numpy=True,  # a LoRA never imports torch
                        nonfinite_fix="pass --skip-nonfinite to resize the rest without those modules")


def _hash_later(path: Path) -> Future:
    """The input's sha256 (for the output's provenance metadata) on a thread while the work runs:
    hashlib releases the GIL, so on a multi-core machine it costs no wall time."""
    from loratools.io import file_sha256

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-sha256")
    future = pool.submit(file_sha256, path)
    pool.shutdown(wait=False)
    return future


def _adapter_specs(adapter: AdapterFile) -> list:
    """The ``TensorSpec`` of every tensor of a parsed adapter, as its file holds them."""
    from loratools.io import TensorSpec

    specs = [TensorSpec(f"{m.source_name}.{s}", t.dtype, tuple(t.shape))
             for m in adapter.modules.values() for s, t in m.tensors().items()]
    return specs + [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in adapter.unknown.items()]


def _size_of(adapter: AdapterFile) -> int:
    """The size the file of an in-memory adapter would have (its table's "before" size)."""
    from loratools.ops.resize.sizing import file_size

    return file_size(_adapter_specs(adapter), adapter.metadata, sshs_hashes=False)


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
    rz = Resizer(found, **{k: options.pop(k) for k in ("cache_dir", "device", "allow_larger") if k in options})
    return [rz.resize(p, recipes, **options) for p in files]
