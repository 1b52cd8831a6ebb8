"""Network precision: --full_fp16/--full_bf16 train through float32 master weights (fp16 AdamW
steps give NaN at the first step), and a run whose loss stops being finite ends with one error
naming the step, keeping the saves made before it."""

from __future__ import annotations

import pytest
import torch

from loratools.errors import NonFiniteError
from loratools.io.reader import open_safetensors
from trainer.config import resolve_config
from trainer.network.fast import FactorPair, MaxNormGroup
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


def test_max_norm_scaling_lands_in_the_masters_not_only_in_the_half_weights():
    """--scale_weight_norms with --full_bf16: scaling the bf16 weights alone is undone by the next
    push of the masters; inside `editing_masters()` the float32 masters are scaled and the push
    carries the result to the half weights."""
    g = torch.Generator().manual_seed(3)
    up = torch.nn.Parameter((torch.randn(6, 2, generator=g) * 10).bfloat16())
    down = torch.nn.Parameter(torch.randn(2, 5, generator=g).bfloat16())
    masters = MasterWeights([up, down])
    group = MaxNormGroup(lambda: [FactorPair(up, down, 1.0)])
    before = (masters.master[0].detach() @ masters.master[1].detach()).norm()
    assert before > 2.0
    group.apply(1.0)  # on the half weights: the masters keep the old norm, and push restores it
    masters.push()
    assert float((up.detach().float() @ down.detach().float()).norm()) == pytest.approx(float(before), rel=1e-2)
    with masters.editing_masters():
        assert up.dtype == torch.float32 and group.apply(1.0)[0] == 1
    master_up, master_down = (m.detach() for m in masters.master)
    assert (master_up @ master_down).norm() == pytest.approx(1.0, rel=1e-5)
    masters.push()
    assert up.dtype == down.dtype == torch.bfloat16
    assert torch.equal(up, master_up.bfloat16()) and torch.equal(down, master_down.bfloat16())


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
    """With --scale_weight_norms too (scaled on the masters): every saved module is within the limit."""
    limit = 0.05
    result = train(resolve_config(_args(tiny_sd1_dir, tiny_dataset.root, tmp_path / "out", "--max_train_steps", "3",
                                        "--mixed_precision", "bf16", "--full_bf16", "--learning_rate", "5e-2",
                                        "--scale_weight_norms", str(limit))))
    assert all(map(torch.isfinite, torch.tensor(result.losses)))
    assert result.keys_scaled[-1] > 0
    reader = open_safetensors(result.final_file)
    assert any(reader[k].abs().sum() > 0 for k in reader if k.endswith("lora_up.weight"))
    for key in (k for k in reader if k.endswith("lora_up.weight")):
        name = key.removesuffix(".lora_up.weight")
        up, down = reader[key].float(), reader[f"{name}.lora_down.weight"].float()
        delta = up.flatten(1) @ down.flatten(1) * float(reader[f"{name}.alpha"]) / down.shape[0]
        assert float(delta.norm()) <= limit * 1.02, name  # bf16 rounding of the factors


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
