"""The resize recipe mini-language: parsing, validation, names.

One recipe is a comma-separated list of ``key[=value]`` items; several recipes are joined with
``:`` and share one decomposition per LoRA. The grammar is elias-gaeros/resize_lora's, extended
with kohya's selections and per-layer caps:

- score weights (elias): ``fro_ckpt``, ``spn_ckpt``, ``subspace``, ``fro_lora``, ``spn_lora``,
  ``params``; a bare key means weight 1; weights are normalised by their plain sum. They only
  apply with ``thr=`` or ``size=`` (default ``fro_ckpt=1`` when none is given).
- one selection: ``thr=<log10 score>`` (a dimension is kept iff its score >= thr),
  ``size=<MiB>`` (the largest file <= that many MiB, header included), or kohya's
  ``sv_fro=<0..1>``, ``sv_ratio=<>=1>``, ``sv_cumulative=<0..1>``, ``rank=<int>``.
- ``rescale=<factor>`` bakes a strength multiplier into the factors.
- caps: ``max_rank=``, ``conv_rank=`` (k x k conv layers), ``min_rank=``.
- a bare word that is no key names a recipe in ``recipes/resize/<word>.toml``.

Errors name the bad item and list the valid keys.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from loratools.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: Score keys in the order elias applies their terms (A2.5).
SCORE_TERMS = ("subspace", "spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "params")
#: Score keys in elias' ``resize_params`` weights order.
WEIGHTS_ORDER = ("spn_lora", "spn_ckpt", "subspace", "fro_lora", "fro_ckpt", "params")
SCORE_METHODS = ("thr", "size")
KOHYA_METHODS = ("sv_fro", "sv_ratio", "sv_cumulative", "rank")
CAPS = ("max_rank", "conv_rank", "min_rank")
VALID_KEYS = (*sorted(SCORE_TERMS), *SCORE_METHODS, *KOHYA_METHODS, "rescale", *CAPS)
CKPT_TERMS = ("fro_ckpt", "spn_ckpt", "subspace")

DEFAULT_RECIPE = "fro_ckpt=1,thr=-3.55"


@dataclass(frozen=True)
class Recipe:
    """One validated recipe.

    ``method`` is ``thr``, ``size``, ``sv_fro``, ``sv_ratio``, ``sv_cumulative`` or ``rank``;
    ``param`` its value (``size`` in MiB, ``rank`` an int). ``weights`` are normalised (sum 1)
    and empty for kohya methods.
    """

    text: str
    method: str
    param: float
    weights: dict[str, float] = field(default_factory=dict)
    rescale: float = 1.0
    max_rank: int | None = None
    conv_rank: int | None = None
    min_rank: int = 0

    @property
    def uses_scores(self) -> bool:
        return self.method in SCORE_METHODS

    @property
    def needs_checkpoint(self) -> bool:
        return any(abs(self.weights.get(k, 0.0)) > 1e-6 for k in CKPT_TERMS)

    def stem(self) -> str:
        """The recipe's part of the output file name (elias' ``recipe_fn`` plus our keys)."""
        parts: list[str] = []
        if self.uses_scores:
            parts += [f"{k.replace('_', '')}{fmt(w)}" for k, w in sorted(self.weights.items()) if w != 0.0]
        else:
            parts.append(f"{self.method.replace('_', '')}{fmt(self.param)}")
        if self.rescale != 1.0:
            parts.append(f"scale{fmt(self.rescale)}")
        if self.method == "size":
            parts.append(f"size{fmt(self.param)}")
        if self.max_rank is not None:
            parts.append(f"max{self.max_rank}")
        if self.conv_rank is not None:
            parts.append(f"conv{self.conv_rank}")
        if self.min_rank:
            parts.append(f"min{self.min_rank}")
        return "_".join(parts)

    def weights_json(self) -> dict[str, float]:
        """All six weights in elias' order (for the ``resize_params`` metadata entry)."""
        return {k: float(self.weights.get(k, 0.0)) for k in WEIGHTS_ORDER}


