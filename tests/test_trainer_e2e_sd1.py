"""End-to-end tiny SD1 training: files, metadata, diffusers loading, loss on the training images,
latent cache reuse and continuing from --network_weights."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from loratools.io.reader import open_safetensors
from trainer.config import resolve_config
from trainer.run import train

pytestmark = pytest.mark.slow

SPEC_KEYS = ("ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr "
             "ss_num_train_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs ss_gradient_checkpointing "
             "ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler ss_network_module "
             "ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2 "
             "ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram "
             "ss_noise_offset ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale "
             "ss_zero_terminal_snr ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm "
             "ss_caption_dropout_rate ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_loss_type "
             "ss_batch_size_per_device ss_total_batch_size ss_resolution ss_enable_bucket ss_min_bucket_reso "
             "ss_max_bucket_reso ss_keep_tokens ss_dataset_dirs ss_reg_dataset_dirs ss_tag_frequency ss_bucket_info "
             "ss_network_args ss_sd_model_name ss_sd_model_hash ss_new_sd_model_hash ss_training_finished_at "
             "ss_steps ss_epoch modelspec.sai_model_spec modelspec.architecture modelspec.implementation "
             "modelspec.title modelspec.date modelspec.resolution modelspec.prediction_type sshs_model_hash "
             "sshs_legacy_hash").split()


def _args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "tiny", "--resolution", "64", "--caption_extension", ".txt",
            "--train_batch_size", "2", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "5e-3",
            "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture(scope="module")
def data_copy(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1_data") / "train"
    shutil.copytree(tiny_dataset.root, root)
    return root


def _sshs(path):
    """sd-scripts' hashes, independently: sha256 of the data section of a serialization holding
    only the ss_* metadata, and of the 64 KiB at 1 MiB of that buffer."""
    import hashlib

    from safetensors.torch import load_file, save

    meta = {k: v for k, v in open_safetensors(path).metadata.items() if k.startswith("ss_")}
    buf = save(load_file(str(path)), meta)
    n = int.from_bytes(buf[:8], "little")
    return hashlib.sha256(buf[8 + n:]).hexdigest(), hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]


def _eval_loss(pipe, data, lora=None, seed=0):
    """Mean epsilon loss of the UNet on the training images at fixed noise/timesteps."""
    import numpy as np
    from PIL import Image

    if lora is not None:
        pipe.load_lora_weights(str(lora))
    images = sorted(p for p in data.rglob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for p in images])
    captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "tinychar"
                for p in images]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * 0.18215
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        total = 0.0
        for t in (200, 500, 800):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), t)
            from diffusers import DDPMScheduler

            sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
            pred = pipe.unet(sched.add_noise(latents, noise, ts), ts, cond).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 3


def test_sd1_run_writes_kohya_files_that_lower_the_loss(tiny_sd1_dir, data_copy, tmp_path):
    from loratools.tiny import build_pipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\ntinychar, red circle --n blurry --w 64 --h 64 --d 42 --l 5.5 --s 2 --ss euler\n")
    out = tmp_path / "out"
    cfg = resolve_config(_args(
        tiny_sd1_dir, data_copy, out, "--max_train_steps", "6", "--network_args", "conv_dim=2", "conv_alpha=1",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.34", "--cache_latents", "--cache_latents_to_disk",
        "--shuffle_caption", "--keep_tokens", "1", "--noise_offset", "0.05", "--multires_noise_iterations", "2",
        "--min_snr_gamma", "5", "--scale_weight_norms", "5", "--save_every_n_steps", "2", "--save_last_n_steps", "2",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "3", "--sample_sampler", "euler_a",
        "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"), "--log_prefix", "t-",
        "--save_precision", "fp16", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"))
    result = train(cfg)

    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # steps 2, 4, 6 saved; save_last_n_steps=2 keeps the files of the last 2 steps (step 2 removed)
    assert names == ["tiny-step00000004.safetensors", "tiny-step00000006.safetensors", "tiny.safetensors"]
    assert result.latents_encoded == 6
    assert len(list(data_copy.rglob("*_sd.npz"))) == 6
    assert all(re.fullmatch(r"\d{4}x\d{4}", p.stem.split("_")[-2]) for p in data_copy.rglob("*_sd.npz"))

    reader = open_safetensors(out / "tiny.safetensors")
    meta = reader.metadata
    assert [k for k in SPEC_KEYS if k not in meta] == []
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_tinychar": {"n_repeats": 5, "img_count": 6}}
    assert sum(json.loads(meta["ss_tag_frequency"])["5_tinychar"].values()) > 0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _sshs(out / "tiny.safetensors")
    modules = {k.split(".")[0] for k in reader}
    assert all(f"{m}.alpha" in reader for m in modules)
    assert {reader.info(k).dtype for k in reader} == {"F16"}
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in modules)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules  # conv_dim: 3x3 LoCon
    assert any(reader[k].abs().sum() > 0 for k in reader if "lora_up" in k)

    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert len(samples) == 2 and all(re.fullmatch(r"tiny_00000[36]_00_\d{14}_42\.png", s) for s in samples)
    assert list((tmp_path / "logs").glob("t-*/**/events.out.tfevents.*"))

    base = _eval_loss(build_pipeline("sd1"), data_copy)
    trained = _eval_loss(build_pipeline("sd1"), data_copy, lora=out / "tiny.safetensors")
    assert trained < base

    # the cache is reused from disk by a second run (no VAE encode)
    again = train(resolve_config(_args(tiny_sd1_dir, data_copy, tmp_path / "out2", "--max_train_steps", "1",
                                       "--cache_latents_to_disk", "--enable_bucket", "--min_bucket_reso", "64",
                                       "--max_bucket_reso", "128")))
    assert (again.latents_encoded, again.latents_reused) == (0, 6)


def test_continue_from_network_weights_and_same_seed_is_reproducible(tiny_sd1_dir, tiny_dataset, tmp_path,
                                                                    same_seed_tolerance):
    first = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "a", "--max_train_steps", "2",
                                       "--network_train_unet_only")))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "tinychar", "width": 64, "height": 64, "sample_steps": 1}]))
    again = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "b", "--max_train_steps", "2",
                                       "--network_train_unet_only", "--sample_prompts", str(prompts),
                                       "--sample_at_first", "--sample_every_n_steps", "1")))
    assert len(again.sample_files) == 3
    # same seed, and sampling leaves the training RNG alone (another RNG state changes every loss by ~1e-1)
    assert again.losses == pytest.approx(first.losses, **same_seed_tolerance)
    start = open_safetensors(first.final_file)
    cont = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "c", "--max_train_steps", "1",
                                      "--network_train_unet_only", "--network_dim", "8",
                                      "--network_weights", str(first.final_file))))
    end = open_safetensors(cont.final_file)
    assert set(end.keys()) == set(start.keys())  # ranks and modules come from the file
    assert all(end[k].shape == start[k].shape for k in start)
    assert not any(k.startswith("lora_te") for k in end)


def test_epoch_saves_keep_last_n_and_the_russian_guides_optimizer(tiny_sd1_dir, tiny_dataset, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("tinychar --w 64 --h 64 --s 1 --d 7\n")
    out = tmp_path / "out"
    result = train(resolve_config(_args(
        tiny_sd1_dir, tiny_dataset.root, out, "--train_batch_size", "8", "--gradient_accumulation_steps", "4",
        "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1",
        "--sample_prompts", str(prompts), "--sample_every_n_epochs", "2", "--sample_every_n_steps", "1",
        "--clip_skip", "2", "--max_token_length", "225", "--optimizer_type", "Prodigy", "--learning_rate", "1",
        "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "d_coef=2",
        "use_bias_correction=True", "safeguard_warmup=True", "--lr_scheduler", "cosine_with_restarts",
        "--lr_scheduler_num_cycles", "2")))
    assert result.global_step == 3 and result.epochs == 3  # 4 batches / accumulation 4 = 1 step per epoch
    # epoch 1 was saved then removed (keep 1), epoch 2 kept, epoch 3 is the final file
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-000002.safetensors", "tiny.safetensors"]
    meta = open_safetensors(out / "tiny-000002.safetensors").metadata
    assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_clip_skip"], meta["ss_max_token_length"]) == ("2", "2", "2", "225")
    assert meta["ss_optimizer"] == ("prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.99),decouple=True,"
                                    "d_coef=2,use_bias_correction=True,safeguard_warmup=True)")
    # epochs win over steps for sampling: only the end of epoch 2 samples
    assert [p.name.split("_")[1] for p in result.sample_files] == ["e000002"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu(tiny_sd1_dir, tiny_dataset, tmp_path, precision, monkeypatch):
    """bf16 autocasts on the CPU; fp16 (the guides' default, GPU-only) falls back to float32 with
    a warning instead of failing; either way the run finishes and saves in --save_precision.
    --xformers without the package (or CUDA) degrades to sdpa with a warning. (On a CUDA machine
    the run is sent to the CPU with accelerate's own switch.)"""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    result = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "out", "--max_train_steps", "1",
                                        "--mixed_precision", precision, "--save_precision", precision,
                                        "--network_train_unet_only", "--xformers")))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(w.startswith("--xformers unavailable") for w in result.warnings)  # no xformers/CUDA here
    reader = open_safetensors(result.final_file)
    assert {reader.info(k).dtype for k in reader} == {"BF16" if precision == "bf16" else "F16"}
    assert reader.metadata["ss_mixed_precision"] == precision
    fallback = [w for w in result.warnings if "fp16 needs a GPU" in w]
    assert len(fallback) == (precision == "fp16")


@pytest.mark.parametrize("module", ["networks.lora", "lycoris.kohya"])
def test_text_encoder_only_trains_through_the_frozen_unet(tiny_sd1_dir, tiny_dataset, tmp_path, module):
    result = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "out", "--max_train_steps", "1",
                                        "--network_module", module, "--network_train_text_encoder_only")))
    reader = open_safetensors(result.final_file)
    modules = {k.split(".")[0] for k in reader}
    assert modules and all(m.startswith("lora_te_text_model_") for m in modules)
    # the gradient reached the text encoder through the UNet: some up factor moved from its zero init
    assert any(reader[k].abs().sum() > 0 for k in reader if k.endswith("lora_up.weight"))
