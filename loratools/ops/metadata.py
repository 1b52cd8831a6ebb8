"""Read, summarise and edit safetensors metadata (``loratools metadata``).

``summarize`` answers "what is this file?" from the header alone (plus the alpha scalars, a few
bytes each), so it is instant on a multi-GB checkpoint: architecture from the keys (metadata only as
a fallback and a cross-check), adapter types, module counts, rank/alpha, and the sd-scripts training
record decoded (kohya stringifies everything: ``"True"``, ``"None"``, JSON in strings).

``edit_metadata`` rewrites a file with changed metadata: tensors are streamed byte for byte through
``loratools.io``'s writer, and sd-scripts' ``sshs_*`` hashes are recomputed when the input had them
(a stale hash makes A1111 mis-identify the LoRA).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loratools.errors import ArchitectureMismatchError, LoratoolsError, UsageError
from loratools.io.header import SafetensorsHeader, read_header

# Keys whose values are text even when they look like numbers (hex hashes, names, free text).
_TEXT_HINTS = ("hash", "name", "title", "comment", "description", "author", "date", "commit", "license",
               "usage_hint", "trigger", "thumbnail", "tags", "merged_from", "implementation", "keywords",
               "session_id", "cover")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def decode_value(key: str, value: str) -> Any:
    """A metadata string as what it means: JSON decoded (recursively), ``"True"``/``"False"``/
    ``"None"`` as bool/None, numbers as numbers; hashes and names stay text."""
    text = value.strip()
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text in ("None", "null"):
        return None
    if text[:1] in "{[":
        try:
            return _decode_nested(json.loads(text))
        except (ValueError, RecursionError):
            return value
    if not any(h in key.lower() for h in _TEXT_HINTS) and _NUMBER.fullmatch(text):
        number = float(text)
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else number
    return value


def _decode_nested(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _decode_nested(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_nested(v) for v in obj]
    if isinstance(obj, str):
        return decode_value("", obj) if obj.strip()[:1] in "{[" or obj in ("True", "False", "None") else obj
    return obj


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Every key decoded with ``decode_value``."""
    return {k: decode_value(k, v) for k, v in metadata.items()}


# ------------------------------------------------------------------------------------------ show

@dataclass
class DatasetFolder:
    """One training folder as sd-scripts recorded it (``N_concept`` -> repeats, images)."""

    folder: str
    images: int | None
    repeats: int | None
    regularization: bool = False


@dataclass
class MetadataSummary:
    """Everything ``metadata show`` reports about one file (``to_json`` gives it all)."""

    path: Path
    file_size: int
    header_size: int
    tensor_count: int
    dtypes: dict[str, int]
    raw: dict[str, str]
    decoded: dict[str, Any]
    arch: str | None = None
    arch_label: str | None = None
    arch_source: str | None = None
    arch_note: str | None = None
    naming: str | None = None
    kind: str = "unknown"  # "adapter", "checkpoint" (an SD1/SD2/SDXL model, no adapter modules) or "unknown"
    adapter_types: dict[str, int] = field(default_factory=dict)
    module_counts: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    scales: dict[str, int] = field(default_factory=dict)
    unknown_keys: int = 0
    base_model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    trigger_words: list[tuple[str, int]] = field(default_factory=list)
    declared_triggers: list[str] = field(default_factory=list)
    datasets: list[DatasetFolder] = field(default_factory=list)
    comment: str | None = None
    modelspec: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    tensors: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # name, dtype, shape

    def to_json(self, *, keys: bool = False) -> dict[str, Any]:
        """Everything, raw and decoded metadata included; ``keys`` adds every tensor's dtype and shape."""
        extra = {"tensors": [{"name": n, "dtype": d, "shape": list(sh)} for n, d, sh in self.tensors]} if keys else {}
        return extra | {
            "path": str(self.path), "file_size": self.file_size, "header_size": self.header_size,
            "tensor_count": self.tensor_count, "dtypes": self.dtypes,
            "architecture": {"arch": self.arch, "label": self.arch_label, "evidence": self.arch_source,
                             "note": self.arch_note},
            "kind": self.kind, "naming": self.naming, "adapter_types": self.adapter_types,
            "module_counts": self.module_counts,
            "ranks": self.ranks, "alphas": self.alphas, "scales": self.scales, "unknown_keys": self.unknown_keys,
            "base_model": self.base_model, "training": self.training,
            "trigger_words": [{"tag": t, "count": c} for t, c in self.trigger_words],
            "declared_triggers": self.declared_triggers,
            "datasets": [d.__dict__ for d in self.datasets], "comment": self.comment,
            "modelspec": self.modelspec, "hashes": self.hashes,
            "metadata": {"raw": self.raw, "decoded": self.decoded},
        }


