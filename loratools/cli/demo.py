"""`loratools demo`: the whole seed workflow on built-in tiny models, offline, on CPU.

Only wiring and rendering: ``loratools.ops.demo.run_demo`` does the work (imported inside the
command so ``--help`` stays instant); this module turns its result into three tables (where
everything is, what each step produced, the commands to run each step yourself) or ``--json``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from loratools.cli.options import JsonOpt

if TYPE_CHECKING:
    from loratools.ops.demo import DemoResult

HELP = (
    "Run the whole LoRA workflow on a built-in tiny model: no download, no GPU, under a minute.\n\n"
    "Builds a tiny SDXL-like base model (a single-file checkpoint and a diffusers folder), writes a captioned "
    "dataset in N_concept folders, trains a LoCon with sample images, resizes it with fro_ckpt=1,thr=-3.55 and "
    "with sv_fro=0.9, checks its weights, merges it into the base (also with block weights), extracts it back "
    "from the merged checkpoint, averages the run's saves by post-hoc EMA and reads its metadata. Then it prints where "
    "every file is, what each step produced, and the loratools command that does each step on your own files.\n\n"
    "Examples:\n\n"
    "  loratools demo\n\n"
    "  loratools demo --quick --arch sd1 -o /tmp/demo --json"
)


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command("demo", help=HELP)(demo)


def demo(
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", help="Folder for everything the demo writes. A non-empty folder that an earlier "
        "demo did not write is refused unless --overwrite.")] = Path("demo-output"),
    arch: Annotated[str, typer.Option("--arch", help="Tiny base model: sdxl (as Pony/SDXL) or sd1.")] = "sdxl",
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=2, help="Training steps (default 120; 8 with --quick).", show_default=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller settings: fewer images, steps and "
                                        "sampling steps (a smoke test).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Use a non-empty folder anyway; only the demo's own entries in it are replaced.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the demo (see the help above)."""
    from loratools.cli.output import out
    from loratools.ops.demo import DemoOptions, run_demo

    options = DemoOptions(output_dir=output_dir, arch=arch.lower(), steps=steps, quick=quick, overwrite=overwrite)
    # stdout is kept for the tables / JSON: libraries that log to stdout while the steps run
    # (lycoris-lora's logger does) are sent to stderr with the progress lines.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_demo(options, progress=out.info)
    if json_out:
        out.json(result.to_json())
        return
    _render(result)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _render(r: DemoResult) -> None:
    from loratools.cli.output import out
    from loratools.units import human_bytes as hb, size_change

    root = r.output_dir
    where = [
        ("base", "single-file checkpoint", _rel(r.base.single_file, root)),
        ("base", "diffusers folder", _rel(r.base.diffusers_dir, root) + "/"),
        ("dataset", f"{r.dataset.images} images + captions", _rel(r.dataset.concept_dir, root) + "/"),
        ("train", "recipe (sd-scripts flags)", _rel(r.train.recipe, root)),
        ("train", "LoCon", _rel(r.train.lora, root)),
        *(("train", "sample image", _rel(p, root)) for p in r.train.samples),
        *(("resize", x.recipe, _rel(x.path, root)) for x in r.resized),
        ("merge", "merged checkpoint", _rel(r.merge.path, root)),
        ("merge", "preview: base / merged", f"{_rel(r.merge.preview_base, root)} / "
                                            f"{_rel(r.merge.preview_merged, root)}"),
        ("blocks", f"merged with {r.blocks.preset} block weights", _rel(r.blocks.path, root)),
        ("blocks", "preview", _rel(r.blocks.preview, root)),
        ("extract", "LoCon extracted from the merged checkpoint", _rel(r.extract.path, root)),
        ("ema", "post-hoc EMA of the run's saves", _rel(r.ema.path, root)),
        ("all", "this report as JSON", "report.json"),
    ]
    for message in r.train.warnings:
        out.warn(f"train: {message}")
    out.show(out.table(f"Where everything is (in {root})", ["path", "what"],
                       [(path, f"{step}: {what}") for step, what, path in where], wrap=("what",)))

    first, last = r.train.loss_window()
    n = max(1, len(r.train.losses) // 4)
    lo, hi = r.metadata.network.get("network dim"), r.metadata.network.get("network alpha")
    triggers = ", ".join(f"{t} ({c})" for t, c in r.metadata.trigger_words[:3])
    ranks = ", ".join(f"{n} modules of rank {k}" for k, n in r.metadata.ranks.items())
    produced = [
        ("base", f"tiny {r.base.arch.upper()}, {r.base.parameters / 1e6:.2f} M parameters, "
                       f"{hb(r.base.single_file_bytes)} single file"),
        ("dataset", f"{r.dataset.images} images x {r.dataset.repeats} repeats, trigger word '{r.dataset.trigger}'; "
                    f"e.g. \"{r.dataset.example_caption}\""),
        ("train", f"{r.train.network}: {r.train.steps} steps, loss {first:.4f} -> {last:.4f} (mean of first/last "
                  f"{n} steps), {r.train.modules} modules, {hb(r.train.bytes)}, {len(r.train.samples)} sample images"),
        *(("resize", f"{x.recipe}: rank {x.rank_before} -> {x.rank_after}, "
                     f"{size_change(x.bytes_before, x.bytes_after)}, Frobenius {100 * x.fro_retained:.1f} % kept, {x.layers_dropped} "
                     "layers dropped" + ("" if x.status == "written" else f" ({x.status})"))
          for x in r.resized),
        *(("check", f"{c.path.name}: " + "; ".join(c.explanations)) for c in r.checks),
        ("merge", f"applied {r.merge.applied}/{r.merge.modules} modules at ratio {r.merge.ratio:g}, "
                  f"{r.merge.patched_keys} weights changed, {r.merge.copied_keys} copied, verify "
                  f"{'ok' if r.merge.verified else 'FAILED' if r.merge.verified is False else 'skipped'}; "
                  f"preview pixels changed by {100 * r.merge.preview_change:.2f} % on average"),
        ("blocks", f"{r.blocks.preset}: {r.blocks.applied - r.blocks.zeroed}/{r.blocks.applied} modules applied, "
                   f"{r.blocks.zeroed} at block weight 0 (their weights unchanged); preview pixels changed by "
                   f"{100 * r.blocks.preview_change:.2f} %"),
        ("extract", f"{r.extract.recipe}: {r.extract.layers} layers, ranks {r.extract.ranks[0]}-{r.extract.ranks[1]}, "
                    f"{hb(r.extract.bytes)}, {100 * r.extract.kept:.1f} % of the difference kept; equals "
                    f"{r.merge.ratio:g} x the trained LoCon to {100 * r.extract.deviation:.2f} %"),
        ("ema", f"--sigma_rel {r.ema.sigma_rel:g} over steps {', '.join(map(str, r.ema.steps))}: weights "
                f"{', '.join(f'{w:.2f}' for w in r.ema.weights)}, rank up to {r.ema.max_rank}, {hb(r.ema.bytes)}"),
        ("metadata", f"{r.metadata.architecture} LoRA, dim {lo} / alpha {hi} ({ranks}), base "
                     f"{r.metadata.base_model.get('name', '?')}; trigger words: {triggers}"),
    ]
    seen: set[str] = set()
    rows = []
    for step, text in produced:  # each step's time on its first row
        rows.append((step, text, "" if step in seen else f"{r.steps_seconds.get(step, 0.0):.1f}"))
        seen.add(step)
    out.show(out.table("What each step produced", ["step", "result", "s"], rows, justify_right=["s"], wrap=("result",)))

    commands = [("train", r.train.command), ("resize", r.resize_command), ("check", r.check_command),
                ("merge", r.merge.command), ("blocks", r.blocks.command), ("extract", r.extract.command),
                ("ema", r.ema.command), ("metadata", r.metadata.command)]
    out.show(out.table("Each step on your own files", ["step", "command"], commands, wrap=("command",)))
    out.print(f"done in {r.seconds:.0f} s. The tiny models have random weights, so their images are noise patterns; "
              "what to look at is how each step's files and numbers change. To run the same steps on a real model, "
              "use the commands above with your own files.")
