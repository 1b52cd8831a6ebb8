"""`loratools merge`: adapters into a checkpoint, or (``--to-lora``) adapters into one adapter.

Only wiring: arguments become ``MergeOptions`` / ``LoraMergeOptions``, the operation runs, and the
result is rendered; the ops module is imported inside the command so ``--help`` stays instant.

sd-scripts' ``merge_lora.py`` / ``sdxl_merge_lora.py`` / ``svd_merge_lora.py`` command lines work as
they are: ``--sd_model`` is BASE, ``--models a b`` and ``--ratios 0.7 0.3`` take space-separated
lists, no ``--sd_model`` (or ``--concat``) combines the LoRAs into one, and ``--new_rank`` /
``--new_conv_rank`` re-compress that combination as ``svd_merge_lora.py`` does. Flags that change
nothing here say so.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt, ListOptionsCommand, OverwriteOpt

_EXAMPLES = """
Examples:

\b
loratools merge sdxl.safetensors style.safetensors:0.8 char.safetensors:0.5 \\
    -o merged.safetensors
loratools merge "C:\\models\\sd15.safetensors" "C:\\loras\\a,b.safetensors" \\
    --ratio 0.7 -o out.safetensors
loratools merge sd15-diffusers/ lora.safetensors -o sd15-merged/ --verify
loratools merge --to-lora style.safetensors:0.6 detail.safetensors:0.4 \\
    -o both.safetensors
loratools merge --to-lora a.safetensors b.safetensors \\
    -r fro_ckpt=1,thr=-3.55 --base sdxl.safetensors -o ab.safetensors

Block weights (LORA:RATIO:PRESET, presets in recipes/lbw/; or a list of 17/26
weights for SD1/SD2, 12/20/26 for SDXL, BASE = the text encoders first):

\b
loratools merge sd15.safetensors style.safetensors:0.8:OUTD -o out.safetensors
loratools merge sd15.safetensors style.safetensors:0.8:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0 \\
    --te-scale 0.5 -o out.safetensors
loratools merge --to-lora style.safetensors:1:OUTALL char.safetensors:0.6:INALL \\
    -o style-out-char-in.safetensors

sd-scripts' command lines work as they are (merge_lora.py, sdxl_merge_lora.py, svd_merge_lora.py):

\b
loratools merge --sd_model sd15.safetensors \\
    --models a.safetensors b.safetensors --ratios 0.7 0.3 \\
    --save_to merged.safetensors --save_precision fp16
loratools merge --models a.safetensors b.safetensors --ratios 0.7 0.3 \\
    --concat --save_to ab.safetensors
loratools merge --models a.safetensors b.safetensors --ratios 0.7 0.3 \\
    --new_rank 32 --save_to ab.safetensors --device cuda
loratools merge --sd_model sdxl.safetensors --models a.safetensors b.safetensors \\
    --lbws "[1,0,0,0,0,1,1,1,1,1,1,1]" "[1,1,1,1,1,1,0,0,0,0,0,0]" --save_to out.safetensors
