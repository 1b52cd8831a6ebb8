"""``loratools check keys``: will every module of an adapter land on a weight of this base model,
and which keys will ComfyUI, A1111 and diffusers load?

The answer to the field's most common complaint ("lora key not loaded"), computed before merging
or loading anything: architecture of both sides, every module resolved through the base's own
alias index (`loratools.keys.index`; without a base, the released model of the adapter's
architecture), shapes compared, and modules that would be applied twice (two names for one
weight, e.g. a file mixing SGM and diffusers names) flagged. With loaders chosen, each loader's
own rules (`loratools.keys.loaders`) say per key: loaded, or skipped and why. Only headers are
read: a 7 GB checkpoint is checked in well under a second.

Example:
    >>> result = check_keys(CheckKeysOptions(adapter=Path("lora.safetensors"), base=Path("sdxl.safetensors")))
    >>> result.summary
    '1052/1052 modules apply; 0 unmatched; LoRA: SDXL, base: SDXL'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.errors import ArchitectureMismatchError, UsageError
from loratools.keys.arch import ArchInfo, check_compatible, guess_adapter_arch
from loratools.keys.index import BaseIndex, Target, shapes_compatible
from loratools.keys.loaders import LOADERS, REASONS, FileModule, LoaderReport, check_loader

STATUSES = ("ok", "unmatched", "shape", "duplicate")


@dataclass(frozen=True)
class CheckKeysOptions:
    """adapter: the LoRA/LyCORIS/PEFT file; base: a single-file checkpoint or a diffusers folder
    (None: the released model of the adapter's architecture); loaders: any of "comfyui", "a1111",
    "diffusers" (or "all") whose rules are applied to every key."""

    adapter: Path
    base: Path | None = None
    loaders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        chosen = LOADERS if "all" in self.loaders else tuple(dict.fromkeys(self.loaders))
        for name in chosen:
            if name not in LOADERS:
                raise UsageError(f"--loader {name!r} is not a loader loratools knows; use one of: "
                                 f"{', '.join(LOADERS)}, all")
        object.__setattr__(self, "loaders", chosen)


@dataclass(frozen=True)
class ModuleCheck:
    """One adapter module: where it lands and whether it fits.

    status: "ok", "unmatched" (no base weight has this name), "shape" (the delta's shape does not
    fit the weight) or "duplicate" (another module of the file targets the same weight).
    """

    name: str
    source_name: str
    kind: str
    status: str
    target: str | None = None
    rows: tuple[int, int] | None = None
    adapter_shape: tuple[int, ...] | None = None
    base_shape: tuple[int, ...] | None = None
    duplicate_of: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "source_name": self.source_name, "kind": self.kind, "status": self.status,
                "target": self.target, "rows": list(self.rows) if self.rows else None,
                "adapter_shape": list(self.adapter_shape) if self.adapter_shape is not None else None,
                "base_shape": list(self.base_shape) if self.base_shape is not None else None,
                "duplicate_of": list(self.duplicate_of)}


@dataclass
class CheckKeysResult:
    """What `check_keys` found. `ok` is False on any problem (the CLI exits 1)."""

    adapter: Path
    base: Path | None
    base_arch: ArchInfo
    adapter_arch: ArchInfo | None
    modules: list[ModuleCheck]
    unknown_keys: list[str] = field(default_factory=list)
    arch_problem: str | None = None
    loaders: list[LoaderReport] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for m in self.modules if m.status == status)

    @property
    def applied(self) -> int:
        return self.count("ok")

    @property
    def ok(self) -> bool:
        """No problem with the base and no chosen loader skips a key."""
        return (self.arch_problem is None and not self.unknown_keys and self.applied == len(self.modules)
                and all(r.ok for r in self.loaders))

    @property
    def base_label(self) -> str:
        """"SDXL" for a given base; "the released SDXL (no --base)" otherwise."""
        return self.base_arch.label if self.base is not None else f"the released {self.base_arch.label} (no --base)"

    @property
    def summary(self) -> str:
        """'N/M modules apply; K unmatched; LoRA: SDXL, base: SDXL' (+ shape/duplicate/unknown counts)."""
        parts = [f"{self.applied}/{len(self.modules)} modules apply", f"{self.count('unmatched')} unmatched"]
        if self.count("shape"):
            parts.append(f"{self.count('shape')} shape mismatches")
        if self.count("duplicate"):
            parts.append(f"{self.count('duplicate')} on a weight another module also changes")
        if self.unknown_keys:
            parts.append(f"{len(self.unknown_keys)} keys of no known adapter type")
        lora = self.adapter_arch.label if self.adapter_arch else "unknown"
        parts.append(f"LoRA: {lora}, base: {self.base_label}")
        return "; ".join(parts)

    def problems(self) -> list[str]:
        """One sentence per kind of problem, saying what is wrong and what to do."""
        out = []
        if self.arch_problem:
            out.append(self.arch_problem)
        n = self.count("unmatched")
        if n:
            out.append(f"{n} module(s) name no weight of the base: the adapter was made for another model "
                       "or uses names this base does not have (see the list)")
        n = self.count("shape")
        if n:
            out.append(f"{n} module(s) have a shape that does not fit their base weight: wrong base model "
                       "(e.g. SDXL refiner, another channel plan) or a damaged file")
        n = self.count("duplicate")
        if n:
            out.append(f"{n} module(s) change a weight another module of the same file also changes "
                       "(mixed naming schemes): loaders would apply them twice or drop some")
        if self.unknown_keys:
            out.append(f"{len(self.unknown_keys)} key(s) belong to no adapter type loratools knows "
                       "(they would be ignored by a merge)")
        for report in self.loaders:
            if report.refused:
                out.append(f"{report.label} would not load the file: {report.refused}")
            elif not report.ok:
                reasons = ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(report.reasons().items()))
                out.append(f"{report.label} would skip {len(report.skipped)} of {report.keys} keys ({reasons})")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter), "base": None if self.base is None else str(self.base), "ok": self.ok,
            "summary": self.summary,
            "adapter_arch": self.adapter_arch.label if self.adapter_arch else None,
            "base_arch": self.base_arch.label, "modules_total": len(self.modules), "applied": self.applied,
            "unmatched": [m.name for m in self.modules if m.status == "unmatched"],
            "shape_mismatches": [m.as_json() for m in self.modules if m.status == "shape"],
            "duplicates": [m.as_json() for m in self.modules if m.status == "duplicate"],
            "unknown_keys": self.unknown_keys, "problems": self.problems(),
            "modules": [m.as_json() for m in self.modules],
            "loaders": {r.loader: r.as_json() for r in self.loaders},
        }


def check_keys(opts: CheckKeysOptions) -> CheckKeysResult:
    """Check an adapter file against a base model (or the released model of its architecture),
    and against the chosen loaders' rules, reading headers only.

    Raises:
        InvalidFileError: a file is missing or unreadable.
        ArchitectureMismatchError: the *base* is not SD1/SD2/SDXL (nothing to check against), or
            without a base, the adapter's architecture cannot be told.
    """
    from loratools.io.checkpoint import open_model

    summary, metadata, shapes = _adapter_header(opts.adapter)
    if opts.base is not None:
        index = BaseIndex.from_model(open_model(opts.base))
    else:
        index = BaseIndex.standard(_adapter_arch(summary, metadata, opts.adapter))
    result = check_header(summary, metadata, index, adapter=opts.adapter, base=opts.base)
    modules = file_modules(shapes, metadata, summary)
    result.loaders = [check_loader(name, shapes, modules, index) for name in opts.loaders]
    return result


def file_modules(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], summary: Any
                 ) -> list[FileModule]:
    """The file's modules with their keys (the adapter parser's grouping) for the loaders' rules."""
    from loratools.adapters.names import group_keys

    out = []
    for name, group in group_keys(shapes, metadata).modules.items():
        module = summary.modules.get(name)
        shape = tuple(module.weight_shape) if module is not None and module.weight_shape is not None else None
        out.append(FileModule(name, group.source_name, tuple(group.keys.values()), shape))
    return out


