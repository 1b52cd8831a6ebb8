"""`train(cfg)`: a run as five phases, each readable on its own.

1. session (`trainer.session`): accelerate, seed, dtypes, warnings;
2. models (`load_models`): the frozen base, in its compute dtype, optional `--base_weights`;
3. data (`prepare_data`): datasets, step plan, latent / text-encoder caches;
4. network (`prepare_network`): the adapter, its placement, optimizer, data loader, schedule;
5. loop (`trainer.loop.TrainLoop`): the steps, and the save schedule (`trainer.schedule`).

The single-process path and `accelerate launch` (DDP, several processes or nodes) are the same
code: the dataloader is sharded by accelerate, the network's gradients are averaged across
processes, only the main process writes files, and sample prompts are split over processes.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError
from trainer.session import Session


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
    modules: int = 0
    skipped_steps: int = 0
    setup_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainHooks:
    """Callbacks for tools that observe a run (benchmarks, the GPU check): `loop_start()` right
    before the first step, `step_end(global_step)` after each optimizer step."""

    loop_start: Callable[[], None] | None = None
    step_end: Callable[[int], None] | None = None


@dataclass
class DataPhase:
    """What the data phase hands on: datasets, sd-scripts' step plan and cache counts."""

    dataset: Any
    val_dataset: Any
    trainer: Any  # trainer.loop.Trainer (its network is set by the network phase)
    latents_encoded: int = 0
    latents_reused: int = 0

    @property
    def plan(self):
        return self.dataset.plan


@dataclass
class NetworkPhase:
    """The applied network and everything that steps it."""

    network: Any
    network_args: dict[str, str]
    optimizer: Any  # accelerate-wrapped
    opt_info: Any  # trainer.optim.OptimizerInfo
    lr_scheduler: Any
    loader: Any
    sampler: Any  # trainer.loop.EpochSampler
    params: list[torch.nn.Parameter]  # what the optimizer steps (float32 masters with --full_fp16/bf16)
    descriptions: list[str]
    masters: Any = None  # trainer.precision.MasterWeights or None


