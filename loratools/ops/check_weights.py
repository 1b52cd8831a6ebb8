"""``loratools check weights``: find dead, NaN and fp16-underflowed modules, and explain them.

The seed guides run sd-scripts' ``check_lora_weights.py`` and count zero tensors by eye ("a
normal SD1 LoRA at clip skip 2 has exactly 6"). This does the same per module and says which
findings are expected:

* SD1/SD2 trained with clip skip N never use the last N-1 text-encoder layers, so their modules
  stay at their zero initialisation (6 modules per layer: q/k/v/out_proj, fc1, fc2);
* sd-scripts SDXL LoRAs read TE1's penultimate layer, so TE1's last layer is never trained.

Statuses: ``nan`` (NaN/Inf in any factor or in the delta), ``dead`` (the weight delta is exactly
zero), ``underflow`` (most nonzero values of a factor are below fp16's smallest normal or flush to
zero in fp16: the module is losing precision or will die when saved in fp16), else ``ok``.

Each finding is either *expected* (nothing to do: the unused text-encoder layers above, or an
underflow whose cost is negligible) or a *problem* (with what to do). How much an underflow costs
is measured, not guessed: ``fp16_loss`` is the relative change of the module's delta that fp16
storage causes below fp16's normal range (first order, sqrt of the factors' summed squared relative
errors): for an fp16 file the bound of the rounding already done (half a subnormal step per value),
for an fp32/bf16 file the exact change a cast to fp16 would make. Below ``CheckOptions.
underflow_tolerance`` (1 %) the finding is expected; a LoRA whose small up factor sits just under
6.1e-5 loses a few hundredths of a percent and is fine.

The delta's Frobenius norm comes from the factors: for LoRA/LoCon
``||s U D||_F = |s| sqrt(sum((U^T U) * (D D^T)))`` with r x r Gram matrices, so even a 10240 x 1280
SDXL layer costs two thin matmuls. Other types are small per module and use ``delta()``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError
from loratools.keys.naming import TE1_PREFIX, TE2_PREFIX, component_label, te_layer
from loratools.threads import one_thread

if TYPE_CHECKING:
    import torch

    from loratools.adapters import AdapterFile, AdapterModule

STATUSES = ("ok", "dead", "nan", "underflow")
FAILABLE = STATUSES[1:]  # an ``ok`` module never fails a check
FP16_TINY = 2.0 ** -14  # smallest normal fp16, 6.1e-5
FP16_FLUSH = 2.0 ** -25  # |x| <= this rounds to 0 in fp16 (half the smallest subnormal, ties to even)
_FP16_HALF_STEP = 2.0 ** -25  # largest rounding error of an fp16 subnormal


@dataclass(frozen=True)
class CheckOptions:
    """``fail_on``: statuses that make the check fail (expected findings never do).
    ``underflow_fraction``: share of a factor's nonzero values in fp16's subnormal/flush range
    above which a module is ``underflow``. ``underflow_tolerance``: relative change of the delta
    from fp16 storage (``fp16_loss``) up to which an underflow is expected, not a problem."""

    fail_on: frozenset[str] = frozenset({"dead", "nan", "underflow"})
    underflow_fraction: float = 0.5
    underflow_tolerance: float = 0.01

    def __post_init__(self) -> None:
        bad = set(self.fail_on) - set(FAILABLE)
        if bad:
            raise UsageError(f"--fail-on: unknown status {', '.join(sorted(bad))} "
                             f"(choose from {', '.join(FAILABLE)}, or none alone)")
        if not 0.0 < self.underflow_fraction <= 1.0:
            raise UsageError(f"underflow fraction must be in (0, 1], got {self.underflow_fraction}")


@dataclass
class TensorStats:
    """One stored tensor: sd-scripts' mean|w| and min|w|, plus where its values sit for fp16."""

    key: str
    suffix: str
    shape: tuple[int, ...]
    dtype: str
    mean_abs: float
    min_abs: float
    max_abs: float
    zero_fraction: float
    nan: int
    inf: int
    below_fp16_normal: float  # fraction of nonzero values with |x| < 6.1e-5
    fp16_flush: float  # fraction of nonzero values that become 0 when cast to fp16