def _adapter_arch(summary: Any, metadata: Mapping[str, str], path: Path) -> str:
    info = guess_adapter_arch(summary, metadata)
    if info is None:
        raise ArchitectureMismatchError(
            "cannot tell the adapter's architecture (no text-encoder prefix, no cross-attention module of a known "
            "width, no ss_base_model_version metadata); pass --base with the model it was made for", path=path)
    return info.arch


def check_header(summary: Any, metadata: Mapping[str, str], index: BaseIndex, *,
                 adapter: Path, base: Path | None) -> CheckKeysResult:
    """The check itself, on a `describe_header` summary and a built index (tests call this with
    fixture shapes)."""
    arch_problem = None
    try:
        adapter_arch = guess_adapter_arch(summary, metadata)
        check_compatible(adapter_arch, index.arch)
    except ArchitectureMismatchError as exc:
        arch_problem = str(exc)
        adapter_arch = _safe_guess(summary, metadata)

    resolved: dict[str, Target | None] = {n: index.resolve(n) for n in summary.modules}
    owners: dict[Target, list[str]] = {}
    for name, target in resolved.items():
        if target is not None:
            owners.setdefault(target, []).append(name)

    checks = []
    for name, module in summary.modules.items():
        target = resolved[name]
        shape = tuple(module.weight_shape) if module.weight_shape is not None else None
        common = dict(name=name, source_name=module.source_name, kind=module.kind, adapter_shape=shape)
        if target is None:
            checks.append(ModuleCheck(status="unmatched", **common))
            continue
        where = dict(target=target.key if not target.component else f"{target.component}/{target.key}",
                     rows=target.rows, base_shape=target.shape)
        others = tuple(n for n in owners[target] if n != name)
        if others:
            status = "duplicate"
        elif not _fits(module, shape, target.shape):
            status = "shape"
        else:
            status = "ok"
        checks.append(ModuleCheck(status=status, duplicate_of=others, **where, **common))
    return CheckKeysResult(adapter=adapter, base=base, base_arch=index.arch, adapter_arch=adapter_arch,
                           modules=checks, unknown_keys=list(summary.unknown), arch_problem=arch_problem)


