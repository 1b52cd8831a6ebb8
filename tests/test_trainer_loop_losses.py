"""Noise, loss weighting, schedules, optimizers and text chunking against hand computations."""

from __future__ import annotations

import math
import types

import pytest
import torch

from loratools.errors import UsageError
from trainer import losses
from trainer.loop import LossRecorder
from trainer.models import make_noise_scheduler
from trainer.optim import create_optimizer, create_scheduler, warmup_steps


def _cfg(**kw):
    base = dict(loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0, min_snr_gamma=None,
                scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None, debiased_estimation_loss=False,
                optimizer_type="AdamW", use_8bit_adam=False, use_lion_optimizer=False, learning_rate=1e-3,
                lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=10, lr_scheduler_num_cycles=1,
                lr_scheduler_power=1.0, lr_scheduler_type="", lr_scheduler_args=[], lr_decay_steps=0,
                lr_scheduler_min_lr_ratio=None, lr_scheduler_timescale=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


SCHED = make_noise_scheduler(False, False)
AC = SCHED.alphas_cumprod.double()


def test_snr_table_is_alpha_bar_over_one_minus():
    t = torch.tensor([0, 10, 500, 999])
    expected = AC[t] / (1 - AC[t])
    torch.testing.assert_close(losses.snr_table(SCHED)[t].double(), expected, rtol=1e-5, atol=0)


def test_min_snr_debiased_and_v_like_weights_by_hand():
    t = torch.tensor([3, 400, 900])
    snr = losses.snr_table(SCHED)
    loss = torch.tensor([1.0, 2.0, 3.0])
    s = (AC[t] / (1 - AC[t])).float()
    got = losses.post_process(loss, _cfg(min_snr_gamma=5), t, snr, v_prediction=False)
    torch.testing.assert_close(got, loss * torch.minimum(s, torch.tensor(5.0)) / s, rtol=1e-5, atol=0)
    got_v = losses.post_process(loss, _cfg(min_snr_gamma=5), t, snr, v_prediction=True)
    torch.testing.assert_close(got_v, loss * torch.minimum(s, torch.tensor(5.0)) / (s + 1), rtol=1e-5, atol=0)
    capped = torch.minimum(s, torch.tensor(1000.0))
    got_d = losses.post_process(loss, _cfg(debiased_estimation_loss=True), t, snr, v_prediction=False)
    torch.testing.assert_close(got_d, loss / torch.sqrt(capped), rtol=1e-5, atol=0)
    got_l = losses.post_process(loss, _cfg(v_pred_like_loss=0.5), t, snr, v_prediction=False)
    torch.testing.assert_close(got_l, loss + loss / (capped / (capped + 1)) * 0.5, rtol=1e-5, atol=0)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_c_schedules_and_pseudo_huber(schedule):
    t = torch.tensor([0, 250, 999])
    c = losses.huber_c(_cfg(loss_type="huber", huber_schedule=schedule, huber_c=0.2, huber_scale=1.5), t, SCHED)
    if schedule == "constant":
        expected = torch.full((3,), 0.3)
    elif schedule == "exponential":
        expected = torch.exp(-(-math.log(0.2) / 1000) * t) * 1.5
    else:
        sigma = ((1 - AC[t]) / AC[t]) ** 0.5
        expected = ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).float()
    torch.testing.assert_close(c.float(), expected.float(), rtol=1e-5, atol=1e-7)
    pred, target = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    cc = c.view(-1, 1, 1, 1)
    d2 = (pred - target) ** 2
    torch.testing.assert_close(losses.elementwise_loss(pred, target, "huber", c), 2 * cc * (torch.sqrt(d2 + cc**2) - cc))
    torch.testing.assert_close(losses.elementwise_loss(pred, target, "smooth_l1", c), 2 * (torch.sqrt(d2 + cc**2) - cc))
    assert losses.huber_c(_cfg(loss_type="l2"), t, SCHED) is None


def test_noise_offset_and_pyramid_noise():
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(1)
    noise = torch.randn(2, 4, 8, 8)
    torch.manual_seed(2)
    got = losses.apply_noise_offset(latents, noise, 0.1, None)
    torch.manual_seed(2)
    torch.testing.assert_close(got, noise + 0.1 * torch.randn(2, 4, 1, 1))
    adaptive = losses.apply_noise_offset(latents, noise, 0.1, 0.5)
    assert adaptive.shape == noise.shape
    pyramid = losses.pyramid_noise_like(torch.randn(2, 4, 16, 16), 3, 0.3)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)