@dataclass
class ModuleCheck:
    name: str
    kind: str
    component: str
    rank: int | None
    alpha: float | None
    dtype: str
    tensors: list[TensorStats]
    scale: float | None
    delta_norm: float | None
    status: str
    expected: str | None = None  # why this finding needs no action (unused layer, harmless underflow)
    note: str | None = None
    fp16_loss: float | None = None  # underflow only: relative change of the delta from fp16 storage

    @property
    def problem(self) -> bool:
        return self.status != "ok" and self.expected is None


@dataclass
class WeightsReport:
    """Per-module results for one file, the counts per status and the explanations."""

    path: Path
    arch: str | None
    clip_skip: int | None
    modules: list[ModuleCheck]
    unknown_keys: list[str]
    explanations: list[str] = field(default_factory=list)  # ``expected`` then ``problems``
    counts: dict[str, int] = field(default_factory=dict)
    failed: bool = False
    warnings: list[str] = field(default_factory=list)  # the parser's (``AdapterFile.warnings``)
    expected: list[str] = field(default_factory=list)  # findings that need no action, and why
    problems: list[str] = field(default_factory=list)  # findings to act on, each saying what to do
    verdict: str = ""  # one line: OK / FAILED, and why

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "arch": self.arch, "clip_skip": self.clip_skip, "failed": self.failed,
                "verdict": self.verdict, "counts": self.counts, "explanations": self.explanations,
                "expected": self.expected, "problems": self.problems, "warnings": self.warnings,
                "unknown_keys": self.unknown_keys, "modules": [_module_json(m) for m in self.modules]}


def _module_json(m: ModuleCheck) -> dict[str, Any]:
    d = {k: v for k, v in m.__dict__.items() if k != "tensors"}
    d["tensors"] = [t.__dict__ for t in m.tensors]
    return d


def tensor_stats(key: str, suffix: str, t: torch.Tensor, stored: torch.dtype | None = None) -> TensorStats:
    """Statistics of one tensor, computed in float32 (float64 kept); ``stored``: the file's dtype
    when ``t`` is already a float32 copy."""
    import torch

    from loratools.io.dtypes import from_torch

    x = t.detach()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n = x.numel()
    a = x.abs()
    nan = inf = 0
    if n and not bool(torch.isfinite(a).all()):
        nan, inf = int(torch.isnan(a).sum()), int(torch.isinf(a).sum())
        a = a[torch.isfinite(a)]
    # one pass sorts every |x| into: 0 | flushes in fp16 (<= 2^-25) | fp16 subnormal (< 2^-14) | normal
    tiny = torch.tensor(FP16_TINY, dtype=a.dtype)
    edges = torch.stack([torch.zeros_like(tiny), torch.tensor(FP16_FLUSH, dtype=a.dtype),
                         torch.nextafter(tiny, torch.zeros_like(tiny))])
    zero, flush, subnormal = (torch.bincount(torch.bucketize(a.reshape(-1), edges, right=False),
                                             minlength=4)[:3].tolist() if a.numel() else (0, 0, 0))
    nz = max(a.numel() - zero, 1)
    lo, hi = torch.aminmax(a) if a.numel() else (torch.tensor(math.nan), torch.tensor(math.nan))
    return TensorStats(
        key=key, suffix=suffix, shape=tuple(t.shape), dtype=from_torch(stored or t.dtype),
        mean_abs=float(a.mean()) if a.numel() else math.nan, min_abs=float(lo), max_abs=float(hi),
        zero_fraction=zero / n if n else 0.0, nan=nan, inf=inf,
        below_fp16_normal=(flush + subnormal) / nz, fp16_flush=flush / nz,
    )


