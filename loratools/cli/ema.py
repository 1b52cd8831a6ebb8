"""`loratools ema`: post-hoc EMA of a run's saved LoRAs (work in ``loratools.ops.ema``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt, OverwriteOpt

_EXAMPLES = """
Examples:

\b
loratools ema output/epoch-*.safetensors -o ema.safetensors
loratools ema output/ --sigma_rel 0.1 -o ema.safetensors
loratools ema output/ --beta 0.8 --beta2 0.95 -r sv_fro=0.99 -o ema.safetensors
loratools ema output/ --sigma_rel 0.15 --base sd15.safetensors \\
    -r fro_ckpt=1,thr=-3.55 -o ema-small.safetensors

musubi-tuner's lora_post_hoc_ema.py command line works as it is:

\b
loratools ema a.safetensors b.safetensors c.safetensors --beta 0.9 \\
    --output_file ema.safetensors
"""


def ema(
    inputs: Annotated[list[str], typer.Argument(
        metavar="LORA...", help="The LoRAs one run saved (files, folders or globs), in any order: they are "
        "sorted by the training step in their metadata (ss_steps, else ss_epoch).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", "--output_file", "--output-file", metavar="PATH",
        help="Output .safetensors file (a folder for several ':'-separated recipes).", show_default=False)] = None,
    beta: Annotated[Optional[float], typer.Option(
        "--beta", metavar="B", help="Share the running average keeps at each newer file (musubi-tuner; default "
        "0.95).", show_default=False)] = None,
    beta2: Annotated[Optional[float], typer.Option(
        "--beta2", metavar="B", help="With --beta: the share at the newest file, linear in between.",
        show_default=False)] = None,
    sigma_rel: Annotated[Optional[float], typer.Option(
        "--sigma_rel", "--sigma-rel", metavar="S", help="Power-function EMA of relative width S (Karras et al. "
        "2024) instead of --beta, in (0, 0.2887); smaller favours the newest files. Gives the oldest file "
        "weight 0, as musubi-tuner does.", show_default=False)] = None,
    no_sort: Annotated[bool, typer.Option(
        "--no_sort", "--no-sort", help="Average the files in the order given (oldest first) instead of by their "
        "training step.")] = False,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", metavar="RECIPE", help="Shrink the average with a resize recipe (e.g. sv_fro=0.99, "
        "rank=32, fro_ckpt=1,thr=-3.55 with --base); without it the ranks of the inputs add up.",
        show_default=False)] = None,
    base: Annotated[Optional[Path], typer.Option(
        "--base", metavar="MODEL", help="The model the run trained on: recipe scores that need it (fro_ckpt, ...) "
        "read it, and module names are resolved against it.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", "--save_precision", metavar="DTYPE", help="fp16, bf16 or fp32 (default: the inputs').",
        show_default=False)] = None,
    title: Annotated[Optional[str], typer.Option("--title", metavar="TEXT", help="modelspec.title of the output "
                                                 "(default: output file stem).")] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="Where a recipe's decompositions run "
                                        "(cpu, cuda).")] = "cpu",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Post-hoc EMA of the LoRAs a training run saved: one LoRA whose delta is their weighted average.

    The weights are musubi-tuner's lora_post_hoc_ema.py (--beta, --beta2, --sigma_rel), printed per file. Unlike musubi-tuner, which averages every tensor and so the lora_up and lora_down factors separately, this averages the deltas the files make: the product of averaged factors is not the average of the products, so averaging factors changes what the LoRA does in a way no weight describes. The average is written exactly (ranks add up, as merge --to-lora does); -r shrinks it with a resize recipe. The newest file's metadata is kept.
    """
    from loratools.cli.merge import recompressed_json
    from loratools.cli.output import out
    from loratools.errors import UsageError
    from loratools.ops.ema import EmaOptions, post_hoc_ema
    from loratools.units import human_bytes

    if output is None:
        raise UsageError("give the output with -o PATH (musubi-tuner: --output_file)")
    result = post_hoc_ema(EmaOptions(inputs=inputs, output=output, beta=beta, beta2=beta2, sigma_rel=sigma_rel,
                                     keep_order=no_sort, recipe=recipe, base=base, dtype=dtype, overwrite=overwrite,
                                     title=title, device=device))
    merged = result.merge
    resized = [] if merged.resized is None else merged.resized.outcomes
    if json_out:
        out.json({"output": str(merged.output), "arch": merged.arch, "ordered_by": result.ordered_by,
                  "schedule": result.schedule, "inputs": [i.as_json() for i in result.inputs],
                  "skipped": [str(p) for p in result.skipped],
                  "duplicates": [str(p) for p in result.duplicates], "modules": merged.modules,
                  "max_rank": max(merged.ranks) if merged.ranks else None,
                  "size": merged.file.size if merged.file else None, "warnings": merged.warnings,
                  "recompressed": recompressed_json(resized)})
        return
    for note in merged.warnings:
        out.warn(note)
    for path in result.skipped:
        out.info(f"skipped {path} (an earlier output of resize or ema)")
    for path in result.duplicates:
        out.info(f"skipped {path} (the same step and weights as another file: a run's last save)")
    how = {"given": "in the order given", "ss_steps": "by training step (ss_steps)",
           "ss_epoch": "by epoch (ss_epoch)"}[result.ordered_by]
    schedule = ", ".join(f"{k} {v:.4g}" for k, v in result.schedule.items())
    out.show(out.table(f"weights ({schedule}; files {how})", ["file", "step", "epoch", "weight"],
                       [(i.path.name, "" if i.step is None else str(i.step), "" if i.epoch is None else str(i.epoch),
                         f"{i.weight:.4f}") for i in result.inputs], justify_right=("step", "epoch", "weight")))
    ranks = merged.ranks
    rank_text = f", ranks {min(ranks)}-{max(ranks)}" if ranks else ""
    if merged.file is not None:
        out.print(f"wrote {merged.output} ({merged.arch}, {human_bytes(merged.file.size)}): average of "
                  f"{len(result.inputs)} files' deltas, {merged.modules} modules{rank_text}")
    else:
        out.print(f"averaged {len(result.inputs)} files' deltas ({merged.modules} modules{rank_text}), shrunk:")
    for o in resized:
        out.print(o.summary_line())


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("ema", help=inspect.cleandoc(ema.__doc__ or "") + "\n" + _EXAMPLES, no_args_is_help=True)(ema)
