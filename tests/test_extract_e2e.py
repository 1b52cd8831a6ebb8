"""`loratools extract` end to end on tiny real models (issue 16, item 1).

The tuned model is the base plus a known LoCon (merged by `merge`), so the difference is known
exactly: extracting at its full rank must give it back (to fp16 rounding), at a lower rank with
exactly the Eckart-Young error; diffusers must render the tuned model and base + extracted LoRA
alike; the file must load in ComfyUI, A1111 and diffusers by their key rules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from loratools.adapters import load_adapter
from loratools.cli.app import app
from loratools.io import open_safetensors, read_header
from loratools.ops.extract import ExtractOptions, extract
from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
from loratools.tiny import build_pipeline, load_single_file, make_lora, render


def _tuned(pipe, arch, base, folder, **kw):
    truth = make_lora(pipe, arch, "locon", rank=4, alpha=2.0, seed=3, dtype=torch.float32,
                      path=folder / f"truth-{arch}.safetensors", **kw)
    out = folder / (f"tuned-{arch}" + ("" if base.is_dir() else ".safetensors"))
    merge_checkpoint(MergeOptions(base, [WeightedPath(truth.path, 1.0)], out))
    return out, truth


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tiny_sd1_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract_sd1")
    tuned, truth = _tuned(tiny_sd1, "sd1", tiny_sd1_ckpt, folder)
    return tiny_sd1_ckpt, tuned, truth


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tiny_sdxl_ckpt, tiny_sdxl_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract_sdxl")
    tuned_dir, truth = _tuned(tiny_sdxl, "sdxl", tiny_sdxl_dir, folder)  # tuned as a diffusers folder
    return tiny_sdxl_ckpt, tuned_dir, truth


def _deltas(path):
    return {name: m.delta() for name, m in load_adapter(path).modules.items()}


def test_full_rank_recovers_the_delta(sd1, tmp_path):
    base, tuned, truth = sd1
    out = tmp_path / "x.safetensors"
    result = extract(ExtractOptions(tuned, base, out, recipe="rank=4"))
    got = _deltas(out)
    assert set(got) == set(truth.targets)  # the LoCon's every module, TE included, kohya names
    worst = max(float((got[n].reshape(t.delta.shape) - t.delta).norm() / t.delta.norm())
                for n, t in truth.targets.items())
    assert worst < 2e-3  # fp16 factors
    assert result.kept == pytest.approx(1.0, abs=1e-6)
    assert {t.dtype for t in read_header(out).tensors.values()} == {"F16", "F32"}  # factors fp16, alphas fp32
    meta = read_header(out).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == base.name
    assert meta["ss_new_sd_model_hash"] and meta["sshs_model_hash"]
    prov = json.loads(meta["loratools"])
    assert prov["operation"] == "extract" and prov["tuned"]["file"] == tuned.name


def test_lower_rank_error_is_the_optimum(sd1, tmp_path):
    base, tuned, truth = sd1
    out = tmp_path / "r2.safetensors"
    result = extract(ExtractOptions(tuned, base, out, recipe="rank=2", dtype="fp32"))
    got = _deltas(out)
    reports = {r.name: r for r in result.layers}
    for name, t in truth.targets.items():
        d = t.delta.reshape(t.delta.shape[0], -1).double()
        s = torch.linalg.svdvals(d)
        expected = float(s[2:].norm())  # Eckart-Young: the best rank-2 error
        err = float((got[name].reshape(d.shape).double() - d).norm())
        assert err == pytest.approx(expected, rel=1e-3, abs=1e-7), name
        assert reports[name].kept == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-4)


def test_sdxl_any_layout_mix_gives_the_same_file(sdxl, tiny_sdxl_dir, tmp_path):
    base_file, tuned_dir, truth = sdxl
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    extract(ExtractOptions(tuned_dir, base_file, a, recipe="rank=4"))  # diffusers folder vs single file
    extract(ExtractOptions(tuned_dir, tiny_sdxl_dir, b, recipe="rank=4"))  # folder vs folder
    fa, fb = open_safetensors(a), open_safetensors(b)
    assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    names = set(_deltas(a))
    assert names == set(truth.targets)  # SGM UNet names, lora_te1_/lora_te2_ (TE2 q/k/v from fused rows too)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names) and any(n.startswith("lora_te2_") for n in names)


@pytest.mark.parametrize(("ckpt", "scope"), [("ckpt_sd15_single_file.json", "all"),
                                           ("ckpt_sdxl_single_file.json", "all"),
                                           ("ckpt_sdxl_single_file.json", "attn")])
def test_names_load_in_comfyui_a1111_and_diffusers_at_full_scale(ckpt, scope):
    """What extract writes for the real SD1.5 / SDXL key lists (meta tensors: no data), by the
    loaders' own key rules. (The tiny models' 2-level UNet does not fit A1111's SD1 block arithmetic,
    so full scale is where A1111 can be checked.)"""
    from pathlib import Path

    from loratools.adapters import describe_header
    from loratools.io.checkpoint import ModelSource
    from loratools.keys.index import BaseIndex
    from loratools.keys.loaders import check_loader
    from loratools.ops.check_keys import file_modules
    from loratools.ops.extract.pairs import pair_models

    data = json.loads((Path(__file__).parent / "fixtures" / ckpt).read_text())
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in data["tensors"].items()}
    model = ModelSource(Path(ckpt), "single_file", {"": sd})
    pairing = pair_models(model, model, scope)
    shapes = {}
    for p in pairing.pairs:
        r = 8
        shapes[f"{p.name}.lora_down.weight"] = (r, *p.shape[1:])
        shapes[f"{p.name}.lora_up.weight"] = (p.shape[0], r, 1, 1) if len(p.shape) == 4 else (p.shape[0], r)
        shapes[f"{p.name}.alpha"] = ()
    assert not pairing.missing and len(pairing.pairs) > 100
    index = BaseIndex.from_key_shapes({k: tuple(v["shape"]) for k, v in data["tensors"].items()})
    modules = file_modules(shapes, {}, describe_header(shapes, {}))
    for loader in ("comfyui", "a1111", "diffusers"):
        report = check_loader(loader, list(shapes), modules, index)
        assert report.ok and report.loaded == len(shapes), (loader, report.skipped[:3])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_renders_tuned_and_base_plus_lora_alike(arch, request, tmp_path):
    base, tuned, _ = request.getfixturevalue(arch)
    out = tmp_path / "x.safetensors"
    extract(ExtractOptions(tuned, base, out, recipe="rank=4", dtype="fp32"))
    tuned_pipe = load_single_file(tuned, arch) if tuned.is_file() else None
    if tuned_pipe is None:
        from loratools.tiny import load_diffusers

        tuned_pipe = load_diffusers(tuned)
    want = render(tuned_pipe)
    pipe = build_pipeline(arch, seed=0)
    plain = render(pipe)
    pipe.load_lora_weights(str(out))
    got = render(pipe)
    assert np.abs(want - plain).max() > 1e-2  # the fine-tune visibly changes the image
    assert np.abs(got - want).max() < 1e-4


def test_unchanged_text_encoder_is_left_out(tiny_sd1, tiny_sd1_ckpt, tmp_path):
    tuned, _ = _tuned(tiny_sd1, "sd1", tiny_sd1_ckpt, tmp_path, text_encoders=False)
    out = tmp_path / "x.safetensors"
    result = extract(ExtractOptions(tuned, tiny_sd1_ckpt, out, recipe="rank=2", min_diff=0.0))
    [te] = result.text_encoders
    assert te.label == "TE1" and not te.included and te.max_diff == 0.0
    assert not any(k.startswith("lora_te") for k in read_header(out).tensors)
    assert json.loads(read_header(out).metadata["loratools"])["text_encoders"] == {"TE1": False}


def test_size_recipe_fits_the_budget(sd1, tmp_path):
    base, tuned, _ = sd1
    out = tmp_path / "s.safetensors"
    result = extract(ExtractOptions(tuned, base, out, recipe="size=0.05"))
    assert out.stat().st_size <= 0.05 * (1 << 20)
    assert result.threshold is not None and 0 < len(result.written) < len(result.layers) + 1
    bigger = extract(ExtractOptions(tuned, base, tmp_path / "t.safetensors", recipe="size=0.1"))
    assert sum(r.rank for r in bigger.written) > sum(r.rank for r in result.written)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_sd_scripts_command_line_and_json(sd1, tmp_path):
    base, tuned, _ = sd1
    r = invoke("extract", "--model_org", base, "--model_tuned", tuned, "--save_to", tmp_path / "k.safetensors",
               "--dim", 3, "--conv_dim", 2, "--sdxl", "--load_precision", "fp16")
    assert r.exit_code == 0, r.output
    assert "--sdxl changes nothing" in r.stderr and "--load_precision changes nothing" in r.stderr
    r = invoke("extract", tuned, base, "-o", tmp_path / "o.safetensors", "-r", "rank=3,conv_rank=2", "--json")
    assert r.exit_code == 0, r.output
    a, b = open_safetensors(tmp_path / "k.safetensors"), open_safetensors(tmp_path / "o.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    data = json.loads(r.stdout)
    assert data["components"]["UNet"]["rank_max"] == 3 and len(data["layers"]) == len(data["layers"])
    assert {row["route"] for row in data["layers"]} == {"exact"}
    r = invoke("extract", "--model_org", base, "--model_tuned", tuned, "--save_to", tmp_path / "a.safetensors")
    assert r.exit_code == 0 and "sd-scripts' --dim default" in r.stderr  # sd-scripts' rank 4, attention only
    assert not any("resnets" in k for k in read_header(tmp_path / "a.safetensors").tensors)


def test_bad_input_is_one_line_and_writes_nothing(sd1, tiny_sdxl_ckpt, tmp_path, monkeypatch, capsys):
    from loratools.cli.app import main

    base, tuned, _ = sd1

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["loratools", "extract", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        return exc.value.code, capsys.readouterr().err

    out = tmp_path / "x.safetensors"
    for args, words in (((base, base), "nothing to extract"), ((tuned, base, "-r", "rank=2:rank=3"), "one recipe"),
                        ((tuned, tmp_path / "missing.safetensors"), "not found")):
        code, err = run(*args, "-o", out)
        assert code == 2 and err.strip().count("\n") == 0 and words in err, err
        assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    out.write_bytes(b"keep")
    code, err = run(tuned, base, "-o", out)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"keep"
    # a real process: another architecture, one line, exit 2, no traceback
    r = subprocess.run([sys.executable, "-m", "loratools", "extract", str(tuned), str(tiny_sdxl_ckpt), "-o",
                        str(tmp_path / "y.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "SDXL" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "y.safetensors").exists()


def test_clamp_quantile_reports_what_it_costs(sd1, tmp_path):
    """sd-scripts' clamp is lossy: the kept share reported is the file's own, measured against D."""
    base, tuned, truth = sd1
    out = tmp_path / "c.safetensors"
    result = extract(ExtractOptions(tuned, base, out, recipe="rank=4", dtype="fp32", clamp_quantile=0.9))
    got = _deltas(out)
    for r in result.layers:
        d = truth.targets[r.name].delta.reshape(r.shape[0], -1).double()
        err = float((got[r.name].reshape(d.shape).double() - d).norm())
        assert r.kept == pytest.approx((1 - (err / float(d.norm())) ** 2) ** 0.5, abs=1e-4), r.name
    assert min(r.kept for r in result.layers) < 0.99  # the clamp cut something off