def delta_norm(module: AdapterModule, as_float: Mapping[str, torch.Tensor] | None = None) -> float | None:
    """Frobenius norm of the module's weight delta (scale included), or None when it needs the base.

    ``as_float``: the module's tensors already in float32 (suffix -> tensor), to avoid converting twice.
    """
    import torch

    from loratools.adapters import LoRAModule
    from loratools.linalg.lowrank import contract_tucker, flatten_down, flatten_up

    if module.needs_base:  # DoRA rescales the base weight: its delta is not the LoRA product's
        return None
    if isinstance(module, LoRAModule):
        f = as_float or {"lora_up.weight": module.up.float(), "lora_down.weight": module.down.float()}
        up = flatten_up(f["lora_up.weight"])
        down = f["lora_down.weight"] if module.mid is None else contract_tucker(module.mid, f["lora_down.weight"])
        down = flatten_down(down)
        gram = float((up.T @ up).mul_(down @ down.T).sum(dtype=torch.float64))
        return abs(module.scale) * math.sqrt(max(gram, 0.0))
    return float(torch.linalg.vector_norm(module.delta().float(), dtype=torch.float64))


def _clip_skip(metadata: Mapping[str, str]) -> int | None:
    for key in ("ss_clip_skip", "modelspec.encoder_layer"):
        try:
            return int(float(metadata[key]))
        except (KeyError, ValueError):
            continue
    return None


def _expected_dead(name: str, arch: str | None, clip_skip: int | None, last_layer: dict[str, int]) -> str | None:
    """Why a dead module is expected (its text-encoder layer is never used), or None."""
    found = te_layer(name)
    if found is None:
        return None
    te, layer = found
    last = last_layer.get(te)
    if last is None:
        return None
    if arch == "sdxl" and te == "te1" and layer == last:
        return f"SDXL text encoder 1 layer {layer} is never used: sd-scripts reads its penultimate layer"
    if te == "te" and arch in ("sd1", "sd2", None):
        skip = clip_skip if clip_skip is not None else (2 if arch == "sd1" else None)
        if skip is not None and skip > 1 and layer > last - (skip - 1):
            origin = f"clip skip {skip}" if clip_skip is not None else "clip skip 2 assumed (no ss_clip_skip)"
            return f"text-encoder layer {layer} is unused at {origin}"
    return None


def check_module(module: AdapterModule, options: CheckOptions, source: Mapping[str, str] | None = None) -> ModuleCheck:
    """Statistics and status of one module (expected-dead is decided by ``check_adapter``)."""
    from loratools.io.dtypes import from_torch

    import torch

    tensors = module.tensors()
    as_float = {s: t if t.dtype in (torch.float32, torch.float64) else t.float() for s, t in tensors.items()}
    stats = [tensor_stats((source or {}).get(s, f"{module.source_name}.{s}"), s, as_float[s], stored=t.dtype)
             for s, t in tensors.items() if s != "alpha"]
    norm = delta_norm(module, as_float)
    alpha_bad = module.alpha is not None and not math.isfinite(module.alpha)
    if alpha_bad or any(t.nan or t.inf for t in stats) or (norm is not None and not math.isfinite(norm)):
        status = "nan"
    elif norm == 0.0:
        status = "dead"
    elif any(max(t.below_fp16_normal, t.fp16_flush) > options.underflow_fraction for t in stats
             if t.suffix != "dora_scale" and t.zero_fraction < 1.0):
        status = "underflow"
    else:
        status = "ok"
    first = next(iter(tensors.values()))
    note = "DoRA/IA3 delta depends on the base weight; norm not computed" if norm is None else None
    loss = fp16_loss(as_float, {s: t.dtype for s, t in tensors.items()}) if status == "underflow" else None
    check = ModuleCheck(name=module.name, kind=module.kind, component=component_label(module.name), rank=module.rank,
                        alpha=module.alpha, dtype=from_torch(first.dtype), tensors=stats, scale=module.scale,
                        delta_norm=norm, status=status, note=note, fp16_loss=loss)
    if loss is not None and loss <= options.underflow_tolerance:
        check.expected = (f"harmless: fp16 storage changes its delta by {_percent(loss)} "
                          f"(up to {_percent(options.underflow_tolerance)} is expected)")
    return check


