"""The training dataset: item ``i`` is batch ``i`` of the current epoch, as in sd-scripts.

Batches come from ``trainer.data.layout`` (buckets never mixed); this module loads pixels or
cached latents for them, applies flips and random crops, processes captions, and builds the
batch dict of the trainer contract (docs/ARCHITECTURE.md). The epoch order is a pure function
of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one, and all
per-item randomness comes from (seed, epoch, index), so it does not depend on worker count.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data.buckets import crop_ltrb as analytic_crop
from trainer.data.captions import process_caption
from trainer.data.images import alpha_of, fit_to_bucket, load_image, to_model_range
from trainer.data.latent_cache import (CachedLatents, is_cache_valid, latent_cache_path, legacy_cache_path,
                                       load_latents, save_latents)
from trainer.data.layout import DatasetLayout, ImageInfo, build_layouts
from trainer.data.steps import StepPlan, num_processes_from_env, plan_for_layouts

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CacheReport:
    """What ``cache_latents`` did: images encoded now and images whose cache was reused."""

    encoded: int
    reused: int


def dataset_seed(cfg: TrainConfig) -> int:
    """The dataset's shuffle seed: drawn from ``--seed`` like sd-scripts (randint after set_seed), else random."""
    return random.Random(cfg.seed).randint(0, 2**31) if cfg.seed is not None else random.randint(0, 2**31)


def build_dataset(cfg: TrainConfig, *, validation: bool = False, seed: int | None = None,
                  num_processes: int | None = None) -> TrainDataset | None:
    """The training dataset of ``cfg`` (or its validation part; None when ``--validation_split`` is 0).

    Args:
        cfg: the resolved configuration; set ``cfg.model_type`` before caching so SDXL caches get
            their ``_sdxl.npz`` names.
        validation: build the held-out part instead.
        seed: the shuffle seed (default: derived from ``cfg.seed``).
        num_processes: for the step plan (default: from the accelerate environment).
    """
    seed = dataset_seed(cfg) if seed is None else seed
    layouts = build_layouts(cfg, validation=validation, seed=seed)
    if validation and not layouts:
        return None
    num_validation = 0
    if not validation and any(layout.spec.validation_split > 0 for layout in layouts):
        num_validation = sum(v.num_train_images for v in build_layouts(cfg, validation=True, seed=seed))
    plan = plan_for_layouts(cfg, layouts, num_validation_images=num_validation,
                            num_processes=num_processes if num_processes is not None else num_processes_from_env())
    return TrainDataset(cfg, layouts, seed=seed, plan=plan)