def _fits(module: Any, shape: tuple[int, ...] | None, target: tuple[int, ...]) -> bool:
    if shape is not None:
        return shapes_compatible(shape, target)
    # IA3: only a vector along the output (or input) axis is stored.
    vectors = [s for s in module.factor_shapes.values() if len(s) == 1]
    return bool(vectors) and all(v[0] in target[:2] for v in vectors)


def _safe_guess(summary: Any, metadata: Mapping[str, str]) -> ArchInfo | None:
    try:
        return guess_adapter_arch(summary, metadata)
    except ArchitectureMismatchError:
        return None


def _adapter_header(path: Path) -> tuple[Any, dict[str, str], dict[str, tuple[int, ...]]]:
    """A `describe_header` summary, the metadata and `{key: shape}` of an adapter without reading
    tensor data (safetensors), or from the loaded tensors' shapes (pickles). A file without adapter
    modules, or with factors that do not fit together, is refused here (`require_modules`,
    `describe_header`'s shape check)."""
    from loratools.adapters import describe_header, require_modules
    from loratools.io.checkpoint import open_state_dict
    from loratools.io.header import read_header

    if path.suffix.lower() == ".safetensors":
        header = read_header(path)
        shapes = {k: tuple(v.shape) for k, v in header.tensors.items()}
        summary = describe_header(header.tensors, header.metadata, path=path)
        return require_modules(summary, path), dict(header.metadata), shapes
    sd = open_state_dict(path)
    metadata = dict(getattr(sd, "metadata", None) or {})
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return require_modules(describe_header(shapes, metadata, path=path), path), metadata, shapes
