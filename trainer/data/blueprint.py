"""What to train on: datasets and subsets from ``N_concept`` folders or a ``--dataset_config`` TOML.

sd-scripts turns both inputs into the same "blueprint" (datasets, each with its bucket settings
and batch size, holding subsets with their folder, repeats and caption options); so does this
module. A value is looked up in the subset, then its dataset, then ``[general]``, then the
command line (``TrainConfig``), then the default, and every key is checked with a readable
error naming the file, the table and the key. No torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratools.errors import InvalidFileError, UsageError
from trainer.config import TrainConfig, add_warning, round_bucket_bounds
from trainer.data.captions import CaptionOptions


@dataclass(frozen=True)
class SubsetSpec:
    """One image folder with its repeats and per-image options."""

    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption: CaptionOptions = CaptionOptions()
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """Subsets that share a resolution, bucket settings and a batch size (batches never mix datasets)."""

    subsets: tuple[SubsetSpec, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None


# Dataset-level keys: key -> TrainConfig field used as the command-line fallback.
_DATASET_KEYS = {
    "resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
    "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale",
    "network_multiplier": None, "validation_split": "validation_split", "validation_seed": "validation_seed",
}
# Subset keys inheritable from [general] and [[datasets]] (value None: no command-line fallback).
_SUBSET_KEYS = {
    "num_repeats": None, "caption_extension": "caption_extension", "class_tokens": None,
    "shuffle_caption": "shuffle_caption", "caption_separator": "caption_separator", "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator", "secondary_separator": "secondary_separator",
    "enable_wildcard": "enable_wildcard", "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix",
    "caption_dropout_rate": "caption_dropout_rate", "caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate", "token_warmup_min": "token_warmup_min",
    "token_warmup_step": "token_warmup_step", "flip_aug": "flip_aug", "random_crop": "random_crop",
    "alpha_mask": "alpha_mask", "resize_interpolation": "resize_interpolation", "custom_attributes": None,
    "color_aug": "color_aug", "face_crop_aug_range": "face_crop_aug_range", "cache_info": "cache_info",
}
_SUBSET_ONLY = {"image_dir", "is_reg"}
_REFUSED = {
    "metadata_file": "fine-tuning metadata subsets are not supported; use image_dir with caption files",
    "color_aug": "colour augmentation is not supported",
    "face_crop_aug_range": "face-crop augmentation is not supported",
}
_TYPES: dict[str, tuple[type, ...]] = {
    "num_repeats": (int,), "batch_size": (int,), "min_bucket_reso": (int,), "max_bucket_reso": (int,),
    "bucket_reso_steps": (int,), "keep_tokens": (int,), "caption_dropout_every_n_epochs": (int,),
    "token_warmup_min": (int,), "validation_seed": (int,),
    "network_multiplier": (int, float), "validation_split": (int, float), "caption_dropout_rate": (int, float),
    "caption_tag_dropout_rate": (int, float), "token_warmup_step": (int, float),
    "enable_bucket": (bool,), "bucket_no_upscale": (bool,), "shuffle_caption": (bool,), "enable_wildcard": (bool,),
    "flip_aug": (bool,), "random_crop": (bool,), "alpha_mask": (bool,), "is_reg": (bool,), "cache_info": (bool,),
    "color_aug": (bool,),
    "caption_extension": (str,), "class_tokens": (str,), "caption_separator": (str,), "keep_tokens_separator": (str,),
    "secondary_separator": (str,), "caption_prefix": (str,), "caption_suffix": (str,), "image_dir": (str,),
    "resize_interpolation": (str,), "metadata_file": (str,),
    "resolution": (int, list), "custom_attributes": (dict,), "face_crop_aug_range": (list,),
}


def build_blueprint(cfg: TrainConfig) -> list[DatasetSpec]:
    """The datasets to train on, from ``cfg.dataset_config`` or else ``train_data_dir``/``reg_data_dir``.

    Raises ``UsageError`` for missing or contradictory settings and ``InvalidFileError`` for a
    dataset TOML that cannot be read or has an invalid key.
    """
    if cfg.dataset_config:
        if cfg.train_data_dir or cfg.reg_data_dir:
            add_warning(cfg, "--train_data_dir/--reg_data_dir have no effect with --dataset_config")
        return load_dataset_config(cfg.dataset_config, cfg)
    if not cfg.train_data_dir:
        raise UsageError("no training images: give --train_data_dir (a folder of N_concept folders) or --dataset_config")
    subsets = folder_subsets(cfg.train_data_dir, False, cfg) + folder_subsets(cfg.reg_data_dir, True, cfg)
    if not any(not s.is_reg for s in subsets):
        raise InvalidFileError("no N_concept folders inside: train_data_dir must be the parent of folders named "
                               "like 10_mychar that hold the images", path=cfg.train_data_dir)
    return [_dataset_from(cfg, {}, {}, subsets, where="")]


def folder_subsets(parent: str | None, is_reg: bool, cfg: TrainConfig) -> list[SubsetSpec]:
    """sd-scripts' ``N_concept`` rule: N = repeats (folders without a number or with N < 1 are skipped), concept = class tokens."""
    if parent is None:
        return []
    root = Path(parent)
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not root.is_dir():
        raise InvalidFileError(f"{flag} is not a folder", path=root)
    subsets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        head, _, concept = sub.name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            add_warning(cfg, f"{sub}: folder name does not start with N_ (repeats); skipped")
            continue
        if repeats < 1:
            add_warning(cfg, f"{sub}: {repeats} repeats; skipped")
            continue
        raw = {"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": concept}
        subsets.append(_subset_from(cfg, raw, {}, {}, where=""))
    return subsets


