"""``loratools merge BASE LORA:RATIO -o OUT`` against a real client.

The reference is diffusers: the tiny base pipeline with the LoRA loaded by ``load_lora_weights`` at
the same ratio. The merged checkpoint (a single file, or a diffusers folder) must render the same
image (float32 CPU, ~1e-5). The LoRAs are LoCon, so 3x3 resnet convs are covered; the SDXL case
covers TE2's q/k/v row slices of the fused ``in_proj_weight``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from loratools.io import open_model, read_header
from loratools.tiny import build_pipeline, load_diffusers, make_lora, render, save_single_file
from loratools.tiny.files import load_single_file

RATIO = 0.7


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loratools", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def _reference_image(arch, lora_path):
    pipe = build_pipeline(arch, seed=0)
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    pipe.set_adapters(["x"], [RATIO])
    return render(pipe)


@pytest.fixture(scope="module")
def files(tiny_sd1, tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_ckpt")
    out = {}
    for arch, pipe in (("sd1", tiny_sd1), ("sdxl", tiny_sdxl)):
        out[arch, "base"] = save_single_file(pipe, folder / f"{arch}.safetensors")
        out[arch, "lora"] = make_lora(pipe, arch, "locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=3,
                                      path=folder / f"{arch}-locon.safetensors").path
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_merge_renders_like_load_lora_weights(files, arch, tmp_path):
    out = tmp_path / "merged.safetensors"
    proc = _run(files[arch, "base"], f"{files[arch, 'lora']}:{RATIO}", "-o", out, "--verify")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "applied" in last and last.split("applied ")[1].split()[0].split("/")[0] == \
        last.split("applied ")[1].split()[0].split("/")[1]
    merged = render(load_single_file(out, arch))
    reference = _reference_image(arch, files[arch, "lora"])
    base = render(build_pipeline(arch, seed=0))
    assert np.abs(reference - base).max() > 1e-2  # the LoRA does change the image
    assert np.abs(merged - reference).max() < 1e-4
    # every key of the base is written, in its dtype; metadata records the LoRA and its ratio
    base_header, out_header = read_header(files[arch, "base"]), read_header(out)
    assert {k: (t.dtype, t.shape) for k, t in base_header.tensors.items()} == \
        {k: (t.dtype, t.shape) for k, t in out_header.tensors.items()}
    prov = json.loads(out_header.metadata["loratools.merge"])
    assert prov["adapters"][0]["ratio"] == RATIO and len(prov["adapters"][0]["sha256"]) == 64
    assert out_header.metadata["modelspec.title"] == "merged"


def test_diffusers_folder_merge_renders_like_load_lora_weights(tiny_sd1_dir, files, tmp_path):
    out = tmp_path / "merged-folder"
    proc = _run(tiny_sd1_dir, files["sd1", "lora"], "--ratio", str(RATIO), "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layout"] == "diffusers" and report["adapters"][0]["applied"] == report["adapters"][0]["modules"]
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    assert set(open_model(out).components) == set(open_model(tiny_sd1_dir).components)
    merged = render(load_diffusers(out))
    assert np.abs(merged - _reference_image("sd1", files["sd1", "lora"])).max() < 1e-4
