"""``loratools ema``: post-hoc EMA of the LoRAs one training run saved (epoch/step files).

The weights are musubi-tuner's ``lora_post_hoc_ema.py``: the files, oldest first, are folded as
``s = x_0``, then ``s = beta_i * s + (1 - beta_i) * x_i`` for ``i = 1 .. n-1``, with

* ``--beta B`` (default 0.95): ``beta_i = B``; with ``--beta2 B2`` linearly from ``B`` (``i = 1``)
  to ``B2`` (``i = n-1``);
* ``--sigma_rel S`` (Karras et al. 2024, power-function EMA): ``beta_i = (1 - 1/i)^(gamma + 1)``,
  gamma the positive root of ``gamma^3 + 7 gamma^2 + (16 - S^-2) gamma + (12 - S^-2) = 0``, so
  ``beta_1 = 0`` and the oldest file gets weight 0, as in musubi-tuner.

Unrolled, file ``j`` gets ``w_j = (1 - beta_j) * prod_{k > j} beta_k`` (``w_0 = prod beta``); the
weights sum to 1. musubi-tuner applies that average to every tensor, i.e. to the ``lora_up`` and
``lora_down`` factors separately, and the product of averaged factors is not the average of the
products (``(a1 + a2)(b1 + b2) / 4 != (a1 b1 + a2 b2) / 2``). Here the *deltas* are averaged:
``merge --to-lora``'s exact rank concatenation writes ``sum_j w_j * delta_j`` (ranks add), and a
resize recipe (``-r``) shrinks that afterwards.

Files are ordered by the training step in their metadata (``ss_steps``, else ``ss_epoch``), not by
name (``epoch-10`` sorts before ``epoch-2``) nor by modification time (copies change it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import InvalidFileError, UsageError

if TYPE_CHECKING:
    from loratools.ops.merge import LoraMergeResult

DEFAULT_BETA = 0.95
#: --sigma_rel above this has no positive gamma (the cubic's constant term 12 - S^-2 must be negative).
MAX_SIGMA_REL = 1 / math.sqrt(12)


@dataclass(frozen=True)
class EmaOptions:
    """Inputs, schedule and output of a post-hoc EMA.

    Attributes:
        inputs: the saved LoRAs (files, folders or globs, any order).
        output: ``.safetensors`` file (a folder with several ``:``-separated recipes).
        beta, beta2: musubi-tuner's ``--beta`` / ``--beta2`` (None: 0.95, and beta2 = beta).
        sigma_rel: the power-function profile instead of ``beta`` (None: not used).
        keep_order: use the order given instead of the training steps (musubi's ``--no_sort``).
        recipe, base, dtype, overwrite, title, device: as ``merge --to-lora``.
    """

    inputs: Sequence[str | Path]
    output: Path
    beta: float | None = None
    beta2: float | None = None
    sigma_rel: float | None = None
    keep_order: bool = False
    recipe: str | None = None
    base: Path | None = None
    dtype: str | None = None
    overwrite: bool = False
    title: str | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class EmaInput:
    """One saved LoRA: its training position (from metadata) and its weight in the average."""

    path: Path
    step: int | None
    epoch: int | None
    weight: float

    def as_json(self) -> dict[str, object]:
        return {"path": str(self.path), "step": self.step, "epoch": self.epoch, "weight": self.weight}


@dataclass
class EmaResult:
    """The inputs in the order averaged, how they were ordered, the schedule, and the written merge."""

    inputs: list[EmaInput]
    ordered_by: str  # "ss_steps", "ss_epoch" or "given"
    schedule: dict[str, object]
    merge: LoraMergeResult
    skipped: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)  # same step and tensors as a kept file


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent for a relative width (Karras et al. 2024, Algorithm 2).

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 3)
        16.97
    """
    import numpy as np

    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UsageError(f"--sigma_rel {sigma_rel:g} must be in (0, {MAX_SIGMA_REL:.4f}); e.g. 0.05 to 0.2")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    return max(real)


def betas(n: int, *, beta: float | None = None, beta2: float | None = None,
          sigma_rel: float | None = None) -> list[float]:
    """``beta_i`` for files ``1 .. n-1`` (musubi-tuner's schedule; see the module docstring)."""
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / i) ** (gamma + 1) for i in range(1, n)]
    b1 = DEFAULT_BETA if beta is None else beta
    b2 = b1 if beta2 is None else beta2
    for name, value in (("--beta", b1), ("--beta2", b2)):
        if not 0 <= value <= 1:
            raise UsageError(f"{name} {value:g} must be in [0, 1] (the share the running average keeps per file)")
    count = n - 1
    return [b1 + (b2 - b1) * (i / (count - 1)) if count > 1 else b1 for i in range(count)]


