"""Metadata of merge outputs: what the inputs carried, plus where the result came from.

Users lose training metadata and get stale hashes from other mergers (user-asks 12), so the rule is:
keep the base's (or first LoRA's) metadata, drop only what the merge makes wrong (``sshs_*`` hashes,
which the writer recomputes, ``modelspec.hash_sha256``), refresh the modelspec fields that describe
this file (title, date, merged_from, implementation_version), and record the inputs, their hashes
and ratios under ``loratools.merge`` as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loratools import __version__

if TYPE_CHECKING:
    from loratools.ops.merge.blocks import BlockWeights

PROVENANCE_KEY = "loratools.merge"
_STALE_PREFIXES = ("sshs_",)
_STALE_KEYS = ("modelspec.hash_sha256",)

#: modelspec.architecture of full checkpoints per detected architecture (formats-spec 6.3).
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_RESOLUTIONS = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
_SGM = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class InputRecord:
    """One merged input as recorded in the provenance JSON."""

    path: Path
    ratio: float
    sha256: str | None
    autov2: str | None
    applied: int
    modules: int
    title: str | None = None
    blocks: BlockWeights | None = None

    def as_json(self) -> dict:
        entry = {"file": self.path.name, "sha256": self.sha256, "autov2": self.autov2, "ratio": self.ratio,
                 "applied": self.applied, "modules": self.modules}
        if self.blocks is not None:
            entry["blocks"] = self.blocks.as_json()
        return entry


def hash_input(path: Path) -> tuple[str | None, str | None]:
    """Full-file sha256 and its AutoV2 short form (CivitAI/A1111's LoRA id); None for folders."""
    from loratools.io.hashes import autov2, file_sha256

    if not path.is_file():
        return None, None
    digest = file_sha256(path)
    return digest, autov2(digest)


def title_of(path: Path, metadata: Mapping[str, str] | None) -> str:
    """The name modelspec.merged_from uses for an input: its own modelspec title, else its file stem."""
    title = (metadata or {}).get("modelspec.title")
    return title if title else (path.stem if path.suffix else path.name)


def _kept(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (metadata or {}).items()
            if not k.startswith(_STALE_PREFIXES) and k not in _STALE_KEYS}


def _modelspec(meta: dict[str, str], *, arch: str, architecture: str, implementation: str, title: str,
               merged_from: Sequence[str]) -> None:
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    if arch in _ARCHITECTURES:
        meta.setdefault("modelspec.architecture", architecture)
    meta.setdefault("modelspec.implementation", implementation)
    meta.setdefault("modelspec.resolution", _RESOLUTIONS.get(arch, "512x512"))
    meta["modelspec.title"] = title
    meta["modelspec.date"] = datetime.now().replace(microsecond=0).isoformat()
    meta["modelspec.merged_from"] = ", ".join(merged_from)
    meta["modelspec.implementation_version"] = f"loratools/{__version__}"


def lora_modelspec(meta: dict[str, str], *, arch: str, title: str, merged_from: Sequence[str]) -> None:
    """Fill the ``modelspec.*`` keys of a LoRA file made from ``merged_from`` (merge, ema, extract)."""
    _modelspec(meta, arch=arch, architecture=_ARCHITECTURES.get(arch, arch) + "/lora",
               implementation=_SGM if arch == "sdxl" else "diffusers", title=title, merged_from=merged_from)


def checkpoint_metadata(base_meta: Mapping[str, str] | None, *, arch: str, base: InputRecord,
                        adapters: Sequence[InputRecord], output: Path, dtype: str | None,
                        title: str | None, modelspec: bool = True, te_scale: float = 1.0) -> dict[str, str]:
    """Metadata for a checkpoint with adapters merged in.

    Args:
        base_meta: the base file's metadata (kept, minus stale hashes).
        arch: detected architecture ("sd1", "sd2", "sdxl").
        base: the base's record (title used in ``merged_from``).
        adapters: one record per merged adapter.
        output: the output path (its stem is the default title).
        dtype: the ``--dtype`` asked for, or None.
        title: ``modelspec.title`` override.
        modelspec: write ``modelspec.*`` (single files; diffusers folders keep only the provenance).
        te_scale: the text-encoder factor on the ratios, recorded.
    """
    meta = _kept(base_meta)
    if modelspec:
        _modelspec(meta, arch=arch, architecture=_ARCHITECTURES.get(arch, arch), implementation=_SGM,
                   title=title or output.stem,
                   merged_from=[base.title or base.path.name] + [a.title or a.path.stem for a in adapters])
    meta[PROVENANCE_KEY] = json.dumps({
        "tool": f"loratools {__version__}", "mode": "checkpoint", "base": base.path.name,
        "dtype": dtype, "te_scale": te_scale, "adapters": [a.as_json() for a in adapters]}, ensure_ascii=False)
    return meta


def lora_metadata(first_meta: Mapping[str, str] | None, *, arch: str, adapters: Sequence[InputRecord],
                  output: Path, ranks: Sequence[int], alphas: Sequence[float], title: str | None,
                  recipe: str | None = None, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """Metadata for a LoRA combined from several: the first input's (the caller's choice: ``ema``
    keeps the newest), with dim/alpha brought up to date; ``extra`` fields join the provenance record.

    ``ss_network_dim`` holds the largest rank as a number (parsers choke on "Dynamic" there);
    ``ss_network_alpha`` is the common alpha, or "Dynamic" (kohya's convention) when they differ.
    """
    meta = _kept(first_meta)
    if ranks:
        meta["ss_network_dim"] = str(max(ranks))
        distinct = {float(a) for a in alphas}
        meta["ss_network_alpha"] = str(distinct.pop()) if len(distinct) == 1 else "Dynamic"
    lora_modelspec(meta, arch=arch, title=title or output.stem, merged_from=[a.title or a.path.stem for a in adapters])
    record = {"tool": f"loratools {__version__}", "mode": "recipe" if recipe else "concat", "recipe": recipe}
    record.update(extra or {})
    record["adapters"] = [a.as_json() for a in adapters]
    meta[PROVENANCE_KEY] = json.dumps(record, ensure_ascii=False)
    return meta
