"""`loratools merge`: adapters into a checkpoint, or (``--to-lora``) adapters into one adapter.

Only wiring: arguments become ``MergeOptions`` / ``LoraMergeOptions``, the operation runs, and the
result is rendered; the ops module is imported inside the command so ``--help`` stays instant.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt, OverwriteOpt

_EXAMPLES = """
Examples:

  loratools merge sdxl.safetensors style.safetensors:0.8 char.safetensors:0.5 -o merged.safetensors

  loratools merge "C:\\models\\sd15.safetensors" "C:\\loras\\a,b.safetensors" --ratio 0.7 -o out.safetensors

  loratools merge models/sd15-diffusers lora.safetensors -o models/sd15-merged --verify

  loratools merge --to-lora style.safetensors:0.6 detail.safetensors:0.4 -o style+detail.safetensors

  loratools merge --to-lora a.safetensors b.safetensors -r fro_ckpt=1,thr=-3.55 --base sdxl.safetensors -o ab.safetensors
"""


def merge(
    inputs: Annotated[list[str], typer.Argument(
        help="BASE then LORA[:RATIO]... (with --to-lora: LORA[:WEIGHT]... only). BASE is a .safetensors/"
             ".ckpt checkpoint or a diffusers folder. A path that exists is never split, so Windows drive "
             "letters and commas in names are safe.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file (a folder for a "
                                         "diffusers base).", show_default=False)],
    ratio: Annotated[Optional[list[str]], typer.Option(
        "--ratio", help="Ratios instead of the :RATIO suffix: one per adapter (repeat, or 0.7,0.3) or one for "
                        "all.")] = None,
    to_lora: Annotated[bool, typer.Option("--to-lora", help="Combine adapters into one adapter (exact rank "
                                          "concatenation) instead of merging into a checkpoint.")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="fp16, bf16 or fp32 for every float tensor written (default: keep each tensor's).")] = None,
    allow_unmatched: Annotated[bool, typer.Option(
        "--allow-unmatched", help="Merge the modules that match and report the others instead of refusing.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-open the output and check sampled modules: "
                                         "merged - base must equal the intended delta.")] = False,
    title: Annotated[Optional[str], typer.Option("--title", help="modelspec.title of the output "
                                                 "(default: output file stem).")] = None,
    te_scale: Annotated[float, typer.Option(
        "--te-scale", help="Multiply every ratio by this for text-encoder modules (A1111/ComfyUI's separate "
                           "TE strength); 0 merges the UNet part only.")] = 1.0,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", help="With --to-lora: re-compress the exact combination with a resize recipe "
                               "(e.g. fro_lora=1,size=64 or sv_fro=0.9); several recipes with ':' need an "
                               "output folder.")] = None,
    base_model: Annotated[Optional[Path], typer.Option(
        "--base", help="With --to-lora -r: the checkpoint for recipe scores that need it (fro_ckpt, ...).")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge LoRA/LyCORIS adapters into a checkpoint (streaming, any adapter type), or into one LoRA.

    Strict by default: modules matching no base weight, an architecture mismatch or NaN in an adapter
    stop the merge before anything is written. The last line says how many modules of each adapter
    were applied.
    """
    from loratools.errors import UsageError
    from loratools.ops.merge import resolve_inputs

    if to_lora:
        if verify:
            raise UsageError("--verify checks a merged checkpoint; it does not apply to --to-lora")
        if te_scale != 1.0:
            raise UsageError("--te-scale applies to merges into a checkpoint; scale the inputs with :WEIGHT instead")
        if base_model is not None and recipe is None:
            raise UsageError("--base is only used with -r RECIPE (recipe scores against the checkpoint)")
        _to_lora(resolve_inputs(inputs, ratio), output, dtype, allow_unmatched, overwrite, title, recipe,
                 base_model, json_out)
        return
    if recipe is not None or base_model is not None:
        raise UsageError("-r/--base re-compress a LoRA+LoRA merge; add --to-lora, or drop them")
    if len(inputs) < 2:
        raise UsageError("give BASE and at least one LORA (or --to-lora with adapters only)")
    base, *adapters = inputs
    _checkpoint(Path(base), resolve_inputs(adapters, ratio), output, dtype, allow_unmatched, overwrite,
                verify, title, te_scale, json_out)


