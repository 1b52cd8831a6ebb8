"""Aspect-ratio buckets, exactly as sd-scripts' ``BucketManager`` (train-spec 1.4).

Users compare bucket tables and step counts with what sd-scripts printed for the same folder,
so the arithmetic (integer floors, ``int(x + 0.5)`` rounding, first-minimum tie breaking) is
reproduced literally. Sizes are ``(width, height)`` tuples throughout. No torch, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def make_bucket_resos(resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                      divisible: int = 64) -> list[tuple[int, int]]:
    """The predefined bucket list for ``--enable_bucket`` without ``--bucket_no_upscale``.

    Example:
        >>> len(make_bucket_resos((512, 512), 256, 1024, 64))
        17
    """
    max_area = resolution[0] * resolution[1]
    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' analytic crop box for SDXL conditioning: the original aspect fitted into the bucket.

    Returns (left, top, right, bottom); left/top are floored with ``//`` as sd-scripts does (they
    may be floats, exactly as sd-scripts stores them in the latent cache).
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        fit_w, fit_h = bucket[1] * image_ar, bucket[1]
    else:
        fit_w, fit_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - fit_w) // 2
    top = (bucket[1] - fit_h) // 2
    return left, top, left + fit_w, top + fit_h


@dataclass
class BucketManager:
    """Assigns each image a bucket and a resize size; holds the image keys per bucket.

    ``predefined`` (a sorted list) is used unless ``no_upscale``; with ``no_upscale`` buckets are
    created on demand from each image's own size.
    """

    no_upscale: bool
    max_reso: tuple[int, int]
    reso_steps: int
    predefined: list[tuple[int, int]] = field(default_factory=list)
    resos: list[tuple[int, int]] = field(default_factory=list)
    buckets: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.max_area = self.max_reso[0] * self.max_reso[1]
        self._predefined_set = set(self.predefined)
        self._predefined_ars = [w / h for w, h in self.predefined]
        for reso in self.predefined:
            self._add_reso(reso)

    @classmethod
    def for_dataset(cls, resolution: tuple[int, int], enable_bucket: bool, min_bucket_reso: int,
                    max_bucket_reso: int, bucket_reso_steps: int, bucket_no_upscale: bool) -> BucketManager:
        """The manager sd-scripts builds for a dataset's bucket settings (one bucket without bucketing)."""
        if not enable_bucket:
            return cls(False, resolution, bucket_reso_steps, predefined=[tuple(resolution)])
        if bucket_no_upscale:
            return cls(True, resolution, bucket_reso_steps)
        resos = make_bucket_resos(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        return cls(False, resolution, bucket_reso_steps, predefined=resos)

    def _add_reso(self, reso: tuple[int, int]) -> None:
        if reso not in self.resos:
            self.resos.append(reso)
            self.buckets.append([])

    def round_to_steps(self, x: float) -> int:
        """``int(x + 0.5)`` then down to a multiple of the step (sd-scripts' ``round_to_steps``)."""
        value = int(x + 0.5)
        return value - value % self.reso_steps

    def select_bucket(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], float]:
        """(bucket, resized size, aspect-ratio error) for an image of ``width`` x ``height``.

        The resized size covers the bucket; the excess is cropped later (never padded).
        """
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                errors = [abs(ar - aspect) for ar in self._predefined_ars]
                reso = self.predefined[errors.index(min(errors))]
            if aspect > reso[0] / reso[1]:
                scale = reso[1] / height
            else:
                scale = reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw1 = self.round_to_steps(rw)
                bh1 = self.round_to_steps(bw1 / aspect)
                bh2 = self.round_to_steps(rh)
                bw2 = self.round_to_steps(bh2 * aspect)
                if abs(bw1 / bh1 - aspect) < abs(bw2 / bh2 - aspect):
                    resized = (bw1, int(bw1 / aspect + 0.5))
                else:
                    resized = (int(bh2 * aspect + 0.5), bh2)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
            if min(reso) <= 0:
                raise ValueError(f"image {width}x{height} is smaller than one bucket step ({self.reso_steps})")
            self._add_reso(reso)
        return reso, resized, reso[0] / reso[1] - aspect

    def add_image(self, reso: tuple[int, int], key: str) -> None:
        """Put one use of an image (call once per repeat) into its bucket."""
        self.buckets[self.resos.index(reso)].append(key)

    def sort(self) -> None:
        """Sort buckets by resolution (sd-scripts sorts on-demand buckets before reporting them)."""
        order = sorted(range(len(self.resos)), key=lambda i: self.resos[i])
        self.resos = [self.resos[i] for i in order]
        self.buckets = [self.buckets[i] for i in order]