def test_masked_loss_is_area_resized():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0  # top half
    out = losses.apply_mask(loss, mask)
    assert out[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_loss_recorder_is_a_moving_average_over_the_epoch_window():
    r = LossRecorder()
    for step, value in enumerate([1.0, 2.0, 3.0]):
        r.add(0, step, value)
    assert r.average == pytest.approx(2.0)
    r.add(1, 0, 4.0)  # replaces step 0 of the window
    assert r.average == pytest.approx(3.0)


def test_warmup_steps_forms():
    assert warmup_steps(0.1, 50) == 5 and warmup_steps(7, 50) == 7 and warmup_steps("10%", 50) == 5


def _optimizer(**kw):
    params = [torch.nn.Parameter(torch.zeros(2))]
    return create_optimizer(_cfg(**kw), [{"params": params, "lr": 1e-3}], kw.pop("args", {}))


def test_optimizers_by_sd_scripts_names():
    info = _optimizer(optimizer_type="adamw")
    assert info.ss_optimizer == "torch.optim.adamw.AdamW"
    info = create_optimizer(_cfg(optimizer_type="Prodigy"), [{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                            {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True})
    assert info.ss_optimizer == "prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.99),decouple=True)"
    assert info.adaptive
    assert _optimizer(optimizer_type="DAdaptAdam").name == "dadaptation.dadapt_adam.DAdaptAdam"
    sgd = _optimizer(optimizer_type="SGDNesterov").optimizer
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    sf = _optimizer(optimizer_type="AdamWScheduleFree")
    assert sf.schedule_free
    ada = _optimizer(optimizer_type="AdaFactor")
    assert ada.lr_scheduler == "adafactor:0.001"
    assert type(create_scheduler(_cfg(), ada, 1)).__name__ == "AdafactorSchedule"
    with pytest.raises(UsageError, match="bitsandbytes"):
        _optimizer(optimizer_type="AdamW8bit")
    with pytest.raises(UsageError, match="unknown --optimizer_type"):
        _optimizer(optimizer_type="NoSuchThing")


def _schedule(**kw):
    cfg = _cfg(**kw)
    info = create_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}], {})
    return cfg, info


def test_schedulers_follow_transformers_semantics():
    cfg, info = _schedule(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, max_train_steps=8)
    sched = create_scheduler(cfg, info, 1)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        info.optimizer.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3)  # restart after 4 of 8 steps
    cfg, info = _schedule(lr_scheduler="linear", lr_warmup_steps=0.5, max_train_steps=4)
    sched = create_scheduler(cfg, info, 2)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        info.optimizer.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1e-3)  # 4 warmup steps of 8 (steps x processes)
    cfg, info = _schedule(lr_warmup_steps=2)
    with pytest.raises(UsageError, match="constant"):
        create_scheduler(cfg, info, 1)


def test_token_chunking_and_sdxl_pooling(tiny_sdxl):
    from trainer.text_encoding import TextEncoderHelper, tokenize

    tok = tiny_sdxl.tokenizer
    long = ", ".join(["tinychar red circle"] * 40)
    ids = tokenize(tok, [long, "a"], 150)
    assert ids.shape == (2, 2, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    helper = TextEncoderHelper("sdxl", [tiny_sdxl.tokenizer, tiny_sdxl.tokenizer_2],
                               [tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2], clip_skip=None, max_token_length=150)
    with torch.no_grad():
        cond = helper.encode([long, "a"])
        width = tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size
        assert cond.hidden.shape == (2, 152, width)
        assert cond.pooled.shape == (2, tiny_sdxl.text_encoder_2.config.projection_dim)
        ids2 = tokenize(tiny_sdxl.tokenizer_2, ["a"], None)[0]
        out = tiny_sdxl.text_encoder_2(ids2, output_hidden_states=True)
        eos = int((ids2[0] == tiny_sdxl.tokenizer_2.eos_token_id).nonzero()[0])
        expected = tiny_sdxl.text_encoder_2.text_projection(out.last_hidden_state[0, eos])
    torch.testing.assert_close(cond.pooled[1], expected, rtol=1e-5, atol=1e-6)


def test_sd1_clip_skip_uses_final_layer_norm(tiny_sd1):
    from trainer.text_encoding import TextEncoderHelper, tokenize

    helper = TextEncoderHelper("sd1", [tiny_sd1.tokenizer], [tiny_sd1.text_encoder], clip_skip=2, max_token_length=None)
    with torch.no_grad():
        got = helper.encode(["tinychar"]).hidden
        ids = tokenize(tiny_sd1.tokenizer, ["tinychar"], None)[0]
        hs = tiny_sd1.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = tiny_sd1.text_encoder.final_layer_norm(hs)
    torch.testing.assert_close(got, expected)


def test_compute_loss_applies_alpha_masks_and_loss_weights(tiny_sd1):
    from pathlib import Path

    from accelerate import Accelerator

    from trainer.config import resolve_config
    from trainer.loop import Trainer
    from trainer.models import BaseModel
    from trainer.text_encoding import TextEncoderHelper

    cfg = resolve_config(["--masked_loss", "--alpha_mask"])
    model = BaseModel("sd1", tiny_sd1.unet, tiny_sd1.vae, [tiny_sd1.text_encoder], [tiny_sd1.tokenizer], False, Path("."))
    text = TextEncoderHelper("sd1", model.tokenizers, model.text_encoders, clip_skip=None, max_token_length=None)
    trainer = Trainer(cfg, Accelerator(cpu=True), model, None, make_noise_scheduler(False, False), text,
                      torch.float32, torch.float32, True, False)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "captions": ["tinychar", "red"],
             "loss_weights": torch.tensor([1.0, 1.0]), "alpha_masks": torch.ones(2, 1, 64, 64)}

    def loss(**changes):
        torch.manual_seed(3)
        with torch.no_grad():
            return trainer.compute_loss({**batch, **changes}).per_sample

    full = loss()
    assert torch.equal(loss(alpha_masks=torch.zeros(2, 1, 64, 64)), torch.zeros(2))
    half = torch.ones(2, 1, 64, 64)
    half[1] = 0.0
    torch.testing.assert_close(loss(alpha_masks=half), full * torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss(loss_weights=torch.tensor([0.5, 2.0])), full * torch.tensor([0.5, 2.0]))


