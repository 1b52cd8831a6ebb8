"""`merge --to-lora` of inputs spelled differently: one module per base weight, summed exactly, with
diffusers as the client (issue 13); at full scale, the PEFT + kohya SDXL fixtures merge into one
module per weight (the 560 attention layers both name are written once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools.adapters import describe_header
from loratools.io import read_header
from loratools.keys.index import BaseIndex
from loratools.keys.naming import unet_spelling
from loratools.tiny import build_pipeline, make_lora, render

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 5e-5


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def inputs(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("naming")
    return {
        "peft": make_lora(tiny_sdxl, "sdxl", "lora", rank=4, alpha=4.0, naming="peft", seed=1, dtype=torch.float32,
                          strength=0.4, path=d / "peft.safetensors").path,
        "sgm": make_lora(tiny_sdxl, "sdxl", "locon", rank=2, alpha=1.0, seed=2, dtype=torch.float32, strength=0.4,
                         path=d / "sgm.safetensors").path,
        "diffusers": make_lora(tiny_sdxl, "sdxl", "lora", rank=3, alpha=3.0, naming="kohya_diffusers", seed=3,
                               dtype=torch.float32, strength=0.4, path=d / "dif.safetensors").path,
    }


def _two_adapters(a: Path, wa: float, b: Path, wb: float) -> np.ndarray:
    pipe = build_pipeline("sdxl", seed=0)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [wa, wb])
    return render(pipe)


def _one(path: Path) -> np.ndarray:
    pipe = build_pipeline("sdxl", seed=0)
    pipe.load_lora_weights(str(path))
    return render(pipe)


@pytest.mark.parametrize("a,b", [("peft", "sgm"), ("sgm", "diffusers")])
def test_merged_file_equals_loading_the_inputs_one_after_another(inputs, tiny_sdxl_ckpt, tmp_path, a, b):
    out = tmp_path / "merged.safetensors"
    proc = _run("merge", "--to-lora", f"{inputs[a]}:0.7", f"{inputs[b]}:0.5", "--base", tiny_sdxl_ckpt,
                "--dtype", "fp32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    # one module per base weight, in kohya SGM spelling; every loader maps every key of it
    header = describe_header(read_header(out).tensors)
    index = BaseIndex.from_key_shapes({k: tuple(v.shape) for k, v in read_header(tiny_sdxl_ckpt).tensors.items()})
    targets = [index.resolve(n) for n in header.modules]
    assert None not in targets and len(set(targets)) == len(targets)
    assert all(unet_spelling(n) in (None, "sgm") for n in header.modules)
    check = _run("check", "keys", out, "--base", tiny_sdxl_ckpt, "--loader", "all", "--json")
    assert check.returncode == 0, check.stdout[-2000:]
    assert all(r["ok"] for r in json.loads(check.stdout)["loaders"].values())
    # diffusers as the client: the merged file draws what the two inputs draw together
    merged, together = _one(out), _two_adapters(inputs[a], 0.7, inputs[b], 0.5)
    assert np.abs(merged - render(build_pipeline("sdxl", seed=0))).max() > 1e-2  # the LoRAs do something
    assert np.abs(merged - together).max() < TOLERANCE


def test_custom_layout_with_two_spellings_needs_the_base(inputs, tmp_path):
    # the tiny UNet is not the released SDXL: its SGM names cannot be related to diffusers names
    out = tmp_path / "merged.safetensors"
    proc = _run("merge", "--to-lora", inputs["peft"], inputs["sgm"], "-o", out)
    assert proc.returncode == 2 and "--base" in proc.stderr and "lora_unet_input_blocks" in proc.stderr
    assert not out.exists()
    # one spelling only (PEFT paths are the same in every layout): no base needed, kohya names out
    proc = _run("merge", "--to-lora", inputs["peft"], inputs["diffusers"], "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te"))
               for n in describe_header(read_header(out).tensors).modules)


def _fixture_file(name: str, path: Path, dtype=torch.float16) -> Path:
    from loratools.io import save_tensors

    data = json.loads((FIXTURES / name).read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.tensor(4.0) if k.endswith(".alpha") else torch.randn(v["shape"], generator=g).to(dtype) * 0.01)
               for k, v in data["tensors"].items()}
    save_tensors(path, tensors, data.get("metadata"))
    return path


def test_full_scale_peft_and_kohya_sdxl_merge_into_one_module_per_weight(tmp_path):
    from loratools.ops.merge import LoraMergeOptions, WeightedPath, merge_loras

    peft = _fixture_file("lora_peft_sdxl.json", tmp_path / "peft.safetensors", torch.float32)
    kohya = _fixture_file("lora_kohya_sdxl_lora.json", tmp_path / "kohya.safetensors")
    out = tmp_path / "merged.safetensors"
    result = merge_loras(LoraMergeOptions([WeightedPath(peft, 1.0), WeightedPath(kohya, 1.0)], out))
    names = set(describe_header(read_header(out).tensors).modules)
    kohya_names = set(describe_header(read_header(kohya).tensors).modules)
    assert names == kohya_names and result.modules == 986  # was 986 + 560 duplicates
    ranks = {n: s.rank for n, s in describe_header(read_header(out).tensors).modules.items()}
    assert sum(r == 16 for r in ranks.values()) == 736  # the layers both inputs change: ranks 8 + 8
