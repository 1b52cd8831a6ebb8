"""End-to-end tiny SDXL training: single-file base, LyCORIS and built-in LoRA, SGM names,
metadata, and the file loading in diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from loratools.io.reader import open_safetensors
from trainer.config import resolve_config
from trainer.run import train

pytestmark = pytest.mark.slow


def _args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "xl", "--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "2",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "5e-3", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--bucket_reso_steps", "32", *extra]


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory):
    from loratools.tiny import make_dataset

    return make_dataset(tmp_path_factory.mktemp("sdxl_data") / "train", "sdxl", 4, rgba=2).root


def _render_with(lora):
    from loratools.tiny import build_pipeline, render

    pipe = build_pipeline("sdxl")
    before = render(pipe)
    pipe.load_lora_weights(str(lora))
    return before, render(pipe)


def test_sdxl_lycoris_from_single_file_with_the_guides_args(tiny_sdxl_ckpt, tiny_sdxl_dir, sdxl_data, tmp_path):
    out = tmp_path / "out"
    cfg = resolve_config(_args(
        tiny_sdxl_ckpt, sdxl_data, out, "--tokenizer_cache_dir", str(tiny_sdxl_dir), "--max_train_steps", "2",
        "--network_module", "lycoris.kohya", "--network_args", "preset=full", "conv_dim=4", "conv_alpha=1",
        "algo=locon", "use_tucker=False", "block_dims=" + ",".join(["4"] * 25), "block_alphas=" + ",".join(["1"] * 26),
        "--cache_latents", "--min_snr_gamma", "5", "--noise_offset", "0.03", "--lr_scheduler", "cosine_with_restarts",
        "--lr_scheduler_num_cycles", "2", "--save_precision", "fp16", "--spda", "--gradient_checkpointing",
        "--alpha_mask", "--masked_loss"))
    result = train(cfg)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any("block_dims" in w for w in result.warnings)
    reader = open_safetensors(out / "xl.safetensors")
    names = {k.split(".")[0] for k in reader}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") and n.endswith("_skip_connection") for n in names)
    assert any(n.startswith("lora_te1_text_model_") for n in names)
    assert any(n.startswith("lora_te2_text_model_") for n in names)
    assert not any("down_blocks" in n or "time_embedding" in n or "conv_in" in n for n in names)
    meta = reader.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "lycoris.kohya"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["ss_network_args"])["algo"] == "locon"
    from loratools.adapters import parse_adapter

    parsed = parse_adapter({k: reader[k] for k in reader})
    assert set(parsed.modules) == names and not parsed.unknown
    before, after = _render_with(out / "xl.safetensors")
    assert abs(before - after).max() > 1e-4


def test_sdxl_lora_unet_only_from_diffusers_folder(tiny_sdxl_dir, sdxl_data, tmp_path):
    out = tmp_path / "out"
    cfg = resolve_config(_args(tiny_sdxl_dir, sdxl_data, out, "--max_train_steps", "2", "--network_train_unet_only",
                               "--network_args", "conv_dim=2", "--optimizer_type", "AdamWScheduleFree",
                               "--loss_type", "huber", "--huber_schedule", "exponential", "--flip_aug",
                               "--validation_split", "0.25", "--validate_every_n_steps", "1",
                               "--cache_text_encoder_outputs"))
    result = train(cfg)
    assert len(result.losses) == 2
    # after steps 1 and 2, and at the end of the (cut) epoch; finite, fixed timesteps
    assert [s for s, _ in result.validation_losses] == [1, 2, 2]
    assert all(0 < v < 10 for _, v in result.validation_losses)
    reader = open_safetensors(result.final_file)
    names = {k.split(".")[0] for k in reader}
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # SGM name of down_blocks.0.resnets.0.conv1
    assert reader.metadata["ss_optimizer"] == "schedulefree.adamw_schedulefree.AdamWScheduleFree"
    before, after = _render_with(result.final_file)
    assert abs(before - after).max() > 1e-4
