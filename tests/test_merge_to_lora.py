"""``loratools merge --to-lora``: real files, the real program, deltas checked against the inputs'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loratools.adapters import load_adapter
from loratools.io import read_header
from loratools.tiny import make_lora


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loratools", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_loras(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("to_lora")
    a = make_lora(tiny_sd1, "sd1", "locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=1,
                  path=folder / "a.safetensors")
    b = make_lora(tiny_sd1, "sd1", "lora", rank=8, alpha=8.0, seed=2, text_encoders=False,
                  path=folder / "b,c.safetensors")
    return a.path, b.path


def test_concat_merge_delta_is_the_weighted_sum(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "ab.safetensors"
    proc = _run("--to-lora", f"{a}:0.7", f"{b}:-0.4", "-o", out, "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fa, fb, fo = load_adapter(a), load_adapter(b), load_adapter(out)
    assert set(fo.modules) == set(fa.modules) | set(fb.modules)
    assert report["modules"] == len(fo.modules)
    only_a = set(fa.modules) - set(fb.modules)
    assert only_a and any("conv" in n for n in only_a)  # LoCon 3x3 layers exist in one input only
    for name, module in fo.modules.items():
        want = sum(w * f.modules[name].delta().double() for w, f in ((0.7, fa), (-0.4, fb)) if name in f.modules)
        got = module.delta().double()
        assert module.rank == sum(f.modules[name].rank for f in (fa, fb) if name in f.modules)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), name
    meta = read_header(out).metadata
    assert meta["sshs_model_hash"] and meta["ss_network_dim"] == "12"
    assert json.loads(meta["loratools.merge"])["adapters"][1]["ratio"] == -0.4
    assert "a" in meta["modelspec.merged_from"]


def test_fp16_output_stays_close(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "ab16.safetensors"
    proc = _run("--to-lora", a, b, "--ratio", "0.5,0.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "applied" in proc.stdout.strip().splitlines()[-1]
    fa, fb, fo = load_adapter(a), load_adapter(b), load_adapter(out)
    name = next(n for n in fo.modules if n in fa.modules and n in fb.modules)
    want = 0.5 * fa.modules[name].delta() + 0.5 * fb.modules[name].delta()
    assert fo.modules[name].up.dtype == torch.float16
    assert (fo.modules[name].delta() - want).abs().max() <= 2e-3 * want.abs().max()


def test_to_lora_refuses_missing_input_and_existing_output(two_loras, tmp_path):
    a, _ = two_loras
    proc = _run("--to-lora", a, tmp_path / "missing.safetensors", "-o", tmp_path / "x.safetensors")
    assert proc.returncode == 2 and "missing.safetensors" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()
    proc = _run("--to-lora", a, "-o", a)
    assert proc.returncode == 2 and "input" in proc.stderr


def test_recipe_recompresses_through_the_resize_engine(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "ab-r4.safetensors"
    proc = _run("--to-lora", f"{a}:0.7", f"{b}:0.5", "-r", "rank=4", "--dtype", "fp32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temp combination is gone
    fa, fb, fo = load_adapter(a), load_adapter(b), load_adapter(out)
    name = next(n for n in fo.modules if n in fa.modules and n in fb.modules)
    exact = (0.7 * fa.modules[name].delta() + 0.5 * fb.modules[name].delta()).double()
    U, S, Vh = torch.linalg.svd(exact.flatten(1), full_matrices=False)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    got = fo.modules[name].delta().double().flatten(1)
    assert fo.modules[name].rank == 4
    assert torch.allclose(got, best, atol=1e-5 * S[0].item())
