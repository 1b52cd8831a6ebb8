"""The diffusers <-> LDM/SGM UNet block table, against the fixtures and diffusers' own converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import InvalidFileError
from loratools.keys.unet_blocks import LDM_UNET_PREFIX, UNetBlockTable

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures folder not found")

# (arch, single-file fixture, diffusers fixture)
FULL_SCALE = [
    ("sd1", "ckpt_sd15_single_file.json", "diffusers_sd15.json"),
    ("sdxl", "ckpt_sdxl_single_file.json", "diffusers_sdxl.json"),
]


def _shapes(name: str, file: str | None = None) -> dict[str, tuple[int, ...]]:
    data = json.loads((FIXTURES / name).read_text())
    tensors = data["files"][file] if file else data["tensors"]
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


@pytest.mark.parametrize("arch,single,folder", FULL_SCALE)
def test_full_scale_tables_agree_and_map_every_key(arch, single, folder):
    ldm = _shapes(single)
    dif = _shapes(folder, "unet/diffusion_pytorch_model.safetensors")
    from_ldm, from_dif = UNetBlockTable.from_keys(ldm), UNetBlockTable.from_keys(dif)
    assert from_ldm.layout == from_dif.layout == UNetBlockTable.standard(arch).layout
    ldm_unet = {k[len(LDM_UNET_PREFIX):]: s for k, s in ldm.items() if k.startswith(LDM_UNET_PREFIX)}
    mapped = {}
    for key, shape in dif.items():
        target = from_ldm.to_ldm(key)
        assert target in ldm_unet, key
        assert ldm_unet[target] == shape, (key, target)
        assert from_ldm.to_diffusers(target) == key
        mapped[target] = key
    assert set(mapped) == set(ldm_unet)  # a bijection over the whole UNet


def test_upsampler_sub_index_depends_on_attention():
    # SD1's first up level has no attention: upsampler at sub-index 1; SDXL's has: sub-index 2.
    sd1 = UNetBlockTable.from_keys(_shapes("ckpt_sd15_single_file.json"))
    sdxl = UNetBlockTable.from_keys(_shapes("ckpt_sdxl_single_file.json"))
    assert sd1.to_ldm("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.1.conv.weight"
    assert sdxl.to_ldm("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.2.conv.weight"
    assert sd1.to_diffusers("model.diffusion_model.output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert sdxl.to_ldm("down_blocks.1.resnets.0.conv_shortcut") == "input_blocks.4.0.skip_connection"
    assert sdxl.to_ldm("add_embedding.linear_1.weight") == "label_emb.0.0.weight"
    assert sd1.to_ldm("not_a_unet_module") is None


def test_no_unet_keys_is_refused():
    with pytest.raises(InvalidFileError, match="no UNet blocks"):
        UNetBlockTable.from_keys(["first_stage_model.encoder.conv_in.weight"])


TINY_CONFIGS = {
    "two_levels_sd1_like": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8),
    "two_levels_sdxl_like": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48),
    "four_levels_sd1_shape": dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=16, attention_head_dim=8),
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_unet_round_trips_through_diffusers_converter(name):
    """Our diffusers->LDM names, read back by diffusers' own single-file converter, give the
    original state dict: an independent check of the table on layouts other than SD1/SDXL."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, norm_num_groups=8, **TINY_CONFIGS[name])
    sd = unet.state_dict()
    table = UNetBlockTable.from_config(unet.config)
    ldm = {LDM_UNET_PREFIX + table.to_ldm(k): v for k, v in sd.items()}
    assert UNetBlockTable.from_keys(ldm).layout == table.layout
    assert UNetBlockTable.from_keys(sd).layout == table.layout
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
