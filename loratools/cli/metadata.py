"""`loratools metadata`: show, dump, set, delete, strip.

Only wiring and rendering; the work is in ``loratools.ops.metadata`` (imported inside each command so
``loratools --help`` never loads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loratools.cli.options import JsonOpt, OutputOpt, OverwriteOpt

app = typer.Typer(
    help="Read and edit safetensors metadata (sd-scripts ss_*, modelspec, sshs hashes).\n\n"
    "Example: loratools metadata show my_lora.safetensors",
    no_args_is_help=True,
    rich_markup_mode=None,
)

FileArg = Annotated[Path, typer.Argument(help="A .safetensors file.", show_default=False, metavar="FILE")]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Replace the input file (atomically).")]


@app.command()
def show(
    files: Annotated[Optional[list[Path]], typer.Argument(help="One or more .safetensors files.", metavar="FILE",
                                                          show_default=False)] = None,
    model: Annotated[Optional[list[Path]], typer.Option(
        "--model", metavar="FILE", help="sd-scripts' show_metadata.py spelling of FILE.", show_default=False)] = None,
    json_out: JsonOpt = False,
    top_tags: Annotated[int, typer.Option("--top-tags", min=0, help="Trigger-word candidates to list.")] = 12,
    keys: Annotated[bool, typer.Option("--keys", help="Also list every tensor with dtype and shape.")] = False,
) -> None:
    """Summarise adapters: architecture, types, ranks, training record, trigger words.

    Reads only the header (and alpha scalars), so it is instant on multi-GB files. sd-scripts'
    show_metadata.py prints the raw keys: that is loratools metadata dump.

    Example: loratools metadata show lora.safetensors --json
    """
    from loratools.cli.output import out
    from loratools.errors import UsageError
    from loratools.ops.metadata import summarize

    paths = [*(files or []), *(model or [])]
    if not paths:
        raise UsageError("give the .safetensors file(s) to show (sd-scripts: --model FILE)")
    summaries = [summarize(f, top_tags=top_tags) for f in paths]
    if json_out:
        docs = [s.to_json(keys=keys) for s in summaries]
        out.json(docs[0] if len(docs) == 1 else docs)
        return
    for s in summaries:
        _render_summary(s)
        if keys:
            out.show(out.table("Tensors", ["name", "dtype", "shape"],
                               [(n, d, "x".join(map(str, sh)) or "scalar") for n, d, sh in s.tensors]))


def _render_summary(s: Any) -> None:
    from loratools.cli.output import out, styled
    from loratools.units import human_bytes

    def kv(title: str, rows: list[tuple[str, Any]]) -> None:
        rows = [(k, _text(v)) for k, v in rows if v not in (None, "", {}, [])]
        if rows:
            out.show(out.key_values(title, rows))
            out.print()

    def hist(d: dict[str, int]) -> str:
        return ", ".join(f"{k} x{v}" if len(d) > 1 else str(k) for k, v in d.items())

    arch = s.arch_label or "unknown"
    if s.arch_source:
        arch += f" (from {s.arch_source})"
    out.rule(str(s.path))
    kv("File", [
        ("size", f"{human_bytes(s.file_size)} ({s.file_size} bytes), header {human_bytes(s.header_size)}"),
        ("tensors", f"{s.tensor_count} ({hist(s.dtypes)})"),
        ("architecture", arch), ("note", s.arch_note),
        ("adapter", hist(s.adapter_types) or ("none: a checkpoint" if s.kind == "checkpoint" else None)),
        ("naming", s.naming),
        ("modules", ", ".join(f"{k} {v}" for k, v in s.module_counts.items())),
        ("rank", hist(s.ranks)), ("alpha", hist(s.alphas)), ("scale alpha/rank", hist(s.scales)),
        ("unknown keys", (s.unknown_keys or None) if s.kind != "checkpoint" else None),
        *[(k, v) for k, v in s.hashes.items()],
    ])
    kv("Base model", list(s.base_model.items()))
    kv("Training", list(s.training.items()))
    if s.trigger_words or s.declared_triggers:
        kv("Trigger words", [("declared", ", ".join(s.declared_triggers)),
                             ("top tags", ", ".join(f"{t} ({n})" for t, n in s.trigger_words))])
    if s.datasets:
        kv("Dataset folders", [(d.folder + (" (reg)" if d.regularization else ""),
                                f"{d.images if d.images is not None else '?'} images"
                                + (f" x {d.repeats} repeats" if d.repeats is not None else ""))
                               for d in s.datasets])
    kv("Comment", [("", s.comment)])
    kv("Model spec", list(s.modelspec.items()))
    if not s.raw:
        out.print(styled("no metadata", "dim"))
        out.print()


def _text(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


@app.command()
def dump(file: FileArg) -> None:
    """Print the raw metadata as sorted, indented JSON.

    Example: loratools metadata dump lora.safetensors > meta.json
    """
    from loratools.cli.output import out
    from loratools.io.header import read_header

    out.json(dict(sorted(read_header(file).metadata.items())))


def _report(result: Any, json_out: bool) -> None:
    from loratools.cli.output import out

    rows = [(c.key, c.action, c.reason, c.old, c.new) for c in result.changes]
    if json_out:
        out.json({"source": str(result.source), "output": str(result.output),
                    "changes": [c.__dict__ for c in result.changes],
                    "hashes_recomputed": result.hashes_recomputed,
                    "sshs_model_hash": result.written.sshs_model_hash,
                    "sshs_legacy_hash": result.written.sshs_legacy_hash})
        return
    if rows:
        out.show(out.table(None, ["key", "change", "why", "old", "new"],
                           [(k, a, w, _short(o), _short(n)) for k, a, w, o, n in rows], wrap=("why", "old", "new")))
    else:
        out.print("no metadata changed")
    note = ", sshs hashes recomputed" if result.hashes_recomputed else ""
    out.print(f"wrote {result.output}{note}")


def _short(v: str | None, n: int = 60) -> str | None:
    return v if v is None or len(v) <= n else v[: n - 3] + "..."


@app.command("set")
def set_(
    file: FileArg,
    assignments: Annotated[list[str], typer.Argument(help="KEY=VALUE pairs (KEY=@FILE reads a file).",
                                                     metavar="KEY=VALUE", show_default=False)],
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Add or change metadata keys (sshs hashes are recomputed).

    Example:

      loratools metadata set lora.safetensors modelspec.author=me --in-place
    """
    from loratools.ops.metadata import edit_metadata, parse_assignments

    _report(edit_metadata(file, output=output, in_place=in_place, overwrite=overwrite,
                          set_values=parse_assignments(assignments)), json_out)


@app.command()
def delete(
    file: FileArg,
    keys: Annotated[list[str], typer.Argument(help="Keys to remove.", metavar="KEY", show_default=False)],
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove metadata keys.

    Example:

      loratools metadata delete lora.safetensors ss_training_comment --in-place
    """
    from loratools.ops.metadata import edit_metadata

    _report(edit_metadata(file, output=output, in_place=in_place, overwrite=overwrite, delete=keys), json_out)


@app.command()
def strip(
    file: FileArg,
    training_data: Annotated[bool, typer.Option(
        "--training-data", help="Remove keys that reveal the training set (tags, folders, buckets, "
        "comment) and shorten local paths to file names.")] = False,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove groups of metadata before sharing a file; lists each key and why.

    Example:

      loratools metadata strip lora.safetensors --training-data -o share.safetensors
    """
    from loratools.errors import UsageError
    from loratools.ops.metadata import edit_metadata

    if not training_data:
        raise UsageError("say what to strip: --training-data")
    _report(edit_metadata(file, output=output, in_place=in_place, overwrite=overwrite,
                          strip_training_data=True), json_out)
