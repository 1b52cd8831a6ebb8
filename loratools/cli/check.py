"""`loratools check`: `weights` (dead / NaN / underflow modules) here; `keys` comes from check_keys.

Only wiring and rendering; the work is in ``loratools.ops.check_weights`` (imported inside the
command so ``loratools --help`` stays instant).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loratools.cli.options import JsonOpt

app = typer.Typer(
    help="Check adapter files for problems.\n\nExample: loratools check weights my_lora.safetensors",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command()
def weights(
    files: Annotated[list[Path], typer.Argument(help="Adapter files (.safetensors, .pt, .ckpt).", metavar="FILE",
                                                show_default=False)],
    all_modules: Annotated[bool, typer.Option("--all", help="List every module, not only problems.")] = False,
    json_out: JsonOpt = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="One CSV row per tensor, sd-scripts' "
                                          "check_lora_weights columns: key, shape, mean|w|, min|w|.")] = False,
    fail_on: Annotated[Optional[list[str]], typer.Option(
        "--fail-on", metavar="STATUSES", help="Statuses that give exit code 1: dead, nan, underflow (comma list; "
        "'none' never fails). Expected findings (unused text-encoder layers, underflow that costs under 1 % of "
        "a delta) never fail.")] = None,
) -> None:
    """Find dead (all-zero), NaN/Inf and fp16-underflowed modules; say which are expected and what to do
    about the others.

    Exit code 0: nothing to fix; 1: problems found; 2: unreadable input. sd-scripts' check_lora_weights.py
    output: --csv.

    Example: loratools check weights lora.safetensors --fail-on nan,dead
    """
    from loratools.errors import UsageError
    from loratools.ops.check_weights import CheckOptions, check_file, parse_fail_on

    if json_out and csv_out:
        raise UsageError("choose one of --json and --csv")
    options = CheckOptions(fail_on=parse_fail_on(fail_on)) if fail_on else CheckOptions()
    reports = [check_file(f, options) for f in files]
    from loratools.cli.output import out

    for r in reports:
        for message in r.warnings:
            out.warn(f"{r.path}: {message}")
    if json_out:
        docs = [_clean(r.to_json()) for r in reports]
        out.json(docs[0] if len(docs) == 1 else docs)
    elif csv_out:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["key", "shape", "mean|w|", "min|w|"])
        for r in reports:
            for m in r.modules:
                for t in m.tensors:
                    # Python float repr, as sd-scripts prints: the seed guides count zero tensors
                    # by searching the dump for lines ending in "0.0"
                    w.writerow([t.key, "(" + "-".join(str(d) for d in t.shape) + ")", repr(t.mean_abs),
                                repr(t.min_abs)])
    else:
        for r in reports:
            _render(r, all_modules)
    if any(r.failed for r in reports):
        raise typer.Exit(1)


def _clean(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _pct(x: float) -> str:
    return "0" if x == 0 else f"{100 * x:.1f}%"


def _render(r: Any, all_modules: bool) -> None:
    from loratools.cli.output import out, styled

    rows = []
    for m in r.modules:
        if not all_modules and m.status == "ok":
            continue
        status = m.status + ((" (harmless)" if m.status == "underflow" else " (expected)") if m.expected else "")
        rank = f"{m.kind} {m.rank if m.rank is not None else '-'}/{_g(m.alpha)}"
        factors = "; ".join(f"{x.suffix.removesuffix('.weight')} {_g(x.mean_abs)}/{_g(x.min_abs)}" for x in m.tensors)
        rows.append((m.name, status, rank, _pct(max(x.zero_fraction for x in m.tensors)),
                     _pct(max(x.below_fp16_normal for x in m.tensors)), _g(m.delta_norm), factors))
    out.rule(str(r.path))
    if rows:
        out.show(out.table(None, ["module", "status", "type r/α", "zeros", "<fp16", "‖ΔW‖",
                                  "mean|w| / min|w| per factor"], rows,
                           justify_right=("zeros", "<fp16", "‖ΔW‖"), wrap=("mean|w| / min|w| per factor",)))
    counts = ", ".join(f"{n} {s}" for s, n in r.counts.items())
    dtypes = ", ".join(sorted({m.dtype for m in r.modules}))
    out.print(f"{len(r.modules)} modules ({counts}); {dtypes}; architecture {(r.arch or 'unknown').upper()}"
              + (f", clip skip {r.clip_skip}" if r.clip_skip else ""))
    for heading, lines in (("expected, nothing to do:", r.expected), ("problems, and what to do:", r.problems)):
        if lines:
            out.print(heading)
            for line in lines:
                out.print("  - " + line)
    for line in r.explanations[len(r.expected) + len(r.problems):] if r.unknown_keys else []:
        out.print("- " + line)  # keys no module type claimed (the "all ok" line is the verdict's)
    out.print(styled(r.verdict, "red" if r.failed else "green"))


from loratools.cli import check_keys  # noqa: E402  (adds `check keys` to this group)

check_keys.register(app)
