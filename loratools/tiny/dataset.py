"""A synthetic captioned training set in sd-scripts' ``N_concept`` folder layout.

Each image is a flat background with one coloured shape on it, and the trigger concept adds a
diagonal stripe pattern over the shape: something a tiny LoRA can learn in a few steps and a test
can see. Sizes cycle through several aspect ratios so that aspect-ratio bucketing puts images in
different buckets. Captions are comma-separated tags beginning with the trigger word, as
sd-scripts users write them (``keep_tokens=1`` keeps the trigger first).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")

#: (width, height) cycles: square, landscape, portrait, wide, tall, odd sizes that need a resize.
SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "sd1": ((64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (200, 120)),
    "sd2": ((64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (200, 120)),
    "sdxl": ((64, 64), (96, 64), (64, 96), (96, 32), (32, 96), (120, 200)),
}


@dataclass(frozen=True)
class TinyDataset:
    """What ``make_dataset`` wrote: the training root (pass as ``--train_data_dir``) and its files."""

    root: Path
    concept_dir: Path
    repeats: int
    trigger: str
    images: list[Path] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)  # image file name -> caption (absent: none written)


def _draw(size: tuple[int, int], shape: str, colour: str, background: str, striped: bool, rgba: bool):
    from PIL import Image, ImageDraw

    w, h = size
    mode = "RGBA" if rgba else "RGB"
    bg = COLOURS[background] + ((0,) if rgba else ())
    img = Image.new(mode, size, bg)
    draw = ImageDraw.Draw(img)
    side = int(min(w, h) * 0.6)
    x0, y0 = (w - side) // 2, (h - side) // 2
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour] + ((255,) if rgba else ())
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    if striped:
        stripe = (255, 255, 255) + ((255,) if rgba else ())
        for offset in range(-h, w, 8):
            draw.line([(offset, 0), (offset + h, h)], fill=stripe, width=2)
    return img


def make_dataset(
    directory: str | Path,
    arch: str = "sd1",
    n_images: int = 6,
    *,
    repeats: int = 5,
    concept: str = "tinychar",
    trigger: str | None = None,
    seed: int = 0,
    uncaptioned: int = 0,
    rgba: int = 0,
    caption_extension: str = ".txt",
) -> TinyDataset:
    """Write ``n_images`` PNG+caption pairs into ``directory/<repeats>_<concept>/``.

    Args:
        directory: the training root (created if needed); other concepts may live beside it.
        arch: picks the size cycle ("sdxl" uses 32-pixel steps as its buckets do).
        n_images: number of images.
        repeats: the ``N`` of the folder name.
        concept: folder concept name (may contain spaces, e.g. ``"dog toy"``).
        trigger: first tag of every caption; defaults to ``concept``.
        seed: shapes, colours and tag order are a function of the seed only.
        uncaptioned: the last this many images get no caption file (class-token fallback).
        rgba: the first this many images are RGBA with a transparent background (alpha masks).
        caption_extension: ``".txt"`` or e.g. ``".caption"``.

    Example:
        >>> ds = make_dataset(tmp_path / "train", "sd1", 6)
        >>> ds.concept_dir.name
        '5_tinychar'
    """
    if arch not in SIZES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {tuple(SIZES)}")
    trigger = concept if trigger is None else trigger
    rng = random.Random(seed)
    root = Path(directory)
    concept_dir = root / f"{repeats}_{concept}"
    concept_dir.mkdir(parents=True, exist_ok=True)
    colour_names = list(COLOURS)
    images: list[Path] = []
    captions: dict[str, str] = {}
    for i in range(n_images):
        size = SIZES[arch][i % len(SIZES[arch])]
        shape = SHAPES[i % len(SHAPES)]
        colour = rng.choice(colour_names)
        background = rng.choice([c for c in colour_names if c != colour])
        path = concept_dir / f"img_{i:03d}.png"
        _draw(size, shape, colour, background, striped=True, rgba=i < rgba).save(path)
        images.append(path)
        if i >= n_images - uncaptioned:
            continue
        tags = [f"{colour} {shape}", f"{background} background", "stripes", "simple background"]
        rng.shuffle(tags)
        caption = ", ".join([trigger, *tags])
        path.with_suffix(caption_extension).write_text(caption + "\n", encoding="utf-8")
        captions[path.name] = caption
    return TinyDataset(root=root, concept_dir=concept_dir, repeats=repeats, trigger=trigger, images=images,
                       captions=captions)
