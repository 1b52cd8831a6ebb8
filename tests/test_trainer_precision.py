"""Network precision: --full_fp16/--full_bf16 train through float32 master weights (fp16 AdamW
steps give NaN at the first step), and a run whose loss stops being finite ends with one error
naming the step, keeping the saves made before it."""

from __future__ import annotations

import pytest
import torch

from loratools.errors import NonFiniteError
from loratools.io.reader import open_safetensors
from trainer.config import resolve_config
from trainer.precision import MasterWeights
from trainer.run import train

pytestmark = pytest.mark.slow


def _args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "p", "--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "2",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "5e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--network_train_unet_only", *extra]


def test_an_fp16_adamw_step_on_a_zero_gradient_is_nan_which_is_why_masters_exist():
    """The failure the master weights prevent, shown on torch itself: a fresh LoRA's down factors
    get exactly zero gradients (its up factors are zero), and AdamW in fp16 divides 0 by 0."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.zeros(4, dtype=torch.float16)
    torch.optim.AdamW([p], lr=1e-4).step()
    assert torch.isnan(p).all()
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    masters = MasterWeights([half])
    (master,) = masters.groups([{"params": [half]}])[0]["params"]
    half.grad = torch.zeros(4, dtype=torch.float16)
    optimizer = torch.optim.AdamW([master], lr=1e-4)
    masters.pull_grads()
    assert master.grad.dtype == torch.float32 and half.grad is None
    optimizer.step()
    masters.push()
    assert torch.isfinite(half).all() and torch.equal(half, torch.zeros(4, dtype=torch.float16))


def test_master_weights_carry_updates_below_half_precision_resolution():
    """Ten updates of 1e-4 on a weight of 1.0: bf16 alone rounds each away (its step at 1.0 is
    2^-7), the float32 master accumulates them and the bf16 copy shows the sum."""
    half = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    masters = MasterWeights([half])
    master = masters.groups([{"params": [half]}])[0]["params"][0]
    optimizer = torch.optim.SGD([master], lr=1.0)
    for _ in range(100):
        half.grad = torch.full((1,), -1e-4, dtype=torch.bfloat16)
        masters.pull_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.push()
    assert master.item() == pytest.approx(1.01, abs=2e-4)
    assert half.item() == pytest.approx(1.0078125)  # bf16 nearest to 1.01; plain bf16 SGD would stay at 1.0


@pytest.mark.parametrize("module", ["networks.lora", "lycoris.kohya"])
def test_full_fp16_trains_finite_and_saves_finite_weights(tiny_sd1_dir, tiny_dataset, tmp_path, module):
    """The issue's SD1 `--full_fp16 --mixed_precision fp16` run (the network in fp16; on a CPU the
    frozen UNet stays float32) trains with finite losses and saves finite, non-zero factors."""
    result = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "out", "--max_train_steps", "4",
                                        "--mixed_precision", "fp16", "--full_fp16", "--network_module", module,
                                        "--save_precision", "fp16")))
    assert len(result.losses) == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    reader = open_safetensors(result.final_file)
    ups = [reader[k].float() for k in reader if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(reader[k].float()).all() for k in reader)
    assert any(u.abs().sum() > 0 for u in ups)  # the optimizer really moved the fp16 network


def test_full_bf16_trains_through_masters(tiny_sd1_dir, tiny_dataset, tmp_path):
    result = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "out", "--max_train_steps", "3",
                                        "--mixed_precision", "bf16", "--full_bf16")))
    assert all(map(torch.isfinite, torch.tensor(result.losses)))
    reader = open_safetensors(result.final_file)
    assert any(reader[k].abs().sum() > 0 for k in reader if k.endswith("lora_up.weight"))


def test_a_diverged_run_stops_naming_the_step_and_keeps_earlier_saves(tiny_sd1_dir, tiny_dataset, tmp_path):
    """A learning rate of 1e12 blows the weights up after the first update; the run must stop with
    one error naming the step and write nothing after it, while the step-1 file stays."""
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"training diverged at step \d+") as info:
        train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, out, "--max_train_steps", "12",
                                   "--learning_rate", "1e12", "--save_every_n_steps", "1",
                                   "--optimizer_type", "SGDNesterov")))
    assert "earlier saves kept: p-step00000001.safetensors" in str(info.value)
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert "p.safetensors" not in saved and "p-step00000001.safetensors" in saved
    for name in saved:
        reader = open_safetensors(out / name)
        assert all(torch.isfinite(reader[k].float()).all() for k in reader), name
