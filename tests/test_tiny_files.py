"""Tiny pipelines written to disk and read back give the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loratools.tiny import load_diffusers, render


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_folder_round_trip_reproduces_the_image(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    index = json.loads((folder / "model_index.json").read_text())
    expected = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[arch]
    assert index["_class_name"] == expected
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_diffusers(folder)
    assert type(loaded).__name__ == expected
    np.testing.assert_allclose(render(loaded), render(pipe), atol=1e-5)
