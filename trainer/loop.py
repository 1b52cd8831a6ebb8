"""One training step and the epoch loop, in sd-scripts' order (spec 2.1-2.2).

`Trainer` holds what a step needs (models, network, optimizer, schedules, accelerator) so that
the loss computation can be called by tests on a single batch, and `run.train` only wires it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError
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
    text_offloaded: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.snr = losses.snr_table(self.noise_scheduler).to(self.device)
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

    def precache_text(self, captions: list[str]) -> None:
        """`--cache_text_encoder_outputs`: encode every caption now, then move the frozen text
        encoders off the device (SDXL's two take 1.6 GB in bf16); a caption first seen later brings
        them back."""
        self._encode_into_cache(list(dict.fromkeys(captions)))
        for te in self.model.text_encoders:
            te.to("cpu")
        self.text_offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encode_into_cache(self, missing: list[str]) -> None:
        if self.text_offloaded:
            log.warning("a caption outside the text-encoder cache: the text encoders return to the device")
            for te in self.model.text_encoders:
                te.to(self.device)
            self.text_offloaded = False
        batch = max(1, int(self.cfg.train_batch_size or 1))
        for start in range(0, len(missing), batch):
            chunk = missing[start:start + batch]
            with torch.no_grad(), self.accelerator.autocast():
                cond = self.text.encode(chunk)
            for i, caption in enumerate(chunk):
                self.te_cache[caption] = (cond.hidden[i].detach(),
                                          None if cond.pooled is None else cond.pooled[i].detach())

    def _cached_conditioning(self, captions: list[str]):
        """`--cache_text_encoder_outputs`: each distinct caption is encoded once (captions are
        fixed: the config refuses shuffling/dropout with this flag)."""
        from trainer.text_encoding import TextConditioning

        missing = [c for c in dict.fromkeys(captions) if c not in self.te_cache]
        if missing:
            self._encode_into_cache(missing)
        hidden = torch.stack([self.te_cache[c][0] for c in captions])
        pooled = None if self.model.arch != "sdxl" else torch.stack([self.te_cache[c][1] for c in captions])
        return TextConditioning(hidden, pooled)

    def compute_loss(self, batch: dict, fixed_timestep: int | None = None) -> StepOutput:
        """The per-batch loss of spec 2.2 (latents, noise, UNet, target, elementwise loss, weights)."""
        cfg = self.cfg
        if batch.get("latents") is not None:
            latents = losses.to_device(batch["latents"], self.device).float()
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
            time_ids = losses.to_device(torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"],
                                                   batch["target_sizes_hw"]], dim=1), self.device).to(self.weight_dtype)
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
            loss = loss * losses.to_device(weights, loss.device).to(loss.dtype)
        loss = losses.post_process(loss, cfg, timesteps, self.snr, self.model.v_parameterization)
        return StepOutput(loss.mean(), loss.detach(), timesteps)


class PendingLosses:
    """Per-step losses kept on the device and read in batches.

    Reading a loss (`float(loss)`) waits for the GPU to finish the step, so the host can never
    queue the next step while the GPU works. Losses are read every `every` micro-steps and before
    anything that needs them (saves, validation, the end of an epoch), at the same points in every
    process (the read is a collective `gather` under `accelerate launch`).
    """

    def __init__(self, accelerator, every: int = 10) -> None:
        self.accelerator = accelerator
        self.every = every
        self._items: list[tuple[int, int, int, bool, torch.Tensor]] = []

    def add(self, global_step: int, epoch: int, step_in_epoch: int, synced: bool, loss: torch.Tensor) -> bool:
        """Queue one micro-step's loss; True when it is time to `drain`."""
        self._items.append((global_step, epoch, step_in_epoch, synced, loss.detach().reshape(1)))
        return len(self._items) >= self.every

    def drain(self) -> list[tuple[int, int, int, bool, float]]:
        """(global step, epoch, step in epoch, optimizer stepped, loss averaged over processes)."""
        if not self._items:
            return []
        stacked = torch.cat([item[-1] for item in self._items]).float()
        gathered = self.accelerator.gather(stacked).reshape(-1, len(self._items)).mean(0).tolist()
        out = [(*item[:4], value) for item, value in zip(self._items, gathered)]
        self._items = []
        return out


class TrainLoop:
    """The epoch/step loop of sd-scripts (spec 2.1): accumulation, clipping, optimizer and LR
    steps, max-norm, the save schedule, sampling, validation and logging.

    Built by `trainer.run.train` from the phases' results; `run()` returns the `TrainResult`.
    """

    def __init__(self, cfg: Any, session: Any, model: Any, data: Any, net: Any, hooks: Any) -> None:
        from trainer import saving
        from trainer.run import TrainResult
        from trainer.sampling import Sampler
        from trainer.schedule import SaveSchedule

        self.cfg, self.session, self.model, self.data, self.net, self.hooks = cfg, session, model, data, net, hooks
        self.acc = session.accelerator
        plan = data.plan
        self.schedule = SaveSchedule(cfg, plan.num_epochs)
        self.recorder = LossRecorder()
        self.pending = PendingLosses(self.acc)
        self.scaler = getattr(self.acc, "scaler", None)
        self.out_dir = Path(cfg.output_dir)
        self.result = TrainResult(self.out_dir, None, warnings=session.warnings,
                                  latents_encoded=data.latents_encoded, latents_reused=data.latents_reused,
                                  modules=net.network.module_count())
        self.metadata = saving.RunMetadata(cfg, session, model, data, net)
        self.save_dtype = saving.SAVE_DTYPES[cfg.save_precision]
        self.sampler = Sampler.maybe(cfg, model, net.network, self.acc, self.out_dir, cfg.output_name,
                                     session.weight_dtype, session.seed)
        self.global_step = 0
        self.last_scaled: tuple[int, float, float] | None = None
        self.scaled_log: dict[int, tuple[int, float, float]] = {}  # max-norm values per step, until logged
        self.diverged_at: int | None = None

    # --- the loop -------------------------------------------------------------------------------

    def run(self):
        cfg, acc, net, plan = self.cfg, self.acc, self.net, self.data.plan
        for w in self.result.warnings:
            self.session.say(f"warning: {w}")
        self.session.say(self.data.dataset.summary())
        self.session.say(f"network: {net.network.module_count()} modules ({cfg.network_module}), optimizer "
                         f"{net.opt_info.ss_optimizer}, lr scheduler {net.opt_info.lr_scheduler}")
        self.result.setup_seconds = {"start": round(time.time() - self.session.started, 2),
                                     **self.session.setup_seconds}
        self.session.say("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.result.setup_seconds.items()
                                                 if k != "start") + f" ({self.result.setup_seconds['start']:.1f} s "
                         "since the run started)")
        first_epoch, skip_batches = self._resume(plan.steps_per_epoch)
        if acc.is_main_process and acc.trackers == [] and (cfg.log_with or cfg.logging_dir):
            config, init_kwargs = tracker_init(cfg)
            acc.init_trackers(cfg.log_tracker_name or "network_train", config=config, init_kwargs=init_kwargs)
        from tqdm.auto import tqdm

        self.progress = tqdm(total=plan.max_train_steps, initial=self.global_step, desc="steps",
                             disable=not acc.is_local_main_process, file=sys.stderr)
        if cfg.sample_at_first and not cfg.resume:
            self._sample(0, 0)
        if self.hooks.loop_start:
            self.hooks.loop_start()
        epoch = first_epoch
        for epoch in range(first_epoch, plan.num_epochs):
            if self.global_step >= plan.max_train_steps:
                break
            self._epoch(epoch, skip_batches)
            skip_batches = 0
        self.progress.close()
        self._schedule_free_eval()
        final = self.schedule.at_end(epoch + 1, self.global_step)
        self._act(final)
        result = self.result
        result.final_file = self.out_dir / final[0].file if acc.is_main_process else None
        result.global_step, result.epochs = self.global_step, epoch + 1
        if result.skipped_steps:
            self.session.say(f"{result.skipped_steps} optimizer steps skipped by the fp16 grad scaler (non-finite "
                             "gradients); their updates were not applied")
        acc.end_training()
        return result

    def _epoch(self, epoch: int, skip_batches: int) -> None:
        cfg, acc, net, dataset = self.cfg, self.acc, self.net, self.data.dataset
        self.session.say(f"epoch {epoch + 1}/{self.data.plan.num_epochs}")
        dataset.set_epoch(epoch + 1)
        dataset.set_current_step(self.global_step)
        net.sampler.use_epoch(epoch)
        net.network.train()
        if net.opt_info.schedule_free:
            net.optimizer.train()
        loader = acc.skip_first_batches(net.loader, skip_batches) if skip_batches else net.loader
        step_in_epoch = skip_batches
        for batch in loader:
            multipliers = batch.get("network_multipliers")
            if multipliers is not None:  # per dataset (batches never mix datasets), as sd-scripts
                net.network.set_multiplier(float(multipliers[0]))
            loss = self._micro_step(batch)
            synced = acc.sync_gradients
            if synced:
                self.global_step += 1
                dataset.set_current_step(self.global_step)
            due = self.pending.add(self.global_step, epoch, step_in_epoch, synced, loss)
            step_in_epoch += 1
            if synced:
                self.progress.update(1)
                if self.hooks.step_end:
                    self.hooks.step_end(self.global_step)
                actions = self.schedule.after_step(self.global_step, epoch + 1)
                sample_now = cfg.sample_every_n_steps and not cfg.sample_every_n_epochs and \
                    self.global_step % cfg.sample_every_n_steps == 0
                validate_now = cfg.validate_every_n_steps and self.global_step % cfg.validate_every_n_steps == 0
                if due or actions or sample_now or validate_now or self.global_step >= self.data.plan.max_train_steps:
                    self._drain()
                if actions or sample_now:
                    self._schedule_free_eval()
                    if sample_now:
                        self._sample(None, self.global_step)
                    self._act(actions)
                    self._schedule_free_train()
                if validate_now:
                    self._validate(self.global_step, "step")
            elif due:
                self._drain()
            if self.global_step >= self.data.plan.max_train_steps:
                break
        self._drain()
        if acc.trackers:
            acc.log({"loss/epoch_average": self.recorder.average}, step=epoch + 1)
        if not cfg.validate_every_n_epochs or (epoch + 1) % cfg.validate_every_n_epochs == 0:
            self._validate(epoch + 1, "epoch")
        acc.wait_for_everyone()
        self._schedule_free_eval()
        self._act(self.schedule.after_epoch(epoch + 1, self.global_step))
        if cfg.sample_every_n_epochs and (epoch + 1) % cfg.sample_every_n_epochs == 0:
            self._sample(epoch + 1, self.global_step)

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward, backward and (at the end of an accumulation) the optimizer step; the loss stays
        on the device."""
        cfg, acc, net = self.cfg, self.acc, self.net
        with acc.accumulate(net.network):
            out = self.data.trainer.compute_loss(batch)
            acc.backward(out.loss)
            if acc.sync_gradients:
                if net.masters is not None:
                    net.masters.pull_grads()
                sync_gradients(net.params, acc)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(net.params, cfg.max_grad_norm)
            net.optimizer.step()
            net.lr_scheduler.step()
            net.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                if self.scaler is not None and acc.optimizer_step_was_skipped:
                    self.result.skipped_steps += 1
                if cfg.scale_weight_norms:  # on the float32 masters when there are any, then pushed
                    with net.masters.editing_masters() if net.masters is not None else contextlib.nullcontext():
                        self.last_scaled = net.network.apply_max_norm_regularization(cfg.scale_weight_norms)
                    self.result.keys_scaled.append(self.last_scaled[0])
                    self.scaled_log[self.global_step + 1] = self.last_scaled
                if net.masters is not None:
                    net.masters.push()
        return out.loss

    def _drain(self) -> None:
        """Read the queued losses: running average, result, progress, trackers; stop a run whose
        loss became non-finite without a grad scaler to skip the step (its weights are now NaN)."""
        for global_step, epoch, step_in_epoch, synced, value in self.pending.drain():
            if not math.isfinite(value) and self.diverged_at is None:
                self.diverged_at = global_step if synced else global_step + 1
            self.recorder.add(epoch, step_in_epoch, value)
            if synced:
                self.result.losses.append(value)
            self._log(global_step, value, self.scaled_log.pop(global_step, None) if synced else None)
        if self.diverged_at is not None and self.scaler is None:
            self._stop_diverged()
        postfix = {"avr_loss": f"{self.recorder.average:.4g}"}
        if self.last_scaled is not None:
            postfix.update({"Keys Scaled": self.last_scaled[0], "Average key norm": f"{self.last_scaled[1]:.4g}"})
        self.progress.set_postfix(postfix, refresh=False)

    def _stop_diverged(self) -> None:
        from loratools.errors import NonFiniteError

        kept = ", ".join(p.name for p in self.result.saved_files) or "none"
        precision = self.cfg.mixed_precision or "no"
        hint = ("train in bf16 (--mixed_precision bf16), which has fp32's range" if precision != "bf16"
                else "lower --learning_rate or set --max_grad_norm")
        raise NonFiniteError(f"training diverged at step {self.diverged_at}: the loss is not finite, so the "
                             f"network's weights are not either; nothing from this step on is saved (earlier "
                             f"saves kept: {kept}); {hint}")

    def _log(self, global_step: int, loss: float, scaled: tuple[int, float, float] | None) -> None:
        acc, net = self.acc, self.net
        if not acc.trackers:
            return
        logs: dict[str, float] = {"loss/current": loss, "loss/average": self.recorder.average}
        for i, lr in enumerate(net.lr_scheduler.get_last_lr()):
            label = net.descriptions[i] if i < len(net.descriptions) else f"group{i}"
            logs[f"lr/{label}"] = float(lr)
            if net.opt_info.adaptive:
                opt = net.optimizer.optimizer if hasattr(net.optimizer, "optimizer") else net.optimizer
                group = opt.param_groups[i]
                if "d" in group:
                    logs[f"lr/d*lr/{label}"] = float(group["d"] * group["lr"])
        if scaled is not None:
            logs.update({"max_norm/keys_scaled": scaled[0], "max_norm/max_key_norm": scaled[2],
                         "norm/avg_key_norm": scaled[1]})
        acc.log(logs, step=global_step)

    # --- schedule actions -------------------------------------------------------------------------

    def _act(self, actions) -> None:
        from trainer.schedule import RemoveFile, RemoveState, SaveFile, SaveState

        if not actions:
            return
        self._drain()
        for action in actions:
            if isinstance(action, SaveFile):
                self._save(action)
            elif isinstance(action, RemoveFile):
                self._remove(self.out_dir / action.file)
            elif isinstance(action, SaveState):
                self._save_state(action)
            elif isinstance(action, RemoveState):
                if self.acc.is_main_process and (self.out_dir / action.folder).is_dir():
                    shutil.rmtree(self.out_dir / action.folder)

    def _save(self, action) -> None:
        from trainer import saving

        acc = self.acc
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        tensors = self.net.network.kohya_state_dict()
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            self.diverged_at = self.diverged_at or self.global_step
            self._stop_diverged()
        path, flushed = saving.save_network_file(self.out_dir / action.file, tensors,
                                                 self.metadata.for_save(action.epoch, action.step), self.save_dtype,
                                                 save_model_as=self.cfg.save_model_as)
        if flushed:
            message = (f"{flushed} modules of {path.name} are all-zero in {self.cfg.save_precision} (underflow); "
                       "save with --save_precision float or bf16 to keep them")
            self.result.warnings.append(message)
            self.session.say(f"warning: {message}")
        if path not in self.result.saved_files:
            self.result.saved_files.append(path)

    def _remove(self, path: Path) -> None:
        if self.acc.is_main_process and path.exists():
            path.unlink()
            self.session.say(f"removed old file {path.name}")

    def _save_state(self, action) -> None:
        folder = self.out_dir / action.folder
        self.acc.save_state(str(folder))
        if self.acc.is_main_process:
            TrainState(action.epoch, action.step).write(folder, self.recorder)
            self.result.state_dirs.append(folder)

    def _resume(self, per_epoch: int) -> tuple[int, int]:
        """(first epoch, batches to skip in it) from `--resume` or `--initial_step/epoch`."""
        cfg = self.cfg
        if cfg.resume:
            folder = Path(cfg.resume)
            if not (folder / "train_state.json").exists():
                raise UsageError(f"--resume {folder}: no train_state.json there; pass a folder written by --save_state")
            self.acc.load_state(str(folder))
            if self.net.masters is not None:
                self.net.masters.reload()
            state = TrainState.read(folder, self.recorder)
            self.global_step = state.step
            self.session.say(f"resumed from {folder}: step {state.step}, epoch {state.step // per_epoch + 1}")
            return state.step // per_epoch, (state.step % per_epoch) * cfg.gradient_accumulation_steps
        if cfg.initial_step or cfg.initial_epoch:
            self.global_step = cfg.initial_step or (cfg.initial_epoch - 1) * per_epoch
            skip = (self.global_step % per_epoch) * cfg.gradient_accumulation_steps if cfg.skip_until_initial_step else 0
            return self.global_step // per_epoch, skip
        return 0, 0

    # --- sampling, validation, schedule-free mode ---------------------------------------------------

    def _sample(self, epoch: int | None, step: int) -> None:
        if self.sampler is not None:
            self.result.sample_files += self.sampler.run(epoch=epoch, step=step)

    def _validate(self, step_or_epoch: int, kind: str) -> None:
        if self.data.val_dataset is None:
            return
        self._drain()
        cfg = self.cfg
        self._schedule_free_eval()
        seed = cfg.validation_seed if cfg.validation_seed is not None else self.session.seed
        value = validation_loss(self.data.trainer, self.data.val_dataset, seed, cfg.max_validation_steps)
        self._schedule_free_train()
        self.result.validation_losses.append((self.global_step, value))
        if self.acc.trackers:
            self.acc.log({f"loss/validation/{kind}_average": value,
                          f"loss/validation/{kind}_divergence": value - self.recorder.average}, step=step_or_epoch)

    def _schedule_free_eval(self) -> None:
        if self.net.opt_info.schedule_free:
            self.net.optimizer.eval()

    def _schedule_free_train(self) -> None:
        if self.net.opt_info.schedule_free:
            self.net.optimizer.train()


#: Left out of `--log_config` as sd-scripts does: secrets, and paths that would reveal the user's disk.
_UNLOGGED = ("wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
             "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def tracker_init(cfg) -> tuple[dict | None, dict]:
    """sd-scripts' `init_trackers` arguments: the run's settings with `--log_config` (trackers store
    scalars and strings only, so None is dropped and anything else becomes its string), the wandb
    run name, or the kwargs of a `--log_tracker_config` TOML (which replace the run name)."""
    init_kwargs: dict = {"wandb": {"name": cfg.wandb_run_name}} if cfg.wandb_run_name else {}
    if cfg.log_tracker_config:
        import tomllib

        try:
            init_kwargs = tomllib.loads(Path(cfg.log_tracker_config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"--log_tracker_config {cfg.log_tracker_config}: {exc}; pass a TOML file of "
                             "tracker init arguments, e.g. [wandb] name = \"run\"") from None
    if not cfg.log_config:
        return None, init_kwargs
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
              for k, v in cfg.settings().items() if k not in _UNLOGGED and v is not None}
    return config, init_kwargs


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
