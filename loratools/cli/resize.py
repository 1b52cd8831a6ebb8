"""`loratools resize`: shrink LoRAs with elias-gaeros recipes or sd-scripts' resize flags.

Only wiring: paths and flags become recipes and a ``Resizer``; results are rendered here (one
summary line per output, ``--dry-run`` per-layer tables, ``--json``). The operation is imported
inside the command so ``--help`` stays instant.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt, OverwriteOpt

_EXAMPLES = """
Examples:

\b
loratools resize -o out -r fro_ckpt=1,thr=-3.55 \\
    base.safetensors lora.safetensors
loratools resize -b sd_xl_base_1.0.safetensors \\
    -r "fro_ckpt=1,thr=-3.55:size=32" loras/ -o out
loratools resize --dry-run -r sv_ratio=8,max_rank=32 \\
    base.safetensors lora.safetensors

sd-scripts' resize_lora.py flags work as they are:

\b
loratools resize --model lora.safetensors --save_to small.safetensors \\
    --new_rank 32 --dynamic_method sv_fro --dynamic_param 0.9 \\
    --save_precision fp16 --device cuda
"""

_RECIPE_HELP = (
    "Recipe(s), ':'-separated; repeatable. Scores (with thr= or size=): fro_ckpt, spn_ckpt, subspace, fro_lora, "
    "spn_lora, params [=weight]. Selections: thr=<log10>, size=<MiB>, sv_fro=, sv_ratio=, sv_cumulative=, "
    "rank=. Also rescale=, max_rank=, conv_rank=, min_rank=, or a name from recipes/resize. "
    "Default: fro_ckpt=1,thr=-3.55.")


def resize(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="PATH", help="Base checkpoint (recognised by content; or use --base) and LoRA files, folders or globs.",
        show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", "--output_folder", "--output-folder", "--save_to", "--save-to", metavar="PATH",
        help="Output folder (default: each LoRA's folder), or a .safetensors name for one LoRA and one recipe.",
        show_default=False)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", "-b", metavar="MODEL", help="Base checkpoint (single "
                                                 "file or diffusers folder).", show_default=False)] = None,
    recipe: Annotated[Optional[list[str]], typer.Option(
        "--recipe", "-r", "--score_recipes", "--score-recipes", metavar="RECIPE", help=_RECIPE_HELP,
        show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", metavar="LORA", help="sd-scripts spelling: the LoRA to resize.",
                                                  show_default=False)] = None,
    new_rank: Annotated[Optional[int], typer.Option(
        "--new_rank", "--new-rank", metavar="N", help="sd-scripts: fixed rank, or the cap with --dynamic_method.",
        show_default=False)] = None,
    new_conv_rank: Annotated[Optional[int], typer.Option(
        "--new_conv_rank", "--new-conv-rank", metavar="N", help="sd-scripts: rank (or cap) of k x k conv layers.",
        show_default=False)] = None,
    dynamic_method: Annotated[Optional[str], typer.Option(
        "--dynamic_method", "--dynamic-method", metavar="METHOD", help="sd-scripts: sv_fro, sv_ratio or sv_cumulative.",
        show_default=False)] = None,
    dynamic_param: Annotated[Optional[float], typer.Option(
        "--dynamic_param", "--dynamic-param", metavar="X", help="sd-scripts: the dynamic method's parameter.",
        show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(
        "--save_precision", "--save-precision", "--dtype", "-t", "--output_dtype", "--output-dtype", metavar="DTYPE",
        help="Factor precision: fp16, bf16, fp32 (also 16, 32, float). Default: the input's. Alphas are fp32.",
        show_default=False)] = None,
    kohya_compat: Annotated[bool, typer.Option(
        "--kohya-compat", "--kohya_compat", help="Reproduce sd-scripts' ranks exactly, its +1 off-by-one and rank "
        "cap of 4 without --new_rank included.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", "--dry_run", help="Print the per-layer table, score "
                                          "quantiles and predicted size; write nothing.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="Also print the per-layer table when writing.")] = 0,
    device: Annotated[str, typer.Option("--device", "-d", metavar="DEVICE",
                                                  help="Device for LoHa/LoKr decompositions (cpu, cuda); LoRA/LoCon "
                                                       "layers are decomposed on the CPU from r x r Gram matrices.")] = "cpu",
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", metavar="FOLDER", help="Folder of the base-norm cache (default: the user cache folder).",
        show_default=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the base-norm cache.")] = False,
    skip_nonfinite: Annotated[bool, typer.Option(
        "--skip-nonfinite", help="Leave out modules whose factors hold NaN/Inf (with a warning) instead of "
        "refusing the LoRA.")] = False,
    allow_larger: Annotated[bool, typer.Option(
        "--allow-larger", "--allow_larger", help="Write an output whose factors take more bytes than the input's "
        "(otherwise it is reported and skipped).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Resize (shrink) LoRA/LoCon/LyCORIS files, exactly and fast, against their base checkpoint.

    Checkpoint-aware recipes (elias-gaeros/resize_lora) keep each singular direction whose strength relative to the base layer passes the threshold; size= finds the threshold that fits a file size; sd-scripts' sv_fro/sv_ratio/sv_cumulative/rank keep what their criterion needs (without sd-scripts' +1, unless --kohya-compat).

    Several recipes share one decomposition. LoHa and LoKr shrink in their own form. Existing outputs are skipped unless --overwrite, and so is an output that would be larger than its input unless --allow-larger. Output names follow elias: <lora>_<recipe>_th<threshold>.safetensors.
    """
    from loratools.errors import UsageError
    from loratools.ops.resize import DEFAULT_RECIPE, Resizer, kohya_recipe, parse_recipes, resolve_inputs

    paths = list(inputs or []) + ([str(model)] if model is not None else [])
    if not paths:
        raise UsageError("give the LoRA file(s) to resize (and the base checkpoint), e.g. "
                         "loratools resize -o out model.safetensors lora.safetensors")
    base_path, loras, skipped = resolve_inputs(paths, None if base is None else str(base))
    texts = list(recipe or [])
    if any(v is not None for v in (new_rank, new_conv_rank, dynamic_method, dynamic_param)):
        texts.append(kohya_recipe(new_rank=new_rank, new_conv_rank=new_conv_rank, dynamic_method=dynamic_method,
                                  dynamic_param=dynamic_param, kohya_compat=kohya_compat))
    recipes = parse_recipes(":".join(texts) if texts else DEFAULT_RECIPE)
    if output is not None and output.suffix.lower() == ".safetensors" and (len(loras) > 1 or len(recipes) > 1):
        raise UsageError(f"-o {output} names one file but there are {len(loras)} LoRA(s) x {len(recipes)} "
                         "recipe(s); give an output folder")
    dtype = {"16": "fp16", "32": "fp32"}.get(precision, precision) if precision else None
    rz = Resizer(base_path, cache_dir=None if no_cache else (cache_dir or "default"), device=device,
                 allow_larger=allow_larger)
    _run(rz, loras, skipped, recipes, output, dtype, overwrite, kohya_compat, dry_run, verbose, json_out,
         skip_nonfinite)


