"""convert on real files: every module's delta survives both directions; metadata carried over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loratools.adapters import load_adapter
from loratools.errors import InvalidFileError, OutputExistsError, UsageError
from loratools.io.reader import open_safetensors
from loratools.io.writer import save_tensors
from loratools.keys.index import BaseIndex
from loratools.ops.convert import ConvertOptions, convert
from loratools.tiny import make_lora


def _index(pipe, arch: str) -> BaseIndex:
    tes = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    return BaseIndex.from_modules(arch, pipe.unet, tes)


def _by_path(adapter, index) -> dict:
    """module -> (component, diffusers path) through the vocabulary of the live model."""
    out = {}
    for name, m in adapter.modules.items():
        info = index.info(index.resolve(name))
        out[info.component, info.path] = m
    return out


# arch, kind, naming of the source file
SOURCES = [
    ("sd1", "locon", "kohya_diffusers"), ("sd1", "lora", "peft"), ("sd1", "loha", "kohya"),
    ("sdxl", "locon", "kohya"), ("sdxl", "lora", "kohya_diffusers"), ("sdxl", "locon", "peft"),
    ("sdxl", "lokr", "kohya"), ("sdxl", "dora", "kohya"),
]


def _live_weight(pipe, component: str, path: str) -> torch.Tensor:
    """The pipeline's weight for a module path (transformers 5 CLIPTextModel has no `text_model.`)."""
    model = getattr(pipe, component)
    try:
        return model.get_submodule(path).weight.detach().float()
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model.")).weight.detach().float()


@pytest.fixture(scope="module")
def pipes(tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}


@pytest.mark.parametrize("arch,kind,naming", SOURCES, ids=["-".join(s) for s in SOURCES])
def test_deltas_survive_conversion(pipes, tiny_sd1_dir, tiny_sdxl_dir, tmp_path, arch, kind, naming):
    pipe = pipes[arch]
    base = {"sd1": tiny_sd1_dir, "sdxl": tiny_sdxl_dir}[arch]
    table = _index(pipe, arch)
    src = tmp_path / "src.safetensors"
    made = make_lora(pipe, arch, kind, rank=4, alpha=2.0, naming=naming, path=src)
    original = _by_path(load_adapter(src), table)
    targets = ("kohya", "peft") if kind in ("lora", "locon") else ("kohya",)
    for to in targets:
        out = tmp_path / f"out_{to}.safetensors"
        result = convert(ConvertOptions(src, out, to, base=base))
        converted = load_adapter(out)
        assert converted.unknown == {} and result.modules == len(made.targets)
        assert converted.naming == to
        if to == "kohya" and arch == "sdxl":
            assert all(not n.startswith("lora_unet_") or "_blocks_" not in n.split("lora_unet_")[1][:12]
                       for n in converted.modules)  # SGM names: input_blocks / middle_block / output_blocks
        again = _by_path(converted, table)
        assert again.keys() == original.keys()
        bad = []
        for where, m in original.items():
            w = _live_weight(pipe, *where) if m.needs_base else None
            expected = m.delta(w)
            if not torch.allclose(again[where].delta(w).reshape(expected.shape), expected, rtol=1e-3, atol=1e-6):
                bad.append(where)
        assert bad == [], (to, bad[:3])


def test_metadata_carried_and_hashes_recomputed(tiny_sdxl, tmp_path):
    src = tmp_path / "src.safetensors"
    made = make_lora(tiny_sdxl, "sdxl", "lora", naming="kohya_diffusers", path=src)
    out = tmp_path / "out.safetensors"
    convert(ConvertOptions(src, out, "kohya", arch="sdxl"))
    md = open_safetensors(out).metadata
    for k, v in made.metadata.items():
        assert md[k] == v
    assert len(md["sshs_model_hash"]) == 64 and "sshs_legacy_hash" in md
    peft = tmp_path / "peft.safetensors"
    convert(ConvertOptions(out, peft, "peft", arch="sdxl"))
    md2 = open_safetensors(peft).metadata
    assert md2["format"] == "pt" and "sshs_model_hash" not in md2 and md2["ss_output_name"] == made.metadata["ss_output_name"]


def test_missing_alpha_is_written_as_rank(tiny_sd1, tmp_path):
    src = tmp_path / "peft.safetensors"
    make_lora(tiny_sd1, "sd1", "lora", naming="peft", path=src)
    out = tmp_path / "kohya.safetensors"
    convert(ConvertOptions(src, out, "kohya", arch="sd1"))
    sd = open_safetensors(out)
    for key in sd:
        if key.endswith(".alpha"):
            down = sd[key.replace(".alpha", ".lora_down.weight")]
            assert float(sd[key]) == down.shape[0]