def fp16_loss(tensors: Mapping[str, torch.Tensor], stored: Mapping[str, torch.dtype]) -> float:
    """Relative change of a module's delta that storing its factors in fp16 causes below fp16's
    normal range (first order: the square root of the factors' summed squared relative errors).

    ``tensors``: suffix -> values (any float dtype); ``stored``: suffix -> the file's dtype. An fp16
    factor has already been rounded: its bound is half a subnormal step per nonzero value below
    6.1e-5. Any other factor is cast to fp16 and compared. Alpha and DoRA magnitudes are left out.
    """
    import torch

    total = 0.0
    for suffix, x in tensors.items():
        if suffix in ("alpha", "dora_scale") or not x.is_floating_point() or x.numel() == 0:
            continue
        x = x.double()
        norm2 = float(x.square().sum())
        if norm2 == 0.0:
            continue
        a = x.abs()
        small = (a > 0) & (a < FP16_TINY)
        if stored[suffix] == torch.float16:
            err2 = int(small.sum()) * _FP16_HALF_STEP ** 2
        else:
            v = x[small]
            err2 = float((v - v.half().double()).square().sum())
        total += err2 / norm2
    return math.sqrt(total)


def _percent(x: float) -> str:
    return f"{100 * x:.2g} %" if x < 0.01 else f"{100 * x:.1f} %"


def check_adapter(adapter: AdapterFile, options: CheckOptions = CheckOptions(), *,
                  path: str | Path | None = None,
                  file_keys: Mapping[str, Mapping[str, str]] | None = None) -> WeightsReport:
    """Check every module of a parsed adapter.

    Args:
        adapter: from ``loratools.adapters.parse_adapter`` / ``load_adapter``.
        options: which statuses fail the check.
        path: for the report.
        file_keys: module name -> {kohya suffix: key as the file spells it}, so reports name PEFT
            keys (``...lora_A.weight``) as they are stored; default ``<source_name>.<suffix>``.
    Returns:
        A ``WeightsReport``; ``failed`` is True when a status in ``options.fail_on`` occurred
        in a module whose state is not expected.
    Example:
        >>> check_adapter(load_adapter("lora.safetensors")).counts
        {'ok': 258, 'dead': 6}
    """
    from loratools.errors import ArchitectureMismatchError
    from loratools.keys.arch import guess_adapter_arch

    try:
        info = guess_adapter_arch(adapter, adapter.metadata)
        arch = info.arch if info is not None else None
    except ArchitectureMismatchError:
        arch = None
    if arch is None and any(n.startswith((TE1_PREFIX, TE2_PREFIX)) for n in adapter.modules):
        arch = "sdxl"
    clip_skip = _clip_skip(adapter.metadata)
    last_layer: dict[str, int] = {}
    for name in adapter.modules:
        found = te_layer(name)
        if found:
            last_layer[found[0]] = max(last_layer.get(found[0], -1), found[1])
    checks = []
    with one_thread():
        for module in adapter.modules.values():
            c = check_module(module, options, (file_keys or {}).get(module.name))
            if c.status == "dead":
                c.expected = _expected_dead(c.name, arch, clip_skip, last_layer)
            checks.append(c)
    report = WeightsReport(Path(path) if path else (adapter.path or Path("-")), arch, clip_skip, checks,
                           sorted(adapter.unknown), warnings=list(adapter.warnings))
    _summarise(report, options)
    return report


def check_file(path: str | Path, options: CheckOptions = CheckOptions()) -> WeightsReport:
    """``check_adapter`` on a file read through ``loratools.io`` (lazily for safetensors)."""
    from loratools.adapters import parse_adapter, require_modules
    from loratools.adapters.names import group_keys
    from loratools.io.checkpoint import open_state_dict

    sd = open_state_dict(path)
    metadata = getattr(sd, "metadata", None) or {}
    adapter = require_modules(parse_adapter(sd, metadata, path=path))
    info = getattr(sd, "info", None)
    shapes = {k: tuple(info(k).shape) if info else tuple(sd[k].shape) for k in sd}
    file_keys = {name: dict(group.keys) for name, group in group_keys(shapes, metadata).modules.items()}
    return check_adapter(adapter, options, path=path, file_keys=file_keys)