"""


class _MergeCommand(ListOptionsCommand):
    LIST_OPTIONS = frozenset({"--models", "--ratios", "--lbws"})


def merge(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="PATH[:RATIO]",
        help="BASE then LORA[:RATIO[:BLOCKS]]... (with --to-lora: LORA[:WEIGHT[:BLOCKS]]... only). BASE is a "
             ".safetensors/.ckpt checkpoint or a diffusers folder. BLOCKS is a block-weight preset (OUTD, INALL, "
             "...) or a list of weights. A path that exists is never split, so Windows drive letters and commas in "
             "names are safe.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", "--save_to", "--save-to", metavar="PATH",
        help="Output .safetensors file (a folder for a diffusers base).", show_default=False)] = None,
    ratio: Annotated[Optional[list[str]], typer.Option(
        "--ratio", "--ratios", metavar="R", help="Ratios instead of the :RATIO suffix: one per adapter (--ratios "
        "0.7 0.3, or 0.7,0.3, or repeat) or one for all.")] = None,
    sd_model: Annotated[Optional[Path], typer.Option(
        "--sd_model", "--sd-model", metavar="BASE", help="sd-scripts' spelling of BASE.", show_default=False)] = None,
    models: Annotated[Optional[list[str]], typer.Option(
        "--models", metavar="LORA", help="sd-scripts' spelling of the adapters: --models a.safetensors "
        "b.safetensors (every value up to the next option). Without BASE / --sd_model the adapters are "
        "combined into one LoRA, as sd-scripts does.", show_default=False)] = None,
    to_lora: Annotated[bool, typer.Option("--to-lora", help="Combine adapters into one adapter (exact rank "
                                          "concatenation) instead of merging into a checkpoint.")] = False,
    concat: Annotated[bool, typer.Option(
        "--concat", help="sd-scripts: combine LoRAs by rank concatenation; the same as --to-lora.")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", "--save_precision", "--save-precision", metavar="DTYPE",
        help="fp16, bf16 or fp32 (sd-scripts: float) for every float tensor written (default: keep each "
             "tensor's).")] = None,
    precision: Annotated[Optional[str], typer.Option(
        "--precision", metavar="DTYPE", help="sd-scripts' compute precision; loratools always computes in "
        "float32, so this changes nothing.", show_default=False)] = None,
    new_rank: Annotated[Optional[int], typer.Option(
        "--new_rank", "--new-rank", metavar="N", help="svd_merge_lora.py: combine the LoRAs and re-compress "
        "to rank N (--to-lora -r rank=N).", show_default=False)] = None,
    new_conv_rank: Annotated[Optional[int], typer.Option(
        "--new_conv_rank", "--new-conv-rank", metavar="N", help="svd_merge_lora.py: rank of k x k conv layers "
        "(default: --new_rank).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", metavar="DEVICE", help="Device for the decompositions of a re-compressed LoRA merge (cpu, "
        "cuda); merges into a checkpoint stream on the CPU.", show_default=False)] = None,
    allow_unmatched: Annotated[bool, typer.Option(
        "--allow-unmatched", help="Merge the modules that match and report the others instead of refusing.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-open the output and check sampled modules: "
                                         "merged - base must equal the intended delta.")] = False,
    title: Annotated[Optional[str], typer.Option("--title", metavar="TEXT", help="modelspec.title of the output "
                                                 "(default: output file stem).")] = None,
    te_scale: Annotated[float, typer.Option(
        "--te-scale", metavar="X", help="Multiply every ratio by this for text-encoder modules (A1111/ComfyUI's "
        "separate TE strength; with block weights it multiplies BASE too); 0 merges the UNet part only.")] = 1.0,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", metavar="RECIPE", help="With --to-lora: re-compress the exact combination with a "
        "resize recipe (e.g. fro_lora=1,size=64 or sv_fro=0.9); several recipes with ':' need an output "
        "folder.")] = None,
    base_model: Annotated[Optional[Path], typer.Option(
        "--base", metavar="MODEL", help="With --to-lora: the model the adapters were made for; module names "
        "are resolved against it (needed only for custom-layout models, default: the released SD1/SD2/SDXL) and "
        "recipe scores that need it (fro_ckpt, ...) read it.")] = None,
    v2: Annotated[bool, typer.Option("--v2", "--sd2", help="sd-scripts: SD2 model; the architecture is "
                                     "detected from the files, so this changes nothing.")] = False,
    no_metadata: Annotated[bool, typer.Option(
        "--no_metadata", "--no-metadata", help="sd-scripts: write no modelspec; changes nothing here (remove keys "
        "afterwards with loratools metadata delete).")] = False,
    shuffle: Annotated[bool, typer.Option(
        "--shuffle", help="sd-scripts: permute the rank dimensions of the result; every delta stays the "
        "same, so this changes nothing.")] = False,
    lbws: Annotated[Optional[list[str]], typer.Option(
        "--lbws", metavar="WEIGHTS", help="sd-scripts: block weights for the first adapters, one list each "
        "(--lbws \"[1,0,...]\" \"[...]\", every value up to the next option): 17 or 26 weights for SD1/SD2, 12, "
        "20 or 26 for SDXL, BASE (the text encoders) first; a preset name works too. Blocks a shorter list does "
        "not name keep weight 1.", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge LoRA/LyCORIS adapters into a checkpoint (streaming, any adapter type), or into one LoRA.

    Strict by default: modules matching no base weight, an architecture mismatch or NaN in an adapter
    stop the merge before anything is written. The last lines say how many modules of each adapter
    were applied.
    """
    from loratools.cli.output import out
    from loratools.errors import UsageError
    from loratools.ops.merge import resolve_inputs

    positional = list(inputs or [])
    if output is None:
        raise UsageError("give the output with -o PATH (sd-scripts: --save_to)")
    svd = new_rank is not None or new_conv_rank is not None
    if sd_model is not None:
        if to_lora or concat or svd:
            raise UsageError("--sd_model merges into a checkpoint; drop it to combine LoRAs "
                             "(--to-lora, --concat, --new_rank)")
        positional.insert(0, str(sd_model))
    elif models and not positional:
        to_lora = True  # sd-scripts: without --sd_model the LoRAs are merged into one LoRA
        if not concat and not svd:
            out.info("combining the LoRAs exactly (rank concatenation, sd-scripts' --concat); sd-scripts without "
                     "--concat adds their factors instead, which only approximates the weighted sum")
    positional += list(models or [])
    to_lora = to_lora or concat or svd
    if svd:
        if recipe is not None:
            raise UsageError("--new_rank and -r both choose the re-compression; keep one")
        from loratools.ops.resize import kohya_recipe

        rank = new_rank if new_rank is not None else new_conv_rank
        recipe = kohya_recipe(new_rank=rank, new_conv_rank=new_conv_rank, dynamic_method=None, dynamic_param=None)
    for note in _no_effect(precision, v2, no_metadata, shuffle, device, to_lora and recipe is not None):
        out.warn(note)

    if to_lora:
        if verify:
            raise UsageError("--verify checks a merged checkpoint; it does not apply to --to-lora")
        if not positional:
            raise UsageError("give the LoRA files to combine (or --models a.safetensors b.safetensors)")
        _to_lora(resolve_inputs(positional, ratio, lbws), output, dtype, allow_unmatched, overwrite, title, recipe,
                 base_model, device or "cpu", te_scale, json_out)
        return
    if recipe is not None or base_model is not None:
        raise UsageError("-r/--base re-compress a LoRA+LoRA merge; add --to-lora, or drop them")
    if len(positional) < 2:
        raise UsageError("give BASE and at least one LORA (or --to-lora with adapters only)")
    base, *adapters = positional
    _checkpoint(Path(base), resolve_inputs(adapters, ratio, lbws), output, dtype, allow_unmatched, overwrite,
                verify, title, te_scale, json_out)


