"""resize writes kohya names whatever the input's naming (issue 13), chosen by `loratools.keys`:
diffusers loads them exactly, ComfyUI and A1111 load every key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.adapters import load_adapter
from loratools.io import open_safetensors
from loratools.keys.naming import unet_spelling
from loratools.ops.check_keys import CheckKeysOptions, check_keys
from loratools.ops.resize.engine import Resizer
from loratools.tiny import build_pipeline, make_lora, render


def _image(path) -> np.ndarray:
    pipe = build_pipeline("sdxl", seed=0)
    pipe.load_lora_weights(str(path))
    return render(pipe)


@pytest.mark.parametrize("naming", ["peft", "kohya_diffusers"])
def test_resized_file_has_sgm_kohya_names_and_draws_the_inputs_image(naming, tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    src = tmp_path / f"{naming}.safetensors"
    make_lora(tiny_sdxl, "sdxl", "lora", rank=4, alpha=4.0, naming=naming, dtype=torch.float32, strength=0.5, path=src)
    (o,) = Resizer(tiny_sdxl_ckpt, cache_dir=None).resize(src, "fro_ckpt=1,thr=-20", output=tmp_path,
                                                           dtype="fp32").outcomes
    names = list(load_adapter(o.path).modules)
    assert names and all(unet_spelling(n) in (None, "sgm") for n in names)  # SDXL UNet by SGM path
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in open_safetensors(o.path))
    report = check_keys(CheckKeysOptions(o.path, tiny_sdxl_ckpt, loaders=("all",)))
    assert report.ok, report.problems()
    assert np.abs(_image(o.path) - _image(src)).max() < 5e-5


def test_without_a_base_layout_free_names_are_kept(tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    # no checkpoint: the tiny model's layout is unknown, so its modules keep their diffusers-path
    # kohya names (right in every layout) rather than the released SDXL's SGM numbering
    src = tmp_path / "peft.safetensors"
    made = make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", dtype=torch.float32, path=src)
    (o,) = Resizer(None).resize(src, "rank=2", output=tmp_path).outcomes
    names = set(load_adapter(o.path).modules)
    assert len(names) == len(made.targets) and all(unet_spelling(n) in (None, "diffusers") for n in names)
    assert check_keys(CheckKeysOptions(o.path, tiny_sdxl_ckpt)).ok