def test_refusals(tiny_sd1, tmp_path):
    src = tmp_path / "loha.safetensors"
    make_lora(tiny_sd1, "sd1", "loha", path=src)
    with pytest.raises(UsageError, match="LoRA only") as refused:
        convert(ConvertOptions(src, tmp_path / "x.safetensors", "peft", arch="sd1"))
    assert refused.value.path == str(src)  # the CLI's one line names the file
    ckpt = tmp_path / "ckpt.safetensors"  # was: "cannot tell the adapter's architecture"
    save_tensors(ckpt, {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)})
    with pytest.raises(InvalidFileError, match="not a LoRA"):
        convert(ConvertOptions(ckpt, tmp_path / "x.safetensors", "kohya"))
    with pytest.raises(UsageError, match="--to"):
        ConvertOptions(src, tmp_path / "x.safetensors", "comfy")
    with pytest.raises(OutputExistsError):
        convert(ConvertOptions(src, src, "kohya", arch="sd1", overwrite=True))
    assert not (tmp_path / "x.safetensors").exists()


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cli_end_to_end(tiny_sdxl, tmp_path):
    src = tmp_path / "in.safetensors"
    make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", path=src)
    out = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, "-m", "loratools", "convert", str(src), "--to", "kohya", "-o", str(out),
                          "--arch", "sdxl", "--json"], capture_output=True, text=True, timeout=120, env=_ENV)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["to"] == "kohya" and doc["source_naming"] == "peft" and doc["modules"] > 0
    assert load_adapter(out).naming == "kohya"
    again = subprocess.run([sys.executable, "-m", "loratools", "convert", str(src), "--to", "kohya", "-o", str(out)],
                           capture_output=True, text=True, timeout=120, env=_ENV)
    assert again.returncode == 2 and "error:" in again.stderr and str(out) in again.stderr


def test_unknown_keys_and_outside_block_modules_are_kept_and_reported(tmp_path):
    src = tmp_path / "in.safetensors"
    save_tensors(src, {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
                       "lora_unet_conv_in.lora_up.weight": torch.ones(320, 2, 1, 1),
                       "lora_unet_conv_in.alpha": torch.tensor(1.0),
                       "bundle_emb.star.string_to_param.*": torch.ones(1, 768)}, {"ss_base_model_version": "sd_v1"})
    out = tmp_path / "out.safetensors"
    result = convert(ConvertOptions(src, out, "kohya"))
    assert result.arch == "sd1" and len(result.warnings) == 2
    assert "lora_unet_conv_in" in result.warnings[0] and "bundle_emb" in result.warnings[1]
    written = open_safetensors(out)
    assert "bundle_emb.star.string_to_param.*" in written and "lora_unet_conv_in.alpha" in written
    peft = convert(ConvertOptions(src, tmp_path / "peft.safetensors", "peft"))
    assert "unet.conv_in.lora_A.weight" in open_safetensors(peft.output) and len(peft.warnings) == 2
    assert "ComfyUI" in peft.warnings[0] and "A1111" in peft.warnings[0]  # PEFT names do not load there


def test_dtype_option_casts_float_tensors_only(tiny_sd1, tmp_path):
    src = tmp_path / "in.safetensors"
    made = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2.0, path=src)  # fp16 factors
    out = convert(ConvertOptions(src, tmp_path / "out.safetensors", "peft", arch="sd1", dtype="fp32")).output
    written = open_safetensors(out)
    assert {written[k].dtype for k in written} == {torch.float32}
    # scale 0.5 is a power of two: folding it into fp16 factors and widening to fp32 is exact
    peft = load_adapter(out).modules
    for name, m in load_adapter(src).modules.items():
        assert torch.equal(peft[name].delta(), m.delta()), name
    assert len(peft) == len(made.targets)