def ema_weights(bs: Sequence[float]) -> list[float]:
    """Each file's weight in the folded average: ``w_0 = prod beta``, ``w_j = (1 - beta_j) prod_{k>j} beta_k``.

    Example:
        >>> ema_weights([0.5, 0.5])
        [0.25, 0.25, 0.5]
    """
    weights = [1.0] + [1.0 - b for b in bs]
    for j in range(len(weights)):
        for b in bs[j:]:
            weights[j] *= b
    return weights


def _position(path: Path) -> tuple[int | None, int | None, dict[str, str]]:
    from loratools.io import read_header

    meta = read_header(path).metadata

    def number(key: str) -> int | None:
        value = meta.get(key)
        try:
            return int(float(value)) if value not in (None, "", "None") else None
        except ValueError:
            raise InvalidFileError(f"metadata {key}={value!r} is not a number", path=path) from None

    return number("ss_steps"), number("ss_epoch"), meta


def _is_ema_output(meta: dict[str, str]) -> bool:
    try:
        return json.loads(meta.get("loratools.merge", "{}")).get("mode") == "ema"
    except (ValueError, AttributeError):
        return False


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two adapter files hold the same tensors (a run's last step file and its final file do)."""
    import torch

    from loratools.io import open_safetensors

    fa, fb = open_safetensors(a), open_safetensors(b)
    return set(fa) == set(fb) and all(fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]) for k in fa)


def order_inputs(paths: Sequence[Path], keep_order: bool
                 ) -> tuple[list[tuple[Path, int | None, int | None]], str, list[Path]]:
    """The files oldest first, by ``ss_steps`` (every file has it), else ``ss_epoch``; and the
    duplicates left out (a file at the same step as another, holding the same tensors: sd-scripts
    and the trainer save the last step both as a step file and as the final file).

    Raises:
        UsageError: a file has neither (naming it; ``--no_sort`` keeps the given order), or two
            files at the same step hold different tensors.
    """
    found = [(p, *_position(p)[:2]) for p in paths]
    if keep_order:
        return found, "given", []
    for column, key in ((1, "ss_steps"), (2, "ss_epoch")):
        if all(f[column] is not None for f in found):
            ordered: list[tuple[Path, int | None, int | None]] = []
            duplicates: list[Path] = []
            for f in sorted(found, key=lambda f: (f[column], f[0].name)):
                if ordered and ordered[-1][column] == f[column]:
                    if not _same_tensors(ordered[-1][0], f[0]):
                        raise UsageError(f"{ordered[-1][0].name} and {f[0].name} are both at {key}={f[column]} but "
                                         "hold different weights; give one file per step")
                    duplicates.append(f[0])
                    continue
                ordered.append(f)
            return ordered, key, duplicates
    no_steps = next(f[0] for f in found if f[1] is None)
    no_epoch = next(f[0] for f in found if f[2] is None)
    what = (f"{no_steps} has neither ss_steps nor ss_epoch in its metadata" if no_steps == no_epoch else
            f"{no_steps} has no ss_steps and {no_epoch} no ss_epoch in their metadata")
    raise UsageError(f"{what}, so the files' order in the run is unknown; pass --no_sort to average them in the "
                     "order given (oldest first)", path=no_steps)


