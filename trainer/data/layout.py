"""Images on disk -> captions, buckets and batches, without decoding a pixel (no torch).

This is the part of sd-scripts' dataset that decides *what* is trained: which files count,
their captions (with the class-token fallback), the validation split, regularization-image
balancing, the bucket of every image and the list of batches per epoch. ``--dry-run`` prints
it, and ``TrainDataset`` loads pixels for it. Image sizes come from file headers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from loratools.errors import InvalidFileError
from trainer.config import TrainConfig, add_warning
from trainer.data.blueprint import DatasetSpec, SubsetSpec, build_blueprint
from trainer.data.buckets import BucketManager
from trainer.data.captions import read_caption, tag_frequency
from trainer.data.images import image_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageInfo:
    """One image file: its size, raw caption, subset and bucket."""

    key: str
    path: Path
    size: tuple[int, int]
    caption: str
    subset: SubsetSpec
    num_repeats: int
    bucket: tuple[int, int] = (0, 0)
    resized_size: tuple[int, int] = (0, 0)

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg


@dataclass
class DatasetLayout:
    """One dataset's images, buckets and batches (batches never mix buckets)."""

    spec: DatasetSpec
    images: dict[str, ImageInfo]
    manager: BucketManager
    num_train_images: int
    num_reg_images: int
    tag_frequency: dict[str, dict[str, int]]
    ar_errors: list[float]
    batches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def batch_keys(self, index: int) -> list[str]:
        """Image keys of batch ``index`` in the current order."""
        bucket_index, batch_index = self.batches[index]
        start = batch_index * self.spec.batch_size
        return self.manager.buckets[bucket_index][start:start + self.spec.batch_size]

    def bucket_table(self) -> list[tuple[int, tuple[int, int], int]]:
        """(bucket index, resolution, count with repeats) of the non-empty buckets, as sd-scripts logs them."""
        return [(i, reso, len(keys)) for i, (reso, keys) in enumerate(zip(self.manager.resos, self.manager.buckets))
                if keys]

    def bucket_info(self) -> dict:
        """sd-scripts' ``ss_bucket_info``: non-empty buckets by index, and the mean |aspect error| per image."""
        buckets = {i: {"resolution": list(reso), "count": n} for i, reso, n in self.bucket_table()}
        mean = sum(abs(e) for e in self.ar_errors) / len(self.ar_errors) if self.ar_errors else 0.0
        return {"buckets": buckets, "mean_img_ar_error": mean}

    def dataset_dirs(self, is_reg: bool) -> dict[str, dict[str, int]]:
        """sd-scripts' ``ss_dataset_dirs`` / ``ss_reg_dataset_dirs``: folder name -> repeats and image count."""
        out: dict[str, dict[str, int]] = {}
        for subset in self.spec.subsets:
            if subset.is_reg != is_reg:
                continue
            count = sum(1 for info in self.images.values() if info.subset is subset)
            out[subset.image_dir.name] = {"n_repeats": subset.num_repeats, "img_count": count}
        return out

    def shuffle(self, seed: int, epoch: int) -> None:
        """sd-scripts' per-epoch order: the batch list, then every bucket's contents, from ``seed + epoch``."""
        rng = random.Random(seed + epoch)
        rng.shuffle(self.batches)
        for bucket in self.manager.buckets:
            rng.shuffle(bucket)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (extensions in any case), sorted as sd-scripts sorts them."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_train_validation(paths: list[Path], split: float, seed: int, validation: bool) -> list[Path]:
    """sd-scripts' split: shuffle with the validation seed, training takes the first ceil(n(1-split)).

    The validation part is the rest (sd-scripts computes it with ``round``, which can overlap the
    training part for odd counts; here the two parts never share an image).
    """
    if split <= 0:
        return [] if validation else list(paths)
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    cut = math.ceil(len(shuffled) * (1 - split))
    return shuffled[cut:] if validation else shuffled[:cut]


def build_layouts(cfg: TrainConfig, *, validation: bool = False, seed: int = 0) -> list[DatasetLayout]:
    """The datasets of ``cfg`` with buckets and batches (epoch 0 order); warnings go to ``cfg.warnings``.

    Args:
        cfg: the resolved configuration.
        validation: build the held-out validation part instead of the training part.
        seed: the dataset seed (shuffles batches per epoch).
    """
    layouts = []
    for spec in build_blueprint(cfg):
        layout = _layout(cfg, spec, validation)
        if layout is not None:
            layout.shuffle(seed, 0)
            layouts.append(layout)
    if not layouts and not validation:
        raise InvalidFileError("no training images found (extensions: " + ", ".join(IMAGE_EXTENSIONS) + ")",
                               path=cfg.dataset_config or cfg.train_data_dir)
    return layouts


