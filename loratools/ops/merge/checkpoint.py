"""Merge adapters into a checkpoint, streaming: one base tensor in memory at a time.

The output is written through ``loratools.io.write_safetensors``: for every key of the base, in file
order, ``produce`` either fuses the deltas that target it (float32, cast back to the key's dtype or
``--dtype``) or hands the lazily-mapped base tensor straight to the writer. Nothing else is held, so
peak memory is the largest tensor plus its deltas whatever the model size (user-asks 6). Every key of
the base is written (VAE, position ids, EMA, unknown keys), unmodified ones byte for byte.

All refusals (missing files, architecture mismatch, unmatched modules, NaN in an adapter, an output
that exists or cannot be written) happen in planning, before the output is opened; a failure while
writing leaves no file behind (the writer's temp file, or the temp folder of a diffusers output, is
removed).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import InvalidFileError, OutputExistsError, UnmatchedModulesError, UsageError
from loratools.io.checkpoint import release_pages
from loratools.io.dtypes import parse_dtype_name
from loratools.ops.merge.plan import MergePlan, Patch, build_plan, check_arch
from loratools.ops.merge.provenance import InputRecord, checkpoint_metadata, hash_input, title_of
from loratools.ops.merge.ratios import WeightedPath

if TYPE_CHECKING:
    import torch

    from loratools.io import ModelSource, WrittenFile
    from loratools.ops.merge.blocks import BlockWeights
    from loratools.ops.merge.verify import VerifyRow

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class MergeOptions:
    """What to merge, where, and how strictly.

    Attributes:
        base: single-file checkpoint (``.safetensors``, ``.ckpt``) or diffusers folder.
        adapters: adapter files with their ratios (and block weights), in order.
        output: ``.safetensors`` file for a single-file base, a folder for a diffusers base.
        dtype: ``fp16``/``bf16``/``fp32`` for every float tensor; None keeps each key's dtype.
        allow_unmatched: merge what matches and report the rest instead of refusing.
        overwrite: replace an existing output (never an input).
        verify: re-open the output and check sampled modules numerically.
        verify_samples: modules checked per adapter.
        title: ``modelspec.title`` (default: output file stem).
        te_scale: factor on every ratio for text-encoder modules (0: UNet only).
        sha256: hash each written file while streaming (``MergeResult.files[i].sha256``/``.autov2``
            are correct either way; without it they read the file back when first asked for).
    """

    base: Path
    adapters: Sequence[WeightedPath]
    output: Path
    dtype: str | None = None
    allow_unmatched: bool = False
    overwrite: bool = False
    verify: bool = False
    verify_samples: int = 8
    title: str | None = None
    te_scale: float = 1.0
    sha256: bool = False


@dataclass
class AdapterReport:
    """Per-adapter outcome: ``applied`` of ``modules`` matched a weight (``zeroed`` of them at an
    effective ratio of 0, so unchanged), the names that did not; ``blocks`` the block weights and
    ``unnamed`` the modules in blocks the block-weight list did not name (kept at 1)."""

    path: Path
    ratio: float
    modules: int
    applied: int
    unmatched: list[str]
    sha256: str | None = None
    autov2: str | None = None
    zeroed: int = 0
    blocks: BlockWeights | None = None
    unnamed: int = 0


@dataclass
class MergeResult:
    """What was written and what happened."""

    output: Path
    layout: str
    arch: str
    adapters: list[AdapterReport]
    patched_keys: int
    copied_keys: int
    files: list[WrittenFile] = field(default_factory=list)
    #: patched tensors that several modules of one adapter write rows of: OpenCLIP's fused q/k/v
    #: ``in_proj_weight`` in a single file (a diffusers folder keeps q, k and v apart), so a single
    #: file counts fewer patched tensors than modules applied
    fused_keys: int = 0
    verify: list[VerifyRow] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        return None if self.verify is None else all(row.ok for row in self.verify)


ProgressFn = Callable[[int, int], None]


def _check_output(opts: MergeOptions, source: ModelSource) -> None:
    from loratools.io.writer import check_output_path

    inputs = [*source.all_files(), *(a.path for a in opts.adapters)]
    if source.layout == "single_file":
        if opts.output.suffix.lower() != ".safetensors":
            raise UsageError("the merged checkpoint is written as .safetensors; name the output *.safetensors",
                             path=opts.output)
        check_output_path(opts.output, overwrite=opts.overwrite, protected=inputs)
        return
    from loratools.io.claim import clear_stale

    out = opts.output
    if out.exists() and (out.resolve() == source.path.resolve() or not out.is_dir()):
        raise OutputExistsError("a diffusers base is written as a new diffusers folder; give a new folder path",
                                path=out)
    clear_stale(out)  # a killed run's half-built folder goes; a live one's means "being written"
    if out.exists() and not opts.overwrite:
        raise OutputExistsError("output folder exists; pass --overwrite to replace it", path=out)
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist; create it first", path=out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to folder {parent} (permission denied); choose another output", path=out)


def _load_adapters(opts: MergeOptions, arch: str):
    from loratools.adapters import load_adapter
    from loratools.keys.arch import guess_adapter_arch

    loaded = []
    for wp in opts.adapters:
        if wp.path.is_dir():
            raise InvalidFileError("is a folder; adapters are single .safetensors files", path=wp.path)
        adapter = load_adapter(wp.path)  # refuses NaN/Inf factors, naming the tensor
        info = guess_adapter_arch(adapter)  # None: nothing tells; the shape checks of the plan still apply
        if info is not None:
            check_arch(arch, opts.base, info.arch, wp.path)
        loaded.append((wp.path, wp.ratio, adapter))
    return loaded


def parse_blocks(adapters: Sequence[WeightedPath], arch: str) -> list[BlockWeights | None]:
    """Each adapter's block weights, parsed for the base's architecture (before anything is read)."""
    from loratools.ops.merge.blocks import parse_block_weights

    return [None if wp.blocks is None else parse_block_weights(wp.blocks, arch, origin=str(wp.path))
            for wp in adapters]


def _refuse_unmatched(plan: MergePlan) -> None:
    missing = plan.unmatched()
    if not missing:
        return
    shown = "; ".join(missing[:12]) + (f"; ... ({len(missing) - 12} more)" if len(missing) > 12 else "")
    raise UnmatchedModulesError(f"{len(missing)} adapter module(s) match no base weight: {shown}. "
                                "Check the base model, or pass --allow-unmatched to merge the rest", missing)


def _warnings(loaded, source: ModelSource) -> list[str]:
    notes = []
    for path, ratio, adapter in loaded:
        notes.extend(f"{path.name}: {w}" for w in adapter.warnings)  # the parser's (e.g. alpha 0 -> scale 0)
        if ratio != 1.0 and any(getattr(m, "dora_scale", None) is not None for m in adapter.modules.values()):
            notes.append(f"{path.name}: DoRA modules merged as W + {ratio:g}*dW (ComfyUI's convention); "
                         "LyCORIS scales only the magnitude at ratios other than 1, so tools differ")
    if source.layout == "single_file" and any(k.startswith("model_ema.") for k in source.components[""]):
        notes.append("the base holds EMA weights (model_ema.*); they are copied unmerged")
    return notes


def merge_checkpoint(opts: MergeOptions, progress: ProgressFn | None = None) -> MergeResult:
    """Merge ``opts.adapters`` into ``opts.base`` and write ``opts.output``.

    Args:
        opts: validated options.
        progress: called as ``progress(done, total)`` after each tensor is produced.

    Returns:
        ``MergeResult`` with per-adapter counts, written files and (with ``verify``) the check rows.

    Raises:
        InvalidFileError: a missing or malformed input.
        ArchitectureMismatchError: an adapter is for another architecture.
        UnmatchedModulesError: modules without a target (unless ``allow_unmatched``).
        NonFiniteError: NaN/Inf in an adapter or a merged tensor (nothing is written).
        OutputExistsError, UsageError: unusable output path or options.

    Example:
        >>> merge_checkpoint(MergeOptions(Path("sdxl.safetensors"), [WeightedPath(Path("style.safetensors"), 0.8)],
        ...                               Path("sdxl-style.safetensors")))
    """
    from loratools.io import open_model
    from loratools.keys.index import BaseIndex

    if not opts.adapters:
        raise UsageError("give at least one adapter to merge")
    out_dtype = parse_dtype_name(opts.dtype)
    source = open_model(opts.base)
    _check_output(opts, source)
    index = BaseIndex.from_model(source)
    arch = index.arch.arch
    blocks = parse_blocks(opts.adapters, arch)
    loaded = _load_adapters(opts, arch)
    plan = build_plan(index, loaded, opts.te_scale, blocks)
    if not opts.allow_unmatched:
        _refuse_unmatched(plan)

    records, reports = [], []
    for (path, ratio, adapter), ap, bw in zip(loaded, plan.adapters, blocks):
        sha, short = hash_input(path)
        matched = len(ap.applied) + len(ap.zeroed)
        records.append(InputRecord(path, ratio, sha, short, matched, ap.modules,
                                   title_of(path, adapter.metadata), blocks=bw))
        reports.append(AdapterReport(path, ratio, ap.modules, matched, ap.unmatched, sha, short,
                                     zeroed=len(ap.zeroed), blocks=bw, unnamed=len(ap.unnamed)))
    names = [p.name for p, _, _ in loaded]
    writer = _Writer(source, plan, out_dtype, names, progress, opts.sha256)

    def metadata_for(sd: Mapping) -> dict[str, str]:
        base_meta = getattr(sd, "metadata", None)
        return checkpoint_metadata(base_meta, arch=arch,
                                   base=InputRecord(source.path, 1.0, None, None, 0, 0,
                                                    title_of(source.path, base_meta)),
                                   adapters=records, output=opts.output, dtype=opts.dtype, title=opts.title,
                                   modelspec=source.layout == "single_file", te_scale=opts.te_scale)

    protected = [*source.all_files(), *(a.path for a in opts.adapters)]
    if source.layout == "single_file":
        sd = source.components[""]
        files = [writer.write_file(opts.output, "", sd, metadata_for(sd), opts.overwrite, protected)]
    else:
        files = _write_folder(opts, source, writer, metadata_for, protected)

    result = MergeResult(opts.output, source.layout, arch, reports, writer.patched, writer.copied, files,
                         fused_keys=sum(any(p.rows for p in ps) for ps in plan.patches.values()),
                         warnings=_warnings(loaded, source))
    if opts.verify:
        from loratools.ops.merge.verify import verify_output

        result.verify = verify_output(opts.output, source, plan, out_dtype, names, opts.verify_samples)
    return result


class _Writer:
    """Produces each output tensor on demand and counts what it patched and copied.

    While the io writer writes one tensor, the next tensor that needs fusing is
    already being computed on a worker thread: file writes, hashing and torch kernels all release
    the GIL, so on two cores I/O and maths overlap. At most one fused tensor is computed ahead, so
    memory stays at two tensors. The order comes from ``loratools.io.dtypes.sort_key`` (the order the
    writer asks in); a name asked out of that order is simply computed on the spot.
    """

    def __init__(self, source: ModelSource, plan: MergePlan, out_dtype: torch.dtype | None,
                 names: Sequence[str], progress: ProgressFn | None, sha256: bool = False) -> None:
        self.plan = plan
        self.out_dtype = out_dtype
        self.names = names
        self.progress = progress
        self.sha256 = sha256
        self.total = sum(len(sd) for sd in source.components.values())
        self.done = 0
        self._pending: tuple[Mapping, str] | None = None
        self.patched = 0
        self.copied = 0
        self._ahead: list[str] = []  # patched names still to compute, in write order
        self._futures: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def dtype_for(self, t: torch.Tensor) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None and t.is_floating_point() else t.dtype

    def _fuse(self, component: str, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        from loratools.ops.merge.fuse import fuse

        base = sd[name]
        return fuse(name, base, self.plan.patches[(component, name)], self.dtype_for(base), self.names)

    def _prefetch(self, component: str, sd: Mapping[str, torch.Tensor]) -> None:
        while self._ahead and self._ahead[0] in self._futures:
            self._ahead.pop(0)
        if self._ahead and not self._futures and self._pool is not None:
            name = self._ahead.pop(0)
            self._futures[name] = self._pool.submit(self._fuse, component, sd, name)

    def produce(self, component: str, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        self.release()  # the writer has written the previous tensor by now
        base = sd[name]
        patches: list[Patch] | None = self.plan.patches.get((component, name))
        dtype = self.dtype_for(base)
        if patches:
            future = self._futures.pop(name, None)
            if name in self._ahead:
                self._ahead.remove(name)
            self._prefetch(component, sd)  # start the next one before waiting for this one
            out = future.result() if future is not None else self._fuse(component, sd, name)
            self._prefetch(component, sd)
            self.patched += 1
        else:
            out = base if base.dtype == dtype else base.to(dtype)
            self.copied += 1
        self._pending = (sd, name)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return out

    def release(self) -> None:
        """Drop the last tensor's pages from the reader's mapping of the base file.

        Without it, every page the merge read stays in this process's RSS and the whole checkpoint
        shows as resident by the end (see ``SafetensorsReader.release``). Only the written tensor's
        pages go; it was handed to the writer, which is done with it by the next ``produce``.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        sd, name = pending
        release_pages(sd, name)

    def write_file(self, path: Path, component: str, sd: Mapping[str, torch.Tensor], metadata: dict[str, str],
                   overwrite: bool, protected: Sequence[Path], keys: Sequence[str] | None = None) -> WrittenFile:
        from loratools.io import TensorSpec, write_safetensors

        from loratools.io.dtypes import from_torch, sort_key

        names = list(sd) if keys is None else list(keys)
        specs = []
        for name in names:
            t = sd[name]  # lazy: a view of the mapped file, no data read
            specs.append(TensorSpec(name, self.dtype_for(t), tuple(t.shape)))
        order = sorted(specs, key=lambda spec: sort_key(spec.name, from_torch(spec.dtype)))
        self._ahead = [spec.name for spec in order if (component, spec.name) in self.plan.patches]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-fuse")
        try:
            self._prefetch(component, sd)
            return write_safetensors(path, specs, lambda n: self.produce(component, sd, n), metadata,
                                     overwrite=overwrite, protected=protected, sha256=self.sha256,
                                     sshs_hashes=any(k.startswith("sshs_") for k in (getattr(sd, "metadata", None) or {})))
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._futures, self._ahead = None, {}, []
            self.release()