def _checkpoint(base, adapters, output, dtype, allow_unmatched, overwrite, verify, title, te_scale, json_out) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from loratools.cli import output as out
    from loratools.ops.merge import MergeOptions, merge_checkpoint

    opts = MergeOptions(base=base, adapters=adapters, output=output, dtype=dtype, allow_unmatched=allow_unmatched,
                        overwrite=overwrite, verify=verify, title=title, te_scale=te_scale,
                        sha256=json_out)  # --json reports each file's sha256/AutoV2: hash while writing
    with Progress("merging", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=out.err_console,
                  transient=True, disable=json_out) as bar:
        task = bar.add_task("merge", total=None)
        result = merge_checkpoint(opts, progress=lambda done, total: bar.update(task, completed=done, total=total))
    verified = result.verified
    if json_out:
        out.print_json({
            "output": str(result.output), "layout": result.layout, "arch": result.arch,
            "patched_keys": result.patched_keys, "copied_keys": result.copied_keys,
            "files": [{"path": str(f.path), "size": f.size, "sha256": f.sha256, "autov2": f.autov2}
                      for f in result.files],
            "adapters": [{"path": str(a.path), "ratio": a.ratio, "applied": a.applied, "modules": a.modules,
                          "unmatched": a.unmatched, "sha256": a.sha256, "autov2": a.autov2} for a in result.adapters],
            "verify": None if result.verify is None else [vars(r) for r in result.verify],
            "verified": verified, "warnings": result.warnings})
    else:
        for note in result.warnings:
            out.warn(note)
        for a in result.adapters:
            for name in a.unmatched:
                out.warn(f"{a.path.name}: not merged: {name}")
        if result.verify is not None:
            out.console.print(out.table(
                "verify (merged - base vs intended delta)", ["adapter", "module", "max error", "max |delta|", "ok"],
                [(r.adapter, r.module, f"{r.max_error:.3g}", f"{r.max_delta:.3g}", "yes" if r.ok else "NO")
                 for r in result.verify], justify_right=("max error", "max |delta|")))
        size = sum(f.size for f in result.files)
        out.console.print(f"wrote {result.output} ({result.arch}, {result.layout}, {out.human_bytes(size)}): "
                          f"{result.patched_keys} tensors patched, {result.copied_keys} copied")
        for a in result.adapters:
            out.console.print(f"{a.path.name} (ratio {a.ratio:g}): applied {a.applied}/{a.modules} modules")
    if verified is False:
        out.err_console.print("[red]verification failed[/red]: the written file does not hold the intended "
                              "deltas (see the table); please report this")
        raise typer.Exit(1)


def _to_lora(adapters, output, dtype, allow_unmatched, overwrite, title, recipe, base, json_out) -> None:
    from loratools.cli import output as out
    from loratools.ops.merge import LoraMergeOptions, merge_loras

    result = merge_loras(LoraMergeOptions(adapters=adapters, output=output, dtype=dtype,
                                          allow_unmatched=allow_unmatched, overwrite=overwrite, title=title,
                                          recipe=recipe, base=base))
    ranks = result.ranks
    resized = [] if result.resized is None else result.resized.outcomes
    if json_out:
        out.print_json({"output": str(result.output), "arch": result.arch, "modules": result.modules,
                        "kinds": result.kinds, "max_rank": max(ranks) if ranks else None,
                        "inputs": [r.as_json() for r in result.inputs], "omitted": result.omitted,
                        "dropped": result.dropped, "warnings": result.warnings,
                        "size": result.file.size if result.file else None,
                        "sshs_model_hash": result.file.sshs_model_hash if result.file else None,
                        "recompressed": [{"recipe": o.recipe, "path": str(o.path), "status": o.status,
                                          "rank_after": o.rank_after, "size_after": o.size_after,
                                          "fro_retained": o.fro_retained} for o in resized]})
        return
    for note in result.warnings:
        out.warn(note)
    for name in result.dropped:
        out.warn(f"left out (not an adapter tensor): {name}")
    if result.omitted:
        out.warn(f"{len(result.omitted)} module(s) left out because every weight on them is 0")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.kinds.items()))
    rank_text = f", ranks {min(ranks)}-{max(ranks)}" if ranks else ""
    if result.file is not None:
        out.console.print(f"wrote {result.output} ({result.arch}, {out.human_bytes(result.file.size)}): "
                          f"{result.modules} modules ({kinds}{rank_text})")
    else:
        out.console.print(f"combined {result.modules} modules ({kinds}{rank_text}), re-compressed:")
    for o in resized:
        out.console.print(o.summary_line())
    for r in result.inputs:
        out.console.print(f"{r.path.name} (weight {r.ratio:g}): applied {r.applied}/{r.modules} modules")


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("merge", help=inspect.cleandoc(merge.__doc__ or "") + "\n" + _EXAMPLES, no_args_is_help=True)(merge)