def load_dataset_config(path: str | Path, cfg: TrainConfig) -> list[DatasetSpec]:
    """Read a sd-scripts dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``)."""
    from trainer.flags import read_toml

    path = Path(path)
    data = read_toml(path, "dataset config not found (check --dataset_config)")
    _check_keys(data, {"general", "datasets"}, "top level", path)
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise InvalidFileError("[general] must be a table", path=path)
    _check_keys(general, set(_DATASET_KEYS) | set(_SUBSET_KEYS) | set(_REFUSED), "[general]", path)
    datasets_raw = data.get("datasets")
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise InvalidFileError("no [[datasets]]: add at least one [[datasets]] table with [[datasets.subsets]]",
                               path=path)
    datasets = []
    for i, ds in enumerate(datasets_raw):
        where = f"[[datasets]] #{i + 1}"
        _check_keys(ds, set(_DATASET_KEYS) | set(_SUBSET_KEYS) | set(_REFUSED) | {"subsets"}, where, path)
        subsets_raw = ds.get("subsets")
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise InvalidFileError(f"{where} has no [[datasets.subsets]] (each needs image_dir)", path=path)
        subsets = []
        for j, sub in enumerate(subsets_raw):
            sub_where = f"{where} subset #{j + 1}"
            _check_keys(sub, set(_SUBSET_KEYS) | _SUBSET_ONLY | set(_REFUSED), sub_where, path)
            for key, why in _REFUSED.items():
                if key in sub or key in ds or key in general:
                    raise UsageError(f"{path}: {sub_where}: {key}: {why}")
            if "image_dir" not in sub:
                raise InvalidFileError(f"{sub_where}: image_dir is required", path=path)
            if any("cache_info" in level for level in (sub, ds, general)):
                add_warning(cfg, f"{path}: cache_info has no effect (image sizes are read from file headers)")
            subsets.append(_subset_from(cfg, sub, ds, general, where=f"{path}: {sub_where}: "))
        datasets.append(_dataset_from(cfg, ds, general, subsets, where=f"{path}: {where}: "))
    return datasets


def _check_keys(table: Any, allowed: set[str], where: str, path: Path) -> None:
    if not isinstance(table, dict):
        raise InvalidFileError(f"{where} must be a table", path=path)
    for key, value in table.items():
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise InvalidFileError(f"{where}: unknown key {key!r}{hint}", path=path)
        types = _TYPES.get(key)
        if types and not (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)):
            names = " or ".join({int: "an integer", float: "a number", bool: "true/false", str: "a string",
                                 list: "a list", dict: "a table"}[t] for t in types)
            raise InvalidFileError(f"{where}: {key} = {value!r} must be {names}", path=path)


