"""Metadata of a resized file: everything kept, the stale rank fields fixed, provenance added.

sd-scripts' resize leaves ``ss_network_args`` stale and writes the last layer's alpha; elias
copies ``ss_network_dim``/``ss_network_alpha`` unchanged. Here (issue item 5):

- every input key (``ss_*``, ``modelspec.*``, anything else) is kept;
- ``ss_network_dim``/``ss_network_alpha`` become the value when every linear layer has the same
  one, else ``"Dynamic"`` (sd-scripts' word); ``conv_dim``/``conv_alpha`` in
  ``ss_network_args`` likewise for k x k convs;
- ``ss_training_comment`` gets a provenance line in front of the old comment;
- ``loratools`` holds JSON: operation, recipe, threshold reached (null for +-inf), rank summary,
  source file name and sha256, tool version;
- score recipes also get elias' ``resize_params`` (valid JSON: null instead of -Infinity).

sshs hashes are recomputed by the writer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loratools import __version__
from loratools.ops.resize.recipe import Recipe


@dataclass(frozen=True)
class KeptLayer:
    """One written layer, as metadata needs it."""

    rank: int
    alpha: float | None
    kxk: bool


def _uniform(values: Sequence[object]) -> object | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def resized_metadata(source: Mapping[str, str], *, recipe: Recipe, threshold: float | None,
                     kept: Sequence[KeptLayer], old_max_rank: int, dropped: int, source_name: str,
                     source_sha256: str | None, kohya_compat: bool, drop_keys: Sequence[str] = ()) -> dict[str, str]:
    """The output file's metadata for one recipe (see the module docstring); ``source_sha256`` is
    None for an input that never was a file (``merge --to-lora`` resizes in memory)."""
    meta = {k: v for k, v in source.items() if k not in drop_keys}
    linear = [k for k in kept if not k.kxk]
    conv = [k for k in kept if k.kxk]
    if linear:
        dim = _uniform([k.rank for k in linear])
        alpha = _uniform([k.alpha for k in linear])
        meta["ss_network_dim"] = "Dynamic" if dim is None else str(dim)
        meta["ss_network_alpha"] = "Dynamic" if alpha is None else _num(alpha)  # type: ignore[arg-type]
    args_text = meta.get("ss_network_args")
    if conv and args_text:
        try:
            args = json.loads(args_text)
        except ValueError:
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            dim = _uniform([k.rank for k in conv])
            alpha = _uniform([k.alpha for k in conv])
            args["conv_dim"] = "Dynamic" if dim is None else str(dim)
            if "conv_alpha" in args:
                args["conv_alpha"] = "Dynamic" if alpha is None else _num(alpha)  # type: ignore[arg-type]
            meta["ss_network_args"] = json.dumps(args)
    reached = "" if threshold is None else f", threshold {threshold:.4g}"
    line = f"Resized by loratools {__version__} with {recipe.text}{reached} from dim {old_max_rank}"
    old = meta.get("ss_training_comment")
    # sd-scripts writes str(None) when there was no comment: that is no comment, not "None"
    meta["ss_training_comment"] = f"{line}; {old}" if old and old != "None" else line
    ranks = [k.rank for k in kept]
    entry = {
        "version": __version__,
        "operation": "resize",
        "recipe": recipe.text,
        "method": recipe.method,
        "threshold": _finite(threshold),
        "kohya_compat": kohya_compat,
        "ranks": {"layers": len(ranks), "dropped": dropped, "min": min(ranks, default=0),
                  "max": max(ranks, default=0), "total": sum(ranks)},
        "source": {"file": source_name, "sha256": source_sha256},
    }
    if "loratools" in source:
        try:
            entry["previous"] = json.loads(source["loratools"])
        except ValueError:
            entry["previous"] = source["loratools"]
    meta["loratools"] = json.dumps(entry, ensure_ascii=False)
    if recipe.uses_scores:
        meta["resize_params"] = json.dumps({
            "recipe_str": recipe.text, "weights": recipe.weights_json(),
            "target_size": recipe.param if recipe.method == "size" else None,
            "threshold": _finite(threshold), "rescale": recipe.rescale})
    return meta