def train(cfg: Any, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a network as sd-scripts' train_network.py / sdxl_train_network.py would.

    Args:
        cfg: a `trainer.config.TrainConfig` (sd-scripts field names).
        hooks: optional observers (`TrainHooks`).
    Returns:
        `TrainResult` with the written files and the loss per optimizer step.
    Example:
        >>> train(resolve_config(["--pretrained_model_name_or_path", "base/", "--train_data_dir", "img",
        ...                       "--output_dir", "out", "--max_train_steps", "10"]))
    """
    from trainer.loop import TrainLoop

    session = Session.start(cfg)
    model = session.timed("models", load_models, cfg, session)
    data = session.timed("data", prepare_data, cfg, session, model)
    if cfg.debug_dataset:
        for i in range(min(3, len(data.dataset))):
            batch = data.dataset[i]
            pixels = batch["latents"] if batch["latents"] is not None else batch["images"]
            session.say(f"batch {i}: {tuple(pixels.shape)} captions={batch['captions']}")
        return TrainResult(Path(cfg.output_dir), None, warnings=session.warnings)
    net = session.timed("network", prepare_network, cfg, session, model, data)
    return TrainLoop(cfg, session, model, data, net, hooks or TrainHooks()).run()


# --- phase 2: models ---------------------------------------------------------------------------

def load_models(cfg: Any, session: Session):
    """The frozen base model, read from the file straight onto the device in its compute dtype (no
    float32 copy in host memory; with `--lowram` the processes load one after another), then
    `--base_weights` merged into it."""
    from trainer.models import load_base_model

    acc = session.accelerator
    dtype = torch.float32 if cfg.base_weights else session.weight_dtype  # merge in float32, cast when placed
    model = None
    for index in range(acc.num_processes) if cfg.lowram else [acc.process_index]:
        if index == acc.process_index:  # straight from the file to the device, converted there
            model = load_base_model(cfg, acc.device, dtype=dtype, vae_dtype=session.vae_dtype)
        if cfg.lowram:
            acc.wait_for_everyone()
    assert model is not None
    if cfg.base_weights:
        from trainer.base_weights import merge_base_weights

        merged = merge_base_weights(model.arch, model.unet, model.text_encoders, cfg.base_weights,
                                    cfg.base_weights_multiplier)
        session.say(f"merged {merged} modules of {len(cfg.base_weights)} --base_weights files into the base model")
    return model


# --- phase 3: data -----------------------------------------------------------------------------

def prepare_data(cfg: Any, session: Session, model) -> DataPhase:
    """Datasets and step plan; VAE latents (and text-encoder outputs) cached when asked, after
    which those models leave the device."""
    from trainer.data import build_dataset
    from trainer.loop import Trainer
    from trainer.models import make_noise_scheduler
    from trainer.text_encoding import TextEncoderHelper

    acc, arch = session.accelerator, model.arch
    cfg.model_type = arch
    dataset = build_dataset(cfg, num_processes=acc.num_processes)
    val_dataset = build_dataset(cfg, validation=True, seed=dataset.seed, num_processes=acc.num_processes) \
        if cfg.validation_split else None
    data = DataPhase(dataset, val_dataset, None)
    if cfg.debug_dataset:
        return data
    train_te = not cfg.network_train_unet_only
    if cfg.cache_text_encoder_outputs and train_te:
        raise UsageError("--cache_text_encoder_outputs needs --network_train_unet_only (cached text encoders "
                         "cannot be trained)")
    noise_scheduler = make_noise_scheduler(cfg.zero_terminal_snr, model.v_parameterization)
    if cfg.zero_terminal_snr and not model.v_parameterization:
        session.warnings.append("--zero_terminal_snr without v-parameterization makes the terminal step untrainable")
    text = TextEncoderHelper(arch, model.tokenizers, model.text_encoders,
                             clip_skip=None if arch == "sdxl" else cfg.clip_skip,
                             max_token_length=cfg.max_token_length)
    model.vae.to(session.device, dtype=session.vae_dtype)
    data.trainer = Trainer(cfg, acc, model, None, noise_scheduler, text, session.weight_dtype, session.vae_dtype,
                           not cfg.network_train_text_encoder_only, train_te)
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        _cache_latents(cfg, session, model, data)
    if data.trainer.te_cache is not None:
        for te in model.text_encoders:
            te.to(session.device)
        captions = dataset.distinct_captions() + (val_dataset.distinct_captions() if val_dataset is not None else [])
        data.trainer.precache_text(captions)
        session.say(f"text encoders: {len(data.trainer.te_cache)} captions encoded once, encoders off the device")
    return data


def _cache_latents(cfg: Any, session: Session, model, data: DataPhase) -> None:
    acc, sdxl = session.accelerator, model.arch == "sdxl"
    to_disk = bool(cfg.cache_latents_to_disk)
    shard = (acc.process_index, acc.num_processes) if to_disk else (0, 1)
    encode = data.trainer.encode_images
    report = data.dataset.cache_latents(encode, to_disk, sdxl=sdxl, latent_stride=model.vae_scale_factor, shard=shard)
    if to_disk and acc.num_processes > 1:
        acc.wait_for_everyone()
        data.dataset.cache_latents(encode, to_disk, sdxl=sdxl, latent_stride=model.vae_scale_factor, shard=shard)
    if data.val_dataset is not None:
        data.val_dataset.cache_latents(encode, to_disk, sdxl=sdxl, latent_stride=model.vae_scale_factor,
                                       shard=(0, 1))
    session.say(f"latents: {report.encoded} encoded, {report.reused} cached files reused")
    data.latents_encoded, data.latents_reused = report.encoded, report.reused
    model.vae.to("cpu")
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    acc.wait_for_everyone()


# --- phase 4: network --------------------------------------------------------------------------

def prepare_network(cfg: Any, session: Session, model, data: DataPhase) -> NetworkPhase:
    """Build and apply the network, place the models, set attention and compilation, and build
    the optimizer, data loader and LR schedule (accelerate-prepared)."""
    from trainer.config import parse_literal_args, parse_network_args
    from trainer.loop import EpochSampler, unwrap_batch
    from trainer.network import create_network
    from trainer.optim import create_optimizer, create_scheduler

    acc, device = session.accelerator, session.device
    train_unet = not cfg.network_train_text_encoder_only
    train_te = not cfg.network_train_unet_only
    network_args = parse_network_args(cfg.network_args or [])
    weights = None
    if cfg.network_weights:
        from loratools.io.checkpoint import open_state_dict

        weights = dict(open_state_dict(cfg.network_weights))
    network = create_network(cfg, model.arch, model.unet, model.text_encoders, network_args,
                             train_unet=train_unet, train_text_encoder=train_te, weights=weights)
    # `network.ignored` repeats what `trainer.config` already reported (so that --dry-run shows it too)
    unmatched = getattr(network, "unmatched_weights", [])
    if unmatched:
        session.warnings.append(f"--network_weights: {len(unmatched)} modules of the file are not trained by this "
                                f"run (first: {unmatched[0]}; text encoder or UNet excluded, or another architecture)")
    network.apply_to()
    data.trainer.network = network
    _place_models(cfg, session, model, train_te, keep_text_off=data.trainer.text_offloaded)
    network.to(device, dtype=session.net_dtype)

    groups, descriptions = network.prepare_optimizer_params(cfg.text_encoder_lr, cfg.unet_lr, cfg.learning_rate)
    if not groups:
        raise UsageError("no parameters to train: every learning rate is 0 or no module was created; "
                         "check --unet_lr/--text_encoder_lr and --network_train_*_only")
    masters = None
    if session.net_dtype != torch.float32:
        from trainer.precision import MasterWeights

        masters = MasterWeights([p for g in groups for p in g["params"]])
        groups = masters.groups(groups)
    opt_info = create_optimizer(cfg, groups, parse_literal_args(cfg.optimizer_args or []), device=device)
    num_workers = min(int(cfg.max_data_loader_n_workers or 0), os.cpu_count() or 1)
    sampler = EpochSampler(len(data.dataset), session.seed)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=1, sampler=sampler, collate_fn=unwrap_batch,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(session.seed))
    cfg.max_train_steps = data.plan.max_train_steps
    lr_scheduler = create_scheduler(cfg, opt_info, acc.num_processes)
    optimizer, loader, lr_scheduler = acc.prepare(opt_info.optimizer, loader, lr_scheduler)
    acc.register_for_checkpointing(network)
    params = [p for g in groups for p in g["params"]]
    return NetworkPhase(network, network_args, optimizer, opt_info, lr_scheduler, loader, sampler, params,
                        descriptions, masters)


def _place_models(cfg: Any, session: Session, model, train_te: bool, *, keep_text_off: bool) -> None:
    """Models on the device in their compute dtype (fp8 storage with `--fp8_base`), gradient
    checkpointing, attention kernels, regional compilation; frozen text encoders whose outputs
    are cached leave the device."""
    from trainer import acceleration

    device, unet = session.device, model.unet
    if cfg.gradient_checkpointing:
        # The UNet only: a text encoder's activations at 77 tokens are a few MB, and recomputing
        # its 12-32 layers costs more step time than that memory is worth.
        unet.enable_gradient_checkpointing()
        unet.train()
    if train_te:
        for te in model.text_encoders:
            te.train()
    unet.requires_grad_(False)
    unet.to(device, dtype=session.weight_dtype)
    for te in model.text_encoders:
        te.requires_grad_(False)
        te.to("cpu" if keep_text_off else device, dtype=session.weight_dtype)
    if cfg.fp8_base or cfg.fp8_base_unet:
        acceleration.store_fp8(unet, session)
        if cfg.fp8_base and not train_te:
            for te in model.text_encoders:
                acceleration.store_fp8(te, session)
    if cfg.sdpa or cfg.mem_eff_attn:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if cfg.xformers and importlib.util.find_spec("xformers") is not None:  # else trainer.config said so
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # noqa: BLE001 - xformers missing or no CUDA: degrade to sdpa
            session.warnings.append(f"--xformers unavailable ({type(exc).__name__}); using PyTorch sdpa attention")
    if cfg.torch_compile:
        acceleration.compile_blocks(unet, cfg, session)
