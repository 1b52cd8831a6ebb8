"""resolve_config: sd-scripts flag spellings, TOML recipes, aliases, validation and no-effect warnings."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from loratools.errors import UsageError
from trainer.config import TrainConfig, config_to_toml, parse_literal_args, parse_network_args, resolve_config

# The Hungarian guide's full sdxl_train_network.py command (lora-training-guide.hu.md), verbatim.
G1_COMMAND = r"""
    --lowram --pretrained_model_name_or_path="/ponydiffusers/" --train_data_dir="/training_dir"
    --resolution="1024,1024" --output_dir="/output_dir" --enable_bucket --min_bucket_reso=256
    --max_bucket_reso=1024 --network_alpha=4 --save_model_as="safetensors" --network_module="lycoris.kohya"
    --network_args "preset=full" "conv_dim=256" "conv_alpha=4" "use_tucker=False" "use_scalar=False"
        "rank_dropout_scale=False" "algo=locon" "train_norm=False"
        "block_dims=8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8"
        "block_alphas=0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625"
    --network_dropout=0 --lr_scheduler="cosine" --learning_rate=0.0001 --unet_lr=0.0001
    --text_encoder_lr=0.0001 --network_dim=8 --output_name="yifftoolkit" --scale_weight_norms=1
    --no_half_vae --save_every_n_epochs=50 --mixed_precision="fp16" --save_precision="fp16"
    --caption_extension=".txt" --cache_latents --cache_latents_to_disk --optimizer_type="AdamW"
    --max_grad_norm=1 --keep_tokens=1 --max_data_loader_n_workers=8 --bucket_reso_steps=32
    --multires_noise_iterations=10 --multires_noise_discount=0.1 --log_prefix=xl-locon
    --gradient_accumulation_steps=6 --gradient_checkpointing --train_batch_size=8 --dataset_repeats=0
    --max_train_steps=400 --shuffle_caption --sdpa --sample_prompts=/training_dir/sample-prompts.txt
    --sample_sampler="euler_a" --sample_every_n_steps=100