def _run(rz, loras, skipped, recipes, output, dtype, overwrite, kohya_compat, dry_run, verbose, json_out,
         skip_nonfinite=False) -> None:
    from loratools.cli.output import out

    for p in skipped:
        out.info(f"skipping {p} (already a resize output)")
    results = []
    with out.progress(disable=json_out) as bar:
        task = bar.add_task("resize", total=None)

        for lora in loras:
            def progress(phase: str, done: int, total: int, _name: str = lora.name) -> None:
                bar.update(task, description=f"{_name}: {phase}", completed=done, total=total)

            res = rz.resize(lora, recipes, output=output, dtype=dtype, overwrite=overwrite,
                            kohya_compat=kohya_compat, dry_run=dry_run, progress=progress,
                            skip_nonfinite=skip_nonfinite)
            results.append(res)
            if not json_out:
                _render(res, dry_run or verbose > 0)
    if json_out:
        out.json([_as_json(r) for r in results])


def _render(res, tables: bool) -> None:
    from loratools.cli.output import out
    from loratools.units import human_bytes

    for note in res.warnings:
        out.warn(f"{res.path.name}: {note}")
    for o in res.outcomes:
        if tables and o.rows:
            rows = [(r.name, r.kind, r.old_rank, r.new_rank, f"{100 * r.rle_lora:.2f}%",
                     "-" if r.rle_ckpt is None else f"{100 * r.rle_ckpt:.3f}%") for r in o.rows]
            out.show(out.table(f"{res.path.name}: {o.recipe}", ["layer", "kind", "old", "new", "rle_lora", "rle_ckpt"],
                               rows, justify_right=("old", "new", "rle_lora", "rle_ckpt")))
            if o.quantiles:
                out.print("score quantiles: " + " ".join(f"{q}:{v:.3f}" for q, v in o.quantiles.items()))
            if o.status == "dry-run":
                out.print(f"predicted size: {human_bytes(o.size_after)} ({o.size_after} bytes)")
        out.print(o.summary_line())


def _num(v: float | None) -> float | None:
    import math

    return v if v is not None and math.isfinite(v) else None


def _as_json(res) -> dict:
    return {
        "input": str(res.path), "seconds": round(res.seconds, 3), "warnings": res.warnings,
        "zero_layers": res.zero_layers, "unmatched": res.unmatched, "converted": res.converted,
        "passthrough": res.passthrough,
        "outputs": [{
            "recipe": o.recipe, "path": str(o.path), "status": o.status,
            "threshold": _num(o.threshold), "kept_everything": o.threshold == float("-inf"),
            "size_before": o.size_before, "size_after": o.size_after, "rank_before": o.rank_before,
            "rank_after": o.rank_after, "fro_retained": _num(o.fro_retained), "layers_kept": o.layers_kept,
            "layers_dropped": o.layers_dropped, "quantiles": o.quantiles,
            "layers": [{"name": r.name, "kind": r.kind, "old_rank": r.old_rank, "new_rank": r.new_rank,
                        "rle_lora": r.rle_lora, "rle_ckpt": r.rle_ckpt, "matched": r.matched} for r in o.rows],
        } for o in res.outcomes]}


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("resize", help=inspect.cleandoc(resize.__doc__ or "") + "\n" + _EXAMPLES,
                no_args_is_help=True)(resize)