def _lookup(key: str, levels: list[dict], cfg: TrainConfig, fallback: str | None, default: Any) -> Any:
    for level in levels:
        if key in level:
            return level[key]
    if fallback is not None:
        return getattr(cfg, fallback)
    return default


def _subset_from(cfg: TrainConfig, sub: dict, ds: dict, general: dict, *, where: str) -> SubsetSpec:
    levels = [sub, ds, general]

    def get(key: str, default: Any = None) -> Any:
        return _lookup(key, levels, cfg, _SUBSET_KEYS.get(key), default)

    repeats = get("num_repeats", 1)
    if repeats < 1:
        raise UsageError(f"{where}num_repeats = {repeats} must be >= 1")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= get(key) <= 1:
            raise UsageError(f"{where}{key} = {get(key)} must be between 0 and 1")
    caption = CaptionOptions(**{f.name: get(f.name) for f in dataclasses.fields(CaptionOptions)})
    if caption.keep_tokens < 0:
        raise UsageError(f"{where}keep_tokens = {caption.keep_tokens} must be >= 0")
    return SubsetSpec(
        image_dir=Path(sub["image_dir"]), num_repeats=repeats, is_reg=bool(sub.get("is_reg", False)),
        class_tokens=get("class_tokens"), caption=caption, flip_aug=get("flip_aug"), random_crop=get("random_crop"),
        alpha_mask=get("alpha_mask"), resize_interpolation=get("resize_interpolation"),
        custom_attributes=dict(get("custom_attributes", {}) or {}),
    )


def _dataset_from(cfg: TrainConfig, ds: dict, general: dict, subsets: list[SubsetSpec], *, where: str) -> DatasetSpec:
    from trainer.flags import convert_value

    levels = [ds, general]

    def get(key: str, default: Any = None) -> Any:
        return _lookup(key, levels, cfg, _DATASET_KEYS.get(key), default)

    resolution = get("resolution")
    if resolution is None:
        raise UsageError(f"{where}no resolution: give --resolution (e.g. 512 or 1024,1024) or resolution in the "
                         "dataset config")
    if not isinstance(resolution, tuple):
        resolution, _ = convert_value("resolution", resolution, where=where)
    spec = DatasetSpec(
        subsets=tuple(subsets), resolution=resolution, batch_size=get("batch_size"),
        enable_bucket=get("enable_bucket"), min_bucket_reso=get("min_bucket_reso"),
        max_bucket_reso=get("max_bucket_reso"), bucket_reso_steps=get("bucket_reso_steps"),
        bucket_no_upscale=get("bucket_no_upscale"), network_multiplier=float(get("network_multiplier", 1.0)),
        validation_split=float(get("validation_split")), validation_seed=get("validation_seed"),
    )
    if spec.batch_size < 1:
        raise UsageError(f"{where}batch_size = {spec.batch_size} must be >= 1")
    if spec.bucket_reso_steps < 8 or spec.bucket_reso_steps % 8:
        raise UsageError(f"{where}bucket_reso_steps = {spec.bucket_reso_steps} must be a multiple of 8")
    if not 0 <= spec.validation_split < 1:
        raise UsageError(f"{where}validation_split = {spec.validation_split} must be in [0, 1)")
    if spec.enable_bucket and not spec.bucket_no_upscale:
        lo, hi = round_bucket_bounds(spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
        if lo <= 0:
            raise UsageError(f"{where}min_bucket_reso rounds to {lo}; it must be at least bucket_reso_steps")
        if lo > min(resolution) or hi < max(resolution):
            raise UsageError(f"{where}bucket range {lo}..{hi} must contain the resolution {resolution}")
        spec = dataclasses.replace(spec, min_bucket_reso=lo, max_bucket_reso=hi)
    return spec
