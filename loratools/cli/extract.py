"""`loratools extract`: a LoRA/LoCon from a fine-tuned model and its base (work in ``loratools.ops.extract``).

sd-scripts' ``extract_lora_from_models.py`` command lines work as they are: ``--model_tuned``,
``--model_org``, ``--save_to``, ``--dim`` (default 4 there, and here when only its flags are used),
``--conv_dim`` (adds the ResNet convs, as there), ``--clamp_quantile``, ``--min_diff``,
``--save_precision``, ``--device``; flags that change nothing here say so.
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
loratools extract tuned.safetensors sd15.safetensors -o tuned-lora.safetensors
loratools extract tuned.safetensors sdxl.safetensors -r sv_fro=0.9,max_rank=128 \\
    -o tuned-lora.safetensors
loratools extract tuned/ sdxl.safetensors -r fro_ckpt=1,thr=-2.5 -o tuned-lora.safetensors
loratools extract tuned.safetensors sd15.safetensors -r size=64 -o tuned-64mb.safetensors
loratools extract tuned.safetensors sd15.safetensors -r rank=64,conv_rank=16 \\
    --scope attn --layers --json > report.json

Recipes are resize's (loratools resize --help): rank=, conv_rank=, max_rank=, sv_fro=,
sv_ratio=, sv_cumulative=, fro_ckpt=1,thr=..., size=<MiB>. A fixed rank uses a randomized SVD on
large layers (--exact for the exact route); every other recipe reads each difference's whole
spectrum, exactly (size= reads the models twice: spectra first, then the kept directions).

sd-scripts' extract_lora_from_models.py command line works as it is:

\b
loratools extract --model_org sd15.safetensors --model_tuned tuned.safetensors \\
    --save_to lora.safetensors --dim 32 --conv_dim 8 --save_precision fp16
"""


