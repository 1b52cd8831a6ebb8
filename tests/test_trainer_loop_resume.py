"""--save_state / --resume: a resumed run continues with the same losses and ends with the same
weights as an uninterrupted one."""

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
            "--output_name", "r", "--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "2",
            "--network_dim", "2", "--learning_rate", "1e-2", "--seed", "5", "--max_data_loader_n_workers", "0",
            "--max_train_steps", "4", "--lr_scheduler", "linear", "--shuffle_caption", "--noise_offset", "0.1",
            "--multires_noise_iterations", "2", "--network_args", "rank_dropout=0.1", *extra]


def test_resume_gives_the_same_loss_curve(tiny_sd1_dir, tiny_dataset, tmp_path, same_seed_tolerance):
    full = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "a", "--save_every_n_steps", "2",
                                      "--save_state")))
    state = tmp_path / "a" / "r-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 2
    resumed = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "b", "--resume", str(state))))
    tolerance = {"rel": max(1e-6, same_seed_tolerance["rel"]), "abs": max(1e-7, same_seed_tolerance["abs"])}
    assert resumed.losses == pytest.approx(full.losses[2:], **tolerance)
    a, b = open_safetensors(full.final_file), open_safetensors(resumed.final_file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=max(1e-5, tolerance["rel"]), atol=max(1e-6, tolerance["abs"]))
    assert b.metadata["ss_steps"] == "4"
