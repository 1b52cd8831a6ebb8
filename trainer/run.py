"""`train(cfg)`: wire data, models, network, optimizer and the loop; save, sample, log, resume.

The single-process path and `accelerate launch` (DDP, several processes or nodes) are the same
code: the dataloader is sharded by accelerate, the network's gradients are averaged across
processes, only the main process writes files, and sample prompts are split over processes.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError

@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_file: Path | None
    saved_files: list[Path] = field(default_factory=list)
    sample_files: list[Path] = field(default_factory=list)
    state_dirs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    epochs: int = 0
    keys_scaled: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latents_encoded: int = 0
    latents_reused: int = 0
    validation_losses: list[tuple[int, float]] = field(default_factory=list)


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"loratools/{version('loratools')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "loratools/unknown"


def _say(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def _dtype(name: str | None) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "no", torch.float32)


def _make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = cfg.log_with or ("tensorboard" if cfg.logging_dir else None)
    project = None
    if log_with:
        if not cfg.logging_dir:
            raise UsageError(f"--log_with {log_with} needs --logging_dir (where the logs go)")
        run_dir = Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
        if log_with in ("wandb", "all"):
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UsageError("--log_with wandb needs the wandb package (pip install wandb)") from None
    # Several processes without a GPU (accelerate launch / torchrun on CPUs): DDP over gloo.
    import os

    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate keeps its state per process and refuses a second run with another mixed precision;
    # forget the previous run's (the process group in PartialState stays).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cpu_ddp,
                       mixed_precision=cfg.mixed_precision or "no",
                       log_with=None if not log_with else ("all" if log_with == "all" else [log_with]),
                       project_config=project)


def train(cfg: Any) -> TrainResult:
    """Train a network as sd-scripts' train_network.py / sdxl_train_network.py would.

    Args:
        cfg: a `trainer.config.TrainConfig` (sd-scripts field names).
    Returns:
        `TrainResult` with the written files and the loss per optimizer step.
    Example:
        >>> train(resolve_config(["--pretrained_model_name_or_path", "base/", "--train_data_dir", "img",
        ...                       "--output_dir", "out", "--max_train_steps", "10"]))
    """
    from accelerate.utils import set_seed

    from trainer.config import parse_literal_args, parse_network_args
    from trainer.data import build_dataset
    from trainer.loop import (EpochSampler, LossRecorder, Trainer, TrainState, sync_gradients, unwrap_batch,
                              validation_loss)
    from trainer.models import load_base_model, make_noise_scheduler
    from trainer.network import create_network
    from trainer.optim import create_optimizer, create_scheduler
    from trainer import filenames, saving
    from trainer.text_encoding import TextEncoderHelper

    if not cfg.output_dir:
        raise UsageError("--output_dir is required (where the trained files go)")
    session_start = time.time()
    accelerator = _make_accelerator(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**32 - 1)
    set_seed(seed)
    warnings = list(getattr(cfg, "warnings", []) or [])

    # --- models -----------------------------------------------------------------------------
    model = None
    for index in range(accelerator.num_processes) if cfg.lowram else [accelerator.process_index]:
        if index == accelerator.process_index:
            model = load_base_model(cfg, accelerator.device if cfg.lowram else None)
        if cfg.lowram:
            accelerator.wait_for_everyone()
    assert model is not None
    arch = model.arch
    if cfg.base_weights:
        from trainer.base_weights import merge_base_weights

        merged = merge_base_weights(model.arch, model.unet, model.text_encoders, cfg.base_weights,
                                    cfg.base_weights_multiplier)
        _say(accelerator, f"merged {merged} modules of {len(cfg.base_weights)} --base_weights files into the base model")
    for flag, why in (("weighted_captions", "(tag:1.2) emphasis is read as plain caption text"),
                      ("fp8_base", "base weights stay in the mixed-precision dtype"),
                      ("fp8_base_unet", "base weights stay in the mixed-precision dtype"),
                      ("cpu_offload_checkpointing", "checkpointed activations stay on the device"),
                      ("torch_compile", "the UNet is not compiled"),
                      ("persistent_data_loader_workers", "workers are restarted each epoch so they see the epoch")):
        if getattr(cfg, flag, False):
            warnings.append(f"--{flag} has no effect in this trainer: {why}")
    if cfg.cache_text_encoder_outputs_to_disk:
        warnings.append("--cache_text_encoder_outputs_to_disk: text-encoder outputs are cached in memory; no "
                        "*_te_outputs.npz files are written")
    if arch == "sdxl" and cfg.clip_skip:
        warnings.append("--clip_skip has no effect on SDXL (it always uses the penultimate layers)")
    weight_dtype = _dtype(cfg.mixed_precision)
    if weight_dtype == torch.float16 and accelerator.device.type == "cpu":
        warnings.append("--mixed_precision fp16 needs a GPU; on the CPU the frozen models stay in float32 "
                        "(use bf16 for half precision on CPUs)")
        weight_dtype = torch.float32
    vae_dtype = torch.float32 if cfg.no_half_vae else weight_dtype
    device = accelerator.device

    # --- data -------------------------------------------------------------------------------
    cfg.model_type = arch
    dataset = build_dataset(cfg, num_processes=accelerator.num_processes)
    plan = dataset.plan
    val_dataset = build_dataset(cfg, validation=True, seed=dataset.seed, num_processes=accelerator.num_processes) \
        if cfg.validation_split else None
    if cfg.debug_dataset:
        for i in range(min(3, len(dataset))):
            batch = dataset[i]
            pixels = batch["latents"] if batch["latents"] is not None else batch["images"]
            _say(accelerator, f"batch {i}: {tuple(pixels.shape)} captions={batch['captions']}")
        return TrainResult(Path(cfg.output_dir), None, warnings=warnings)
    train_unet = not cfg.network_train_text_encoder_only
    train_te = not cfg.network_train_unet_only
    if cfg.cache_text_encoder_outputs and train_te:
        raise UsageError("--cache_text_encoder_outputs needs --network_train_unet_only (cached text encoders "
                         "cannot be trained)")

    noise_scheduler = make_noise_scheduler(cfg.zero_terminal_snr, model.v_parameterization)
    if cfg.zero_terminal_snr and not model.v_parameterization:
        warnings.append("--zero_terminal_snr without v-parameterization makes the terminal step untrainable")
    text = TextEncoderHelper(arch, model.tokenizers, model.text_encoders,
                             clip_skip=None if arch == "sdxl" else cfg.clip_skip,
                             max_token_length=cfg.max_token_length)

    model.vae.to(device, dtype=vae_dtype)
    cache_counts = (0, 0)
    trainer = Trainer(cfg, accelerator, model, None, noise_scheduler, text, weight_dtype, vae_dtype,
                      train_unet, train_te)
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        to_disk = bool(cfg.cache_latents_to_disk)
        shard = (accelerator.process_index, accelerator.num_processes) if to_disk else (0, 1)
        report = dataset.cache_latents(trainer.encode_images, to_disk, sdxl=arch == "sdxl",
                                       latent_stride=model.vae_scale_factor, shard=shard)
        if to_disk and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()
            dataset.cache_latents(trainer.encode_images, to_disk, sdxl=arch == "sdxl",
                                  latent_stride=model.vae_scale_factor, shard=shard)
        if val_dataset is not None:
            val_dataset.cache_latents(trainer.encode_images, to_disk, sdxl=arch == "sdxl",
                                      latent_stride=model.vae_scale_factor, shard=(0, 1))
        _say(accelerator, f"latents: {report.encoded} encoded, {report.reused} cached files reused")
        cache_counts = (report.encoded, report.reused)
        model.vae.to("cpu")
    accelerator.wait_for_everyone()

    # --- network ----------------------------------------------------------------------------
    network_args = parse_network_args(cfg.network_args or [])
    weights = None
    if cfg.network_weights:
        from loratools.io.checkpoint import open_state_dict

        weights = dict(open_state_dict(cfg.network_weights))
    network = create_network(cfg, arch, model.unet, model.text_encoders, network_args,
                             train_unet=train_unet, train_text_encoder=train_te, weights=weights)
    warnings += network.ignored
    unmatched = getattr(network, "unmatched_weights", [])
    if unmatched:
        warnings.append(f"--network_weights: {len(unmatched)} modules of the file are not trained by this run "
                        f"(first: {unmatched[0]}; text encoder or UNet excluded, or another architecture)")
    network.apply_to()
    trainer.network = network

    unet, text_encoders = model.unet, model.text_encoders
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for te in text_encoders:
            if train_te:
                te.gradient_checkpointing_enable()
                te.train()
    unet.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    for te in text_encoders:
        te.requires_grad_(False)
        te.to(device, dtype=weight_dtype)
    net_dtype = torch.float16 if cfg.full_fp16 else torch.bfloat16 if cfg.full_bf16 else torch.float32
    network.to(device, dtype=net_dtype)
    if cfg.sdpa or cfg.mem_eff_attn:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if cfg.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # noqa: BLE001 - xformers missing or no CUDA: degrade to sdpa
            warnings.append(f"--xformers unavailable ({type(exc).__name__}); using PyTorch sdpa attention")

    # --- optimizer, data loader, schedule ---------------------------------------------------
    groups, descriptions = network.prepare_optimizer_params(cfg.text_encoder_lr, cfg.unet_lr, cfg.learning_rate)
    if not groups:
        raise UsageError("no parameters to train: every learning rate is 0 or no module was created; "
                         "check --unet_lr/--text_encoder_lr and --network_train_*_only")
    opt_info = create_optimizer(cfg, groups, parse_literal_args(cfg.optimizer_args or []))
    num_workers = min(int(cfg.max_data_loader_n_workers or 0), (__import__("os").cpu_count() or 1))
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=unwrap_batch,
                                         num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    per_epoch = plan.steps_per_epoch
    max_train_steps = plan.max_train_steps
    cfg.max_train_steps = max_train_steps
    num_epochs = plan.num_epochs
    lr_scheduler = create_scheduler(cfg, opt_info, accelerator.num_processes)
    optimizer, loader, lr_scheduler = accelerator.prepare(opt_info.optimizer, loader, lr_scheduler)
    if cfg.full_fp16 and getattr(accelerator, "scaler", None) is not None:
        _allow_fp16_unscale(accelerator.scaler)
    accelerator.register_for_checkpointing(network)
    params = [p for g in groups for p in g["params"]]
    recorder = LossRecorder()

    total_batch = plan.effective_batch_size
    dataset_meta = _dataset_metadata(dataset)
    base_meta = saving.base_metadata(
        cfg, arch=arch, v_pred=model.v_parameterization, network_module=cfg.network_module,
        network_args=network_args, dataset_meta=dataset_meta, num_batches_per_epoch=len(loader),
        num_epochs=num_epochs, max_train_steps=max_train_steps, ss_optimizer=opt_info.ss_optimizer,
        total_batch_size=total_batch, seed=seed, model_path=model.path, vae_path=model.vae_path,
        session_start=session_start, trainer_version=_version())
    save_dtype = saving.SAVE_DTYPES[cfg.save_precision]
    out_dir = Path(cfg.output_dir)
    name = cfg.output_name  # None: sd-scripts' per-kind defaults (epoch-…, at-step…, last)
    ext = cfg.save_model_as if cfg.save_model_as != "pt" else "pt"
    result = TrainResult(out_dir, None, warnings=warnings, latents_encoded=cache_counts[0],
                         latents_reused=cache_counts[1])
    for w in warnings:
        _say(accelerator, f"warning: {w}")

    _say(accelerator, dataset.summary())
    _say(accelerator, f"network: {network.module_count()} modules ({cfg.network_module}), optimizer "
                      f"{opt_info.ss_optimizer}, lr scheduler {opt_info.lr_scheduler}")

    def save(file_name: str, epoch: int, step: int) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        ts = time.time()
        meta = dict(base_meta)
        meta.update({"ss_training_finished_at": str(ts), "ss_steps": str(step), "ss_epoch": str(epoch)})
        meta.update(saving.modelspec(cfg, arch=arch, v_pred=model.v_parameterization,
                                     trainer_version=_version(), timestamp=ts))
        path, flushed = saving.save_network_file(out_dir / file_name, network.kohya_state_dict(), meta, save_dtype,
                                                 save_model_as=cfg.save_model_as)
        if flushed:
            message = (f"{flushed} modules of {path.name} are all-zero in {cfg.save_precision} (underflow); save "
                       "with --save_precision float or bf16 to keep them")
            result.warnings.append(message)
            _say(accelerator, f"warning: {message}")
        if path not in result.saved_files:
            result.saved_files.append(path)

    def remove(file_name: str) -> None:
        if accelerator.is_main_process:
            path = out_dir / file_name
            if path.exists():
                path.unlink()
                _say(accelerator, f"removed old file {path.name}")

    def save_state(folder_name: str, epoch: int, step: int) -> None:
        folder = out_dir / folder_name
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            TrainState(epoch, step).write(folder, recorder)
            result.state_dirs.append(folder)

    def remove_state(folder_name: str) -> None:
        if accelerator.is_main_process:
            import shutil

            folder = out_dir / folder_name
            if folder.is_dir():
                shutil.rmtree(folder)

    from trainer.sampling import Sampler

    sampler_images = Sampler.maybe(cfg, model, network, accelerator, out_dir, name, weight_dtype, seed)

    def sample(epoch: int | None, step: int) -> None:
        if sampler_images is not None:
            result.sample_files += sampler_images.run(epoch=epoch, step=step)

    # --- resume -----------------------------------------------------------------------------
    global_step, first_epoch, skip_batches = 0, 0, 0
    if cfg.resume:
        folder = Path(cfg.resume)
        if not (folder / "train_state.json").exists():
            raise UsageError(f"--resume {folder}: no train_state.json there; pass a folder written by --save_state")
        accelerator.load_state(str(folder))
        state = TrainState.read(folder, recorder)
        global_step = state.step
        first_epoch = state.step // per_epoch
        skip_batches = (state.step % per_epoch) * cfg.gradient_accumulation_steps
        _say(accelerator, f"resumed from {folder}: step {global_step}, epoch {first_epoch + 1}")
    elif cfg.initial_step or cfg.initial_epoch:
        global_step = cfg.initial_step or (cfg.initial_epoch - 1) * per_epoch
        first_epoch = global_step // per_epoch
        if cfg.skip_until_initial_step:
            skip_batches = (global_step % per_epoch) * cfg.gradient_accumulation_steps

    if accelerator.is_main_process and accelerator.trackers == [] and (cfg.log_with or cfg.logging_dir):
        config, init_kwargs = _tracker_init(cfg)
        accelerator.init_trackers(cfg.log_tracker_name or "network_train", config=config, init_kwargs=init_kwargs)

    from tqdm.auto import tqdm

    progress = tqdm(total=max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process, file=sys.stderr)
    if cfg.sample_at_first and not cfg.resume:
        sample(0, 0)

    def log_step(loss: float, keys_scaled=None, mean_norm=None, max_norm=None) -> None:
        if not accelerator.trackers:
            return
        logs: dict[str, float] = {"loss/current": loss, "loss/average": recorder.average}
        lrs = lr_scheduler.get_last_lr()
        for i, lr in enumerate(lrs):
            label = descriptions[i] if i < len(descriptions) else f"group{i}"
            logs[f"lr/{label}"] = float(lr)
            if opt_info.adaptive:
                group = optimizer.optimizer.param_groups[i] if hasattr(optimizer, "optimizer") else optimizer.param_groups[i]
                if "d" in group:
                    logs[f"lr/d*lr/{label}"] = float(group["d"] * group["lr"])
        if keys_scaled is not None:
            logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm,
                         "norm/avg_key_norm": mean_norm})
        accelerator.log(logs, step=global_step)

    val_seed = cfg.validation_seed if cfg.validation_seed is not None else seed

    def validate(step_or_epoch: int, kind: str) -> None:
        if val_dataset is None:
            return
        if schedule_free:
            optimizer.eval()
        value = validation_loss(trainer, val_dataset, val_seed, cfg.max_validation_steps)
        if schedule_free:
            optimizer.train()
        result.validation_losses.append((global_step, value))
        if accelerator.trackers:
            accelerator.log({f"loss/validation/{kind}_average": value,
                             f"loss/validation/{kind}_divergence": value - recorder.average}, step=step_or_epoch)

    schedule_free = opt_info.schedule_free
    done = global_step >= max_train_steps
    epoch = first_epoch
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        _say(accelerator, f"epoch {epoch + 1}/{num_epochs}")
        dataset.set_epoch(epoch + 1)
        dataset.set_current_step(global_step)
        sampler.use_epoch(epoch)
        network.train()
        if schedule_free:
            optimizer.train()
        epoch_loader = loader
        if skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        step_in_epoch = skip_batches
        skip_batches = 0
        for batch in epoch_loader:
            multipliers = batch.get("network_multipliers")
            if multipliers is not None:  # per dataset (batches never mix datasets), as sd-scripts
                network.set_multiplier(float(multipliers[0]))
            with accelerator.accumulate(network):
                out = trainer.compute_loss(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    sync_gradients(params, accelerator)
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_value = float(accelerator.gather(out.loss.detach().reshape(1)).mean())
            keys_scaled = mean_norm = max_norm = None
            if accelerator.sync_gradients:
                if cfg.scale_weight_norms:
                    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cfg.scale_weight_norms)
                    result.keys_scaled.append(keys_scaled)
                global_step += 1
                dataset.set_current_step(global_step)
                progress.update(1)
                if schedule_free:
                    optimizer.eval()
                if cfg.sample_every_n_steps and not cfg.sample_every_n_epochs and \
                        global_step % cfg.sample_every_n_steps == 0:
                    sample(None, global_step)
                if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0:
                    save(filenames.step_file(name, global_step, ext), epoch + 1, global_step)
                    old = saving.step_to_remove(global_step, cfg.save_every_n_steps, cfg.save_last_n_steps)
                    if old is not None:
                        remove(filenames.step_file(name, old, ext))
                    if cfg.save_state:
                        save_state(filenames.step_state_dir(name, global_step), epoch + 1, global_step)
                        old = saving.step_to_remove(global_step, cfg.save_every_n_steps, cfg.save_last_n_steps_state)
                        if old is not None:
                            remove_state(filenames.step_state_dir(name, old))
                if schedule_free:
                    optimizer.train()
            recorder.add(epoch, step_in_epoch, loss_value)
            step_in_epoch += 1
            if accelerator.sync_gradients:
                result.losses.append(loss_value)
            postfix = {"avr_loss": f"{recorder.average:.4g}"}
            if keys_scaled is not None:
                postfix.update({"Keys Scaled": keys_scaled, "Average key norm": f"{mean_norm:.4g}"})
            progress.set_postfix(postfix, refresh=False)
            log_step(loss_value, keys_scaled, mean_norm, max_norm)
            # after the step's loss is recorded, as sd-scripts: the divergence compares with the new average
            if accelerator.sync_gradients and cfg.validate_every_n_steps and \
                    global_step % cfg.validate_every_n_steps == 0:
                validate(global_step, "step")
            if global_step >= max_train_steps:
                done = True
                break
        if accelerator.trackers:
            accelerator.log({"loss/epoch_average": recorder.average}, step=epoch + 1)
        if not cfg.validate_every_n_epochs or (epoch + 1) % cfg.validate_every_n_epochs == 0:
            validate(epoch + 1, "epoch")
        accelerator.wait_for_everyone()
        if schedule_free:
            optimizer.eval()
        if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0 and epoch + 1 < num_epochs:
            save(filenames.epoch_file(name, epoch + 1, ext), epoch + 1, global_step)
            old = saving.epoch_to_remove(epoch + 1, cfg.save_every_n_epochs, cfg.save_last_n_epochs)
            if old is not None:
                remove(filenames.epoch_file(name, old, ext))
            if cfg.save_state:
                save_state(filenames.epoch_state_dir(name, epoch + 1), epoch + 1, global_step)
                old = saving.epoch_to_remove(epoch + 1, cfg.save_every_n_epochs, cfg.save_last_n_epochs_state)
                if old is not None:
                    remove_state(filenames.epoch_state_dir(name, old))
        if cfg.sample_every_n_epochs and (epoch + 1) % cfg.sample_every_n_epochs == 0:
            sample(epoch + 1, global_step)
    progress.close()

    if schedule_free:
        optimizer.eval()
    final = filenames.final_file(name, ext)
    save(final, epoch + 1, global_step)
    result.final_file = out_dir / final if accelerator.is_main_process else None
    if cfg.save_state or cfg.save_state_on_train_end:
        save_state(filenames.final_state_dir(name), epoch + 1, global_step)
    result.global_step = global_step
    result.epochs = epoch + 1
    accelerator.end_training()
    return result


#: Left out of `--log_config` as sd-scripts does: secrets, and paths that would reveal the user's disk.
_UNLOGGED = ("wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
             "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def _tracker_init(cfg) -> tuple[dict | None, dict]:
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


def _allow_fp16_unscale(scaler) -> None:
    """`--full_fp16`: the network's own params are fp16, which torch's GradScaler refuses to unscale
    unless told to (what sd-scripts' patch_accelerator_for_fp16_training does)."""
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - signature of torch's method
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def _dataset_metadata(dataset) -> dict:
    """The dataset part of the `ss_*` metadata (spec 3) from the dataset's own bookkeeping."""
    plan = dataset.plan
    meta: dict = {"num_train_images": plan.num_train_images, "num_reg_images": plan.num_reg_images,
                  "num_validation_images": plan.num_validation_images,
                  "ss_tag_frequency": dataset.tag_frequency(), "ss_dataset_dirs": dataset.dataset_dirs(False),
                  "ss_reg_dataset_dirs": dataset.dataset_dirs(True)}
    layouts = dataset.layouts
    meta["ss_bucket_info"] = layouts[0].bucket_info() if len(layouts) == 1 and layouts[0].spec.enable_bucket else None
    if dataset.cfg.dataset_config:
        meta["ss_datasets"] = [_dataset_entry(layout) for layout in layouts]
        del meta["ss_bucket_info"], meta["ss_reg_dataset_dirs"]
    return meta


def _dataset_entry(layout) -> dict:
    """One element of sd-scripts' `ss_datasets` (written when --dataset_config is used)."""
    spec = layout.spec
    subsets = []
    for sub in spec.subsets:
        cap = sub.caption
        subsets.append({
            "img_count": sum(1 for info in layout.images.values() if info.subset is sub),
            "num_repeats": sub.num_repeats, "color_aug": False,
            "flip_aug": sub.flip_aug, "random_crop": sub.random_crop, "shuffle_caption": cap.shuffle_caption,
            "keep_tokens": cap.keep_tokens, "keep_tokens_separator": cap.keep_tokens_separator,
            "secondary_separator": cap.secondary_separator, "enable_wildcard": cap.enable_wildcard,
            "caption_prefix": cap.caption_prefix, "caption_suffix": cap.caption_suffix,
            "resize_interpolation": sub.resize_interpolation, "image_dir": sub.image_dir.name,
            "class_tokens": sub.class_tokens, "is_reg": sub.is_reg,
        })
    return {
        "is_dreambooth": True, "batch_size_per_device": spec.batch_size, "num_train_images": layout.num_train_images,
        "num_reg_images": layout.num_reg_images, "resolution": list(spec.resolution),
        "enable_bucket": spec.enable_bucket, "min_bucket_reso": spec.min_bucket_reso,
        "max_bucket_reso": spec.max_bucket_reso, "tag_frequency": layout.tag_frequency,
        "bucket_info": layout.bucket_info() if spec.enable_bucket else None,
        "resize_interpolation": None, "subsets": subsets,
    }