class TrainDataset(torch.utils.data.Dataset):
    """Batches of one or more datasets; use with ``DataLoader(batch_size=1, collate_fn=lambda b: b[0])``.

    Call ``set_epoch`` (1-based, as sd-scripts counts) in the main process before iterating an
    epoch and ``set_current_step`` for token warmup. Both are kept in shared memory, so persistent
    DataLoader workers (``--persistent_data_loader_workers``) see them too, as in sd-scripts.
    """

    def __init__(self, cfg: TrainConfig, layouts: list[DatasetLayout], *, seed: int, plan: StepPlan) -> None:
        self.cfg = cfg
        self.layouts = layouts
        self.seed = seed
        self.plan = plan
        self.epoch = 0
        self.step = 0
        self._shared_epoch = multiprocessing.RawValue("i", 0)
        self._shared_step = multiprocessing.RawValue("i", 0)
        self._canonical = [(list(l.batches), [list(b) for b in l.manager.buckets]) for l in layouts]
        self._memory_cache: dict[str, CachedLatents] = {}
        self._disk_cache: dict[str, Path] = {}
        self._offsets = []
        total = 0
        for layout in layouts:
            self._offsets.append(total)
            total += layout.batches_per_epoch
        self._length = total
        self.set_epoch(0)

    # --- numbers -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (sd-scripts' ``num_update_steps_per_epoch``)."""
        return self.plan.steps_per_epoch

    @property
    def num_train_images(self) -> int:
        return self.plan.num_train_images

    @property
    def num_reg_images(self) -> int:
        return self.plan.num_reg_images

    def summary_rows(self) -> list[tuple[str, str]]:
        """sd-scripts' startup summary plus one row per non-empty bucket."""
        rows = self.plan.summary_rows()
        for n, layout in enumerate(self.layouts):
            prefix = f"dataset {n} " if len(self.layouts) > 1 else ""
            for index, reso, count in layout.bucket_table():
                rows.append((f"{prefix}bucket {index}", f"resolution {reso}, count: {count}"))
            rows.append((f"{prefix}mean ar error", f"{layout.bucket_info()['mean_img_ar_error']:.4f}"))
        return rows

    def summary(self) -> str:
        """``summary_rows`` as the aligned text block printed at startup."""
        rows = self.summary_rows()
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)

    # --- epoch / step ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Order the batches of ``epoch``: the canonical order shuffled with ``seed + epoch``."""
        self._shared_epoch.value = epoch
        self._apply_epoch(epoch)

    def _apply_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for layout, (batches, buckets) in zip(self.layouts, self._canonical):
            layout.batches = list(batches)
            layout.manager.buckets = [list(b) for b in buckets]
            layout.shuffle(self.seed, epoch)

    def set_current_step(self, step: int) -> None:
        """The optimizer step (token warmup reads it)."""
        self._shared_step.value = step
        self.step = step

    # --- items -------------------------------------------------------------------------
    def _locate(self, index: int) -> tuple[DatasetLayout, int]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        for layout, offset in zip(reversed(self.layouts), reversed(self._offsets)):
            if index >= offset:
                return layout, index - offset
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict:
        if self._shared_epoch.value != self.epoch:  # a DataLoader worker catching up with set_epoch
            self._apply_epoch(self._shared_epoch.value)
        self.step = self._shared_step.value
        layout, local = self._locate(index)
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        keys = layout.batch_keys(local)
        images, latents, masks, captions, weights = [], [], [], [], []
        originals, crops, targets = [], [], []
        any_mask = any(layout.images[k].subset.alpha_mask for k in keys)
        for key in keys:
            info = layout.images[key]
            subset = info.subset
            flipped = subset.flip_aug and rng.random() < 0.5
            cached = self._cached(key)
            if cached is not None:
                lat = cached.latents_flipped if flipped else cached.latents
                latents.append(torch.from_numpy(np.ascontiguousarray(lat)).float())
                original, crop = cached.original_size, cached.crop_ltrb
                if original == (0, 0):
                    original, crop = info.size, analytic_crop(info.bucket, info.size)
                mask = cached.alpha_mask if cached.alpha_mask is not None else None
                if mask is not None and flipped:
                    mask = mask[:, ::-1]
            else:
                pixels = load_image(info.path, with_alpha=subset.alpha_mask)
                pixels, original, crop = fit_to_bucket(pixels, info.bucket, info.resized_size,
                                                       random_crop=subset.random_crop, rng=rng,
                                                       interpolation=subset.resize_interpolation)
                mask = alpha_of(pixels) if subset.alpha_mask else None
                if flipped:
                    pixels = pixels[:, ::-1]
                    mask = mask[:, ::-1] if mask is not None else None
                images.append(torch.from_numpy(to_model_range(pixels)))
            if any_mask:
                bucket_hw = (info.bucket[1], info.bucket[0])
                masks.append(torch.from_numpy(np.ascontiguousarray(mask)) if mask is not None
                              else torch.ones(bucket_hw))
            target = info.bucket
            left_top = (target[0] - crop[2], crop[1]) if flipped else (crop[0], crop[1])
            originals.append((int(original[1]), int(original[0])))
            crops.append((int(left_top[1]), int(left_top[0])))
            targets.append((int(target[1]), int(target[0])))
            captions.append(process_caption(info.caption, subset.caption, rng, epoch=self.epoch, step=self.step,
                                            max_train_steps=self.cfg.max_train_steps))
            weights.append(self.cfg.prior_loss_weight if info.is_reg else 1.0)
        return {
            "latents": torch.stack(latents) if latents else None,
            "images": torch.stack(images) if images else None,
            "captions": captions,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "original_sizes_hw": torch.tensor(originals, dtype=torch.long),
            "crop_top_lefts": torch.tensor(crops, dtype=torch.long),
            "target_sizes_hw": torch.tensor(targets, dtype=torch.long),
            "alpha_masks": torch.stack(masks).unsqueeze(1).float() if masks else None,
            "network_multipliers": torch.full((len(keys),), layout.spec.network_multiplier, dtype=torch.float32),
            "image_keys": keys,
        }

    def _cached(self, key: str) -> CachedLatents | None:
        if key in self._memory_cache:
            return self._memory_cache[key]
        path = self._disk_cache.get(key)
        return load_latents(path) if path is not None else None

    # --- latent caching ----------------------------------------------------------------
    def cache_latents(self, encode_fn: EncodeFn, to_disk: bool, *, sdxl: bool | None = None,
                      latent_stride: int = 8, skip_check: bool | None = None,
                      shard: tuple[int, int] = (0, 1)) -> CacheReport:
        """Encode every image once (reusing valid disk caches); later batches carry ``latents``.

        Args:
            encode_fn: images ``[B,3,H,W]`` in [-1, 1] -> unscaled latents ``[B,C,H/s,W/s]``
                (the VAE's ``latent_dist.sample()`` or mean; NaNs are the caller's to handle).
            to_disk: write/read ``*_WxH_sd.npz`` next to the images (sd-scripts' format).
            sdxl: name caches ``_sdxl.npz`` (default: ``cfg.model_type == "sdxl"``).
            latent_stride: the VAE downscale factor (8 for real SD VAEs).
            skip_check: trust existing files (default ``cfg.skip_cache_check``).
            shard: (process index, process count): with ``to_disk`` each process encodes its
                share; call again after all processes finished to load the others' files.

        Returns:
            How many images were encoded and how many caches were reused.
        """
        sdxl = self.cfg.model_type == "sdxl" if sdxl is None else sdxl
        skip_check = self.cfg.skip_cache_check if skip_check is None else skip_check
        todo: dict[tuple[int, int], list[ImageInfo]] = {}
        reused = 0
        infos = [info for layout in self.layouts for info in layout.images.values()]
        for n, info in enumerate(infos):
            latent_hw = (info.bucket[1] // latent_stride, info.bucket[0] // latent_stride)
            needs = dict(flip_aug=info.subset.flip_aug, alpha_mask=info.subset.alpha_mask, latent_hw=latent_hw,
                         skip_check=skip_check)
            if to_disk:
                path = latent_cache_path(info.path, info.size, sdxl)
                legacy = legacy_cache_path(info.path)
                found = next((p for p in (path, legacy) if is_cache_valid(p, **needs)), None)
                if found is not None:
                    self._disk_cache[info.key] = found
                    reused += 1
                    continue
                if n % shard[1] != shard[0]:
                    continue
            elif info.key in self._memory_cache:
                reused += 1
                continue
            todo.setdefault(info.bucket, []).append(info)
        encoded = 0
        batch = max(1, self.cfg.vae_batch_size)
        for group in todo.values():
            for start in range(0, len(group), batch):
                chunk = group[start:start + batch]
                self._encode_chunk(chunk, encode_fn, to_disk, sdxl)
                encoded += len(chunk)
        return CacheReport(encoded=encoded, reused=reused)

    def _encode_chunk(self, chunk: list[ImageInfo], encode_fn: EncodeFn, to_disk: bool, sdxl: bool) -> None:
        pixels, originals, crops, masks = [], [], [], []
        for info in chunk:
            image = load_image(info.path, with_alpha=info.subset.alpha_mask)
            image, original, crop = fit_to_bucket(image, info.bucket, info.resized_size,
                                                  interpolation=info.subset.resize_interpolation)
            pixels.append(image)
            originals.append(original)
            crops.append(crop)
            masks.append(alpha_of(image) if info.subset.alpha_mask else None)
        batch = torch.from_numpy(np.stack([to_model_range(p) for p in pixels]))
        with torch.no_grad():
            latents = encode_fn(batch).float().cpu().numpy()
            flipped = None
            if any(info.subset.flip_aug for info in chunk):
                flipped = encode_fn(torch.flip(batch, dims=[3])).float().cpu().numpy()
        for i, info in enumerate(chunk):
            entry = CachedLatents(
                latents=latents[i], original_size=originals[i], crop_ltrb=crops[i],
                latents_flipped=flipped[i] if flipped is not None and info.subset.flip_aug else None,
                alpha_mask=masks[i],
            )
            if to_disk:
                path = latent_cache_path(info.path, info.size, sdxl)
                save_latents(path, entry)
                self._disk_cache[info.key] = path
            else:
                self._memory_cache[info.key] = entry

    def distinct_captions(self) -> list[str]:
        """Each image's caption as the text encoders see it, once per distinct text. Exact only when
        captions do not vary between uses (`--cache_text_encoder_outputs` refuses the options that
        vary them); the cache encodes any other caption on first use."""
        rng = random.Random(0)
        return list(dict.fromkeys(
            process_caption(info.caption, info.subset.caption, rng, epoch=1, step=0,
                            max_train_steps=self.cfg.max_train_steps)
            for layout in self.layouts for info in layout.images.values()))

    # --- metadata helpers ----------------------------------------------------------------
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: per folder name, merged over datasets (the first folder of a name wins)."""
        out: dict[str, dict[str, int]] = {}
        for layout in self.layouts:
            for name, counts in layout.tag_frequency.items():
                out.setdefault(name, counts)
        return out

    def dataset_dirs(self, is_reg: bool = False) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs`` (or ``ss_reg_dataset_dirs``)."""
        out: dict[str, dict[str, int]] = {}
        for layout in self.layouts:
            for name, value in layout.dataset_dirs(is_reg).items():
                unique, n = name, 2
                while unique in out:
                    unique, n = f"{name} ({n})", n + 1
                out[unique] = value
        return out
