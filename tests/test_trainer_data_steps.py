"""Step arithmetic (train-spec 2.3) and the dataset layout it is computed from: repeats, ragged
buckets, regularization balancing, validation split, warnings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from loratools.errors import InvalidFileError, UsageError
from trainer.config import resolve_config
from trainer.data.layout import build_layouts, split_train_validation
from trainer.data.steps import plan_for_layouts, plan_steps


def _images(folder: Path, sizes: list[tuple[int, int]], captions: bool = True, ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"im{i}{ext}"
        Image.new("RGB", size, (i * 20 % 255, 100, 50)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"{folder.name}, tag{i}\n", encoding="utf-8")
        paths.append(path)
    return paths


def test_plan_steps_hand_computed():
    # 6 batches, accumulation 4: ceil(6/4) = 2 optimizer steps per epoch; 400 steps -> 200 epochs
    plan = plan_steps(batches_per_epoch=6, max_train_steps=400, max_train_epochs=None, gradient_accumulation_steps=4,
                      train_batch_size=2)
    assert (plan.steps_per_epoch, plan.num_epochs, plan.max_train_steps) == (2, 200, 400)
    assert plan.effective_batch_size == 8
    # max_train_epochs wins: 5 x ceil(6 / 1 / 4) = 10 steps
    plan = plan_steps(batches_per_epoch=6, max_train_steps=400, max_train_epochs=5, gradient_accumulation_steps=4)
    assert (plan.max_train_steps, plan.num_epochs) == (10, 5)
    # two processes: the unsharded rounding ceil(9 / 2 / 4) = 2 for the epoch override,
    # the sharded one ceil(ceil(9 / 2) / 4) = ceil(5 / 4) = 2 steps per epoch
    plan = plan_steps(batches_per_epoch=9, max_train_steps=1, max_train_epochs=3, gradient_accumulation_steps=4,
                      num_processes=2, train_batch_size=8)
    assert (plan.batches_per_epoch_per_process, plan.steps_per_epoch, plan.max_train_steps) == (5, 2, 6)
    assert plan.effective_batch_size == 8 * 2 * 4
    # training stops mid-epoch: 7 steps at 3 per epoch -> 3 epochs
    assert plan_steps(batches_per_epoch=3, max_train_steps=7, max_train_epochs=None,
                      gradient_accumulation_steps=1).num_epochs == 3


def test_hungarian_guide_effective_batch():
    plan = plan_steps(batches_per_epoch=100, max_train_steps=400, max_train_epochs=None,
                      gradient_accumulation_steps=6, train_batch_size=8)
    assert plan.effective_batch_size * plan.max_train_steps == 19200  # "8x6 = 48 images per step, 19,200 samples"


def test_layout_repeats_ragged_buckets_and_batches(tmp_path: Path):
    root = tmp_path / "train"
    _images(root / "3_cat", [(64, 64), (64, 64), (200, 64)])
    _images(root / "1_dog toy", [(64, 128)], captions=False)
    (root / "notes").mkdir()
    (root / "0_off").mkdir()
    cfg = resolve_config(["--train_data_dir", str(root), "--resolution", "64", "--enable_bucket",
                          "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
                          "--train_batch_size", "2", "--caption_extension", ".txt", "--gradient_accumulation_steps", "2",
                          "--max_train_epochs", "3"])
    (layout,) = build_layouts(cfg)
    table = {reso: count for _, reso, count in layout.bucket_table()}
    # buckets: 32x96, 32x128, 64x64, 96x32, 128x32 (aspects 1/3, 1/4, 1, 3, 4)
    # 64x64 x2 images x3 repeats = 6; 200x64 (aspect 3.125) -> 96x32 x3; 64x128 (0.5) -> 32x96
    assert table == {(64, 64): 6, (96, 32): 3, (32, 96): 1}
    assert layout.num_train_images == 3 * 3 + 1
    batches = math.ceil(6 / 2) + math.ceil(3 / 2) + math.ceil(1 / 2)
    assert layout.batches_per_epoch == batches == 6
    plan = plan_for_layouts(cfg, [layout], num_processes=1)
    assert plan.steps_per_epoch == 3 and plan.max_train_steps == 9 and plan.num_epochs == 3
    dog = next(i for i in layout.images.values() if i.subset.image_dir.name == "1_dog toy")
    assert dog.caption == "dog toy" and dog.subset.class_tokens == "dog toy"
    text = "\n".join(cfg.warnings)
    assert "notes: folder name does not start with N_" in text and "0_off: 0 repeats; skipped" in text
    assert "1 image(s) without a .txt caption use 'dog toy': im0.png" in text
    assert layout.tag_frequency["3_cat"] == {"3_cat": 3, "tag0": 1, "tag1": 1, "tag2": 1}
    assert layout.dataset_dirs(False) == {"1_dog toy": {"n_repeats": 1, "img_count": 1},
                                          "3_cat": {"n_repeats": 3, "img_count": 3}}
    info = layout.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 10
    assert info["mean_img_ar_error"] == pytest.approx((0 + 0 + abs(3 - 3.125) + abs(1 / 3 - 0.5)) / 4)


def test_every_batch_is_one_bucket_and_epoch_order_depends_on_seed(tmp_path: Path):
    root = tmp_path / "train"
    _images(root / "2_a", [(64, 64), (64, 128), (128, 64), (64, 64), (64, 128)])
    cfg = resolve_config(["--train_data_dir", str(root), "--resolution", "64", "--enable_bucket",
                          "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
                          "--train_batch_size", "3", "--caption_extension", ".txt"])
    (layout,) = build_layouts(cfg, seed=1)
    seen = []
    for i in range(layout.batches_per_epoch):
        keys = layout.batch_keys(i)
        assert len({layout.images[k].bucket for k in keys}) == 1
        seen.extend(keys)
    assert sorted(seen) == sorted(k for k, info in layout.images.items() for _ in range(info.num_repeats))
    order0 = [layout.batch_keys(i) for i in range(layout.batches_per_epoch)]
    (again,) = build_layouts(cfg, seed=1)
    assert [again.batch_keys(i) for i in range(again.batches_per_epoch)] == order0


def test_regularization_images_are_balanced_round_robin(tmp_path: Path):
    root, reg = tmp_path / "train", tmp_path / "reg"
    _images(root / "5_char", [(64, 64)] * 2)           # 10 training uses
    _images(reg / "1_person", [(64, 64)] * 3)          # 3 reg images, 1 repeat each -> padded to 10
    cfg = resolve_config(["--train_data_dir", str(root), "--reg_data_dir", str(reg), "--resolution", "64",
                          "--caption_extension", ".txt"])
    (layout,) = build_layouts(cfg)
    regs = sorted((i.path.name, i.num_repeats) for i in layout.images.values() if i.is_reg)
    # first pass 1+1+1 = 3, then +1 per image round-robin: 3 + 7 = 10 -> repeats 4, 3, 3
    assert regs == [("im0.png", 4), ("im1.png", 3), ("im2.png", 3)]
    assert layout.num_reg_images == 3 and layout.num_train_images == 10
    assert sum(len(b) for b in layout.manager.buckets) == 20

    _images(reg / "20_many", [(64, 64)] * 2)           # 20 uses at once: more than the 10 needed
    cfg = resolve_config(["--train_data_dir", str(root), "--reg_data_dir", str(reg), "--resolution", "64"])
    (layout,) = build_layouts(cfg)
    used = sorted((i.subset.image_dir.name, i.path.name, i.num_repeats) for i in layout.images.values() if i.is_reg)
    # folders sorted: 1_person first (3 uses), then 20_many's first image (20 uses) reaches 10: the rest is unused
    assert used == [("1_person", "im0.png", 1), ("1_person", "im1.png", 1), ("1_person", "im2.png", 1),
                    ("20_many", "im0.png", 20)]
    assert any("1 regularization image(s) unused" in w for w in cfg.warnings)

    cfg = resolve_config(["--train_data_dir", str(root), "--reg_data_dir", str(reg / "x"), "--resolution", "64"])
    with pytest.raises(InvalidFileError, match="--reg_data_dir is not a folder"):
        build_layouts(cfg)


def test_validation_split_is_disjoint_and_seeded(tmp_path: Path):
    paths = [tmp_path / f"{i}.png" for i in range(7)]
    train = split_train_validation(paths, 0.3, seed=4, validation=False)
    val = split_train_validation(paths, 0.3, seed=4, validation=True)
    assert len(train) == math.ceil(7 * 0.7) == 5 and len(val) == 2
    assert not set(train) & set(val) and set(train) | set(val) == set(paths)
    assert split_train_validation(paths, 0.3, seed=4, validation=False) == train

    root = tmp_path / "train"
    _images(root / "2_a", [(64, 64)] * 5)
    cfg = resolve_config(["--train_data_dir", str(root), "--resolution", "64", "--validation_split", "0.4",
                          "--validation_seed", "3", "--caption_extension", ".txt"])
    (train_layout,) = build_layouts(cfg)
    (val_layout,) = build_layouts(cfg, validation=True)
    assert len(train_layout.images) == 3 and len(val_layout.images) == 2
    assert not set(train_layout.images) & set(val_layout.images)


def test_empty_and_missing_inputs_are_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="give --train_data_dir"):
        build_layouts(resolve_config(["--resolution", "64"]))
    (tmp_path / "train" / "notanumber").mkdir(parents=True)
    with pytest.raises(InvalidFileError, match="must be the parent of folders named"):
        build_layouts(resolve_config(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"]))
    (tmp_path / "train" / "3_x").mkdir()
    (tmp_path / "train" / "3_x" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidFileError, match="cannot read the image"):
        build_layouts(resolve_config(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"]))
    with pytest.raises(UsageError, match="no resolution"):
        build_layouts(resolve_config(["--train_data_dir", str(tmp_path / "train")]))


def test_txt_captions_under_the_default_extension_get_a_hint(tmp_path: Path):
    """sd-scripts' default is `.caption`; a `.txt`-captioned folder used to warn without saying why."""
    _images(tmp_path / "train" / "2_cat", [(64, 64), (64, 64)])
    cfg = resolve_config(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"])
    build_layouts(cfg)
    (warning,) = [w for w in cfg.warnings if "without a .caption caption" in w]
    assert warning.endswith("(they have .txt files: pass --caption_extension .txt)")
