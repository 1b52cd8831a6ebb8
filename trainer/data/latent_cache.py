"""Latent cache files in sd-scripts' format, so caches made by either tool are reused by the other.

A cache sits next to its image as ``<stem>_<W:04d>x<H:04d>_sd.npz`` (``_sdxl.npz`` for SDXL),
W x H being the original image size, with ``np.savez`` keys ``latents`` (C,h,w float32,
unscaled), ``original_size`` [W,H], ``crop_ltrb`` [l,t,r,b] and optionally ``latents_flipped``
and ``alpha_mask`` (train-spec 2.6). A file is reused when it has the keys the run needs and,
beyond sd-scripts' check, latents of the bucket's shape (a changed bucket re-encodes).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class CachedLatents:
    """One image's cache entry (arrays as stored)."""

    latents: np.ndarray
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, float, float, float]
    latents_flipped: np.ndarray | None = None
    alpha_mask: np.ndarray | None = None


def latent_cache_path(image_path: Path, original_size: tuple[int, int], sdxl: bool) -> Path:
    """sd-scripts' cache file name for an image of ``original_size`` (width, height)."""
    suffix = "sdxl" if sdxl else "sd"
    width, height = original_size
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}_{suffix}.npz")


def legacy_cache_path(image_path: Path) -> Path:
    """Older sd-scripts wrote ``<stem>.npz``; it is read when present and valid."""
    return image_path.with_name(image_path.stem + ".npz")


def is_cache_valid(path: Path, *, flip_aug: bool, alpha_mask: bool, latent_hw: tuple[int, int] | None,
                   skip_check: bool = False) -> bool:
    """Whether ``path`` holds what this run needs (``skip_check``: existence only, as ``--skip_cache_check``)."""
    if not path.is_file():
        return False
    if skip_check:
        return True
    try:
        with np.load(path) as npz:
            if "latents" not in npz.files:
                return False
            if flip_aug and "latents_flipped" not in npz.files:
                return False
            if alpha_mask and "alpha_mask" not in npz.files:
                return False
            if latent_hw is not None and tuple(npz["latents"].shape[-2:]) != tuple(latent_hw):
                return False
    except (OSError, ValueError):
        return False
    return True


def save_latents(path: Path, entry: CachedLatents) -> None:
    """Write (or update, keeping other keys, as sd-scripts does) a cache file atomically."""
    arrays: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            arrays = {}
    arrays["latents"] = np.asarray(entry.latents, dtype=np.float32)
    arrays["original_size"] = np.array(entry.original_size)
    arrays["crop_ltrb"] = np.array(entry.crop_ltrb)
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = np.asarray(entry.latents_flipped, dtype=np.float32)
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = np.asarray(entry.alpha_mask, dtype=np.float32)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_latents(path: Path) -> CachedLatents:
    """Read a cache file (missing optional keys come back as None)."""
    with np.load(path) as npz:
        files = set(npz.files)
        latents = npz["latents"]
        original = tuple(int(v) for v in npz["original_size"]) if "original_size" in files else (0, 0)
        crop = tuple(float(v) for v in npz["crop_ltrb"]) if "crop_ltrb" in files else (0.0, 0.0, 0.0, 0.0)
        return CachedLatents(
            latents=latents, original_size=original, crop_ltrb=crop,  # type: ignore[arg-type]
            latents_flipped=npz["latents_flipped"] if "latents_flipped" in files else None,
            alpha_mask=npz["alpha_mask"] if "alpha_mask" in files else None,
        )