def _summarise(report: WeightsReport, options: CheckOptions) -> None:
    """Counts, then each finding as expected (and why) or a problem (and what to do), then the verdict."""
    mods = report.modules
    counts = Counter(m.status for m in mods)
    report.counts = {s: counts.get(s, 0) for s in STATUSES if counts.get(s)}
    expected, problems = report.expected, report.problems
    expected_dead = [m for m in mods if m.status == "dead" and m.expected]
    if expected_dead:
        reasons = Counter(m.expected for m in expected_dead)
        why = "; ".join(f"{n}: {r}" if len(reasons) > 1 else str(r) for r, n in reasons.items())
        expected.append(f"{len(expected_dead)} dead, all expected ({why})")
    harmless = [m for m in mods if m.status == "underflow" and m.expected]
    if harmless:
        worst = max(m.fp16_loss or 0.0 for m in harmless)
        expected.append(f"{len(harmless)} underflowing, harmless: below fp16's normal range (6.1e-5), but fp16 "
                        f"storage changes their deltas by at most {_percent(worst)}")
    dead = [m for m in mods if m.status == "dead" and not m.expected]
    zero_scale = [m for m in dead if m.scale == 0]
    if zero_scale:
        problems.append(f"{len(zero_scale)} dead: alpha is 0, so their scale is 0 (read literally, as ComfyUI "
                        "does); set their alpha (e.g. to the rank) or retrain")
        dead = [m for m in dead if m.scale != 0]
    if dead:
        all_zero = sum(all(t.zero_fraction == 1.0 for t in m.tensors) for m in dead)
        fp16 = sum(m.dtype == "F16" for m in dead)
        if all_zero == len(dead):
            problems.append(f"{len(dead)} dead: every factor is all zeros (the file holds no weights for them: "
                            "saved before training or damaged); resize to drop them")
        elif fp16 >= len(dead) / 2:
            problems.append(f"{len(dead)} dead: fp16 underflow likely; train in bf16 or with a larger alpha, "
                            "or resize to drop them")
        else:
            problems.append(f"{len(dead)} dead: a factor is all zeros (never trained: learning rate 0 for that "
                            "part, or saved before the first step); resize to drop them")
    nan = [m for m in mods if m.status == "nan"]
    if nan:
        problems.append(f"{len(nan)} with NaN/Inf: training diverged (lower the learning rate, train in bf16); "
                        "this file will produce black or noisy images: retrain or use an earlier epoch")
    under = [m for m in mods if m.status == "underflow" and not m.expected]
    if under:
        worst = max(m.fp16_loss or 0.0 for m in under)
        problems.append(f"{len(under)} underflowing: most values of a factor are below fp16's normal range "
                        f"(6.1e-5), and fp16 storage changes their deltas by up to {_percent(worst)}; keep the "
                        "file in bf16/fp32 (--save_precision bf16) or train with a larger network_alpha")
    report.explanations = [*expected, *problems]
    if report.unknown_keys:
        report.explanations.append(f"{len(report.unknown_keys)} keys belong to no module type and were not checked")
    if not report.explanations:
        report.explanations.append(f"{len(mods)} modules, all ok")
    report.failed = any(m.problem and m.status in options.fail_on for m in mods)
    report.verdict = _verdict(mods, options, len(expected_dead) + len(harmless))


def _verdict(mods: list[ModuleCheck], options: CheckOptions, n_expected: int) -> str:
    failing = Counter(m.status for m in mods if m.problem and m.status in options.fail_on)
    ignored = Counter(m.status for m in mods if m.problem and m.status not in options.fail_on)
    expected = f"; {n_expected} expected finding(s) need nothing" if n_expected else ""
    if failing:
        listed = ", ".join(f"{n} {s}" for s, n in failing.items())
        return f"FAILED: {sum(failing.values())} module(s) with problems ({listed}); the problems say what to do{expected}"
    if ignored:
        listed = ", ".join(f"{n} {s}" for s, n in ignored.items())
        return f"OK by --fail-on: {listed} not counted{expected}"
    if n_expected:
        return f"OK: nothing to fix; {n_expected} finding(s) are expected (see above)"
    return f"OK: all {len(mods)} modules are fine"


def parse_fail_on(values: Iterable[str]) -> frozenset[str]:
    """``--fail-on dead,nan`` (comma lists and repeats) -> a validated set; ``none`` disables."""
    out = {v.strip().lower() for item in values for v in item.split(",") if v.strip()}
    if "none" in out and len(out) > 1:
        raise UsageError(f"--fail-on: none means never fail; it cannot be combined with {', '.join(sorted(out - {'none'}))}")
    return frozenset() if out == {"none"} else frozenset(out)
