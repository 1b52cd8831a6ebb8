"""The adapter parser's warnings (a stored alpha of 0 read as scale 0) reach the merge user, and
``--json`` reports each written file's real sha256/AutoV2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from loratools.io import open_safetensors, save_tensors
from loratools.keys.index import BaseIndex
from loratools.ops.merge import LoraMergeOptions, MergeOptions, WeightedPath, merge_checkpoint, merge_loras
from loratools.tiny import make_lora


@pytest.fixture(scope="module")
def zero_alpha(tiny_sd1, tmp_path_factory):
    """A LoRA whose first module stores alpha 0 (hand-edited files do; kohya never writes it)."""
    folder = tmp_path_factory.mktemp("merge_warnings")
    lora = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2.0, seed=3, dtype=torch.float32)
    tensors = dict(lora.tensors)
    alpha_key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[alpha_key] = torch.zeros((), dtype=tensors[alpha_key].dtype)
    path = folder / "zero.safetensors"
    save_tensors(path, tensors, lora.metadata)
    return path, alpha_key.removesuffix(".alpha"), lora


def test_checkpoint_merge_reports_alpha_zero(zero_alpha, tiny_sd1_ckpt, tmp_path):
    path, module, lora = zero_alpha
    out = tmp_path / "merged.safetensors"
    result = merge_checkpoint(MergeOptions(tiny_sd1_ckpt, [WeightedPath(path, 1.0)], out))
    assert any(w.startswith(f"zero.safetensors: 1 module(s) store alpha 0 (first: {module})")
               for w in result.warnings)
    key = BaseIndex.from_key_shapes(open_safetensors(tiny_sd1_ckpt).key_shapes()).resolve(module).key
    assert torch.equal(open_safetensors(out)[key], open_safetensors(tiny_sd1_ckpt)[key])  # scale 0: unchanged
    assert result.adapters[0].applied == len(lora.targets)


def test_to_lora_reports_alpha_zero(zero_alpha, tmp_path):
    path, module, _ = zero_alpha
    result = merge_loras(LoraMergeOptions([WeightedPath(path, 1.0)], tmp_path / "one.safetensors"))
    assert any(w.startswith("zero.safetensors: 1 module(s) store alpha 0") and module in w for w in result.warnings)


def test_cli_prints_the_warning_and_json_hashes(zero_alpha, tiny_sd1_ckpt, tmp_path):
    path, module, _ = zero_alpha
    merge = [sys.executable, "-m", "loratools", "merge", str(tiny_sd1_ckpt), str(path), "-o"]
    plain = subprocess.run([*merge, str(tmp_path / "a.safetensors")], capture_output=True, text=True, timeout=180)
    assert plain.returncode == 0, plain.stderr
    assert "warning:" in plain.stderr and "store alpha 0" in plain.stderr and module in plain.stderr
    as_json = subprocess.run([*merge, str(tmp_path / "b.safetensors"), "--json"], capture_output=True, text=True,
                             timeout=180)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert any("store alpha 0" in w for w in doc["warnings"])
    (entry,) = doc["files"]
    sha = hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).hexdigest()
    assert entry["sha256"] == sha and entry["autov2"] == sha[:10]
