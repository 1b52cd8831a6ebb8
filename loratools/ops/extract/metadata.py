"""Metadata of an extracted LoRA: what sd-scripts' extractor writes, plus where it came from.

sd-scripts writes the minimum ``ss_*`` keys (``ss_v2``, ``ss_base_model_version``,
``ss_network_module`` ``networks.lora``, ``ss_network_dim``/``ss_network_alpha`` = ``--dim``,
``ss_network_args`` with ``conv_dim``/``conv_alpha``) and a LoRA modelspec. Here the same keys
describe the file actually written (``Dynamic`` when layers differ, as kohya does after a dynamic
resize), the base model is named and hashed as a training run names it (``ss_sd_model_name``,
``ss_sd_model_hash``, ``ss_new_sd_model_hash``), and ``loratools`` holds JSON provenance: the
recipe, the threshold reached, both models with their hashes, and the share of the difference kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from loratools import __version__


def _uniform(values: Sequence[int]) -> str:
    return str(values[0]) if values and all(v == values[0] for v in values) else "Dynamic"


def model_hashes(path: Path) -> dict[str, str | None]:
    """The legacy A1111 hash and the full sha256 of a single-file model (None for a folder)."""
    from loratools.io.hashes import file_sha256, legacy_file_hash

    if not path.is_file():
        return {"legacy": None, "sha256": None}
    return {"legacy": legacy_file_hash(path), "sha256": file_sha256(path)}


def extract_metadata(*, arch: str, v_pred: bool, ranks: Sequence[tuple[int, bool]], recipe: str,
                     threshold: float | None, tuned: Path, base: Path, hashes: Mapping[str, Mapping[str, str | None]],
                     title: str, scope: str, kept: float, text_encoders: Mapping[str, bool]) -> dict[str, str]:
    """The output's metadata.

    Args:
        ranks: ``(rank, is_kxk_conv)`` of every written layer.
        hashes: ``{"tuned": model_hashes(...), "base": model_hashes(...)}``.
        kept: the share of the whole difference's Frobenius norm the file holds.
        text_encoders: ``{"TE1": included, ...}``.
    """
    from loratools.keys.arch import BASE_MODEL_VERSIONS
    from loratools.ops.merge.provenance import lora_modelspec

    linear = [r for r, kxk in ranks if not kxk]
    conv = [r for r, kxk in ranks if kxk]
    meta: dict[str, str] = {
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": BASE_MODEL_VERSIONS[(arch, v_pred)],
        "ss_network_module": "networks.lora",
        "ss_network_dim": _uniform(linear or conv),
        "ss_network_alpha": _uniform(linear or conv),  # alpha = rank in every layer: scale 1
    }
    args = {"conv_dim": _uniform(conv), "conv_alpha": _uniform(conv)} if conv else {}
    meta["ss_network_args"] = json.dumps(args)
    meta["ss_sd_model_name"] = base.name
    if hashes["base"]["legacy"] is not None:
        meta["ss_sd_model_hash"] = hashes["base"]["legacy"]
        meta["ss_new_sd_model_hash"] = hashes["base"]["sha256"]
    if v_pred:
        meta["ss_v_parameterization"] = "True"
    meta["ss_training_comment"] = (f"Extracted by loratools {__version__} with {recipe} from {tuned.name} "
                                   f"(difference to {base.name})")
    lora_modelspec(meta, arch=arch, title=title, merged_from=[tuned.stem, base.stem])
    if v_pred:
        meta["modelspec.prediction_type"] = "v"
    meta["loratools"] = json.dumps({
        "version": __version__, "operation": "extract", "recipe": recipe, "threshold": threshold,
        "scope": scope, "text_encoders": dict(text_encoders),
        "kept_fro": f"{kept:.6f}",  # fixed width: size= predicts the file size before it is known
        "ranks": {"layers": len(ranks), "min": min((r for r, _ in ranks), default=0),
                  "max": max((r for r, _ in ranks), default=0), "total": sum(r for r, _ in ranks)},
        "tuned": {"file": tuned.name, **hashes["tuned"]}, "base": {"file": base.name, **hashes["base"]},
    }, ensure_ascii=False)
    return meta
