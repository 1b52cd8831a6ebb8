"""The `check keys` operation at full scale (fixture headers) and on tiny real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.keys.index import BaseIndex
from loratools.ops.check_keys import CheckKeysOptions, check_header, check_keys

FIXTURES = Path(__file__).parent / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures folder not found")


def _load(name):
    return json.loads((FIXTURES / name).read_text())


def _base(name):
    return BaseIndex.from_key_shapes({k: tuple(v["shape"]) for k, v in _load(name)["tensors"].items()})


def _check(lora_shapes, metadata, index):
    from loratools.adapters import describe_header

    return check_header(describe_header(lora_shapes, metadata), metadata, index,
                        adapter=Path("lora.safetensors"), base=Path("base.safetensors"))


def _lora(name):
    data = _load(name)
    return {k: tuple(v["shape"]) for k, v in data["tensors"].items()}, data.get("metadata", {})


@pytest.fixture(scope="module")
def sdxl_base():
    return _base("ckpt_sdxl_single_file.json")


@needs_fixtures
def test_sdxl_lycoris_on_sdxl_applies_fully(sdxl_base):
    result = _check(*_lora("lora_lycoris_sdxl_locon.json"), sdxl_base)
    assert result.ok
    assert result.summary == "1052/1052 modules apply; 0 unmatched; LoRA: SDXL, base: SDXL"
    assert result.problems() == []


@needs_fixtures
def test_sd1_lora_on_sdxl_is_a_mismatch(sdxl_base):
    result = _check(*_lora("lora_kohya_sd15_lora.json"), sdxl_base)
    assert not result.ok
    assert "SD1 adapter" in result.arch_problem and "SDXL base" in result.arch_problem
    assert result.summary.endswith("LoRA: SD1, base: SDXL")
    assert result.applied < 264 and result.count("unmatched") + result.count("shape") > 0


@needs_fixtures
def test_mixed_naming_is_flagged_as_duplicate(sdxl_base):
    shapes, meta = _lora("lora_kohya_sdxl_lora.json")
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    dif = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    shapes.update({f"{dif}.{s}": shapes[f"{sgm}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")})
    result = _check(shapes, meta, sdxl_base)
    dups = {m.name: m.duplicate_of for m in result.modules if m.status == "duplicate"}
    assert dups == {sgm: (dif,), dif: (sgm,)}
    assert not result.ok and "twice" in " ".join(result.problems())
    assert result.summary.startswith("985/987 modules apply; 0 unmatched; 2 on a weight")


@needs_fixtures
def test_shape_mismatch_unmatched_and_unknown_keys(sdxl_base):
    shapes, meta = _lora("lora_kohya_sdxl_lora.json")
    q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    shapes[f"{q}.lora_down.weight"] = (8, 768)  # a CLIP-L sized module on bigG
    shapes["lora_te1_text_model_encoder_layers_12_mlp_fc1.lora_down.weight"] = (8, 768)  # TE1 has layers 0-11
    shapes["lora_te1_text_model_encoder_layers_12_mlp_fc1.lora_up.weight"] = (3072, 8)
    shapes["bundle_emb.tinychar.string_to_param.*"] = (2, 768)
    result = _check(shapes, meta, sdxl_base)
    status = {m.name: m for m in result.modules if m.status != "ok"}
    assert status[q].status == "shape" and status[q].rows == (0, 1280) and status[q].base_shape == (1280, 1280)
    assert status["lora_te1_text_model_encoder_layers_12_mlp_fc1"].status == "unmatched"
    assert result.unknown_keys == ["bundle_emb.tinychar.string_to_param.*"]
    assert result.summary == ("985/987 modules apply; 1 unmatched; 1 shape mismatches; "
                              "1 keys of no known adapter type; LoRA: SDXL, base: SDXL")


@pytest.mark.parametrize("base_fixture", ["tiny_sdxl_ckpt", "tiny_sdxl_dir"])
def test_tiny_files_on_disk(base_fixture, request, tiny_sdxl, tmp_path):
    from loratools.tiny import make_lora

    base = request.getfixturevalue(base_fixture)
    ad = make_lora(tiny_sdxl, "sdxl", "locon", path=tmp_path / "x.safetensors")
    result = check_keys(CheckKeysOptions(adapter=ad.path, base=base))
    assert result.ok, result.problems()
    assert result.applied == len(ad.targets) == len(result.modules)
    assert result.adapter_arch.arch == result.base_arch.arch == "sdxl"


def test_tiny_sd1_lora_against_tiny_sdxl(tiny_sd1, tiny_sdxl_ckpt, tmp_path):
    from loratools.tiny import make_lora

    ad = make_lora(tiny_sd1, "sd1", "lora", path=tmp_path / "sd1.safetensors")
    result = check_keys(CheckKeysOptions(adapter=ad.path, base=tiny_sdxl_ckpt))
    assert not result.ok
    assert "SD1 adapter" in result.arch_problem