def _component_outputs(source: ModelSource, component: str) -> list[tuple[Path, list[str] | None, Mapping]]:
    """``(relative output file, keys or None for all, mapping)`` per weight file of a component."""
    from loratools.io import SafetensorsReader

    sd = source.components[component]
    files = source.files[component]
    rel = [f.relative_to(source.path) for f in files]
    if len(files) == 1:
        return [(rel[0].with_suffix(".safetensors"), None, sd)]
    readers = getattr(sd, "readers", None)
    if readers and all(isinstance(r, SafetensorsReader) for r in readers):
        return [(r.path.relative_to(source.path), list(r), r) for r in readers]
    raise UsageError(f"{component}: sharded .bin weights are not supported; convert the folder to safetensors first",
                     path=source.path)


def _write_folder(opts: MergeOptions, source: ModelSource, writer: _Writer,
                  metadata_for: Callable[[Mapping], dict[str, str]], protected: Sequence[Path]) -> list[WrittenFile]:
    """Write a diffusers folder: configs and other files copied, each component's weights merged.

    Built in a hidden temp folder next to the output (``io.claim.claim_folder``) and renamed into place at
    the end, so a failure leaves nothing behind, an existing output is only replaced by a complete one, and
    a killed run's leftover is removed by the next run.
    """
    from loratools.io.claim import claim_folder
    from loratools.io.writer import disk_full, need_space

    out = opts.output
    size = sum(f.stat().st_size for f in source.path.rglob("*") if f.is_file())  # fp32 -> fp16 needs less
    need_space(out, size)
    held = claim_folder(out)  # .<name>.loratools-partial/, locked: a second merge to `out` is refused
    tmp = held.path
    written_dirs = {source.path / c for c in source.components}
    files = []
    try:
        held.arm()
        for src in sorted(source.path.rglob("*")):
            rel = src.relative_to(source.path)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            if src.name.endswith(_WEIGHT_SUFFIXES) and src.parent in written_dirs:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        for component in source.components:
            for rel, keys, sd in _component_outputs(source, component):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                files.append(writer.write_file(tmp / rel, component, sd, metadata_for(sd), False, protected, keys))
    except OSError as exc:
        held.abandon()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the copies of configs and tokenizers
            raise disk_full(out, size) from None
        raise
    except BaseException:
        held.abandon()
        raise
    held.finish(overwrite=opts.overwrite)
    return [_moved(f, tmp, out) for f in files]


def _moved(f: WrittenFile, tmp: Path, out: Path) -> WrittenFile:
    from dataclasses import replace

    return replace(f, path=out / f.path.relative_to(tmp))
