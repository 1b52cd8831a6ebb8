"""Tiny SD2 v-prediction run with a dataset TOML: v-pred metadata, ss_datasets, zero terminal SNR
and debiased estimation, fp16 flush accounting."""

from __future__ import annotations

import json

import pytest
import torch

from loratools.io.reader import open_safetensors
from trainer.config import resolve_config
from trainer.run import train
from trainer.saving import count_fp16_flushes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory):
    from loratools.tiny import build_pipeline, save_diffusers

    return save_diffusers(build_pipeline("sd2"), tmp_path_factory.mktemp("tiny_sd2") / "model")


def test_sd2_v_prediction_with_dataset_config(tiny_sd2_dir, tiny_dataset, tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tiny_dataset.concept_dir.as_posix()}"\nnum_repeats = 2\n'
                    f'class_tokens = "tinychar"\n')
    out = tmp_path / "out"
    result = train(resolve_config([
        "--pretrained_model_name_or_path", str(tiny_sd2_dir), "--dataset_config", str(toml), "--output_dir", str(out),
        "--output_name", "v", "--v2", "--v_parameterization", "--zero_terminal_snr", "--debiased_estimation_loss",
        "--network_dim", "2", "--learning_rate", "1e-3", "--seed", "2", "--max_train_steps", "2",
        "--max_data_loader_n_workers", "0", "--clip_skip", "2", "--max_token_length", "150"]))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = open_safetensors(out / "v.safetensors").metadata
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.encoder_layer"] == "2"
    datasets = json.loads(meta["ss_datasets"])
    assert len(datasets) == 1 and datasets[0]["batch_size_per_device"] == 2
    assert datasets[0]["subsets"][0]["num_repeats"] == 2 and datasets[0]["subsets"][0]["img_count"] == 6
    assert "ss_batch_size_per_device" not in meta  # CLI-dataset keys only without --dataset_config


def test_fp16_flush_count():
    tensors = {"a.lora_up.weight": torch.full((2, 2), 1e-9), "a.lora_down.weight": torch.ones(2, 2),
               "a.alpha": torch.tensor(1e-9), "b.lora_up.weight": torch.ones(2, 2)}
    assert count_fp16_flushes(tensors, torch.float16) == 1
    assert count_fp16_flushes(tensors, torch.bfloat16) == 0
    assert count_fp16_flushes(tensors, None) == 0
