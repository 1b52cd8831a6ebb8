"""`loratools check keys`: does every module of an adapter apply to this base model, and which
keys will ComfyUI, A1111 and diffusers load?

Only wiring: the operation (`loratools.ops.check_keys`) is imported inside the command so
`--help` stays instant. Exit 0 when every module applies and no chosen loader skips a key, 1 when
the check finds a problem (unmatched, shape mismatch, two modules on one weight, unknown keys,
architecture mismatch, a key a chosen loader skips).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt

_EXAMPLES = """
Examples:

  loratools check keys my_lora.safetensors --base sd_xl_base_1.0.safetensors

  loratools check keys lora.safetensors --base models/sd15-diffusers --json

  loratools check keys peft_lora.safetensors --loader all

  loratools check keys lora.safetensors --loader comfyui --loader a1111
"""

_SHOWN = 50  # longest list printed without --all
_SHOWN_ARCH_MISMATCH = 5


def keys(
    adapter: Annotated[Path, typer.Argument(help="LoRA/LyCORIS/PEFT adapter file.", show_default=False)],
    base: Annotated[Optional[Path], typer.Option(
        "--base", "-b", help="Base checkpoint (.safetensors/.ckpt) or diffusers folder (default: the released "
        "SD1/SD2/SDXL model of the adapter's architecture).", show_default=False)] = None,
    loader: Annotated[Optional[list[str]], typer.Option(
        "--loader", "-l", help="Also apply a loader's own key rules: comfyui, a1111, diffusers or all (repeat, or "
        "comma-separated); lists the keys it would skip and why.", show_default=False)] = None,
    show_all: Annotated[bool, typer.Option("--all", help=f"List every problem module and skipped key (default: "
                                           f"first {_SHOWN}) and every module that applies.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check that every module of an adapter maps to a weight of the base model with a fitting shape, and which keys ComfyUI, A1111 and diffusers would load.

    Lists the modules that do not apply and why, then one line: "N/M modules apply; K unmatched; LoRA: SDXL, base: SDXL". With --loader, per loader: keys loaded, and each key it would skip with the reason (unknown prefix, naming form it does not map, no such weight, shape mismatch, two modules for one weight, adapter type it lacks, file refused). Reads only file headers. Exit code 0: every module applies and no chosen loader skips a key; 1: a problem was found; 2: unreadable input.
    """
    from loratools.cli.output import out
    from loratools.ops.check_keys import CheckKeysOptions, check_keys

    loaders = tuple(n.strip().lower() for v in (loader or []) for n in v.split(",") if n.strip())
    result = check_keys(CheckKeysOptions(adapter=adapter, base=base, loaders=loaders))
    if json_out:
        out.json(result.as_json())
    else:
        _render(result, show_all)
    if not result.ok:
        if not json_out:
            for problem in result.problems():
                out.problem(problem)
        raise typer.Exit(1)


def _render(result, show_all: bool) -> None:
    from loratools.cli.output import out

    # Against a base of another architecture every module is listed as a problem; the
    # architecture line says it all, so show a sample instead of a screenful.
    limit = None if show_all else (_SHOWN_ARCH_MISMATCH if result.arch_problem else _SHOWN)
    unmatched = [m.name for m in result.modules if m.status == "unmatched"]
    _listing(f"unmatched modules ({len(unmatched)}): no base weight has these names", unmatched, limit)
    shape = [m for m in result.modules if m.status == "shape"]
    if shape:
        out.show(out.table(f"shape mismatches ({len(shape)})", ["module", "base weight", "adapter", "base"],
                           [(m.name, _where(m), _shape(m.adapter_shape), _shape(m.base_shape))
                            for m in shape[:limit]]))
    groups: dict[str, list[str]] = {}
    for m in result.modules:
        if m.status == "duplicate":
            groups.setdefault(_where(m), []).append(m.name)
    if groups:
        out.show(out.table(f"weights changed by more than one module ({len(groups)})", ["base weight", "modules"],
                           [(w, "\n".join(names)) for w, names in list(groups.items())[:limit]]))
    _listing(f"keys of no known adapter type ({len(result.unknown_keys)})", result.unknown_keys, limit)
    if show_all:
        good = [(m.name, _where(m), _shape(m.base_shape)) for m in result.modules if m.status == "ok"]
        if good:
            out.show(out.table("modules that apply", ["module", "base weight", "shape"], good))
    out.print(result.summary)
    if result.loaders:
        _render_loaders(result.loaders, None if show_all else _SHOWN)


def _render_loaders(reports, limit: int | None) -> None:
    from loratools.cli.output import out
    from loratools.keys.loaders import REASONS

    for report in reports:
        if report.skipped:
            rows = [(s.key, REASONS[s.reason], s.detail) for s in report.skipped[:limit]]
            out.show(out.table(f"{report.label}: keys it would skip ({len(report.skipped)})", ["key", "reason", "why"],
                               rows, wrap=("why",)))
            if limit is not None and len(report.skipped) > limit:
                out.print(f"  ... and {len(report.skipped) - limit} more (--all lists them)")
    rows = [(r.label, r.loaded, len(r.skipped), r.keys,
             "refused: " + r.refused if r.refused else
             ", ".join(f"{n} {REASONS[k]}" for k, n in sorted(r.reasons().items())) or "-") for r in reports]
    out.show(out.table("loaders", ["loader", "loaded", "skipped", "keys", "skipped because"], rows,
                       justify_right=("loaded", "skipped", "keys"), wrap=("skipped because",)))


def _listing(title: str, names: list[str], limit: int | None) -> None:
    from loratools.cli.output import out

    if not names:
        return
    out.print(title)
    for name in names[:limit]:
        out.print(f"  {name}")
    if limit is not None and len(names) > limit:
        out.print(f"  ... and {len(names) - limit} more (--all lists them)")


def _where(m) -> str:
    return (m.target or "") + (f"[{m.rows[0]}:{m.rows[1]}]" if m.rows else "")


def _shape(shape) -> str:
    return "" if shape is None else "x".join(str(d) for d in shape)


def register(app: typer.Typer) -> None:
    """Add `keys` to the `check` group."""
    app.command("keys", help=inspect.cleandoc(keys.__doc__ or "") + "\n" + _EXAMPLES, no_args_is_help=True)(keys)
