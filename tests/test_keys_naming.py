"""kohya <-> diffusers/PEFT module names."""

from __future__ import annotations

import pytest

from loratools.errors import UsageError
from loratools.keys.naming import kohya_name, peft_name, split_kohya_prefix, te_module_path
from loratools.keys.unet_blocks import UNetBlockTable


@pytest.mark.parametrize("path", ["encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"])
def test_te_names_always_carry_text_model(path):
    # transformers 5 CLIPTextModel paths lack `text_model.`; 4.x (and WithProjection) have it.
    assert kohya_name("text_encoder", path, "sd1") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("text_encoder", path, "sdxl") == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("text_encoder_2", path, "sdxl") == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    assert peft_name("text_encoder_2", path) == "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    assert te_module_path("text_projection") == "text_projection"


def test_unet_names_per_architecture():
    path = "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj"
    assert kohya_name("unet", path, "sd1") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_ff_net_0_proj"
    assert kohya_name("unet", path, "sdxl") == "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_0_proj"
    assert kohya_name("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "sdxl") == (
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0")
    assert kohya_name("unet", "down_blocks.1.resnets.0.time_emb_proj", "sdxl") == "lora_unet_input_blocks_4_0_emb_layers_1"
    assert peft_name("unet", path) == "unet." + path


def test_sdxl_names_follow_the_models_own_table():
    # A tiny 2-level SDXL-like UNet (layers_per_block 1): attention on level 1 = input block 3.
    table = UNetBlockTable.from_config({
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1})
    assert kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl",
                      unet_table=table) == "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    assert kohya_name("unet", "up_blocks.0.attentions.0.proj_in", "sdxl",
                      unet_table=table) == "lora_unet_output_blocks_0_1_proj_in"


def test_errors_name_the_problem():
    with pytest.raises(UsageError, match="text_encoder_2"):
        kohya_name("text_encoder_2", "encoder.layers.0.mlp.fc1", "sd1")
    with pytest.raises(UsageError, match="no SGM name"):
        kohya_name("unet", "class_embedding.linear_1", "sdxl")
    assert split_kohya_prefix("lora_te1_text_model_x") == ("lora_te1_", "text_model_x")
    assert split_kohya_prefix("unet.down_blocks.0") is None
