"""--dataset_config TOML: [general] / [[datasets]] / [[datasets.subsets]] inheritance and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from loratools.errors import InvalidFileError, UsageError
from trainer.config import resolve_config
from trainer.data.blueprint import build_blueprint
from trainer.data.layout import build_layouts


def _folder(path: Path, n: int) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64)).save(path / f"{i}.png")
    return path


def _config(tmp_path: Path, text: str, *flags: str):
    toml = tmp_path / "dataset.toml"
    toml.write_text(text, encoding="utf-8")
    return resolve_config(["--dataset_config", str(toml), *flags])


def test_inheritance_subset_dataset_general_cli_default(tmp_path: Path):
    a, b, r = _folder(tmp_path / "a", 2), _folder(tmp_path / "b", 1), _folder(tmp_path / "r", 1)
    cfg = _config(tmp_path, f"""
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = ".caption"
[[datasets]]
resolution = [96, 64]
batch_size = 3
keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 4
  keep_tokens = 1
  class_tokens = "sks girl"
  [[datasets.subsets]]
  image_dir = "{b}"
  flip_aug = true
[[datasets]]
resolution = 64
enable_bucket = true
min_bucket_reso = 40
max_bucket_reso = 100
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{r}"
  is_reg = true
""", "--train_batch_size", "5", "--caption_dropout_rate", "0.1", "--flip_aug")
    first, second = build_blueprint(cfg)
    sa, sb = first.subsets
    assert first.resolution == (96, 64) and first.batch_size == 3         # dataset level
    assert second.batch_size == 5                                          # CLI --train_batch_size
    assert sa.caption.keep_tokens == 1 and sb.caption.keep_tokens == 3    # subset, then dataset
    assert second.subsets[0].caption.keep_tokens == 2                     # general
    assert sa.caption.shuffle_caption and sa.caption.caption_extension == ".caption"
    assert sa.caption.caption_dropout_rate == 0.1                          # CLI fallback
    assert sa.caption.caption_dropout_every_n_epochs == 0                  # default
    assert sa.num_repeats == 4 and sb.num_repeats == 1 and sa.class_tokens == "sks girl" and sb.class_tokens is None
    assert sb.flip_aug and sa.flip_aug                                     # CLI --flip_aug for both
    assert second.subsets[0].is_reg and not sa.is_reg
    assert (second.min_bucket_reso, second.max_bucket_reso) == (32, 128)  # 40 rounded down, 100 up, to 32s


def test_dataset_config_wins_over_folders_with_warning(tmp_path: Path):
    a = _folder(tmp_path / "a", 1)
    cfg = _config(tmp_path, f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{a}"\n',
                  "--train_data_dir", str(tmp_path))
    (layout,) = build_layouts(cfg)
    assert len(layout.images) == 1
    assert any("--train_data_dir/--reg_data_dir have no effect with --dataset_config" in w for w in cfg.warnings)


@pytest.mark.parametrize("text, message", [
    ('[general]\nshufle_caption = true\n[[datasets]]\n', "[general]: unknown key 'shufle_caption'; did you mean shuffle_caption?"),
    ('[[datasets]]\nresolution = 64\nbatch_size = "4"\n[[datasets.subsets]]\nimage_dir = "x"\n',
     "[[datasets]] #1: batch_size = '4' must be an integer"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n', "[[datasets]] #1 subset #1: image_dir is required"),
    ('[[datasets]]\nresolution = 64\n', "[[datasets]] #1 has no [[datasets.subsets]]"),
    ('[general]\nresolution = 64\n', "no [[datasets]]"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nis_reg = "yes"\n', "is_reg = 'yes' must be true/false"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nshuffle_caption = 1\n', "shuffle_caption = 1 must be true/false"),
    ('[datasets]\nresolution = 64\n', "no [[datasets]]"),
    ('[extra]\n', "top level: unknown key 'extra'"),
    ('[[datasets]\n', "not valid TOML"),
])
def test_readable_errors(tmp_path: Path, text: str, message: str):
    cfg = _config(tmp_path, text)
    with pytest.raises((InvalidFileError, UsageError)) as info:
        build_blueprint(cfg)
    assert message in str(info.value) and "dataset.toml" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n', "no resolution"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\nmetadata_file = "m.json"\n',
     "fine-tuning metadata subsets are not supported"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = 0\n', "num_repeats = 0 must be >= 1"),
    ('[[datasets]]\nresolution = 1024\nenable_bucket = true\nmax_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = "x"\n',
     "must contain the resolution"),
    ('[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 16\nbucket_reso_steps = 32\n'
     '[[datasets.subsets]]\nimage_dir = "x"\n', "min_bucket_reso rounds to 0"),
])
def test_usage_errors(tmp_path: Path, text: str, message: str):
    with pytest.raises(UsageError, match=message):
        build_blueprint(_config(tmp_path, text))


def test_missing_image_dir_names_the_folder(tmp_path: Path):
    cfg = _config(tmp_path, f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "nope"}"\n')
    with pytest.raises(InvalidFileError, match="image folder not found"):
        build_layouts(cfg)
