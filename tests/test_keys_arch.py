"""Architecture detection for checkpoints and adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import ArchitectureMismatchError
from loratools.keys.arch import (
    ArchInfo, check_compatible, detect_adapter_arch, detect_checkpoint_arch, guess_adapter_arch,
)

FIXTURES = Path(__file__).parent / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures folder not found")


def _load(name):
    return json.loads((FIXTURES / name).read_text())


def _single(name):
    return {k: tuple(v["shape"]) for k, v in _load(name)["tensors"].items()}


def _folder(name):
    return {f.split("/")[0]: {k: tuple(v["shape"]) for k, v in t.items()} for f, t in _load(name)["files"].items()}


@needs_fixtures
@pytest.mark.parametrize("name,arch", [("ckpt_sd15_single_file.json", "sd1"), ("ckpt_sdxl_single_file.json", "sdxl")])
def test_full_scale_single_files(name, arch):
    info = detect_checkpoint_arch(_single(name))
    assert (info.arch, info.variant, info.prediction) == (arch, None, None)


@needs_fixtures
@pytest.mark.parametrize("name,arch", [("diffusers_sd15.json", "sd1"), ("diffusers_sdxl.json", "sdxl")])
def test_full_scale_folders(name, arch):
    assert detect_checkpoint_arch(_folder(name)).arch == arch
    unet_only = {"unet": _folder(name)["unet"]}  # the UNet alone still tells
    assert detect_checkpoint_arch(unet_only).arch == arch


@needs_fixtures
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("lora_*.json")) if FIXTURES.is_dir() else [])
def test_full_scale_adapters(name):
    from loratools.adapters import describe_header

    data = _load(name)
    header = describe_header({k: tuple(v["shape"]) for k, v in data["tensors"].items()}, data.get("metadata"))
    assert detect_adapter_arch(header, data.get("metadata")).arch == ("sd1" if "sd15" in name else "sdxl")


def test_inpainting_variant_and_unet_width():
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)}
    info = detect_checkpoint_arch(shapes)
    assert (info.arch, info.variant, info.label) == ("sd1", "inpaint", "SD1 inpaint")


@pytest.mark.parametrize("shapes,seen", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "SD3"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux"),
    ({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
      "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3)}, "SDXL refiner"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "first_stage_model.encoder"),
])
def test_unknown_checkpoints_are_named_and_refused(shapes, seen):
    with pytest.raises(ArchitectureMismatchError, match=seen):
        detect_checkpoint_arch(shapes)


@pytest.mark.parametrize("components,seen", [
    ({"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)},
      "text_encoder_2": {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}}, "without unet/"),
    ({"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 2048)},
      "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)},
      "text_encoder_2": {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}}, "not a CLIP"),
])
def test_foreign_diffusers_folders_are_refused(components, seen):
    # Flux/SD3 folders: transformer/ instead of unet/, a T5 as text_encoder_2.
    with pytest.raises(ArchitectureMismatchError, match=seen):
        detect_checkpoint_arch(components)


def test_contradicting_width_is_refused():
    shapes = {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 2048)}
    with pytest.raises(ArchitectureMismatchError, match="2048 says SDXL"):
        detect_checkpoint_arch(shapes)


SD2_TE = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}


def test_sd2_v_prediction_only_from_metadata():
    assert detect_adapter_arch(SD2_TE).arch == "sd2"
    assert detect_adapter_arch(SD2_TE).prediction is None
    info = detect_adapter_arch(SD2_TE, {"ss_v2": "True", "ss_v_parameterization": "True"})
    assert (info.arch, info.prediction, info.label) == ("sd2", "v_prediction", "SD2 (v-prediction)")
    spec = detect_adapter_arch(SD2_TE, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"})
    assert (spec.arch, spec.prediction) == ("sd2", "v_prediction")


def test_adapter_evidence_order():
    unet_sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}
    assert detect_adapter_arch(unet_sd1).arch == "sd1"
    assert detect_adapter_arch({"lora_te2_text_model_encoder_layers_0_mlp_fc1": (64, 32)}).arch == "sdxl"
    assert detect_adapter_arch({"lora_unet_input_blocks_4_1_proj_in": (64, 64)}).arch == "sdxl"
    tiny = {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1, 1)}
    assert guess_adapter_arch(tiny) is None  # tiny widths, no metadata: nothing to tell by
    assert detect_adapter_arch(tiny, {"ss_base_model_version": "sd_v1"}).arch == "sd1"
    with pytest.raises(ArchitectureMismatchError, match="pass --arch"):
        detect_adapter_arch(tiny)
    with pytest.raises(ArchitectureMismatchError, match="metadata says SDXL"):
        detect_adapter_arch(unet_sd1, {"ss_base_model_version": "sdxl_base_v1-0"})


@pytest.mark.parametrize("names,seen", [
    (["lora_transformer_single_transformer_blocks_0_attn_to_q"], "lora_transformer_"),
    (["lora_te3_encoder_block_0_layer_0_SelfAttention_q"], "lora_te3_"),
    (["lora_unet_double_blocks_0_img_attn_qkv"], "Flux"),
])
def test_foreign_adapters_are_refused(names, seen):
    with pytest.raises(ArchitectureMismatchError, match=seen):
        guess_adapter_arch({n: (4, 4) for n in names})


def test_sd1_adapter_on_sdxl_base_is_refused():
    sd1 = ArchInfo("sd1", evidence="attn2.to_k in-features 768")
    with pytest.raises(ArchitectureMismatchError, match=r"SD1 adapter .* cannot apply to an SDXL base"):
        check_compatible(sd1, ArchInfo("sdxl", evidence="two text encoders"))
    check_compatible(None, ArchInfo("sdxl"))
    check_compatible(sd1, ArchInfo("sd1"))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_models_by_structure(arch):
    """Tiny widths (32/64) match no real model: structure alone must tell, in both layouts."""
    from loratools.keys.state_dict import plan_single_file
    from loratools.tiny import build_pipeline

    pipe = build_pipeline(arch)
    comps = {c: {k: tuple(v.shape) for k, v in getattr(pipe, c).state_dict().items()}
             for c in ("unet", "text_encoder", "text_encoder_2", "vae") if getattr(pipe, c, None) is not None}
    assert detect_checkpoint_arch(comps).arch == arch
    single = {k: s.shape for k, s in plan_single_file(comps, arch).items()}
    assert detect_checkpoint_arch(single).arch == arch


def test_errors_name_the_file(tmp_path):
    """The CLI prints one line per error; it must say which file (was: no path for --base/adapter)."""
    import torch

    from loratools.adapters import parse_adapter
    from loratools.io import open_model, save_tensors

    lora = tmp_path / "lora.safetensors"
    save_tensors(lora, {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2)})
    with pytest.raises(ArchitectureMismatchError, match="not a Stable Diffusion checkpoint") as exc:
        detect_checkpoint_arch(open_model(lora))
    assert str(exc.value).startswith(f"{lora}: ")
    with pytest.raises(ArchitectureMismatchError, match="cannot tell") as exc:
        detect_adapter_arch(parse_adapter({"lora_unet_a.lora_down.weight": torch.ones(2, 4),
                                           "lora_unet_a.lora_up.weight": torch.ones(3, 2)}, path=lora))
    assert exc.value.path == str(lora)