"""


def test_defaults_are_sd_scripts_defaults():
    cfg = resolve_config([])
    assert cfg.learning_rate == 2e-6 and cfg.max_train_steps == 1600 and cfg.caption_extension == ".caption"
    assert cfg.bucket_reso_steps == 64 and cfg.min_bucket_reso == 256 and cfg.max_bucket_reso == 1024
    assert cfg.multires_noise_discount == 0.3 and cfg.lr_scheduler == "constant" and cfg.network_alpha == 1.0
    assert cfg.save_precision is None and cfg.mixed_precision == "no" and cfg.max_data_loader_n_workers == 8
    assert cfg.warnings == [] and cfg.provided == frozenset()


def test_hungarian_full_command_parses_with_expected_warnings():
    cfg = resolve_config(shlex.split(G1_COMMAND) + ["--model_type", "sdxl"])
    assert cfg.resolution == (1024, 1024)
    assert cfg.network_args[:2] == ["preset=full", "conv_dim=256"] and len(cfg.network_args) == 10
    assert cfg.text_encoder_lr == [0.0001] and cfg.unet_lr == 0.0001 and cfg.network_dim == 8
    assert cfg.train_batch_size == 8 and cfg.gradient_accumulation_steps == 6 and cfg.bucket_reso_steps == 32
    assert cfg.lowram and cfg.no_half_vae and cfg.cache_latents_to_disk and cfg.sdpa and cfg.shuffle_caption
    assert cfg.sample_sampler == "euler_a" and cfg.output_name == "yifftoolkit" and cfg.network_dropout == 0.0
    text = "\n".join(cfg.warnings)
    assert "--dataset_repeats=0 has no effect" in text
    assert "block_dims (25 values)" in text and "block_alphas (26 values)" in text and "lycoris.kohya ignores" in text
    assert "sdxl has 23 blocks, not 25" in text
    assert "--log_prefix=xl-locon has no effect without --logging_dir" in text


def test_russian_guide_flags_parse():
    argv = shlex.split(
        '--optimizer_type=DAdaptAdam --optimizer_args "decouple=True" "weight_decay=0.01" "betas=0.9,0.99" '
        '--learning_rate=1.0 --lr_scheduler_type=cosine_annealing_warmup.CosineAnnealingWarmupRestarts '
        '--lr_scheduler_args "T_0=549" "gamma_min_lr=0.99915" "init_lr_ground=True" --max_token_length=225 '
        '--clip_skip=2 --min_snr_gamma=5 --save_last_n_epochs=30 --save_every_n_epochs=1 '
        '--persistent_data_loader_workers --max_data_loader_n_workers=2 --xformers --noise_offset=0.05 '
        '--lr_scheduler_num_cycles=4 --lr_scheduler_power=1 --network_args "conv_dim=32" "conv_alpha=32"')
    cfg = resolve_config(argv)
    assert cfg.optimizer_type == "DAdaptAdam" and cfg.max_token_length == 225 and cfg.clip_skip == 2
    assert parse_literal_args(cfg.optimizer_args) == {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert parse_literal_args(cfg.lr_scheduler_args)["init_lr_ground"] is True
    assert parse_network_args(cfg.network_args) == {"conv_dim": "32", "conv_alpha": "32"}


@pytest.mark.parametrize("argv", [
    ["--train_batch_size=3", "--resolution=512,768"],
    ["--train_batch_size", "3", "--resolution", "512,768"],
    ["--train-batch-size", "3", "--resolution", "512,768"],
])
def test_flag_spellings(argv):
    cfg = resolve_config(argv)
    assert cfg.train_batch_size == 3 and cfg.resolution == (512, 768)


def test_typo_aliases_and_value_aliases_are_reported():
    cfg = resolve_config(["--spda", "--save_precision=fp32", "--caption_extention", ".txt", "--resolution", "768"])
    assert cfg.sdpa and cfg.save_precision == "float" and cfg.caption_extension == ".txt"
    assert cfg.resolution == (768, 768)
    assert "--spda is read as --sdpa" in cfg.warnings
    assert "--save_precision=fp32 is read as float" in cfg.warnings
    assert "--caption_extention is read as --caption_extension" in cfg.warnings


@pytest.mark.parametrize("raw, expected", [("10%", 0.1), ("0.05", 0.05), ("100", 100), ("0", 0)])
def test_lr_warmup_steps_forms(raw, expected):
    cfg = resolve_config(["--lr_scheduler", "cosine", "--lr_warmup_steps", raw])
    assert cfg.lr_warmup_steps == expected and type(cfg.lr_warmup_steps) is type(expected)


def test_boolean_flag_forms():
    cfg = resolve_config(["--shuffle_caption", "--keep_tokens", "1", "--flip_aug=false", "--no_half_vae", "true"])
    assert cfg.shuffle_caption and cfg.keep_tokens == 1 and not cfg.flip_aug and cfg.no_half_vae


def test_recipe_overlaid_by_flags(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'network_dim = 16\n'
        '[data]\nresolution = [640, 512]\nshuffle_caption = true\ncaption_extension = ".txt"\n'
        '[network]\nnetwork_args = { conv_dim = 8, use_tucker = false }\nlearning_rate = 1e-4\n'
        '[model]\nspda = true\nsave_precision = "fp32"\n', encoding="utf-8")
    cfg = resolve_config(["--config", str(recipe), "--network_dim=32", "--shuffle_caption=false"])
    assert cfg.config == str(recipe)
    assert cfg.network_dim == 32 and cfg.resolution == (640, 512) and not cfg.shuffle_caption
    assert cfg.network_args == ["conv_dim=8", "use_tucker=False"] and cfg.learning_rate == 1e-4
    assert cfg.sdpa and cfg.save_precision == "float"
    assert {"network_dim", "resolution", "shuffle_caption", "network_args", "config"} <= cfg.provided
    assert any("spda is read as sdpa" in w for w in cfg.warnings)


def test_recipe_errors_name_file_and_key(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\nresolutoin = 512\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"r\.toml: \[data\] unknown training option --resolutoin; did you mean --resolution"):
        resolve_config(["--config", str(recipe)])
    recipe.write_text("network_dim = 'eight'\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"--network_dim: 'eight' is not an integer"):
        resolve_config(["--config", str(recipe)])
    recipe.write_text("network_dim = 8\n[net]\nnetwork_dim = 4\n", encoding="utf-8")
    with pytest.raises(UsageError, match="network_dim is set twice"):
        resolve_config(["--config", str(recipe)])
    recipe.write_text("network_dim = [\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve_config(["--config", str(recipe)])
    with pytest.raises(UsageError, match="recipe not found"):
        resolve_config(["--config", str(tmp_path / "missing.toml")])


@pytest.mark.parametrize("argv, message", [
    (["--output_name="], "--output_name is empty"),
    (["--mixed_precision", "fp32"], "--mixed_precision: 'fp32' is not one of no, fp16, bf16"),
    (["--save_precision", "half"], "--save_precision: 'half' is not one of float, fp16, bf16"),
    (["--max_token_length", "100"], "is not one of 75, 150, 225"),
    (["--lr_scheduler", "cosine_restarts"], "--lr_scheduler: 'cosine_restarts' is not one of"),
    (["--optimizer_type", "Adam9"], "--optimizer_type 'Adam9' is not one of AdamW"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["--shufle_caption"], "did you mean --shuffle_caption"),
    (["--num_processes=2"], "is an option of accelerate"),
    (["stray"], "unexpected argument 'stray'"),
    (["--lr_warmup_steps", "10"], "--lr_scheduler constant has no warmup"),
    (["--cache_latents", "--random_crop"], "--random_crop cannot be combined with --cache_latents"),
    (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
    (["--bucket_reso_steps", "20"], "must be a multiple of 8"),
    (["--enable_bucket", "--resolution", "1024", "--max_bucket_reso", "768"], "is smaller than the resolution"),
    (["--caption_dropout_rate", "1.5"], "must be between 0 and 1"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"],
     "--cache_text_encoder_outputs cannot be combined with --shuffle_caption"),
    (["--in_json", "meta.json"], "fine-tuning metadata datasets are not supported"),
    (["--network_args", "conv_dim"], "is not key=value"),
    (["--network_module", "lycoris.kohya", "--network_args", "algo=lokra"], "algo=lokra is not one of"),
    (["--model_type", "sd1", "--network_args", "block_dims=" + ",".join(["4"] * 23)],
     "block_dims has 23 values; sd1 needs 25"),
    (["--network_args", "block_dims=4,4", "block_alphas=1,1,1"], "block_alphas has 3 values but block_dims has 2"),
])
def test_readable_usage_errors(argv, message):
    with pytest.raises(UsageError) as info:
        resolve_config(argv)
    assert message in str(info.value)


def test_no_effect_and_implication_warnings():
    cfg = resolve_config(["--cache_latents_to_disk", "--use_8bit_adam", "--mem_eff_attn",
                          "--model_type", "sdxl", "--clip_skip", "2", "--multires_noise_discount", "0.2",
                          "--network_args", "algo=locon", "use_reentrant=False",
                          "--sample_every_n_steps", "10", "--highvram"])
    assert cfg.cache_latents and cfg.optimizer_type == "AdamW8bit"
    text = "\n".join(cfg.warnings)
    for expected in ("implies --cache_latents", "legacy spellings of --optimizer_type AdamW8bit",
                     "--mem_eff_attn is run as --sdpa", "--clip_skip=2 has no effect on SDXL",
                     "--multires_noise_discount has no effect", "algo have no effect with networks.lora",
                     "use_reentrant=False has no effect", "have no effect without --sample_prompts",
                     "--highvram has no effect"):
        assert expected in text, expected
    assert not any("tokenizer_cache_dir" in w for w in
                   resolve_config(["--tokenizer_cache_dir", "tok"]).warnings)  # read by trainer/single_file.py


def test_bucket_bounds_rounded_like_sd_scripts():
    cfg = resolve_config(["--enable_bucket", "--resolution", "512", "--min_bucket_reso", "300",
                          "--max_bucket_reso", "1000"])
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso) == (256, 1024)
    assert any("min_bucket_reso 300 -> 256" in w for w in cfg.warnings)


def test_optimizer_names_are_case_insensitive():
    assert resolve_config(["--optimizer_type", "prodigy", "--learning_rate", "1"]).optimizer_type == "Prodigy"
    assert resolve_config(["--optimizer_type", "torch.optim.SGD"]).optimizer_type == "torch.optim.SGD"


def test_output_config_round_trips(tmp_path: Path):
    cfg = resolve_config(["--network_dim", "8", "--resolution", "640,512", "--network_args", "conv_dim=4",
                          "--shuffle_caption", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1"])
    recipe = tmp_path / "out.toml"
    recipe.write_text(config_to_toml(cfg), encoding="utf-8")
    again = resolve_config(["--config", str(recipe)])
    assert again.settings() | {"config": None} == cfg.settings()


def test_every_field_has_group_and_help():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("internal"):
            assert f.metadata["group"] and f.metadata["help"], f.name


def test_use_reentrant_flag_is_accepted_without_effect(tmp_path: Path):
    cfg = resolve_config(["--use_reentrant=False", "--network_dim", "4", "--use-reentrant", "false", "--use_reentrant"])
    assert cfg.network_dim == 4
    assert sum("has no effect: no trainer option" in w for w in cfg.warnings) == 3
    recipe = tmp_path / "r.toml"
    recipe.write_text("use_reentrant = false\nnetwork_dim = 2\n", encoding="utf-8")
    cfg = resolve_config(["--config", str(recipe)])
    assert cfg.network_dim == 2 and any("use_reentrant has no effect" in w for w in cfg.warnings)


def test_warnings_a_run_would_give_are_decided_before_any_model_loads():
    """Everything accepted without effect is known from the flags alone, so `train --dry-run` shows
    what the run would print (issue 11: the run used to add some only after loading the model)."""
    cfg = resolve_config(["--weighted_captions", "--cpu_offload_checkpointing", "--persistent_data_loader_workers",
                          "--max_data_loader_n_workers", "2", "--network_args", "conv_block_dims=4,4",
                          "down_lr_weight=1,1,1"])
    text = "\n".join(cfg.warnings)
    for flag in ("--weighted_captions", "--cpu_offload_checkpointing", "--persistent_data_loader_workers",
                 "conv_block_dims has no effect without block_dims", "down_lr_weight has 3 values"):
        assert flag in text, flag
    lyco = resolve_config(["--network_module", "lycoris.kohya", "--text_encoder_lr", "1e-4", "2e-4"])
    assert any("one learning rate for all text encoders" in w for w in lyco.warnings)
    compiled = resolve_config(["--torch_compile", "--fp8_base", "--mixed_precision", "bf16"])
    assert not [w for w in compiled.warnings if "torch_compile" in w or "fp8_base" in w]  # both work now