def _lrs(cfg, info, n):
    sched = create_scheduler(cfg, info, 1)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        info.optimizer.step()
        sched.step()
    return out


def test_constant_with_warmup_and_polynomial_by_hand():
    cfg, info = _schedule(lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_train_steps=5)
    assert _lrs(cfg, info, 5) == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3])
    # transformers' polynomial decay: (lr - lr_end) * (1 - (t - w) / (T - w)) ** power + lr_end, lr_end 1e-7
    cfg, info = _schedule(lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_warmup_steps=1, max_train_steps=5)
    want = [0.0] + [(1e-3 - 1e-7) * (1 - (t - 1) / 4) ** 2 + 1e-7 for t in range(1, 5)]
    assert _lrs(cfg, info, 5) == pytest.approx(want)


def test_lion_and_legacy_flags_name_their_package():
    import importlib.util

    if importlib.util.find_spec("lion_pytorch") or importlib.util.find_spec("bitsandbytes"):
        pytest.skip("lion-pytorch or bitsandbytes installed: nothing is missing")
    with pytest.raises(UsageError, match="lion-pytorch"):
        _optimizer(optimizer_type="Lion")
    with pytest.raises(UsageError, match="lion-pytorch"):
        _optimizer(optimizer_type="", use_lion_optimizer=True)
    with pytest.raises(UsageError, match="bitsandbytes"):
        _optimizer(optimizer_type="Lion8bit")


def _noise_cfg(**kw):
    base = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                multires_noise_iterations=None, multires_noise_discount=0.3, min_timestep=None, max_timestep=None,
                ip_noise_gamma=None, ip_noise_gamma_random_strength=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_ip_noise_gamma_perturbs_the_input_but_not_the_target():
    """sd-scripts' input perturbation: x_t = sqrt(ab)·x0 + sqrt(1-ab)·(noise + γ·n'), target stays noise;
    random draws in the order noise, t, n'."""
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(7)
    noise, noisy, t = losses.noise_and_timesteps(_noise_cfg(ip_noise_gamma=0.1, min_timestep=100, max_timestep=900),
                                                 SCHED, latents)
    torch.manual_seed(7)
    want_noise = torch.randn(2, 4, 8, 8)
    want_t = torch.randint(100, 900, (2,))
    extra = torch.randn(2, 4, 8, 8)
    ab = AC[want_t].float().view(2, 1, 1, 1)
    torch.testing.assert_close(noise, want_noise)
    assert torch.equal(t, want_t)
    torch.testing.assert_close(noisy, ab.sqrt() * latents + (1 - ab).sqrt() * (want_noise + 0.1 * extra))
    # without the flag the same seed gives the unperturbed x_t
    torch.manual_seed(7)
    _, plain, _ = losses.noise_and_timesteps(_noise_cfg(min_timestep=100, max_timestep=900), SCHED, latents)
    torch.testing.assert_close(plain, ab.sqrt() * latents + (1 - ab).sqrt() * want_noise)
