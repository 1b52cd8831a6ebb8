"""The name a writer writes (`keys.resolve`) and the naming helpers every layer shares."""

from __future__ import annotations

import pytest

from loratools.adapters import describe_header
from loratools.io import read_header
from loratools.keys.blocks import NUM_BLOCKS, block_slot
from loratools.keys.index import BaseIndex
from loratools.keys.naming import component_label, component_of, te_layer, unet_spelling
from loratools.keys.resolve import module_shapes, output_names, place_modules
from loratools.tiny import make_lora


def test_prefix_helpers():
    assert component_of("lora_te1_text_model_x") == "text_encoder" and component_of("lora_te2_x") == "text_encoder_2"
    assert component_of("lora_te_x") == "text_encoder" and component_of("unet.x") is None
    assert [component_label(n) for n in ("lora_unet_a", "lora_te_a", "lora_te1_a", "lora_te2_a", "lycoris_a")] == [
        "unet", "te", "te1", "te2", "other"]
    assert te_layer("lora_te2_text_model_encoder_layers_31_mlp_fc2") == ("te2", 31)
    assert te_layer("lora_te_text_model_final_layer_norm") is None and te_layer("lora_unet_x") is None
    assert unet_spelling("lora_unet_input_blocks_4_1_proj_in") == "sgm"
    assert unet_spelling("lora_unet_out_2") == "sgm" and unet_spelling("lora_unet_conv_out") == "diffusers"
    assert unet_spelling("lora_unet_down_blocks_1_attentions_0_proj_in") == "diffusers"
    assert unet_spelling("lora_te1_text_model_x") is None


def test_block_slots_follow_sd_scripts():
    # sd-scripts networks/lora.py get_block_index (SD1: diffusers names) and sdxl's (SGM names)
    assert block_slot("lora_unet_down_blocks_0_attentions_1_proj_in", "sd1") == 2
    assert block_slot("lora_unet_down_blocks_2_downsamplers_0_conv", "sd1") == 9
    assert block_slot("lora_unet_mid_block_attentions_0_proj_in", "sd1") == 12
    assert block_slot("lora_unet_up_blocks_3_attentions_2_proj_out", "sd1") == NUM_BLOCKS["sd1"] - 1
    assert block_slot("lora_unet_time_embed_0", "sdxl") == 0 and block_slot("lora_unet_out_2", "sdxl") == 22
    assert block_slot("lora_unet_input_blocks_4_1_proj_in", "sdxl") == 5
    assert block_slot("lora_unet_middle_block_1_proj_in", "sdxl") == 11
    assert block_slot("lora_unet_output_blocks_8_0_skip_connection", "sdxl") == 21
    assert block_slot("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sdxl") == -1
    index = BaseIndex.standard("sdxl")
    assert index.info(index.resolve("unet.down_blocks.1.attentions.0.proj_in")).block == 5  # any spelling


def test_without_a_base_only_layout_bound_names_that_do_not_fit_are_unresolved(tiny_sdxl, tmp_path):
    standard = BaseIndex.standard("sdxl")
    sgm = describe_header(read_header(make_lora(tiny_sdxl, "sdxl", "lora", path=tmp_path / "s.safetensors").path).tensors)
    peft = make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", path=tmp_path / "p.safetensors").path
    placed = place_modules({n: m.weight_shape for n, m in sgm.modules.items()}, standard)
    assert placed.unresolved and all(n.startswith("lora_unet_") and unet_spelling(n) == "sgm"
                                     for n in placed.unresolved)
    assert all(p.name.startswith("lora_te") for p in placed.placed.values())  # TE names need no layout
    assert "pass --base" in placed.hint()
    peft_header = describe_header(read_header(peft).tensors, read_header(peft).metadata)
    placed = place_modules({n: m.weight_shape for n, m in peft_header.modules.items()}, standard)
    assert not placed.unresolved and not any(p.fits for p in placed.placed.values())
    assert {unet_spelling(p.write_name) for p in placed.placed.values()} == {None, "diffusers"}
    assert "--base" in placed.unfit_note()
    # released shapes: the same name is that weight, written in SGM form
    full = place_modules({"unet.down_blocks.1.attentions.0.proj_in": (640, 640)}, standard).placed
    assert full["unet.down_blocks.1.attentions.0.proj_in"].write_name == "lora_unet_input_blocks_4_1_proj_in"


def test_output_names_use_the_base_and_keep_both_spellings_of_one_weight(tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    from loratools.adapters import load_adapter
    from loratools.io import open_model

    base = BaseIndex.from_model(open_model(tiny_sdxl_ckpt))
    peft = load_adapter(make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", path=tmp_path / "p.safetensors").path)
    names = output_names(peft, base)
    assert set(names) == set(peft.modules)
    assert {unet_spelling(n) for n in names.values()} == {None, "sgm"}
    assert len(set(names.values())) == len(names)
    # no base, arch unknown from a bare tiny file: every name stays as parsed (already kohya form)
    bare = {"lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, 3, 3)}
    assert place_modules(bare, base).placed and module_shapes(peft)
    with pytest.raises(ValueError, match="sd3"):
        BaseIndex.standard("sd3")
