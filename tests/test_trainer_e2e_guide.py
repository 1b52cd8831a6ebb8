"""The Hungarian guide's full sdxl_train_network.py command, through the real CLI, on a tiny SDXL
(sizes and step counts scaled down; every other flag as the guide writes it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loratools.io.reader import open_safetensors

pytestmark = pytest.mark.slow


def test_guide_command_runs_and_reports_flags_without_effect(tiny_sdxl_dir, tmp_path):
    from loratools.tiny import make_dataset

    data = make_dataset(tmp_path / "training_dir", "sdxl", 4).root
    prompts = tmp_path / "sample-prompts.txt"
    prompts.write_text("tinychar, red circle --n blurry --w 64 --h 64 --d 42 --l 5.5 --s 2\n")
    out = tmp_path / "output_dir"
    alphas = ",".join(["0.0625"] * 26)
    cmd = [sys.executable, "-m", "loratools", "train", "--lowram", f"--pretrained_model_name_or_path={tiny_sdxl_dir}/",
           f"--train_data_dir={data}", "--resolution=64,64", f"--output_dir={out}", "--enable_bucket",
           "--min_bucket_reso=32", "--max_bucket_reso=128", "--network_alpha=4", "--save_model_as=safetensors",
           "--network_module=lycoris.kohya", "--network_args", "preset=full", "conv_dim=256", "conv_alpha=4",
           "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", "algo=locon", "train_norm=False",
           "block_dims=" + ",".join(["8"] * 25), f"block_alphas={alphas}", "--network_dropout=0",
           "--lr_scheduler=cosine", "--learning_rate=0.0001", "--unet_lr=0.0001", "--text_encoder_lr=0.0001",
           "--network_dim=8", "--output_name=yifftoolkit", "--scale_weight_norms=1", "--no_half_vae",
           "--save_every_n_epochs=50", "--mixed_precision=no", "--save_precision=fp16", "--caption_extension=.txt",
           "--cache_latents", "--cache_latents_to_disk", "--optimizer_type=AdamW", "--max_grad_norm=1",
           "--keep_tokens=1", "--max_data_loader_n_workers=0", "--bucket_reso_steps=32",
           "--multires_noise_iterations=10", "--multires_noise_discount=0.1", "--log_prefix=xl-locon",
           "--gradient_accumulation_steps=2", "--gradient_checkpointing", "--train_batch_size=2",
           "--dataset_repeats=0", "--max_train_steps=2", "--shuffle_caption", "--spda",
           f"--sample_prompts={prompts}", "--sample_sampler=euler_a", "--sample_every_n_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # progress, summaries, warnings and lycoris' log lines all go to stderr
    err = proc.stderr
    assert "block_dims" in err and "block_alphas" in err and "dataset_repeats" in err
    reader = open_safetensors(out / "yifftoolkit.safetensors")
    assert {reader.info(k).dtype for k in reader} == {"F16"}
    assert reader.metadata["ss_network_module"] == "lycoris.kohya"
    assert len(list((out / "sample").glob("yifftoolkit_000002_00_*_42.png"))) == 1
    assert len(list(data.rglob("*_sdxl.npz"))) == 4
