"""The base checkpoint as resize sees it: which weight each LoRA module changes, and its norms.

``fro_ckpt`` scores divide by each base weight's Frobenius norm, ``spn_ckpt`` by its exact
spectral norm, ``subspace`` projects the directions on the weight itself. Norms come from the
on-disk cache (``cache``); the missing Frobenius norms of one LoRA are computed together, in one
sequential pass over the checkpoint's safetensors files (``io.stream``: a reader thread and a
float64 reduction, no mapping, no float32 copies), which is what a cold run spends its time on.
Spectral norms need the whole matrix (a Gram matrix per layer) and are computed per weight, only
when a recipe asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.io.checkpoint import release_pages

if TYPE_CHECKING:
    import torch

    from loratools.io import ModelSource
    from loratools.keys.index import Target
    from loratools.ops.resize.cache import NormCache


class BaseNorms:
    """One opened base checkpoint: module -> base weight, norms (cached), weights on demand.

    Args:
        base: a checkpoint file, a diffusers folder or an open ``ModelSource``.
        cache_dir: norm cache folder; ``"default"`` = the user cache folder, None = no cache.
    """

    def __init__(self, base: str | Path | ModelSource, cache_dir: str | Path | None = "default") -> None:
        from loratools.io import open_model
        from loratools.keys.arch import detect_checkpoint_arch
        from loratools.keys.index import BaseIndex
        from loratools.ops.resize.cache import NormCache, checkpoint_identity, default_cache_dir

        self.model = open_model(base) if isinstance(base, (str, Path)) else base
        self.path = Path(self.model.path)
        self.arch = detect_checkpoint_arch(self.model)
        self.index = BaseIndex.from_model(self.model)
        self.files = list(self.model.all_files())
        folder = default_cache_dir() if cache_dir == "default" else (None if cache_dir is None else Path(cache_dir))
        self.cache: NormCache | None = None
        if self.files and folder is not None:  # an in-memory source has no identity to key a cache by
            self.cache = NormCache(folder, checkpoint_identity(self.files))

    def resolve(self, name: str) -> Target | None:
        """The base weight module ``name`` changes (``keys.BaseIndex``), or None."""
        return self.index.resolve(name)

    def weight(self, target: Target) -> torch.Tensor:
        """One base weight (TE2's fused q/k/v: its row block), read when asked."""
        w = self.model.components[target.component][target.key]
        return w[target.rows[0]:target.rows[1]] if target.rows is not None else w

    def norms(self, targets: Sequence[Target], want_spn: bool,
              progress: Callable[[int, int], None] | None = None) -> list[tuple[float, float | None]]:
        """``(||W||_F, sigma_max(W) or None)`` of each target: cached, else measured (then cached).

        Missing Frobenius norms are measured together in one streamed pass (``io.stream``); a
        target whose weights are not in a safetensors file (a pickle, an in-memory source) is
        read as a tensor instead.
        """
        from loratools.ops.resize.cache import NormCache

        keys = [NormCache.key(t.component, t.key, t.rows) for t in targets]
        found = [dict(self.cache.get(k) or {}) if self.cache is not None else {} for k in keys]
        missing = [i for i, f in enumerate(found) if "fro" not in f]
        streamed = self._stream_fro([targets[i] for i in missing], progress)
        for i, fro in zip(missing, streamed):
            if fro is not None:
                found[i]["fro"] = fro
        for i, (t, f) in enumerate(zip(targets, found)):
            if "fro" in f and (not want_spn or "spn" in f):
                continue
            from loratools.linalg.norms import frobenius_norm, spectral_norm  # torch: only for what is not cached

            W = self.weight(t)
            f.setdefault("fro", frobenius_norm(W))
            if want_spn:
                f.setdefault("spn", spectral_norm(W))
            del W
            release_pages(self.model.components[t.component], t.key)  # a cold run reads the whole base
        if self.cache is not None:
            for k, f, t in zip(keys, found, targets):
                if self.cache.get(k) != f:
                    self.cache.put(k, **f)
        return [(float(f["fro"]), float(f["spn"]) if want_spn else None) for f in found]

    def cached_fro(self, targets: Sequence[Target]) -> list[float | None]:
        """The cached Frobenius norm of each target, or None; reads nothing of the checkpoint."""
        from loratools.ops.resize.cache import NormCache

        if self.cache is None:
            return [None] * len(targets)
        hits = [self.cache.get(NormCache.key(t.component, t.key, t.rows)) or {} for t in targets]
        return [h.get("fro") for h in hits]

    def _stream_fro(self, targets: Sequence[Target], progress: Callable[[int, int], None] | None,
                    ) -> list[float | None]:
        """Frobenius norms by ``io.stream`` where the bytes are on disk (None elsewhere)."""
        from loratools.io.stream import sum_of_squares, tensor_range

        ranges = [tensor_range(self.model.components[t.component], t.key, t.rows) for t in targets]
        where = [i for i, r in enumerate(ranges) if r is not None]
        sums = sum_of_squares([ranges[i] for i in where], progress) if where else []
        out: list[float | None] = [None] * len(targets)
        for i, s in zip(where, sums):
            out[i] = s ** 0.5
        return out

    def save(self) -> None:
        """Write what this run measured to the norm cache (failures only cost speed)."""
        if self.cache is not None:
            self.cache.save()