# sd-scripts key -> label, in the order a person reads a training record
TRAINING_FIELDS: tuple[tuple[str, str], ...] = (
    ("ss_network_module", "network module"), ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"), ("ss_network_args", "network args"),
    ("ss_network_dropout", "network dropout"),
    ("ss_resolution", "resolution"), ("ss_num_epochs", "epochs"), ("ss_epoch", "epoch saved"),
    ("ss_steps", "steps"), ("ss_max_train_steps", "max steps"), ("ss_num_train_images", "images"),
    ("ss_num_reg_images", "regularization images"), ("ss_total_batch_size", "batch size"),
    ("ss_gradient_accumulation_steps", "gradient accumulation"), ("ss_optimizer", "optimizer"),
    ("ss_learning_rate", "learning rate"), ("ss_unet_lr", "UNet lr"), ("ss_text_encoder_lr", "text encoder lr"),
    ("ss_lr_scheduler", "lr scheduler"), ("ss_lr_warmup_steps", "warmup steps"),
    ("ss_clip_skip", "clip skip"), ("ss_mixed_precision", "mixed precision"), ("ss_full_fp16", "full fp16"),
    ("ss_noise_offset", "noise offset"), ("ss_min_snr_gamma", "min SNR gamma"), ("ss_seed", "seed"),
    ("ss_caption_dropout_rate", "caption dropout"), ("ss_shuffle_caption", "shuffle caption"),
    ("ss_keep_tokens", "keep tokens"), ("ss_flip_aug", "flip aug"), ("ss_cache_latents", "cache latents"),
    ("ss_training_started_at", "started"), ("ss_training_finished_at", "finished"),
    ("ss_output_name", "output name"), ("ss_sd_scripts_commit_hash", "sd-scripts commit"),
)
BASE_FIELDS = (("ss_sd_model_name", "name"), ("ss_sd_model_hash", "hash"), ("ss_new_sd_model_hash", "sha256"),
               ("ss_base_model_version", "version"), ("ss_vae_name", "vae"))

def _timestamp(value: Any) -> Any:
    if isinstance(value, (int, float)) and value > 1e9:
        return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return value


def tag_counts(decoded: Mapping[str, Any]) -> Counter[str]:
    """``ss_tag_frequency`` (``{folder: {tag: count}}``, or inside ``ss_datasets``) summed over folders."""
    total: Counter[str] = Counter()
    sources = [decoded.get("ss_tag_frequency")]
    datasets = decoded.get("ss_datasets")
    if isinstance(datasets, list):
        sources += [d.get("tag_frequency") for d in datasets if isinstance(d, dict)]
    for freq in sources:
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        if isinstance(n, (int, float)):
                            total[str(tag).strip()] += int(n)
    return total


def dataset_folders(decoded: Mapping[str, Any]) -> list[DatasetFolder]:
    """Training folders with image counts and repeats, from whichever form the trainer wrote."""
    out: list[DatasetFolder] = []
    for key, reg in (("ss_dataset_dirs", False), ("ss_reg_dataset_dirs", True)):
        dirs = decoded.get(key)
        if isinstance(dirs, dict):
            for folder, info in dirs.items():
                info = info if isinstance(info, dict) else {}
                out.append(DatasetFolder(folder, _int(info.get("img_count")), _int(info.get("n_repeats")), reg))
    datasets = decoded.get("ss_datasets")
    if not out and isinstance(datasets, list):
        for d in datasets:
            for s in (d.get("subsets") or []) if isinstance(d, dict) else []:
                if isinstance(s, dict):
                    folder = s.get("image_dir") or s.get("metadata_file") or "?"
                    out.append(DatasetFolder(str(folder), _int(s.get("img_count")), _int(s.get("num_repeats")),
                                             bool(s.get("is_reg"))))
    if not out and isinstance(decoded.get("ss_tag_frequency"), dict):
        out = [DatasetFolder(folder, None, None) for folder in decoded["ss_tag_frequency"]]
    return out


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def summarize(path: str | Path, *, top_tags: int = 20) -> MetadataSummary:
    """Summarise a safetensors file from its header (and alpha scalars), without reading weights.

    Args:
        path: a ``.safetensors`` LoRA / LyCORIS / checkpoint.
        top_tags: how many trigger-word candidates to keep.
    Returns:
        A ``MetadataSummary``.
    Raises:
        InvalidFileError: the file is missing or malformed.
    Example:
        >>> summarize("lora.safetensors").ranks
        {'32': 264}
    """
    header = read_header(path)
    raw = dict(header.metadata)
    decoded = decode_metadata(raw)
    s = MetadataSummary(path=Path(path), file_size=header.file_size, header_size=header.data_offset,
                        tensor_count=len(header.tensors),
                        dtypes=dict(Counter(t.dtype for t in header.tensors.values()).most_common()),
                        raw=raw, decoded=decoded,
                        tensors=[(t.name, t.dtype, t.shape) for t in header.tensors.values()])
    _describe_modules(s, header)
    _describe_training(s, decoded, top_tags)
    return s


