"""Trainer bad input: a damaged image is named when the dataset is built, in one line.

A truncated download used to pass the header-only size read, then fail inside a DataLoader
worker with a 17-line "Original Traceback" (or never, when its batch was not reached). Building
the layout now checks each file's ending (and decodes the suspicious ones), so `train` and
`train --dry-run` stop before any model is loaded.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loratools.errors import InvalidFileError
from trainer.config import resolve_config
from trainer.data.images import image_size
from trainer.data.layout import build_layouts


def _encoded(fmt: str, size=(48, 40)) -> bytes:
    img = Image.new("RGB", size)
    for x in range(size[0]):  # some detail, so the compressed data is more than a few bytes
        img.putpixel((x, x % size[1]), (x * 5 % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_truncated_images_are_found_and_complete_ones_pass(tmp_path, fmt, ext):
    data = _encoded(fmt)
    good, cut = tmp_path / f"good{ext}", tmp_path / f"cut{ext}"
    good.write_bytes(data)
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert image_size(good) == (48, 40)
    with pytest.raises(InvalidFileError) as exc:
        image_size(cut)
    assert str(exc.value).startswith(f"{cut}: cannot read the image (") and "\n" not in str(exc.value)
    if fmt == "JPEG":  # bytes after the end marker (some phones append data): suspicious, decoded, fine
        tail = tmp_path / f"tail{ext}"
        tail.write_bytes(data + b"\0" * 100)
        assert image_size(tail) == (48, 40)


def test_the_dataset_names_the_bad_image_and_counts_the_others(tmp_path):
    folder = tmp_path / "train" / "5_hero"
    folder.mkdir(parents=True)
    png = _encoded("PNG")
    for i in range(4):
        (folder / f"img_{i}.png").write_bytes(png)
    for name in ("img_1.png", "img_3.png"):
        (folder / name).write_bytes(png[:-40])
    (folder / "zz_not_an_image.png").write_bytes(b"<html>404</html>")
    cfg = resolve_config(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"])
    with pytest.raises(InvalidFileError) as exc:
        build_layouts(cfg)
    message = str(exc.value)
    assert message.startswith(f"{folder / 'img_1.png'}: cannot read the image (")
    assert message.endswith(f"; 2 more in {folder} cannot be read either (img_3.png, zz_not_an_image.png)")
    proc = subprocess.run([sys.executable, "-m", "loratools", "train", "--train_data_dir", str(tmp_path / "train"),
                           "--resolution", "64", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}"


def test_an_error_raised_in_a_dataloader_worker_stays_one_line(tmp_path):
    """An image that fails only when decoded (damaged in the middle) still fails in a worker; torch
    rebuilds the exception in the main process with the worker's traceback as its message."""
    import torch

    bad = tmp_path / "bad.png"

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise InvalidFileError("cannot read the image (broken data stream); remove or re-save it", path=bad)

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1, batch_size=None)
    with pytest.raises(InvalidFileError) as exc:
        next(iter(loader))
    assert str(exc.value) == f"{bad}: cannot read the image (broken data stream); remove or re-save it"


def test_dry_run_with_a_missing_base_model_fails(tiny_dataset, tmp_path: Path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "loratools", "train", "--train_data_dir", str(tiny_dataset.root),
                           "--pretrained_model_name_or_path", str(missing), "--resolution", "64", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: --pretrained_model_name_or_path {missing}: file not found; pass a local "
                                   "diffusers folder or a single-file checkpoint (nothing is downloaded from a hub)")