def _expand(inputs: Sequence[str | Path], output: Path) -> tuple[list[Path], list[Path]]:
    """Files, folders and globs -> files; this command's earlier outputs found there are skipped."""
    from loratools.io import read_header
    from loratools.ops.resize import resolve_inputs

    base, files, resized = resolve_inputs([str(p) for p in inputs])
    if base is not None:
        raise UsageError(f"{base} is a checkpoint, not a saved LoRA; pass the model with --base", path=base)
    skipped = list(resized)
    kept = []
    for f in files:
        if f.resolve() == output.resolve() or _is_ema_output(read_header(f).metadata):
            skipped.append(f)
        else:
            kept.append(f)
    return kept, skipped


def _refuse_products(files: Sequence[Path]) -> None:
    """LoHa/LoKr deltas are products of their factors (DoRA's depends on the base weight): a weighted
    sum of several has no exact form in one such module (and averaging their factors is the error
    this command avoids), so they are refused before anything is read (headers only)."""
    from loratools.adapters import describe_header
    from loratools.io import read_header

    for path in files:
        header = read_header(path)
        modules = describe_header(header.tensors, header.metadata).modules.values()
        kinds = {"dora" if m.dora else m.kind for m in modules}
        odd = sorted(kinds - {"lora", "full", "norm"})
        if odd:
            raise UsageError(f"holds {'/'.join(k.upper() for k in odd)} modules: their deltas are not linear in "
                             "the factors, and an average of several has no exact form in one such module; ema "
                             "averages LoRA/LoCon (and full) files", path=path)


def post_hoc_ema(opts: EmaOptions) -> EmaResult:
    """Average a run's saved LoRAs with an EMA schedule and write the result exactly (see the module).

    Raises:
        UsageError: fewer than two files, a bad schedule, files without a training position.
        InvalidFileError, ArchitectureMismatchError, NonFiniteError: as ``merge --to-lora``.

    Example:
        >>> post_hoc_ema(EmaOptions(["out/epoch-*.safetensors"], Path("ema.safetensors"), sigma_rel=0.1))
    """
    from loratools.ops.merge import LoraMergeOptions, WeightedPath, merge_loras

    if opts.sigma_rel is not None and (opts.beta is not None or opts.beta2 is not None):
        raise UsageError("--sigma_rel and --beta/--beta2 both choose the schedule; keep one")
    files, skipped = _expand(opts.inputs, opts.output)
    _refuse_products(files)
    if len(files) < 2:
        raise UsageError(f"give at least two saved LoRAs of one run (got {len(files)})")
    ordered, ordered_by, duplicates = order_inputs(files, opts.keep_order)
    if len(ordered) < 2:
        raise UsageError(f"give at least two saved LoRAs of one run (got {len(ordered)} distinct)")
    bs = betas(len(ordered), beta=opts.beta, beta2=opts.beta2, sigma_rel=opts.sigma_rel)
    weights = ema_weights(bs)
    inputs = [EmaInput(p, step, epoch, w) for (p, step, epoch), w in zip(ordered, weights)]
    if opts.sigma_rel is not None:
        schedule: dict[str, object] = {"sigma_rel": opts.sigma_rel, "gamma": sigma_rel_to_gamma(opts.sigma_rel)}
    else:
        b1 = DEFAULT_BETA if opts.beta is None else opts.beta
        schedule = {"beta": b1, "beta2": b1 if opts.beta2 is None else opts.beta2}
    record = {"mode": "ema", "ordered_by": ordered_by, **schedule}
    merged = merge_loras(LoraMergeOptions(
        adapters=[WeightedPath(i.path, i.weight) for i in inputs], output=opts.output, dtype=opts.dtype,
        overwrite=opts.overwrite, title=opts.title, recipe=opts.recipe, base=opts.base, device=opts.device,
        metadata_from=len(inputs) - 1, provenance=record))
    return EmaResult(inputs, ordered_by, schedule, merged, skipped, duplicates)
