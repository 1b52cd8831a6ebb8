"""`loratools train --network_module lycoris.kohya --network_args algo=locon preset=full` on a tiny
SD1 through the real CLI: the run that stopped with "duplicated lora name" on SD1, and lycoris'
log lines that landed on stdout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loratools.io.reader import open_safetensors

pytestmark = pytest.mark.slow


def test_sd1_lycoris_preset_full_trains_with_a_clean_stdout(tiny_sd1_dir, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loratools", "train", "--pretrained_model_name_or_path", str(tiny_sd1_dir),
           "--train_data_dir", str(tiny_dataset.root), "--output_dir", str(out), "--output_name", "lyco",
           "--resolution", "64", "--caption_extension", ".txt", "--network_module", "lycoris.kohya",
           "--network_args", "algo=locon", "preset=full", "conv_dim=2", "conv_alpha=1", "--network_dim", "4",
           "--network_alpha", "2", "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # lycoris' INFO lines go to stderr, never into a user's pipe
    assert "LyCORIS" in proc.stderr
    reader = open_safetensors(out / "lyco.safetensors")
    modules = {k.split(".")[0] for k in reader}
    for name in ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                 "lora_unet_time_embedding_linear_2"):
        assert name in modules
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in modules)
    assert reader.metadata["ss_network_module"] == "lycoris.kohya"
    # every module, conv_in/conv_out/time_embedding included, maps onto the base (the project's own check)
    from loratools.ops.check_keys import CheckKeysOptions, check_keys

    report = check_keys(CheckKeysOptions(out / "lyco.safetensors", tiny_sd1_dir))
    assert report.ok and report.applied == len(modules)
