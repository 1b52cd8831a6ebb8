"""Bad inputs to ``loratools merge``: one clear line on stderr, exit code 2, no file left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loratools.io import save_tensors
from loratools.tiny import make_lora, save_single_file


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loratools", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def inputs(tiny_sd1, tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_errors")
    base16 = save_single_file(tiny_sd1, folder / "sd1-fp16.safetensors", torch.float16)
    sdxl = save_single_file(tiny_sdxl, folder / "sdxl.safetensors", torch.float16)
    lora = make_lora(tiny_sd1, "sd1", "lora", seed=5, path=folder / "sd1-lora.safetensors")
    extra = dict(lora.tensors)
    extra["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 32, dtype=torch.float16)
    extra["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(32, 4, dtype=torch.float16)
    save_tensors(folder / "extra.safetensors", extra, lora.metadata)
    nan = dict(lora.tensors)
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_tensors(folder / "nan.safetensors", nan, lora.metadata)
    return {"base": base16, "sdxl": sdxl, "lora": lora.path, "extra": folder / "extra.safetensors",
            "nan": folder / "nan.safetensors", "nan_key": key.split(".")[0]}


def _left(folder):
    return sorted(p.name for p in folder.iterdir())


def test_missing_files(inputs, tmp_path):
    out = tmp_path / "out.safetensors"
    proc = _run(tmp_path / "nope.safetensors", inputs["lora"], "-o", out)
    assert proc.returncode == 2 and "nope.safetensors" in proc.stderr and "not found" in proc.stderr
    proc = _run(inputs["base"], tmp_path / "gone.safetensors:0.5", "-o", out)
    assert proc.returncode == 2 and "gone.safetensors" in proc.stderr
    assert _left(tmp_path) == []


def test_architecture_mismatch(inputs, tmp_path):
    proc = _run(inputs["sdxl"], inputs["lora"], "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2
    assert "sd1" in proc.stderr and "sdxl" in proc.stderr
    assert _left(tmp_path) == []


def test_unmatched_modules_are_refused_then_allowed(inputs, tmp_path):
    out = tmp_path / "out.safetensors"
    proc = _run(inputs["base"], inputs["extra"], "-o", out)
    assert proc.returncode == 2 and "lora_unet_no_such_layer" in proc.stderr and "--allow-unmatched" in proc.stderr
    assert _left(tmp_path) == []
    proc = _run(inputs["base"], inputs["extra"], "-o", out, "--allow-unmatched")
    assert proc.returncode == 0, proc.stderr
    assert "lora_unet_no_such_layer" in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    applied, modules = last.split("applied ")[1].split()[0].split("/")
    assert int(modules) == int(applied) + 1


def test_nan_in_a_lora(inputs, tmp_path):
    proc = _run(inputs["base"], inputs["nan"], "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2 and "NaN" in proc.stderr and inputs["nan_key"] in proc.stderr
    assert _left(tmp_path) == []


def test_overflow_while_writing_leaves_nothing(inputs, tmp_path):
    # fp16 overflow is only seen while streaming (after the header is written): the temp file must go
    proc = _run(inputs["base"], f"{inputs['lora']}:1e6", "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2 and "overflows" in proc.stderr
    assert _left(tmp_path) == []


def test_unwritable_or_protected_output(inputs, tmp_path):
    proc = _run(inputs["base"], inputs["lora"], "-o", tmp_path / "missing-dir" / "out.safetensors")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = _run(inputs["base"], inputs["lora"], "-o", inputs["base"], "--overwrite")
    assert proc.returncode == 2 and "input" in proc.stderr
    proc = _run(inputs["base"], inputs["lora"], "-o", tmp_path / "out.ckpt")
    assert proc.returncode == 2 and ".safetensors" in proc.stderr
    assert _left(tmp_path) == []