def _no_effect(precision: str | None, v2: bool, no_metadata: bool, shuffle: bool, device: str | None,
               decomposes: bool) -> list[str]:
    """One line for each sd-scripts flag given that changes nothing here (an unknown precision name is an
    error, as in sd-scripts)."""
    from loratools.errors import UsageError
    from loratools.io.dtypes import PRECISION_NAMES

    notes = []
    if precision is not None:
        if precision.strip().lower() not in PRECISION_NAMES:
            raise UsageError(f"--precision {precision!r}: use float, fp16 or bf16")
        if PRECISION_NAMES[precision.strip().lower()] != "float32":
            notes.append(f"--precision {precision} changes nothing: loratools computes every delta in float32 "
                         "(use --save_precision / --dtype for the file)")
    if v2:
        notes.append("--v2 changes nothing: the architecture is detected from the files")
    if no_metadata:
        notes.append("--no_metadata changes nothing: loratools always records what was merged "
                     "(loratools metadata delete removes keys)")
    if shuffle:
        notes.append("--shuffle changes nothing: permuting the rank dimensions leaves every delta the same")
    if device is not None and device != "cpu" and not decomposes:
        notes.append(f"--device {device} changes nothing: only a re-compressed LoRA merge (--new_rank, -r) "
                     "decomposes; merges stream on the CPU")
    return notes