def fmt(value: float) -> str:
    """elias' number format: two decimals, trailing zeros and dot stripped (``-3.0`` -> ``-3``)."""
    return "{:.2f}".format(value).rstrip("0").rstrip(".")


def _bad_key(key: str, text: str) -> UsageError:
    near = difflib.get_close_matches(key, VALID_KEYS, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    named = ", ".join(sorted(named_recipes())) or "none"
    return UsageError(f"unknown key '{key}' in resize recipe '{text}'{hint}; valid keys: "
                      f"{', '.join(VALID_KEYS)}; named recipes: {named}")


def _number(key: str, value: str, text: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"'{key}={value}' in resize recipe '{text}': '{value}' is not a number") from None
    if math.isnan(v):
        raise UsageError(f"'{key}={value}' in resize recipe '{text}': NaN is not allowed")
    return v


def _integer(key: str, value: str, text: str, minimum: int) -> int:
    v = _number(key, value, text)
    if v != int(v) or v < minimum:
        raise UsageError(f"'{key}={value}' in resize recipe '{text}': expected an integer >= {minimum}")
    return int(v)


def named_recipes() -> dict[str, Path]:
    """Named recipes shipped in ``recipes/resize/*.toml`` (name -> file)."""
    from loratools.resources import recipes_dir

    folder = recipes_dir() / "resize"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def load_named(name: str) -> str:
    """The recipe string of a named recipe (``recipe = "..."`` in its TOML file)."""
    path = named_recipes()[name]
    with path.open("rb") as f:
        data = tomllib.load(f)
    text = data.get("recipe")
    if not isinstance(text, str):
        raise UsageError(f"{path}: a named resize recipe needs a string 'recipe' entry")
    return text


def parse_recipe(text: str) -> Recipe:
    """Parse and validate one recipe (no ``:``).

    Args:
        text: e.g. ``"fro_ckpt=1,thr=-3.55"``, ``"sv_fro=0.9,max_rank=32"`` or a recipe name.

    Returns:
        The validated ``Recipe``.

    Raises:
        UsageError: naming the bad item and the valid keys.

    Example:
        >>> parse_recipe("fro_ckpt=3,spn_lora,thr=-1").weights
        {'fro_ckpt': 0.75, 'spn_lora': 0.25}
    """
    text = text.strip()
    if text in named_recipes() and "=" not in text:
        return parse_recipe(load_named(text))
    weights: dict[str, float] = {}
    values: dict[str, float] = {}
    caps: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if key in SCORE_TERMS:
            weights[key] = _number(key, value, text) if value else 1.0
        elif key not in VALID_KEYS:
            raise _bad_key(key, text)
        elif not value:
            raise UsageError(f"'{item}' in resize recipe '{text}' needs a value ({key}=...)")
        elif key in CAPS:
            caps[key] = _integer(key, value, text, 0 if key == "min_rank" else 1)
        elif key == "rank":
            values[key] = _integer(key, value, text, 1)
        else:
            values[key] = _number(key, value, text)
    methods = [k for k in (*SCORE_METHODS, *KOHYA_METHODS) if k in values]
    if "thr" in values and "size" in values:
        raise UsageError(f"resize recipe '{text}' gives both thr= and size=; keep one "
                         "(size= finds the threshold that fits the size)")
    if len(methods) > 1:
        raise UsageError(f"resize recipe '{text}' has several selections ({', '.join(methods)}); "
                         "use one per recipe and join recipes with ':'")
    if not methods:
        raise UsageError(f"resize recipe '{text}' selects nothing: add one of thr=, size=, sv_fro=, "
                         f"sv_ratio=, sv_cumulative=, rank= (default recipe: {DEFAULT_RECIPE})")
    method = methods[0]
    param = values[method]
    rescale = values.get("rescale", 1.0)
    if rescale <= 0 or math.isinf(rescale):
        raise UsageError(f"rescale={rescale:g} in resize recipe '{text}' must be a positive number")
    if method in SCORE_METHODS:
        if not weights:
            weights = {"fro_ckpt": 1.0}
        total = sum(weights.values())
        if total == 0:
            raise UsageError(f"score weights in resize recipe '{text}' sum to 0; give at least one positive weight")
        weights = {k: w / total for k, w in weights.items()}
        if method == "size" and (param <= 0 or math.isinf(param)):
            raise UsageError(f"size={param:g} in resize recipe '{text}' must be a positive number of MiB")
        if method == "thr" and math.isinf(param) and param > 0:
            raise UsageError(f"thr={param:g} in resize recipe '{text}' would drop every layer")
    else:
        if weights:
            raise UsageError(f"score weights ({', '.join(weights)}) in resize recipe '{text}' only apply "
                             f"with thr= or size=, not with {method}=")
        if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
            raise UsageError(f"{method}={param:g} in resize recipe '{text}' must be in (0, 1]")
        if method == "sv_ratio" and not param >= 1:
            raise UsageError(f"sv_ratio={param:g} in resize recipe '{text}' must be >= 1 "
                             "(largest / smallest kept singular value)")
    if "max_rank" in caps and caps.get("min_rank", 0) > caps["max_rank"]:
        raise UsageError(f"min_rank is above max_rank in resize recipe '{text}'")
    return Recipe(text=text, method=method, param=param, weights=weights, rescale=rescale,
                  max_rank=caps.get("max_rank"), conv_rank=caps.get("conv_rank"),
                  min_rank=caps.get("min_rank", 0))


def parse_recipes(text: str) -> list[Recipe]:
    """Parse ``:``-separated recipes; duplicates (same output name) are rejected."""
    recipes = [parse_recipe(part) for part in text.split(":") if part.strip()]
    if not recipes:
        raise UsageError(f"empty resize recipe '{text}'; e.g. {DEFAULT_RECIPE}")
    seen: dict[tuple[str, float | None], str] = {}
    for r in recipes:
        sig = (r.stem(), r.param if r.method == "thr" else None)
        if sig in seen:
            raise UsageError(f"resize recipes '{seen[sig]}' and '{r.text}' are the same recipe")
        seen[sig] = r.text
    return recipes


def kohya_recipe(*, new_rank: int | None, new_conv_rank: int | None, dynamic_method: str | None,
                 dynamic_param: float | None, kohya_compat: bool = False) -> str:
    """The recipe string for sd-scripts' ``resize_lora.py`` flags.

    sd-scripts caps dynamic ranks at ``--new_rank`` (default 4, a classic trap) and applies
    ``--new_conv_rank`` (default: ``--new_rank``) to every 4-D layer. The 4 default is kept only
    with ``--kohya-compat``; otherwise a dynamic method without ``--new_rank`` is uncapped.
    """
    if dynamic_method is None:
        if dynamic_param is not None:
            raise UsageError("--dynamic_param needs --dynamic_method (sv_fro, sv_ratio or sv_cumulative)")
        rank = new_rank if new_rank is not None else 4
        items = [f"rank={rank}"]
        if new_conv_rank is not None and new_conv_rank != rank:
            items.append(f"conv_rank={new_conv_rank}")
        return ",".join(items)
    if dynamic_method not in ("sv_fro", "sv_ratio", "sv_cumulative"):
        raise UsageError(f"--dynamic_method {dynamic_method}: expected sv_fro, sv_ratio or sv_cumulative")
    if dynamic_param is None:
        raise UsageError(f"--dynamic_method {dynamic_method} needs --dynamic_param")
    items = [f"{dynamic_method}={dynamic_param!r}"]
    cap = new_rank if new_rank is not None else (4 if kohya_compat else None)
    if cap is not None:
        items.append(f"max_rank={cap}")
    conv = new_conv_rank if new_conv_rank is not None else None
    if conv is not None and conv != cap:
        items.append(f"conv_rank={conv}")
    return ",".join(items)