#: What sd-scripts writes as the base model's hash when the model path is a folder (a diffusers model,
#: often given with a trailing slash): it hashes the path, fails, and stores the exception's name.
_FOLDER_HASH = "IsADirectory"


def _base_model_value(key: str, value: Any) -> Any:
    if key in ("ss_sd_model_hash", "ss_new_sd_model_hash") and value == _FOLDER_HASH:
        return "unknown (trained from a folder)"
    return value


def _describe_training(s: MetadataSummary, decoded: dict[str, Any], top_tags: int) -> None:
    s.base_model = {label: _base_model_value(k, decoded[k]) for k, label in BASE_FIELDS
                    if k in decoded and decoded[k] is not None}
    s.training = {label: _timestamp(decoded[k]) for k, label in TRAINING_FIELDS if k in decoded}
    s.trigger_words = tag_counts(decoded).most_common(top_tags)
    declared = [decoded.get("modelspec.trigger_phrase"), decoded.get("ssmd_keywords")]
    s.declared_triggers = [str(d) for d in declared if d not in (None, "")]
    s.datasets = dataset_folders(decoded)
    s.comment = decoded.get("ss_training_comment") if decoded.get("ss_training_comment") else None
    s.modelspec = {k.removeprefix("modelspec."): v for k, v in s.raw.items()
                   if k.startswith("modelspec.") and k != "modelspec.thumbnail"}
    s.hashes = {k: v for k, v in s.raw.items() if k in ("sshs_model_hash", "sshs_legacy_hash")}


def _describe_modules(s: MetadataSummary, header: SafetensorsHeader) -> None:
    """Adapter types, counts and rank/alpha from names and shapes; alphas read as scalars."""
    from loratools.adapters import describe_header
    from loratools.io.reader import read_scalars
    from loratools.keys.naming import component_label

    try:
        summary = describe_header(header.tensors, header.metadata)
    except LoratoolsError as exc:
        s.arch_note = f"adapter layout not understood: {exc}"
        return
    s.unknown_keys = len(summary.unknown)
    if not summary.modules:
        _detect_arch(s, None, header)
        return
    s.naming = summary.naming
    s.kind = "adapter"
    alpha_of = read_scalars(header, [k for m in summary.modules.values() for k in (m.alpha_key, m.scale_key) if k])
    kinds: Counter[str] = Counter()
    comps: Counter[str] = Counter()
    ranks: Counter[str] = Counter()
    alphas: Counter[str] = Counter()
    scales: Counter[str] = Counter()
    for m in summary.modules.values():
        kinds[m.kind + ("+dora" if m.dora else "")] += 1
        comps[component_label(m.name)] += 1
        alpha = m.alpha if m.alpha is not None else alpha_of.get(m.alpha_key or "")
        if m.rank is None:
            ranks["-"] += 1
            continue
        ranks[str(m.rank)] += 1
        alphas[_fmt_number(alpha) if alpha is not None else "none (= rank)"] += 1
        scale = alpha / m.rank if alpha is not None and m.rank else 1.0
        if m.scale_key:  # A1111's `<module>.scale` overrides alpha / rank
            scale = alpha_of.get(m.scale_key, scale)
        scales[f"{scale:.4g}"] += 1
    s.adapter_types = dict(kinds.most_common())
    s.module_counts = dict(comps.most_common())
    s.ranks = dict(sorted(ranks.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)))
    s.alphas = dict(alphas.most_common())
    s.scales = dict(scales.most_common())
    _detect_arch(s, summary, header)


def _detect_arch(s: MetadataSummary, summary: Any, header: SafetensorsHeader) -> None:
    """Architecture from the key layer: module names and shapes first, metadata only as fallback.

    A contradiction (metadata says SD1, shapes say SDXL) or a foreign model is reported as a note
    rather than an error: ``show`` must describe any file it can read.
    """
    from loratools.keys.arch import detect_checkpoint_arch, guess_adapter_arch

    try:
        if summary is not None and summary.modules:
            info = guess_adapter_arch(summary, header.metadata)
        else:
            info = detect_checkpoint_arch({k: t.shape for k, t in header.tensors.items()})
            s.kind = "checkpoint"
    except ArchitectureMismatchError as exc:
        s.arch_note = str(exc)
        return
    if info is not None:
        s.arch, s.arch_label, s.arch_source = info.arch, info.label, info.evidence


# ------------------------------------------------------------------------------------------ edit

