"""Step 3 of a resize: one recipe's output file, planned exactly and written by streaming.

The plan (every tensor's name, shape and dtype, and the metadata) is known before any tensor
is built, so ``size=`` can size the file exactly and the table can be printed for a dry run.
The writer asks for tensors in file order; each layer's reduced tensors are built by its
``Directions`` on worker threads a few layers ahead of the writer, so a few layers' tensors are
held at a time (plus the scalars a type cannot give before building: rare, and small).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from loratools.errors import NonFiniteError
from loratools.io.arrays import all_finite

if TYPE_CHECKING:
    from loratools.io import TensorSpec
    from loratools.ops.resize.choose import Choice
    from loratools.ops.resize.decompose import Layer
    from loratools.ops.resize.outcome import LayerRow

Progress = Callable[[str, int, int], None]


def written_rank(layer: Layer, k: int) -> int:
    """The rank the layer's file tensors get for a chosen rank ``k`` (``--kohya-compat`` can pad
    above the directions a type has; a type that cannot pad is capped at them)."""
    return k if layer.d.pads else min(k, layer.d.S.size)


def plan_specs(layers: Sequence[Layer], ranks: Sequence[int], names: Mapping[str, str], dtype: str,
               passthrough: Sequence[TensorSpec]) -> tuple[list[TensorSpec], list[tuple[Layer, int]]]:
    """Every output tensor's spec, and the ``(layer, written rank)`` of the kept layers."""
    from loratools.io import TensorSpec

    specs = list(passthrough)
    kept = []
    for ly, k in zip(layers, ranks):
        k = written_rank(ly, k)
        if k == 0:
            continue
        prefix = names[ly.name]
        specs.extend(TensorSpec(f"{prefix}.{suffix}", dt, shape) for suffix, (shape, dt) in ly.d.specs(k, dtype).items())
        kept.append((ly, k))
    return specs, kept


def rows(layers: Sequence[Layer], choice: Choice) -> tuple[list[LayerRow], float]:
    """The per-layer table and the share of the whole delta's Frobenius norm kept."""
    from loratools.ops.resize.outcome import LayerRow

    out, kept_sq, all_sq = [], 0.0, 0.0
    for i, ly in enumerate(layers):
        s = ly.d.S.astype(np.float64)
        mask = _dropped_mask(s.size, choice.kept(i, ly))
        err = float(np.linalg.norm(s[mask])) if s.size else 0.0
        total = float(np.linalg.norm(s))
        kept_sq += max(total * total - err * err, 0.0)
        all_sq += total * total
        out.append(LayerRow(ly.name, ly.kind, ly.d.old_rank, choice.ranks[i], err / total if total else 0.0,
                            err / ly.base.fro if ly.base is not None and ly.base.fro else None, ly.base is not None))
    return out, (math.sqrt(kept_sq / all_sq) if all_sq else 1.0)


def _dropped_mask(n: int, kept: Sequence[int]) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    if kept:
        mask[np.asarray(kept, dtype=np.int64)] = False
    return mask


class Producer:
    """``produce(key)`` for ``io.write_safetensors``, as a context: pass-through tensors as they
    are, each layer's tensors built by its directions on worker threads, a few layers ahead of
    the writer in the order it will ask for them (file order: the float32 alphas first, answered
    without building where the type knows them in advance). numpy's casts and products release
    the GIL, so building uses every core while the writer writes and hashes.
    """

    #: Layers built ahead of the one being written, per worker.
    AHEAD = 2

    def __init__(self, layers: Sequence[Layer], choice: Choice, names: Mapping[str, str], dtype: str,
                 rescale: float, compat: bool, passthrough: Mapping[str, Any], specs: Sequence[TensorSpec],
                 progress: Progress | None = None) -> None:
        from loratools.io.dtypes import from_torch, sort_key

        self.layers, self.choice, self.names, self.dtype = layers, choice, names, dtype
        self.rescale, self.compat, self.passthrough, self.progress = rescale, compat, passthrough, progress
        self.total = len(specs)
        self.owner: dict[str, int] = {}
        for i, ly in enumerate(layers):
            k = written_rank(ly, choice.ranks[i])
            if k:
                for suffix in ly.d.specs(k, dtype):
                    self.owner[f"{names[ly.name]}.{suffix}"] = i
        order: dict[int, None] = {}  # layers by the first key that needs them built, in file order
        for spec in sorted(specs, key=lambda sp: sort_key(sp.name, from_torch(sp.dtype))):
            i = self.owner.get(spec.name)
            if i is not None and not self._scalar_known(i, spec.name):
                order.setdefault(i)
        self.order = list(order)
        self.position = {i: n for n, i in enumerate(self.order)}
        self.built: dict[int, dict[str, Any]] = {}
        self.pending: dict[int, Future] = {}
        self.submitted = 0
        self.served: set[str] = set()  # alphas given before their layer was built
        self.done = 0

    def __enter__(self) -> Producer:
        from loratools.threads import one_blas_thread

        self._blas = one_blas_thread()
        self._blas.__enter__()
        self.workers = (os.cpu_count() or 1) if all(ly.d.threadsafe for ly in self.layers) else 1
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="loratools-build")
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._blas.__exit__(*exc)

    def _scalar_known(self, i: int, key: str) -> bool:
        return key == f"{self.names[self.layers[i].name]}.alpha" and self.layers[i].d.alpha(
            written_rank(self.layers[i], self.choice.ranks[i]), kohya=self.compat) is not None

    def _build(self, i: int) -> dict[str, Any]:
        ly = self.layers[i]
        k = written_rank(ly, self.choice.ranks[i])
        keep = self.choice.kept(i, ly)
        extra = {"rank": k, "kohya": self.compat} if ly.d.pads else {}
        made = ly.d.tensors(keep, self.dtype, self.rescale, **extra)
        for suffix, t in made.items():
            if not all_finite(t):
                raise NonFiniteError(f"module {ly.name}: {suffix} overflows {self.dtype} "
                                     "(write with --save_precision fp32 or bf16)")
        prefix = self.names[ly.name]
        return {f"{prefix}.{s}": t for s, t in made.items()}

    def _ahead(self, upto: int) -> None:
        """Submit the builds of the layers up to ``upto`` in write order."""
        while self.submitted <= min(upto, len(self.order) - 1):
            i = self.order[self.submitted]
            self.pending[i] = self.pool.submit(self._build, i)
            self.submitted += 1

    def __call__(self, key: str) -> Any:
        self.done += 1
        if self.progress:
            self.progress("write", self.done, self.total)
        if key in self.passthrough:
            return self.passthrough[key]
        i = self.owner[key]
        if i not in self.built:
            scalar = _scalar_alpha(self.layers[i], key, self.names, self.choice.ranks[i], self.compat)
            if scalar is not None:
                self.served.add(key)
                return scalar
            self._ahead(self.position[i] + self.AHEAD * self.workers)
            self.built[i] = self.pending.pop(i).result()
        t = self.built[i].pop(key)
        if all(k in self.served for k in self.built[i]):
            del self.built[i]
        return t


def _scalar_alpha(layer: Layer, key: str, names: Mapping[str, str], k: int, compat: bool) -> np.ndarray | None:
    """A layer's alpha without building its tensors, where its type knows it in advance (the
    writer asks for every float32 scalar before the fp16 factors)."""
    if key != f"{names[layer.name]}.alpha":
        return None
    value = layer.d.alpha(written_rank(layer, k), kohya=compat)
    return None if value is None else np.array(value, dtype=np.float32)