def extract(
    models: Annotated[Optional[list[Path]], typer.Argument(
        metavar="TUNED BASE", help="The fine-tuned model, then the model it was tuned from: .safetensors/.ckpt "
        "files or diffusers folders, in any mix.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", "--save_to", "--save-to", metavar="PATH", help="The LoRA to write (.safetensors).",
        show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", metavar="RECIPE", help="How many directions of each difference to keep, in resize's "
        "recipe language (default rank=32).", show_default=False)] = None,
    scope: Annotated[Optional[str], typer.Option(
        "--scope", metavar="SCOPE", help="all (default): attention, MLP and the ResNet/sampler convs (a LoCon); "
        "attn: attention and MLP only (the default with sd-scripts' flags and no --conv_dim, as there).",
        show_default=False)] = None,
    min_diff: Annotated[Optional[float], typer.Option(
        "--min_diff", "--min-diff", metavar="X", help="A text encoder whose largest weight change is not above X "
        "is left out (per encoder; sd-scripts' default 0.01).", show_default=False)] = None,
    clamp_quantile: Annotated[Optional[float], typer.Option(
        "--clamp_quantile", "--clamp-quantile", metavar="Q", help="sd-scripts: clamp every factor to the Q-quantile "
        "of its entries (lossy; the table shows what it costs). Default: no clamp (sd-scripts clamps at 0.99).",
        show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--save_precision", "--save-precision", "--dtype", metavar="DTYPE",
        help="fp16 (default), bf16 or fp32 (sd-scripts: float) for the factors.", show_default=False)] = None,
    device: Annotated[str, typer.Option(
        "--device", metavar="DEVICE", help="Where the decompositions run (cpu, cuda).")] = "cpu",
    exact: Annotated[bool, typer.Option(
        "--exact", help="Use the exact decomposition for fixed ranks too (slower on large layers).")] = False,
    layers: Annotated[bool, typer.Option(
        "--layers", help="Print every layer's rank and kept share (--json always has them).")] = False,
    title: Annotated[Optional[str], typer.Option("--title", metavar="TEXT", help="modelspec.title of the output "
                                                 "(default: output file stem).")] = None,
    model_tuned: Annotated[Optional[Path], typer.Option(
        "--model_tuned", "--model-tuned", metavar="TUNED", help="sd-scripts' spelling of TUNED.",
        show_default=False)] = None,
    model_org: Annotated[Optional[Path], typer.Option(
        "--model_org", "--model-org", metavar="BASE", help="sd-scripts' spelling of BASE.", show_default=False)] = None,
    dim: Annotated[Optional[int], typer.Option(
        "--dim", metavar="N", help="sd-scripts: rank N for every layer (-r rank=N; sd-scripts' default 4 when only "
        "its flags are given).", show_default=False)] = None,
    conv_dim: Annotated[Optional[int], typer.Option(
        "--conv_dim", "--conv-dim", metavar="N", help="sd-scripts: also extract the 3x3 convs, at rank N "
        "(conv_rank=N, --scope all).", show_default=False)] = None,
    sdxl: Annotated[bool, typer.Option("--sdxl", help="sd-scripts: SDXL models; detected from the files, so this "
                                       "changes nothing.")] = False,
    v2: Annotated[bool, typer.Option("--v2", help="sd-scripts: SD2 models; detected from the files, so this "
                                     "changes nothing.")] = False,
    v_parameterization: Annotated[bool, typer.Option(
        "--v_parameterization", "--v-parameterization", help="Mark the LoRA as v-prediction in its metadata "
        "(default: what the models' metadata says).")] = False,
    load_precision: Annotated[Optional[str], typer.Option(
        "--load_precision", metavar="DTYPE", help="sd-scripts' loading precision; differences are always "
        "computed in float32, so this changes nothing.", show_default=False)] = None,
    no_metadata: Annotated[bool, typer.Option(
        "--no_metadata", "--no-metadata", help="sd-scripts: no modelspec; changes nothing here (remove keys "
        "afterwards with loratools metadata delete).")] = False,
    load_original_model_to: Annotated[Optional[str], typer.Option(
        "--load_original_model_to", metavar="DEVICE", help="sd-scripts: where to load BASE; loratools streams one "
        "layer at a time, so this changes nothing.", show_default=False)] = None,
    load_tuned_model_to: Annotated[Optional[str], typer.Option(
        "--load_tuned_model_to", metavar="DEVICE", help="sd-scripts: where to load TUNED; changes nothing here.",
        show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Extract a LoRA/LoCon from the difference of a fine-tuned model and its base.

    The models are read one weight pair at a time (memory: one layer), each difference is decomposed and the recipe keeps its strongest directions; the output is a kohya-named LoRA (LoCon with --scope all) that loads in ComfyUI, A1111 and diffusers, with sd-scripts' metadata. A text encoder that did not change (largest change not above --min_diff) is left out with a note. The summary says how much of each part's difference the file keeps (Frobenius share); --layers and --json give it per layer.
    """
    from loratools.cli.output import out
    from loratools.errors import UsageError
    from loratools.ops.extract import DEFAULT_RECIPE, MIN_DIFF, ExtractOptions
    from loratools.ops.extract import extract as run

    tuned, base, sd_scripts = _models(models, model_tuned, model_org)
    if output is None:
        raise UsageError("give the output with -o PATH (sd-scripts: --save_to)")
    if recipe is not None and (dim is not None or conv_dim is not None):
        raise UsageError("-r and --dim/--conv_dim both choose the ranks; keep one")
    if dim is not None or conv_dim is not None or (sd_scripts and recipe is None):
        rank = dim if dim is not None else 4
        recipe = f"rank={rank}" + (f",conv_rank={conv_dim}" if conv_dim is not None else "")
        scope = scope or ("all" if conv_dim is not None else "attn")
        if dim is None:
            out.info("rank 4 for every layer (sd-scripts' --dim default); pass --dim or -r to choose")
    for note in _no_effect(sdxl, v2, load_precision, no_metadata, load_original_model_to, load_tuned_model_to):
        out.warn(note)
    opts = ExtractOptions(tuned=tuned, base=base, output=output, recipe=recipe or DEFAULT_RECIPE,
                          scope=scope or "all", min_diff=MIN_DIFF if min_diff is None else min_diff,
                          clamp_quantile=clamp_quantile,
                          dtype=dtype, device=device, exact=exact, overwrite=overwrite, title=title,
                          v_parameterization=True if v_parameterization else None)
    with out.progress(disable=json_out) as bar:
        task = bar.add_task("reading the models", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = run(opts, progress=progress)
    if json_out:
        out.json({"output": str(result.output), "arch": result.arch, "recipe": result.recipe,
                  "threshold": result.threshold, "size": result.file.size if result.file else None,
                  "kept_fro": result.kept, "components": result.summary(),
                  "text_encoders": [vars(c) for c in result.text_encoders],
                  "layers": [r.as_json() for r in result.layers], "unchanged": result.unchanged,
                  "missing": result.missing, "warnings": result.warnings, "seconds": result.seconds,
                  "sshs_model_hash": result.file.sshs_model_hash if result.file else None})
        return
    _render(result, layers)


def _models(models: list[Path] | None, tuned: Path | None, base: Path | None) -> tuple[Path, Path, bool]:
    """``(tuned, base, sd_scripts_spelling)`` from the positional pair or sd-scripts' flags."""
    from loratools.errors import UsageError

    positional = list(models or [])
    sd_scripts = tuned is not None or base is not None
    if sd_scripts:
        if positional:
            raise UsageError("give the models either as TUNED BASE or as --model_tuned/--model_org, not both")
        if tuned is None or base is None:
            raise UsageError("give both --model_tuned and --model_org")
        return tuned, base, True
    if len(positional) != 2:
        raise UsageError(f"give TUNED and BASE (got {len(positional)} model(s)): loratools extract tuned.safetensors "
                         "base.safetensors -o lora.safetensors")
    return positional[0], positional[1], False


def _no_effect(sdxl: bool, v2: bool, load_precision: str | None, no_metadata: bool, org_to: str | None,
               tuned_to: str | None) -> list[str]:
    notes = []
    if sdxl or v2:
        notes.append(f"--{'sdxl' if sdxl else 'v2'} changes nothing: the architecture is detected from the files")
    if load_precision is not None:
        notes.append("--load_precision changes nothing: differences are computed in float32")
    if no_metadata:
        notes.append("--no_metadata changes nothing: loratools always records where a file came from "
                     "(loratools metadata delete removes keys)")
    if org_to is not None or tuned_to is not None:
        notes.append("--load_*_model_to changes nothing: the models are streamed one layer at a time (use --device "
                     "for the decompositions)")
    return notes


def _render(result, show_layers: bool) -> None:
    from loratools.cli.output import out
    from loratools.units import human_bytes

    for c in result.text_encoders:
        if c.included:
            out.info(f"{c.label}: changed (largest change {c.max_diff:.3g}), extracted")
        else:
            out.info(f"{c.label}: unchanged (largest change {c.max_diff:.3g} is not above --min_diff), left out")
    for note in result.warnings:
        out.warn(note)
    parts = result.summary()
    out.show(out.table("kept of each part's difference (Frobenius)", ["part", "layers", "written", "ranks", "kept"],
                       [(label, str(p["layers"]), str(p["written"]),
                         f"{p['rank_min']}-{p['rank_max']}" if p["written"] else "-", f"{100 * p['kept_fro']:.1f} %")
                        for label, p in parts.items()], justify_right=("layers", "written", "kept")))
    rows = result.layers if show_layers else sorted(result.written, key=lambda r: r.kept)[:5]
    if rows and (show_layers or rows[0].kept < 0.999):
        title = "every layer" if show_layers else "the layers that keep least"
        out.show(out.table(title, ["layer", "shape", "rank", "kept", "change"],
                           [(r.name, "x".join(str(d) for d in r.shape), str(r.rank), f"{100 * r.kept:.1f} %",
                             f"{100 * r.relative_diff:.2f} %") for r in rows],
                           justify_right=("rank", "kept", "change")))
    written = result.written
    ranks = [r.rank for r in written]
    kind = "LoCon" if any(len(r.shape) == 4 and r.shape[2:] != (1, 1) for r in written) else "LoRA"
    out.print(f"wrote {result.output} ({result.arch.upper()} {kind}, {human_bytes(result.file.size)}): {len(written)} "
              f"layers, ranks {min(ranks)}-{max(ranks)}, {100 * result.kept:.1f} % of the difference (Frobenius), "
              f"{result.seconds:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("extract", help=inspect.cleandoc(extract.__doc__ or "") + "\n" + _EXAMPLES,
                no_args_is_help=True)(extract)
