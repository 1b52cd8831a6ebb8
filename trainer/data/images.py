"""Loading an image and fitting it to its bucket as sd-scripts does (resize to cover, then crop).

sd-scripts resizes with OpenCV's INTER_AREA when shrinking and PIL's LANCZOS when enlarging;
this module uses PIL for both (BOX is PIL's area filter), so pixels can differ slightly from
sd-scripts on non-integer shrink factors while sizes, crops and offsets are identical.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from loratools.errors import InvalidFileError
from trainer.data.buckets import crop_ltrb


def _pil_filter(name: str):
    from PIL import Image

    return {
        "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
        "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
    }[name]


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a damaged file: truncated data, a broken chunk, a size past its safety limit."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _unreadable(path: Path, exc: BaseException) -> InvalidFileError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return InvalidFileError(f"cannot read the image ({text}); remove or re-save it", path=path)


def load_image(path: Path, with_alpha: bool = False) -> np.ndarray:
    """The image as uint8 HxWx3 (RGB) or HxWx4 (RGBA when ``with_alpha``; opaque if the file has no alpha)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = "RGBA" if with_alpha else "RGB"
            return np.asarray(img if img.mode == mode else img.convert(mode)).copy()
    except _pil_errors() as exc:
        raise _unreadable(path, exc) from None


#: How each format's file ends when it is complete (PNG's IEND chunk, JPEG's end-of-image marker).
_ENDINGS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image that will decode, read from its header and its last bytes.

    Building the dataset runs this on every image, so a truncated download is named before the
    first step instead of failing inside a DataLoader worker hours in (or never, when its batch
    is not reached). A file whose ending is not the format's own (a truncated PNG/JPEG, a WebP
    shorter than its RIFF size, any other format) is decoded once to be sure; complete files cost
    a header and a 16-byte read.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
        if not _looks_complete(path, fmt):
            with Image.open(path) as img:
                img.load()
    except _pil_errors() as exc:
        raise _unreadable(path, exc) from None
    return size


def _looks_complete(path: Path, fmt: str | None) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(12)
        end = fh.seek(0, 2)
        fh.seek(max(0, end - 16))
        tail = fh.read()
    if fmt == "WEBP":
        return head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") + 8 <= end
    ending = _ENDINGS.get(fmt or "")
    return ending is not None and tail.endswith(ending)


def resize_image(image: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to ``size`` (width, height); default filter: area when shrinking, lanczos when enlarging."""
    from PIL import Image

    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    return np.asarray(Image.fromarray(image).resize(tuple(size), _pil_filter(interpolation)))


def fit_to_bucket(image: np.ndarray, bucket: tuple[int, int], resized_size: tuple[int, int], *,
                  random_crop: bool = False, rng: random.Random | None = None,
                  interpolation: str | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """sd-scripts' ``trim_and_resize_if_required``: resize, then crop the excess (centre, or random).

    Returns the bucket-sized image, the original (width, height) and the analytic crop box used
    for SDXL conditioning (``crop_ltrb``; independent of a random crop, as in sd-scripts).
    """
    original = (image.shape[1], image.shape[0])
    image = resize_image(image, resized_size, interpolation)
    height, width = image.shape[:2]
    rng = rng or random.Random(0)
    if width > bucket[0]:
        excess = width - bucket[0]
        left = rng.randint(0, excess) if random_crop else excess // 2
        image = image[:, left:left + bucket[0]]
    if height > bucket[1]:
        excess = height - bucket[1]
        top = rng.randint(0, excess) if random_crop else excess // 2
        image = image[top:top + bucket[1]]
    if image.shape[0] != bucket[1] or image.shape[1] != bucket[0]:
        raise ValueError(f"image resized to {image.shape[1]}x{image.shape[0]} does not cover bucket {bucket}")
    return image, original, crop_ltrb(bucket, original)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1] (torchvision ToTensor + Normalize(0.5, 0.5), as sd-scripts)."""
    chw = np.ascontiguousarray(image[:, :, :3].transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
    return (chw - np.float32(0.5)) / np.float32(0.5)


def alpha_of(image: np.ndarray) -> np.ndarray:
    """The alpha channel as float32 HxW in [0, 1] (ones when the image has none)."""
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, 3].astype(np.float32) / np.float32(255.0)
    return np.ones(image.shape[:2], dtype=np.float32)