def _other_captions_hint(missing: list[Path], extension: str) -> str:
    """sd-scripts' default caption extension is `.caption`, but most datasets (and the seed guides)
    use `.txt`: when the uncaptioned images have captions under another common extension, say so."""
    for other in (".txt", ".caption"):
        if other != extension and all(p.with_suffix(other).is_file() for p in missing):
            return f" (they have {other} files: pass --caption_extension {other})"
    return ""


def _layout(cfg: TrainConfig, spec: DatasetSpec, validation: bool) -> DatasetLayout | None:
    split_seed = spec.validation_seed if spec.validation_seed is not None else (cfg.seed or 0)
    train: list[ImageInfo] = []
    reg: list[ImageInfo] = []
    frequency: dict[str, dict[str, int]] = {}
    for subset in spec.subsets:
        if not subset.image_dir.is_dir():
            raise InvalidFileError("image folder not found", path=subset.image_dir)
        paths = list_images(subset.image_dir)
        if not paths:
            add_warning(cfg, f"{subset.image_dir}: no images; skipped")
            continue
        if not subset.is_reg:
            paths = split_train_validation(paths, spec.validation_split, split_seed, validation)
        elif validation:
            continue
        infos, missing = _read_subset(subset, paths)
        if missing:
            fallback = repr(subset.class_tokens) if subset.class_tokens else "an empty caption"
            shown = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
            add_warning(cfg, f"{subset.image_dir}: {len(missing)} image(s) without a {subset.caption.caption_extension} "
                                f"caption use {fallback}: {shown}" + _other_captions_hint(missing, subset.caption.caption_extension))
        counts = frequency.setdefault(subset.image_dir.name, {})
        for tag, n in tag_frequency([i.caption for i in infos]).items():
            counts[tag] = counts.get(tag, 0) + n
        (reg if subset.is_reg else train).extend(infos)
    if not train:
        return None
    num_train = sum(i.num_repeats for i in train)
    num_reg = sum(i.num_repeats for i in reg)
    registered = train + _balance_reg(reg, num_train, cfg)
    manager = BucketManager.for_dataset(spec.resolution, spec.enable_bucket, spec.min_bucket_reso,
                                        spec.max_bucket_reso, spec.bucket_reso_steps, spec.bucket_no_upscale)
    ar_errors = []
    for info in registered:
        try:
            info.bucket, info.resized_size, error = manager.select_bucket(*info.size)
        except ValueError as exc:
            raise InvalidFileError(str(exc), path=info.path) from None
        ar_errors.append(error)
        for _ in range(info.num_repeats):
            manager.add_image(info.bucket, info.key)
    if spec.bucket_no_upscale:
        manager.sort()
    layout = DatasetLayout(spec=spec, images={i.key: i for i in registered}, manager=manager,
                           num_train_images=num_train, num_reg_images=num_reg, tag_frequency=frequency,
                           ar_errors=ar_errors)
    for bucket_index, keys in enumerate(manager.buckets):
        layout.batches.extend((bucket_index, b) for b in range(math.ceil(len(keys) / spec.batch_size)))
    return layout


def _read_subset(subset: SubsetSpec, paths: list[Path]) -> tuple[list[ImageInfo], list[Path]]:
    """Every image's size and caption; all unreadable images are found before one error names them."""
    infos, missing, unreadable = [], [], []
    for path in paths:
        try:
            size = image_size(path)
        except InvalidFileError as exc:
            unreadable.append(exc)
            continue
        caption = read_caption(path, subset.caption.caption_extension, subset.caption.enable_wildcard)
        if caption is None:
            missing.append(path)
            caption = subset.class_tokens or ""
        infos.append(ImageInfo(key=str(path.resolve()), path=path, size=size, caption=caption,
                               subset=subset, num_repeats=subset.num_repeats))
    if unreadable:
        first = unreadable[0]
        others = ", ".join(Path(e.path or "").name for e in unreadable[1:4]) + (", ..." if len(unreadable) > 4 else "")
        more = f"; {len(unreadable) - 1} more in {subset.image_dir} cannot be read either ({others})" \
            if len(unreadable) > 1 else ""
        raise InvalidFileError(str(first) + more)
    return infos, missing


def _balance_reg(reg: list[ImageInfo], num_train: int, cfg: TrainConfig) -> list[ImageInfo]:
    """sd-scripts repeats or truncates regularization images round-robin until they match the training count."""
    if not reg:
        return []
    registered: list[ImageInfo] = []
    n = 0
    first_pass = True
    while n < num_train:
        for info in reg:
            if first_pass:
                registered.append(info)
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= num_train:
                break
        first_pass = False
    if len(registered) < len(reg):
        add_warning(cfg, f"{len(reg) - len(registered)} regularization image(s) unused: there are more than "
                            f"training images x repeats ({num_train})")
    return registered
