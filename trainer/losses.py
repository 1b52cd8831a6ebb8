"""Noise, timesteps and loss weighting exactly as sd-scripts (spec 1.10, 2.2).

Kept as small functions of tensors so that each formula can be checked against a hand
computation; `loop.py` strings them together in sd-scripts' order.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F


def snr_table(noise_scheduler) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for every training timestep."""
    ac = noise_scheduler.alphas_cumprod.float()
    return (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, noise_offset: Any,
                       adaptive_noise_scale: float | None) -> torch.Tensor:
    """noise += offset·N(0,1) of shape (B, C, 1, 1); adaptive: offset += a·|mean(latents)|, clamped ≥ 0."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)


def pyramid_noise_like(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: add upsampled N(0,1)·d^i at sizes /r^i (r ~ U(2,4)), then unit std."""
    b, c, w, h = noise.shape
    up = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise = noise + up(to_device(torch.randn(b, c, wn, hn), noise.device)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without stalling the host: a plain copy to a GPU from pageable
    memory waits for every queued kernel, so small per-step tensors go through pinned memory."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def sample_timesteps(min_timestep: int, max_timestep: int, batch: int, device) -> torch.Tensor:
    """t ~ UniformInt[min, max) drawn on the CPU RNG (so CPU and GPU runs agree); min==max fixes t."""
    if min_timestep < max_timestep:
        t = torch.randint(min_timestep, max_timestep, (batch,), device="cpu")
    else:
        t = torch.full((batch,), max_timestep, device="cpu")
    return to_device(t.long(), device)


def noise_and_timesteps(cfg: Any, noise_scheduler, latents: torch.Tensor, fixed_timestep: int | None = None):
    """(noise, noisy_latents, timesteps) with offset, pyramid and input-perturbation noise;
    `fixed_timestep` pins t (validation loss)."""
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        offset = cfg.noise_offset
        if cfg.noise_offset_random_strength:
            offset = torch.rand(1, device=latents.device) * cfg.noise_offset
        noise = apply_noise_offset(latents, noise, offset, cfg.adaptive_noise_scale)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise_like(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    min_t = 0 if cfg.min_timestep is None else cfg.min_timestep
    max_t = noise_scheduler.config.num_train_timesteps if cfg.max_timestep is None else cfg.max_timestep
    if fixed_timestep is not None:
        min_t = max_t = fixed_timestep
    timesteps = sample_timesteps(min_t, max_t, latents.shape[0], latents.device)
    if cfg.ip_noise_gamma:
        strength = cfg.ip_noise_gamma
        if cfg.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * cfg.ip_noise_gamma
        noisy = noise_scheduler.add_noise(latents, noise + strength * torch.randn_like(latents), timesteps)
    else:
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy, timesteps


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, count: int = 4) -> list[int]:
    """sd-scripts' fixed validation timesteps: `count` evenly spaced inside [min, max], ends excluded."""
    lo = 0 if min_timestep is None else min_timestep
    hi = 1000 if max_timestep is None else max_timestep
    step = (hi - lo) / (count + 1)
    return [int(lo + step * (i + 1)) for i in range(count)]


def huber_c(cfg: Any, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor | None:
    """Per-sample Huber c for `--loss_type huber|smooth_l1` and its schedule; None otherwise."""
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * cfg.huber_scale
    if cfg.huber_schedule == "snr":
        ac = torch.index_select(noise_scheduler.alphas_cumprod.cpu(), 0, timesteps.cpu())
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return ((1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c).to(timesteps.device)
    return torch.full((timesteps.shape[0],), cfg.huber_c * cfg.huber_scale, device=timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced l2 / l1 / pseudo-Huber 2c(√(d²+c²)−c) / smooth_l1 2(√(d²+c²)−c)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.view(-1, 1, 1, 1)
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply by the alpha/conditioning mask area-resized to the latent size."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = F.interpolate(mask.to(loss.dtype), size=loss.shape[2:], mode="area")
    return loss * mask


def _snr_at(snr: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return snr.to(timesteps.device)[timesteps]


def post_process(loss: torch.Tensor, cfg: Any, timesteps: torch.Tensor, snr: torch.Tensor,
                 v_prediction: bool) -> torch.Tensor:
    """Per-sample weights in sd-scripts' order: min-SNR, v-pred scaling, v-pred-like, debiased."""
    s = _snr_at(snr, timesteps).float().to(loss.device)
    if cfg.min_snr_gamma:
        min_snr = torch.minimum(s, torch.full_like(s, cfg.min_snr_gamma))
        loss = loss * (min_snr / (s + 1) if v_prediction else min_snr / s)
    capped = torch.minimum(s, torch.ones_like(s) * 1000)
    if cfg.scale_v_pred_loss_like_noise_pred:
        loss = loss * (capped / (capped + 1))
    if cfg.v_pred_like_loss:
        loss = loss + loss / (capped / (capped + 1)) * cfg.v_pred_like_loss
    if cfg.debiased_estimation_loss:
        loss = loss * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
    return loss
