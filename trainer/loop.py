"""One training step and the epoch loop, in sd-scripts' order (spec 2.1-2.2).

`Trainer` holds what a step needs (models, network, optimizer, schedules, accelerator) so that
the loss computation can be called by tests on a single batch, and `run.train` only wires it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import losses
from trainer.text_encoding import TextEncoderHelper

log = logging.getLogger(__name__)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the batch indices seeded by (seed, epoch) without touching the global RNG,
    so a resumed run sees the same order as an uninterrupted one. The method is deliberately not
    called `set_epoch`: accelerate's data loader calls that with its own iteration counter, which
    restarts at 0 in a resumed run."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1009 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


def unwrap_batch(items: list[dict]) -> dict:
    """DataLoader collate for a dataset whose item is already a whole batch."""
    return items[0]


class LossRecorder:
    """sd-scripts' moving average: the mean of the latest loss at each step index of an epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0 or step >= len(self.losses):
            self.losses.append(loss)
            self.total += loss
        else:
            self.total += loss - self.losses[step]
            self.losses[step] = loss

    @property
    def average(self) -> float:
        return self.total / max(1, len(self.losses))

    def state(self) -> dict:
        return {"losses": self.losses, "total": self.total}

    def load(self, state: dict) -> None:
        self.losses, self.total = list(state["losses"]), float(state["total"])


@dataclass
class StepOutput:
    loss: torch.Tensor
    per_sample: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class Trainer:
    """The pieces one step needs; built by `run.train`."""

    cfg: Any
    accelerator: Any
    model: Any  # models.BaseModel
    network: Any
    noise_scheduler: Any
    text: TextEncoderHelper
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    train_unet: bool
    train_text_encoder: bool
    snr: torch.Tensor = field(init=False)
    te_cache: dict | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.snr = losses.snr_table(self.noise_scheduler)
        if self.cfg.cache_text_encoder_outputs or self.cfg.cache_text_encoder_outputs_to_disk:
            self.te_cache = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latents (what caches store), in vae_batch_size chunks, NaN -> 0 with a warning."""
        vae = self.model.vae
        out = []
        bs = max(1, int(self.cfg.vae_batch_size or 1))
        with torch.no_grad():
            for i in range(0, images.shape[0], bs):
                chunk = images[i:i + bs].to(self.device, dtype=self.vae_dtype)
                out.append(vae.encode(chunk).latent_dist.sample().float())
        latents = torch.cat(out)
        if not torch.isfinite(latents).all():
            log.warning("NaN/inf in VAE latents; replaced by 0 (use --no_half_vae with fp16)")
            latents = torch.nan_to_num(latents, nan=0.0, posinf=0.0, neginf=0.0)
        return latents

    def conditioning(self, batch: dict):
        if self.train_text_encoder:
            with self.accelerator.autocast():
                return self.text.encode(batch["captions"])
        if self.te_cache is None:
            with torch.no_grad(), self.accelerator.autocast():
                return self.text.encode(batch["captions"])
        return self._cached_conditioning(batch["captions"])

    def _cached_conditioning(self, captions: list[str]):
        """`--cache_text_encoder_outputs`: each distinct caption is encoded once (captions are
        fixed: the config refuses shuffling/dropout with this flag)."""
        from trainer.text_encoding import TextConditioning

        missing = [c for c in dict.fromkeys(captions) if c not in self.te_cache]
        if missing:
            with torch.no_grad(), self.accelerator.autocast():
                cond = self.text.encode(missing)
            for i, caption in enumerate(missing):
                self.te_cache[caption] = (cond.hidden[i].detach(),
                                          None if cond.pooled is None else cond.pooled[i].detach())
        hidden = torch.stack([self.te_cache[c][0] for c in captions])
        pooled = None if self.model.arch != "sdxl" else torch.stack([self.te_cache[c][1] for c in captions])
        return TextConditioning(hidden, pooled)

    def compute_loss(self, batch: dict, fixed_timestep: int | None = None) -> StepOutput:
        """The per-batch loss of spec 2.2 (latents, noise, UNet, target, elementwise loss, weights)."""
        cfg = self.cfg
        if batch.get("latents") is not None:
            latents = batch["latents"].to(self.device, dtype=torch.float32)
        else:
            latents = self.encode_images(batch["images"])
        latents = (latents * self.model.latent_scaling).to(self.weight_dtype)
        cond = self.conditioning(batch)
        noise, noisy, timesteps = losses.noise_and_timesteps(cfg, self.noise_scheduler, latents, fixed_timestep)
        if cfg.gradient_checkpointing:
            noisy.requires_grad_(True)
            cond.hidden.requires_grad_(True)
        unet_kwargs: dict[str, Any] = {}
        if self.model.arch == "sdxl":
            time_ids = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]],
                                 dim=1).to(self.device, dtype=self.weight_dtype)
            unet_kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.weight_dtype), "time_ids": time_ids}
        with self.accelerator.autocast():
            pred = self.model.unet(noisy, timesteps, cond.hidden.to(self.weight_dtype), **unet_kwargs).sample
        if self.model.v_parameterization:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        c = losses.huber_c(cfg, timesteps, self.noise_scheduler)
        loss = losses.elementwise_loss(pred.float(), target.float(), cfg.loss_type, c)
        masks = batch.get("alpha_masks")
        if masks is not None and (cfg.masked_loss or cfg.alpha_mask):
            loss = losses.apply_mask(loss, masks.to(loss.device))
        loss = loss.mean([1, 2, 3])
        weights = batch.get("loss_weights")
        if weights is not None:
            loss = loss * weights.to(loss.device, dtype=loss.dtype)
        loss = losses.post_process(loss, cfg, timesteps, self.snr, self.model.v_parameterization)
        return StepOutput(loss.mean(), loss.detach(), timesteps)


def validation_loss(trainer: Trainer, dataset, seed: int, max_steps: int | None) -> float:
    """Mean loss over the held-out batches at sd-scripts' fixed timesteps, with the RNG switched to
    the validation seed and restored afterwards (training randomness is unaffected)."""
    import random

    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py_state = random.getstate()
    was_training = trainer.network.training
    trainer.network.eval()
    torch.manual_seed(seed)
    random.seed(seed)
    total, count = 0.0, 0
    try:
        n = len(dataset) if not max_steps else min(len(dataset), max_steps)
        with torch.no_grad():
            for i in range(n):
                batch = dataset[i]
                for t in losses.validation_timesteps(trainer.cfg.min_timestep, trainer.cfg.max_timestep):
                    total += float(trainer.compute_loss(batch, fixed_timestep=t).loss)
                    count += 1
    finally:
        trainer.network.train(was_training)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        random.setstate(py_state)
    return total / max(1, count)


def sync_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average the network's gradients over processes (the network is not DDP-wrapped: its forward
    is patched into the base model, so DDP's forward hooks would never run)."""
    if accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= accelerator.num_processes


@dataclass
class TrainState:
    """What `--save_state` writes next to accelerate's state and `--resume` reads back."""

    epoch: int = 0
    step: int = 0

    def write(self, folder: Path, recorder: LossRecorder) -> None:
        (folder / "train_state.json").write_text(json.dumps(
            {"current_epoch": self.epoch, "current_step": self.step, "loss_recorder": recorder.state()}))

    @classmethod
    def read(cls, folder: Path, recorder: LossRecorder) -> TrainState:
        data = json.loads((folder / "train_state.json").read_text())
        if "loss_recorder" in data:
            recorder.load(data["loss_recorder"])
        return cls(int(data["current_epoch"]), int(data["current_step"]))