def test_a1111_scale_is_folded_and_alpha_zero_warned(tiny_sd1, tiny_sd1_dir, tmp_path):
    made = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2.0, dtype=torch.float32)
    names = sorted({k.partition(".")[0] for k in made.tensors})
    tensors = dict(made.tensors)
    tensors[f"{names[0]}.scale"] = torch.tensor(3.0)
    tensors[f"{names[1]}.alpha"] = torch.tensor(0.0)
    src = tmp_path / "in.safetensors"
    save_tensors(src, tensors, made.metadata)
    table = _index(tiny_sd1, "sd1")
    mine = _by_path(load_adapter(src), table)
    assert load_adapter(src).modules[names[0]].scale == 3.0
    for to in ("kohya", "peft"):
        out = tmp_path / f"{to}.safetensors"
        result = convert(ConvertOptions(src, out, to, base=tiny_sd1_dir))
        assert any("store alpha 0" in w for w in result.warnings) and result.unknown == []
        assert not any(k.endswith(".scale") for k in open_safetensors(out).keys())
        theirs = _by_path(load_adapter(out), table)
        for where, m in mine.items():
            torch.testing.assert_close(theirs[where].delta(), m.delta(), rtol=1e-6, atol=1e-7)


def test_peft_to_kohya_without_base_on_a_custom_layout_is_named_by_diffusers_paths(tiny_sdxl, tiny_sdxl_ckpt,
                                                                                   tmp_path):
    # issue 13: this exited 0 with SGM names from the released SDXL's table, of which only 121/155
    # applied to the tiny model. Diffusers paths name the same module in every layout: every module
    # applies, and a warning says the names could not be checked against the model
    from loratools.ops.check_keys import CheckKeysOptions, check_keys

    src = tmp_path / "peft.safetensors"
    make_lora(tiny_sdxl, "sdxl", "locon", naming="peft", path=src)
    out = tmp_path / "kohya.safetensors"
    result = convert(ConvertOptions(src, out, "kohya", arch="sdxl"))
    assert any("--base" in w and "diffusers path" in w for w in result.warnings)
    checked = check_keys(CheckKeysOptions(out, tiny_sdxl_ckpt, loaders=("comfyui", "diffusers")))
    assert checked.ok and checked.applied == result.modules == len(load_adapter(src).modules), checked.summary
    with_base = tmp_path / "kohya_base.safetensors"
    convert(ConvertOptions(src, with_base, "kohya", base=tiny_sdxl_ckpt))  # against the model: SGM names
    assert all(not n.startswith("lora_unet_") or n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                                               "lora_unet_output_blocks"))
               for n in load_adapter(with_base).modules)
    assert check_keys(CheckKeysOptions(with_base, tiny_sdxl_ckpt, loaders=("all",))).ok


def test_sgm_names_of_a_custom_layout_are_an_error_naming_the_module(tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    # issue 13 "no silent wrong conversion": an SGM name's module depends on the UNet's layout;
    # the tiny model's layout is not the released SDXL's, so without --base it cannot be resolved
    from loratools.errors import UnmatchedModulesError

    src = tmp_path / "sgm.safetensors"
    make_lora(tiny_sdxl, "sdxl", "lora", path=src)
    with pytest.raises(UnmatchedModulesError, match=r"lora_unet_input_blocks_\w+.*pass --base") as err:
        convert(ConvertOptions(src, tmp_path / "x.safetensors", "peft", arch="sdxl"))
    assert err.value.path == str(src) and not (tmp_path / "x.safetensors").exists()
    run = subprocess.run([sys.executable, "-m", "loratools", "convert", str(src), "--to", "peft", "-o",
                          str(tmp_path / "x.safetensors"), "--arch", "sdxl"], capture_output=True, text=True,
                         timeout=120, env=_ENV)
    assert run.returncode == 2 and "lora_unet_input_blocks" in run.stderr and "--base" in run.stderr
    assert convert(ConvertOptions(src, tmp_path / "y.safetensors", "peft", base=tiny_sdxl_ckpt)).modules > 0


def test_peft_output_says_which_programs_do_not_load_it(tiny_sd1, tmp_path):
    # issue 13: `convert --to peft` stays, and says (help + one line per run) that ComfyUI and A1111
    # do not load those UNet keys
    src = tmp_path / "in.safetensors"
    make_lora(tiny_sd1, "sd1", "lora", path=src)
    run = subprocess.run([sys.executable, "-m", "loratools", "convert", str(src), "--to", "peft", "-o",
                          str(tmp_path / "p.safetensors"), "--arch", "sd1"], capture_output=True, text=True,
                         timeout=120, env=_ENV)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "ComfyUI" in line]  # one line, once
    assert len(lines) == 1 and "A1111" in lines[0]
    helped = subprocess.run([sys.executable, "-m", "loratools", "convert", "--help"], capture_output=True, text=True,
                            timeout=60, env={**_ENV, "COLUMNS": "200"})
    assert "ComfyUI skips its UNet attention keys" in " ".join(helped.stdout.split())