def _checkpoint(base, adapters, output, dtype, allow_unmatched, overwrite, verify, title, te_scale, json_out) -> None:
    from loratools.cli.output import out
    from loratools.units import human_bytes
    from loratools.ops.merge import MergeOptions, merge_checkpoint

    opts = MergeOptions(base=base, adapters=adapters, output=output, dtype=dtype, allow_unmatched=allow_unmatched,
                        overwrite=overwrite, verify=verify, title=title, te_scale=te_scale,
                        sha256=json_out)  # --json reports each file's sha256/AutoV2: hash while writing
    with out.progress(disable=json_out) as bar:
        task = bar.add_task("reading the inputs", total=None)

        def progress(done: int, total: int) -> None:
            what = "merging" if done < total else "verifying" if verify else "finishing"
            bar.update(task, description=what, completed=done, total=total)

        result = merge_checkpoint(opts, progress=progress)
    verified = result.verified
    if json_out:
        out.json({
            "output": str(result.output), "layout": result.layout, "arch": result.arch,
            "patched_keys": result.patched_keys, "copied_keys": result.copied_keys, "fused_keys": result.fused_keys,
            "files": [{"path": str(f.path), "size": f.size, "sha256": f.sha256, "autov2": f.autov2}
                      for f in result.files],
            "adapters": [{"path": str(a.path), "ratio": a.ratio, "applied": a.applied, "modules": a.modules,
                          "zeroed": a.zeroed, "unmatched": a.unmatched, "sha256": a.sha256, "autov2": a.autov2,
                          "blocks": None if a.blocks is None else a.blocks.as_json(), "blocks_unnamed": a.unnamed}
                         for a in result.adapters],
            "verify": None if result.verify is None else [vars(r) for r in result.verify],
            "verified": verified, "warnings": result.warnings})
    else:
        for note in result.warnings:
            out.warn(note)
        for a in result.adapters:
            for name in a.unmatched:
                out.warn(f"{a.path.name}: not merged: {name}")
        if result.verify is not None:
            out.show(out.table(
                "verify (merged - base vs intended delta)", ["module", "adapter", "max error", "max |delta|", "ok"],
                [(r.module, r.adapter, f"{r.max_error:.3g}", f"{r.max_delta:.3g}", "yes" if r.ok else "NO")
                 for r in result.verify], justify_right=("max error", "max |delta|")))
        size = sum(f.size for f in result.files)
        out.print(f"wrote {result.output} ({result.arch}, {result.layout}, {human_bytes(size)}): "
                  f"{result.patched_keys} tensors patched, {result.copied_keys} copied")
        if result.fused_keys:
            out.print(f"({result.fused_keys} of them are text encoder 2's fused q/k/v in_proj_weight tensors, each "
                      "patched by 3 modules; a diffusers folder stores q, k and v apart)")
        for a in result.adapters:
            out.print(f"{a.path.name} (ratio {a.ratio:g}{_blocks_text(a.blocks)}): applied {a.applied}/{a.modules} "
                      f"modules{_zeroed_text(a.zeroed, a.blocks)}")
            if a.blocks is not None and a.unnamed:
                out.info(f"{a.path.name}: {a.unnamed} module(s) lie in blocks the {len(a.blocks.named)}-weight list "
                         "does not name (or outside the numbered blocks) and keep weight 1")
    if verified is False:
        out.problem("verification failed: the written file does not hold the intended deltas (see the table); "
                    "please report this")
        raise typer.Exit(1)


def _blocks_text(blocks) -> str:
    return "" if blocks is None else f", blocks {blocks.text}"


def _zeroed_text(zeroed: int, blocks) -> str:
    if not zeroed:
        return ""
    why = "block weight or --te-scale 0" if blocks is not None else "--te-scale 0"
    return f" ({zeroed} at weight 0 ({why}): their weights are unchanged)"


def _to_lora(adapters, output, dtype, allow_unmatched, overwrite, title, recipe, base, device, te_scale,
             json_out) -> None:
    from loratools.cli.output import out
    from loratools.units import human_bytes
    from loratools.ops.merge import LoraMergeOptions, merge_loras

    result = merge_loras(LoraMergeOptions(adapters=adapters, output=output, dtype=dtype,
                                          allow_unmatched=allow_unmatched, overwrite=overwrite, title=title,
                                          recipe=recipe, base=base, device=device, te_scale=te_scale))
    ranks = result.ranks
    resized = [] if result.resized is None else result.resized.outcomes
    if json_out:
        out.json({"output": str(result.output), "arch": result.arch, "modules": result.modules,
                  "kinds": result.kinds, "max_rank": max(ranks) if ranks else None,
                  "inputs": [r.as_json() for r in result.inputs], "omitted": result.omitted,
                  "dropped": result.dropped, "warnings": result.warnings,
                  "size": result.file.size if result.file else None,
                  "sshs_model_hash": result.file.sshs_model_hash if result.file else None,
                  "recompressed": recompressed_json(resized)})
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
        out.print(f"wrote {result.output} ({result.arch}, {human_bytes(result.file.size)}): "
                  f"{result.modules} modules ({kinds}{rank_text})")
    else:
        out.print(f"combined {result.modules} modules ({kinds}{rank_text}), re-compressed:")
    for o in resized:
        out.print(o.summary_line())
    for r in result.inputs:
        out.print(f"{r.path.name} (weight {r.ratio:g}{_blocks_text(r.blocks)}): applied {r.applied}/{r.modules} "
                  "modules")


def recompressed_json(outcomes) -> list[dict]:
    """The ``--json`` rows of a combination re-compressed by a resize recipe (merge --to-lora, ema)."""
    return [{"recipe": o.recipe, "path": str(o.path), "status": o.status, "rank_after": o.rank_after,
             "size_after": o.size_after, "fro_retained": o.fro_retained} for o in outcomes]


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("merge", cls=_MergeCommand, help=inspect.cleandoc(merge.__doc__ or "") + "\n" + _EXAMPLES,
                no_args_is_help=True)(merge)