#: Keys that reveal the training images, and why (``metadata strip --training-data``).
TRAINING_DATA_KEYS: dict[str, str] = {
    "ss_tag_frequency": "caption tags of every training folder",
    "ss_dataset_dirs": "training folder names and image counts",
    "ss_reg_dataset_dirs": "regularization folder names and image counts",
    "ss_datasets": "dataset configuration: folders, captions, tag frequencies",
    "ss_bucket_info": "image sizes of the training set (bucket histogram)",
    "ss_training_comment": "free-text training notes",
}
#: Keys that may hold a local path (user names, folder layout): shortened to the file name.
PATH_KEYS = ("ss_sd_model_name", "ss_vae_name", "ss_output_name")


@dataclass
class MetadataChange:
    key: str
    action: str  # "set", "deleted", "shortened"
    reason: str = ""
    old: str | None = None
    new: str | None = None


@dataclass
class EditResult:
    """What ``edit_metadata`` did: where it wrote, each change, and the hashes it recomputed."""

    source: Path
    output: Path
    changes: list[MetadataChange]
    hashes_recomputed: bool
    written: Any = None


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments; ``KEY=@FILE`` reads the value from a text file."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{item!r} is not KEY=VALUE (example: ss_output_name=my_lora)")
        if value.startswith("@"):
            try:
                value = Path(value[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"{key}: cannot read value file {value[1:]} ({exc.strerror})") from None
            except UnicodeDecodeError:
                raise UsageError(f"{key}: value file {value[1:]} is not UTF-8 text; metadata values are "
                                 "strings (pass a text or JSON file)") from None
        out[key] = value
    return out


def plan_strip(metadata: Mapping[str, str]) -> list[MetadataChange]:
    """The changes ``--training-data`` makes to ``metadata``, with the reason for each."""
    changes = [MetadataChange(k, "deleted", why, metadata[k]) for k, why in TRAINING_DATA_KEYS.items()
               if k in metadata]
    for k in PATH_KEYS:
        v = metadata.get(k, "")
        base = re.split(r"[\\/]", v)[-1]
        if base != v:
            changes.append(MetadataChange(k, "shortened", "local path (reveals folders and user names)", v, base))
    return changes


def edit_metadata(path: str | Path, *, output: str | Path | None = None, in_place: bool = False,
                  set_values: Mapping[str, str] | None = None, delete: Iterable[str] = (),
                  strip_training_data: bool = False, overwrite: bool = False) -> EditResult:
    """Write ``path`` again with changed metadata, tensors streamed unchanged.

    Args:
        path: input ``.safetensors``.
        output: where to write; exclusive with ``in_place`` (which replaces ``path`` atomically).
        set_values: keys to add or change.
        delete: keys to remove (a key that is absent is an error: it is usually a typo).
        strip_training_data: remove the keys in ``TRAINING_DATA_KEYS`` and shorten local paths.
        overwrite: allow replacing an existing ``output``.
    Returns:
        ``EditResult`` listing every change.
    Raises:
        UsageError: no output chosen, both chosen, a deleted key missing, an ``sshs_*`` key set.
    Example:
        >>> edit_metadata("a.safetensors", output="b.safetensors", set_values={"ss_output_name": "b"})
    """
    from loratools.io.dtypes import to_torch
    from loratools.io.reader import open_safetensors
    from loratools.io.writer import SSHS_KEYS, TensorSpec, check_output_path, write_safetensors

    source = Path(path)
    if in_place == (output is not None):
        raise UsageError("choose where to write: -o OUT or --in-place (not both)")
    reader = open_safetensors(source)
    target = source if in_place else Path(output)  # type: ignore[arg-type]
    if not in_place:
        check_output_path(target, overwrite=overwrite, protected=[source])
    old = reader.metadata
    meta = dict(old)
    changes: list[MetadataChange] = []
    for key in delete:
        if key not in meta:
            raise UsageError(f"key {key!r} is not in the metadata (see `loratools metadata dump`)", path=source)
        changes.append(MetadataChange(key, "deleted", "requested", meta.pop(key)))
    if strip_training_data:
        for c in plan_strip(meta):
            if c.action == "deleted":
                meta.pop(c.key)
            else:
                meta[c.key] = c.new or ""
            changes.append(c)
    for key, value in (set_values or {}).items():
        if key in SSHS_KEYS:
            raise UsageError(f"{key} is computed from the tensors and rewritten on every save; it cannot be set")
        changes.append(MetadataChange(key, "set", "requested", old.get(key), value))
        meta[key] = value
    had_hashes = any(k in old for k in SSHS_KEYS)
    specs = [TensorSpec(k, to_torch(i.dtype), i.shape) for k, i in reader.header.tensors.items()]
    written = write_safetensors(target, specs, reader.__getitem__,
                                meta if (meta or reader.header.has_metadata) else None,
                                overwrite=overwrite or in_place, protected=() if in_place else [source],
                                sshs_hashes=had_hashes)
    return EditResult(source, target, changes, had_hashes, written)
