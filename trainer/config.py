"""The trainer's one configuration object, named exactly like sd-scripts' arguments.

Users arrive with sd-scripts command lines and GUI presets (see the seed guides), so every field
of ``TrainConfig`` is an sd-scripts argument name with sd-scripts' type and default; the few
fields sd-scripts does not have (``model_type``, ``config``) are marked as ours. A run is
configured by a TOML recipe (``--config``) overlaid with sd-scripts-style flags:
``resolve_config(argv)`` does both, applies the guides' typos as aliases, validates every value
with a one-line ``UsageError`` naming the flag and the valid values, and collects the flags that
are accepted but have no effect into ``cfg.warnings``. No torch here: ``--dry-run`` and
``loratools --help`` use this module.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from loratools.errors import UsageError

# --- choices (sd-scripts' spellings) -------------------------------------------------------

MODEL_TYPES = ("sd1", "sd2", "sdxl")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
SAVE_MODEL_AS = ("safetensors", "ckpt", "pt")
MAX_TOKEN_LENGTHS = (75, 150, 225)
NETWORK_MODULES = ("networks.lora", "lycoris.kohya", "networks.dylora", "locon.locon_kohya")
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "adafactor", "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
LOG_WITH = ("tensorboard", "wandb", "all")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit",
    "PagedLion8bit", "SGDNesterov8bit", "Lion", "SGDNesterov", "DAdaptation", "DAdaptAdamPreprint",
    "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD",
    "Prodigy", "AdaFactor", "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
)


def _opt(default: Any = None, group: str = "", help: str = "", *, choices: tuple | None = None,
         factory: Any = None, ours: bool = False) -> Any:
    """A dataclass field carrying its flag group, help, choices and whether sd-scripts has it."""
    meta = {"group": group, "help": help, "choices": choices, "ours": ours}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training setting; field names and defaults are sd-scripts' (``train_network.py``).

    ``warnings`` (flags accepted without effect, aliases applied) and ``provided`` (the fields
    the recipe or the command line set explicitly) are filled by ``resolve_config``.
    """

    # --- model / precision / memory ---
    pretrained_model_name_or_path: str | None = _opt(None, "model", "Base model: a diffusers folder or a single .safetensors/.ckpt file.")
    model_type: str | None = _opt(None, "model", "sd1, sd2 or sdxl; default: detected from the model (ours; sd-scripts picks it by script).", choices=MODEL_TYPES, ours=True)
    v2: bool = _opt(False, "model", "SD2 model.")
    v_parameterization: bool = _opt(False, "model", "v-prediction target.")
    vae: str | None = _opt(None, "model", "Replacement VAE (file or diffusers folder).")
    no_half_vae: bool = _opt(False, "model", "Keep the VAE in fp32 under mixed precision.")
    lowram: bool = _opt(False, "model", "Processes load the base one after another (models always go straight "
                                            "from the file to the GPU).")
    highvram: bool = _opt(False, "model", "Do not empty the CUDA cache while caching latents.")
    mixed_precision: str = _opt("no", "model", "Autocast dtype.", choices=MIXED_PRECISIONS)
    full_fp16: bool = _opt(False, "model", "Network computes in fp16 too (the optimizer keeps float32 master weights).")
    full_bf16: bool = _opt(False, "model", "Network computes in bf16 too (the optimizer keeps float32 master weights).")
    fp8_base: bool = _opt(False, "model", "Frozen base weights in float8_e4m3fn.")
    fp8_base_unet: bool = _opt(False, "model", "Frozen UNet weights in float8_e4m3fn.")
    save_precision: str | None = _opt(None, "model", "dtype of the saved tensors (fp32 accepted for float).", choices=SAVE_PRECISIONS)
    xformers: bool = _opt(False, "model", "xformers attention.")
    sdpa: bool = _opt(False, "model", "PyTorch scaled-dot-product attention (--spda accepted).")
    mem_eff_attn: bool = _opt(False, "model", "Memory-efficient attention (mapped to sdpa).")
    gradient_checkpointing: bool = _opt(False, "model", "Trade speed for VRAM.")
    cpu_offload_checkpointing: bool = _opt(False, "model", "Offload checkpointed activations to the CPU.")
    torch_compile: bool = _opt(False, "model", "torch.compile each UNet transformer block (regional compilation).")
    dynamo_backend: str = _opt("inductor", "model", "torch.compile backend.")
    max_token_length: int | None = _opt(None, "model", "Caption token budget: 75, 150 or 225.", choices=MAX_TOKEN_LENGTHS)
    clip_skip: int | None = _opt(None, "model", "Use the N-th last CLIP layer (SD1/SD2; SDXL ignores it).")
    tokenizer_cache_dir: str | None = _opt(
        None, "model", "Tokenizers for a single-file base: a folder with tokenizer/ (and tokenizer_2/ for SDXL) "
        "of vocab.json + merges.txt (default: tokenizer folders next to the checkpoint).")
    cache_text_encoder_outputs: bool = _opt(False, "model", "SDXL: encode captions once (needs --network_train_unet_only).")
    cache_text_encoder_outputs_to_disk: bool = _opt(False, "model", "SDXL: keep the text-encoder cache in *_te_outputs.npz.")
    disable_mmap_load_safetensors: bool = _opt(False, "model", "Read safetensors fully instead of mmap.")

    # --- dataset / captions / buckets ---
    train_data_dir: str | None = _opt(None, "data", "Parent of N_concept folders.")
    reg_data_dir: str | None = _opt(None, "data", "Parent of N_concept regularization folders.")
    in_json: str | None = _opt(None, "data", "Fine-tuning metadata JSON (not supported: use folders or --dataset_config).")
    dataset_repeats: int = _opt(1, "data", "Repeats of fine-tuning datasets; no effect with N_concept folders.")
    prior_loss_weight: float = _opt(1.0, "data", "Loss weight of regularization images.")
    dataset_config: str | None = _opt(None, "data", "Dataset TOML ([general], [[datasets]], [[datasets.subsets]]).")
    caption_extension: str = _opt(".caption", "data", "Caption file extension (first line is used).")
    shuffle_caption: bool = _opt(False, "data", "Shuffle separator-delimited tags each time an image is used.")
    caption_separator: str = _opt(",", "data", "Tag separator.")
    keep_tokens: int = _opt(0, "data", "Number of leading tags never shuffled or dropped.")
    keep_tokens_separator: str = _opt("", "data", "Tags before this separator are kept fixed.")
    secondary_separator: str | None = _opt(None, "data", "Replaced by caption_separator after shuffling.")
    enable_wildcard: bool = _opt(False, "data", "{a|b} wildcards and multi-line captions.")
    caption_prefix: str | None = _opt(None, "data", "Text put before every caption.")
    caption_suffix: str | None = _opt(None, "data", "Text put after every caption.")
    caption_dropout_rate: float = _opt(0.0, "data", "Probability of an empty caption.")
    caption_dropout_every_n_epochs: int = _opt(0, "data", "Empty captions on every N-th epoch.")
    caption_tag_dropout_rate: float = _opt(0.0, "data", "Probability of dropping each shuffled tag.")
    token_warmup_min: int = _opt(1, "data", "Tags used at the first step of token warmup.")
    token_warmup_step: float = _opt(0.0, "data", "Steps (or fraction of max_train_steps) of token warmup.")
    weighted_captions: bool = _opt(False, "data", "A1111-style (tag:1.2) emphasis in captions.")
    resolution: tuple[int, int] | None = _opt(None, "data", "Training size \"W,H\" or \"S\".")
    enable_bucket: bool = _opt(False, "data", "Aspect-ratio buckets.")
    min_bucket_reso: int = _opt(256, "data", "Smallest bucket side.")
    max_bucket_reso: int = _opt(1024, "data", "Largest bucket side.")
    bucket_reso_steps: int = _opt(64, "data", "Bucket side granularity (SD1: multiple of 64, SDXL: 32).")
    bucket_no_upscale: bool = _opt(False, "data", "Per-image buckets without upscaling.")
    resize_interpolation: str | None = _opt(None, "data", "Resize filter (default: area down, lanczos up).", choices=RESIZE_INTERPOLATIONS)
    flip_aug: bool = _opt(False, "data", "Random horizontal flips.")
    color_aug: bool = _opt(False, "data", "Random hue shifts (not with latent caching).")
    random_crop: bool = _opt(False, "data", "Random crop offsets (not with latent caching).")
    face_crop_aug_range: tuple[float, float] | None = _opt(None, "data", "Face crop range \"a,b\".")
    alpha_mask: bool = _opt(False, "data", "Loss mask from the image alpha channel.")
    masked_loss: bool = _opt(False, "data", "Apply the mask (alpha or conditioning image) to the loss.")
    conditioning_data_dir: str | None = _opt(None, "data", "Mask images for --masked_loss.")
    cache_latents: bool = _opt(False, "data", "Encode every image with the VAE once.")
    cache_latents_to_disk: bool = _opt(False, "data", "Keep the latent cache next to the images (*_WxH_sd.npz).")
    skip_cache_check: bool = _opt(False, "data", "Trust existing cache files without checking their keys.")
    vae_batch_size: int = _opt(1, "data", "Batch size for VAE encoding.")
    cache_info: bool = _opt(False, "data", "Cache image sizes and captions per folder.")
    debug_dataset: bool = _opt(False, "data", "Print batches and exit.")
    dataset_class: str | None = _opt(None, "data", "User dataset class pkg.mod.Class.")
    validation_split: float = _opt(0.0, "data", "Fraction of images held out for validation loss.")
    validation_seed: int | None = _opt(None, "data", "Seed of the validation split and loss.")
    validate_every_n_steps: int | None = _opt(None, "data", "Validation loss every N steps.")
    validate_every_n_epochs: int | None = _opt(None, "data", "Validation loss every N epochs.")
    max_validation_steps: int | None = _opt(None, "data", "Cap on validation batches.")
    max_data_loader_n_workers: int = _opt(8, "data", "DataLoader workers (capped by the CPU count).")
    persistent_data_loader_workers: bool = _opt(False, "data", "Keep DataLoader workers between epochs.")

    # --- network ---
    network_module: str = _opt("networks.lora", "network", "networks.lora or lycoris.kohya (sd-scripts requires it; default ours).", choices=NETWORK_MODULES)
    network_dim: int | None = _opt(None, "network", "Rank (None = 4).")
    network_alpha: float = _opt(1.0, "network", "Alpha; scale = alpha/dim.")
    network_dropout: float | None = _opt(None, "network", "Dropout on the down projection.")
    network_args: list[str] = _opt(group="network", help="key=value ... (conv_dim, algo, preset, ...).", factory=list)
    network_weights: str | None = _opt(None, "network", "Continue from this LoRA file.")
    dim_from_weights: bool = _opt(False, "network", "Take ranks from --network_weights.")
    base_weights: list[str] | None = _opt(None, "network", "LoRAs merged into the base before training.")
    base_weights_multiplier: list[float] | None = _opt(None, "network", "Multipliers of --base_weights.")
    network_train_unet_only: bool = _opt(False, "network", "Train the UNet only.")
    network_train_text_encoder_only: bool = _opt(False, "network", "Train the text encoder(s) only.")
    learning_rate: float = _opt(2e-6, "network", "Default learning rate.")
    unet_lr: float | None = _opt(None, "network", "UNet learning rate.")
    text_encoder_lr: list[float] | None = _opt(None, "network", "Text-encoder learning rate(s), one per encoder.")
    loraplus_lr_ratio: float | None = _opt(None, "network", "LoRA+ ratio for lora_up.")
    loraplus_unet_lr_ratio: float | None = _opt(None, "network", "LoRA+ ratio (UNet).")
    loraplus_text_encoder_lr_ratio: float | None = _opt(None, "network", "LoRA+ ratio (text encoders).")
    scale_weight_norms: float | None = _opt(None, "network", "Max-norm regularization.")
    training_comment: str | None = _opt(None, "network", "Stored in ss_training_comment.")
    no_metadata: bool = _opt(False, "network", "Minimal metadata only.")
    save_model_as: str = _opt("safetensors", "network", "File format.", choices=SAVE_MODEL_AS)
    metadata_title: str | None = _opt(None, "network", "modelspec.title")
    metadata_author: str | None = _opt(None, "network", "modelspec.author")
    metadata_description: str | None = _opt(None, "network", "modelspec.description")
    metadata_license: str | None = _opt(None, "network", "modelspec.license")
    metadata_tags: str | None = _opt(None, "network", "modelspec.tags")
    metadata_usage_hint: str | None = _opt(None, "network", "modelspec.usage_hint")
    metadata_thumbnail: str | None = _opt(None, "network", "modelspec.thumbnail (image path)")

    # --- optimizer / schedule ---
    optimizer_type: str = _opt("AdamW", "optimizer", "Optimizer name (case-insensitive) or pkg.mod.Class.")
    optimizer_args: list[str] = _opt(group="optimizer", help="key=value ... (values parsed as Python literals).", factory=list)
    use_8bit_adam: bool = _opt(False, "optimizer", "Legacy: AdamW8bit.")
    use_lion_optimizer: bool = _opt(False, "optimizer", "Legacy: Lion.")
    max_grad_norm: float = _opt(1.0, "optimizer", "Gradient clipping; 0 disables.")
    lr_scheduler: str = _opt("constant", "optimizer", "LR schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int | float = _opt(0, "optimizer", "Warmup steps, or a fraction (<1 or \"10%\") of the steps.")
    lr_decay_steps: int | float = _opt(0, "optimizer", "Decay steps (warmup_stable_decay), or a fraction.")
    lr_scheduler_num_cycles: int = _opt(1, "optimizer", "cosine_with_restarts cycles.")
    lr_scheduler_power: float = _opt(1.0, "optimizer", "polynomial power.")
    lr_scheduler_min_lr_ratio: float | None = _opt(None, "optimizer", "Minimum LR ratio (cosine_with_min_lr, warmup_stable_decay).")
    lr_scheduler_timescale: int | None = _opt(None, "optimizer", "inverse_sqrt timescale.")
    lr_scheduler_type: str = _opt("", "optimizer", "Custom scheduler class.")
    lr_scheduler_args: list[str] = _opt(group="optimizer", help="key=value ... for --lr_scheduler_type.", factory=list)
    fused_backward_pass: bool = _opt(False, "optimizer", "Adafactor fused backward pass.")

    # --- steps / saving ---
    train_batch_size: int = _opt(1, "steps", "Images per batch per device.")
    gradient_accumulation_steps: int = _opt(1, "steps", "Batches per optimizer step.")
    max_train_steps: int = _opt(1600, "steps", "Optimizer steps.")
    max_train_epochs: int | None = _opt(None, "steps", "Epochs; overrides --max_train_steps.")
    seed: int | None = _opt(None, "steps", "Random seed (None: random, recorded in ss_seed).")
    output_dir: str | None = _opt(None, "saving", "Output folder (created).")
    output_name: str | None = _opt(None, "saving", "Output file stem (default \"last\"; empty refused).")
    save_every_n_epochs: int | None = _opt(None, "saving", "Save every N epochs.")
    save_every_n_steps: int | None = _opt(None, "saving", "Save every N steps.")
    save_n_epoch_ratio: int | None = _opt(None, "saving", "Save about N times over the run.")
    save_last_n_epochs: int | None = _opt(None, "saving", "Keep the last N epoch files.")
    save_last_n_steps: int | None = _opt(None, "saving", "Keep step files of the last N steps.")
    save_state: bool = _opt(False, "saving", "Save the training state with each save.")
    save_state_on_train_end: bool = _opt(False, "saving", "Save the training state at the end.")
    save_last_n_epochs_state: int | None = _opt(None, "saving", "Keep the last N epoch states.")
    save_last_n_steps_state: int | None = _opt(None, "saving", "Keep states of the last N steps.")
    resume: str | None = _opt(None, "saving", "Resume from this state folder.")
    initial_epoch: int | None = _opt(None, "saving", "Start counting at this epoch.")
    initial_step: int | None = _opt(None, "saving", "Start counting at this step.")
    skip_until_initial_step: bool = _opt(False, "saving", "Skip data until --initial_step.")

    # --- sampling / logging ---
    sample_prompts: str | None = _opt(None, "sampling", "Prompt file (.txt, .toml, .json).")
    sample_sampler: str = _opt("ddim", "sampling", "Sampler for sample images.", choices=SAMPLERS)
    sample_every_n_steps: int | None = _opt(None, "sampling", "Sample every N steps.")
    sample_every_n_epochs: int | None = _opt(None, "sampling", "Sample every N epochs (wins over steps).")
    sample_at_first: bool = _opt(False, "sampling", "Sample before training.")
    log_with: str | None = _opt(None, "logging", "tensorboard, wandb or all.", choices=LOG_WITH)
    logging_dir: str | None = _opt(None, "logging", "Log folder (implies tensorboard).")
    log_prefix: str | None = _opt(None, "logging", "Prefix of the run folder.")
    log_tracker_name: str | None = _opt(None, "logging", "Tracker project name.")
    log_tracker_config: str | None = _opt(None, "logging", "Tracker config TOML.")
    wandb_run_name: str | None = _opt(None, "logging", "wandb run name.")
    wandb_api_key: str | None = _opt(None, "logging", "wandb API key (prefer the WANDB_API_KEY variable).")
    log_config: bool = _opt(False, "logging", "Log the configuration to the trackers.")

    # --- noise / loss ---
    noise_offset: float | None = _opt(None, "loss", "Offset noise strength.")
    noise_offset_random_strength: bool = _opt(False, "loss", "Random offset strength in [0, v].")
    adaptive_noise_scale: float | None = _opt(None, "loss", "Adds |latent mean| x this to the offset.")
    multires_noise_iterations: int | None = _opt(None, "loss", "Pyramid noise levels.")
    multires_noise_discount: float = _opt(0.3, "loss", "Pyramid noise discount.")
    ip_noise_gamma: float | None = _opt(None, "loss", "Input perturbation noise.")
    ip_noise_gamma_random_strength: bool = _opt(False, "loss", "Random input perturbation strength.")
    min_snr_gamma: float | None = _opt(None, "loss", "Min-SNR weighting gamma.")
    scale_v_pred_loss_like_noise_pred: bool = _opt(False, "loss", "Scale v-pred loss like eps loss.")
    v_pred_like_loss: float | None = _opt(None, "loss", "Add v-pred-like loss with this weight.")
    debiased_estimation_loss: bool = _opt(False, "loss", "Debiased estimation weighting.")
    zero_terminal_snr: bool = _opt(False, "loss", "Rescale betas to zero terminal SNR.")
    min_timestep: int | None = _opt(None, "loss", "Smallest timestep (default 0).")
    max_timestep: int | None = _opt(None, "loss", "Largest timestep, exclusive (default 1000).")
    loss_type: str = _opt("l2", "loss", "Loss function.", choices=LOSS_TYPES)
    huber_schedule: str = _opt("snr", "loss", "Huber c schedule.", choices=HUBER_SCHEDULES)
    huber_c: float = _opt(0.1, "loss", "Huber c.")
    huber_scale: float = _opt(1.0, "loss", "Huber scale.")

    # --- run control (ours) ---
    config: str | None = _opt(None, "run", "TOML recipe; flags override it (--config_file accepted).", ours=True)
    output_config: bool = _opt(False, "run", "Write the resolved configuration as TOML and exit.")

    warnings: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})
    provided: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False, metadata={"internal": True})

    def settings(self) -> dict[str, Any]:
        """The user-facing fields as a plain dict (what ``--dry-run`` prints and metadata reads)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}


def add_warning(cfg: TrainConfig, message: str) -> None:
    """Record a warning once (the dataset is scanned more than once: training and validation parts)."""
    if message not in cfg.warnings:
        cfg.warnings.append(message)


def config_fields() -> dict[str, dataclasses.Field]:
    """The settable fields by name (internal bookkeeping fields excluded)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}


def parse_network_args(items: list[str]) -> dict[str, str]:
    """``["conv_dim=4", "algo=locon"]`` -> ``{"conv_dim": "4", "algo": "locon"}`` (split at the first ``=``).

    Values stay strings as sd-scripts passes them to the network module (and stores them in
    ``ss_network_args``); each network module converts what it reads.
    """
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--network_args: {item!r} is not key=value (example: conv_dim=32)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_literal_args(items: list[str], flag: str = "--optimizer_args") -> dict[str, Any]:
    """``key=value`` items with values read by ``ast.literal_eval`` (a value that fails stays a string).

    That is how sd-scripts reads ``--optimizer_args betas=0.9,0.99 decouple=True`` (a tuple and a bool).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag}: {item!r} is not key=value (example: weight_decay=0.01)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def resolve_config(argv: list[str]) -> TrainConfig:
    """Build the configuration: TOML recipe (``--config``), then the flags in ``argv`` on top.

    Args:
        argv: sd-scripts-style arguments (``--flag=value``, ``--flag value``, ``--flag`` for
            booleans, ``--network_args k=v k=v``; dashes or underscores), possibly with
            ``--config RECIPE.toml``.

    Returns:
        A validated ``TrainConfig`` whose ``warnings`` lists every flag accepted without effect.

    Example:
        >>> cfg = resolve_config(["--config", "recipes/sd15-style.toml", "--train_data_dir", "data"])
    """
    from trainer.flags import load_recipe, parse_argv

    flag_values, warnings = parse_argv(argv)
    recipe_path = flag_values.pop("config", None)
    values: dict[str, Any] = {}
    if recipe_path is not None:
        recipe_values, recipe_warnings = load_recipe(recipe_path)
        values.update(recipe_values)
        warnings.extend(recipe_warnings)
    values.update(flag_values)
    cfg = TrainConfig(**values, config=recipe_path)
    cfg.provided = frozenset(values) | ({"config"} if recipe_path else frozenset())
    cfg.warnings = warnings
    validate_config(cfg)
    return cfg


def round_bucket_bounds(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """sd-scripts rounds ``min_bucket_reso`` down and ``max_bucket_reso`` up to a multiple of the step."""
    return (min_reso // steps) * steps, int(math.ceil(max_reso / steps)) * steps


# network_args keys each network module reads; anything else is reported as having no effect.
LORA_NETWORK_KEYS = frozenset({
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "dropout", "rank_dropout", "module_dropout", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
    "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
})
LYCORIS_NETWORK_KEYS = frozenset({
    "algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker",
    "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "rank_dropout_scale", "train_norm", "factor",
    "decompose_both", "full_matrix", "unbalanced_factorization", "block_size", "constraint", "rescaled",
    "dora_wd", "wd_on_output", "bypass_mode", "rs_lora", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
})
# Keys lycoris.kohya accepts on the command line but never reads (the Hungarian guide passes them).
LYCORIS_IGNORED_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                        "down_lr_weight", "mid_lr_weight", "up_lr_weight", "use_reentrant")
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3")
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")
# Number of per-block values networks.lora expects (spec 1.6).
BLOCK_COUNTS = {"sd1": 25, "sd2": 25, "sdxl": 23}
# Flags accepted for compatibility whose work this trainer does differently (no effect).
NO_EFFECT = {
    "highvram": "the latent cache does not empty the CUDA cache between batches anyway",
    "weighted_captions": "(tag:1.2) emphasis is read as plain caption text",
    "cpu_offload_checkpointing": "checkpointed activations stay on the device",
    "cache_info": "image sizes are read from file headers, which is already fast",
    "disable_mmap_load_safetensors": "models are loaded through loratools.io",
}
# Flags sd-scripts has that this trainer refuses rather than silently ignoring.
UNSUPPORTED = {
    "in_json": "fine-tuning metadata datasets are not supported; use N_concept folders or --dataset_config",
    "dataset_class": "custom dataset classes are not supported; use N_concept folders or --dataset_config",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "color_aug": "colour augmentation is not supported",
    "conditioning_data_dir": "mask images are not supported; use --alpha_mask (RGBA images) with --masked_loss",
}


def validate_config(cfg: TrainConfig) -> None:
    """Check values and combinations; raise ``UsageError`` or append to ``cfg.warnings``.

    Also applies sd-scripts' implications (``cache_latents_to_disk`` implies ``cache_latents``,
    legacy optimizer flags, bucket bounds rounded to the step) so every consumer sees the
    effective values.
    """
    warn = cfg.warnings.append
    given = cfg.provided

    for name, why in UNSUPPORTED.items():
        if getattr(cfg, name) not in (None, False):
            raise UsageError(f"--{name}: {why}")
    for name, why in NO_EFFECT.items():
        if getattr(cfg, name) not in (None, False):
            warn(f"--{name} has no effect: {why}")

    if cfg.output_name is not None and not cfg.output_name.strip():
        raise UsageError("--output_name is empty: the final file would have no name; give a file stem, "
                         "e.g. --output_name my_lora")
    if cfg.output_name is not None and any(c in cfg.output_name for c in "/\\"):
        raise UsageError(f"--output_name {cfg.output_name!r} contains a path separator; put folders in --output_dir")
    if "dataset_repeats" in given and cfg.in_json is None:
        warn(f"--dataset_repeats={cfg.dataset_repeats} has no effect: repeats come from the N_ prefix of each "
             "concept folder (or num_repeats in --dataset_config)")

    _check_ranges(cfg)
    _check_precision(cfg)
    _check_buckets(cfg)
    _check_caching(cfg)
    _check_optimizer(cfg)
    _check_network(cfg)
    _check_schedule_and_saving(cfg)


def _positive(cfg: TrainConfig, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else ">= 1"
            raise UsageError(f"--{name}={value} must be {bound}")


def _check_ranges(cfg: TrainConfig) -> None:
    _positive(cfg, "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs",
              "vae_batch_size", "network_dim", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso",
              "lr_scheduler_num_cycles")
    _positive(cfg, "keep_tokens", "caption_dropout_every_n_epochs", "max_data_loader_n_workers",
              "prior_loss_weight", "max_grad_norm", "learning_rate", "network_alpha", allow_zero=True)
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UsageError(f"--{name}={value} must be between 0 and 1")
    if not 0.0 <= cfg.validation_split < 1.0:
        raise UsageError(f"--validation_split={cfg.validation_split} must be in [0, 1)")
    lo = 0 if cfg.min_timestep is None else cfg.min_timestep
    hi = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= lo <= hi <= 1000:
        raise UsageError(f"--min_timestep={lo} / --max_timestep={hi}: need 0 <= min <= max <= 1000")
    if cfg.clip_skip is not None and cfg.clip_skip < 1:
        raise UsageError(f"--clip_skip={cfg.clip_skip} must be >= 1 (1 = last layer, 2 = penultimate)")
    if cfg.adaptive_noise_scale is not None and cfg.noise_offset is None:
        raise UsageError("--adaptive_noise_scale needs --noise_offset")
    if "multires_noise_discount" in cfg.provided and not cfg.multires_noise_iterations:
        cfg.warnings.append("--multires_noise_discount has no effect without --multires_noise_iterations")


def _check_precision(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        raise UsageError("--full_fp16 needs --mixed_precision fp16")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        raise UsageError("--full_bf16 needs --mixed_precision bf16")
    if (cfg.fp8_base or cfg.fp8_base_unet) and cfg.mixed_precision == "no":
        raise UsageError("--fp8_base needs --mixed_precision fp16 or bf16")
    if cfg.mem_eff_attn:
        warn("--mem_eff_attn is run as --sdpa (PyTorch's memory-efficient attention)")
    if cfg.xformers and (cfg.sdpa or cfg.mem_eff_attn):
        warn("--xformers and --sdpa both given: xformers is used where installed, sdpa otherwise")
    if cfg.xformers and importlib.util.find_spec("xformers") is None:
        warn("--xformers unavailable: the xformers package is not installed; PyTorch sdpa attention is used")
    if cfg.model_type == "sdxl" and cfg.clip_skip is not None:
        warn(f"--clip_skip={cfg.clip_skip} has no effect on SDXL (it always uses the penultimate layers)")
    if cfg.model_type == "sdxl" and cfg.v2:
        raise UsageError("--v2 contradicts --model_type sdxl")
    if cfg.model_type == "sd2" and not cfg.v2:
        cfg.v2 = True
    if cfg.v2 and cfg.model_type is None:
        cfg.model_type = "sd2"


def _check_buckets(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    steps = cfg.bucket_reso_steps
    if steps % 8:
        raise UsageError(f"--bucket_reso_steps={steps} must be a multiple of 8 (the VAE downscale factor)")
    need = 32 if cfg.model_type == "sdxl" else 64
    if cfg.model_type is not None and steps % need:
        warn(f"--bucket_reso_steps={steps} is not a multiple of {need}: sd-scripts refuses this for "
             f"{cfg.model_type}; loratools accepts multiples of 8")
    if cfg.bucket_no_upscale:
        if {"min_bucket_reso", "max_bucket_reso"} & cfg.provided:
            warn("--min_bucket_reso/--max_bucket_reso have no effect with --bucket_no_upscale")
        return
    if not cfg.enable_bucket:
        if {"min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"} & cfg.provided:
            warn("--min_bucket_reso/--max_bucket_reso/--bucket_reso_steps have no effect without --enable_bucket")
        return
    lo, hi = round_bucket_bounds(cfg.min_bucket_reso, cfg.max_bucket_reso, steps)
    if (lo, hi) != (cfg.min_bucket_reso, cfg.max_bucket_reso):
        warn(f"bucket bounds rounded to multiples of {steps}: min_bucket_reso {cfg.min_bucket_reso} -> {lo}, "
             f"max_bucket_reso {cfg.max_bucket_reso} -> {hi}")
        cfg.min_bucket_reso, cfg.max_bucket_reso = lo, hi
    if lo <= 0:
        raise UsageError(f"--min_bucket_reso rounds to {lo}; it must be at least --bucket_reso_steps={steps}")
    if cfg.resolution is not None:
        if lo > min(cfg.resolution):
            raise UsageError(f"--min_bucket_reso={lo} is larger than the resolution {cfg.resolution}; lower it")
        if hi < max(cfg.resolution):
            raise UsageError(f"--max_bucket_reso={hi} is smaller than the resolution {cfg.resolution}; raise it")


def _check_caching(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        cfg.cache_latents = True
        warn("--cache_latents_to_disk implies --cache_latents")
    if cfg.cache_latents and cfg.random_crop:
        raise UsageError("--random_crop cannot be combined with --cache_latents (a cached latent has one crop)")
    if cfg.cache_text_encoder_outputs_to_disk and not cfg.cache_text_encoder_outputs:
        cfg.cache_text_encoder_outputs = True
    if cfg.cache_text_encoder_outputs:
        if cfg.model_type in ("sd1", "sd2"):
            raise UsageError("--cache_text_encoder_outputs is for SDXL only")
        if not cfg.network_train_unet_only:
            raise UsageError("--cache_text_encoder_outputs needs --network_train_unet_only (cached encoders are not trained)")
        for name in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step",
                     "enable_wildcard", "caption_dropout_every_n_epochs"):
            if getattr(cfg, name):
                raise UsageError(f"--cache_text_encoder_outputs cannot be combined with --{name} "
                                 "(captions must be the same every epoch)")
    if cfg.masked_loss and not cfg.alpha_mask:
        raise UsageError("--masked_loss needs --alpha_mask (the mask is the images' alpha channel)")
    if cfg.persistent_data_loader_workers:
        warn("--persistent_data_loader_workers has no effect: " + (
            "there are no workers (--max_data_loader_n_workers=0)" if cfg.max_data_loader_n_workers == 0 else
            "workers are restarted each epoch so they see the epoch"))
    if cfg.cache_text_encoder_outputs_to_disk:
        warn("--cache_text_encoder_outputs_to_disk: text-encoder outputs are cached in memory; no "
             "*_te_outputs.npz files are written")


def _check_optimizer(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    if cfg.use_8bit_adam or cfg.use_lion_optimizer:
        legacy = "AdamW8bit" if cfg.use_8bit_adam else "Lion"
        if "optimizer_type" in cfg.provided and cfg.optimizer_type.lower() != legacy.lower():
            raise UsageError(f"--use_8bit_adam/--use_lion_optimizer contradict --optimizer_type {cfg.optimizer_type}")
        warn(f"--use_8bit_adam/--use_lion_optimizer are legacy spellings of --optimizer_type {legacy}")
        cfg.optimizer_type = legacy
    if "." not in cfg.optimizer_type:
        by_lower = {o.lower(): o for o in OPTIMIZERS}
        if cfg.optimizer_type.lower() not in by_lower:
            raise UsageError(f"--optimizer_type {cfg.optimizer_type!r} is not one of {', '.join(OPTIMIZERS)} "
                             "(or a class path pkg.module.Class)")
        cfg.optimizer_type = by_lower[cfg.optimizer_type.lower()]
    parse_literal_args(cfg.optimizer_args)
    parse_literal_args(cfg.lr_scheduler_args, "--lr_scheduler_args")
    if cfg.lr_scheduler == "adafactor" and cfg.optimizer_type != "AdaFactor":
        raise UsageError("--lr_scheduler adafactor needs --optimizer_type AdaFactor")
    warmup = cfg.lr_warmup_steps
    if warmup and (cfg.lr_scheduler == "constant" or cfg.lr_scheduler_type):
        which = f"--lr_scheduler_type {cfg.lr_scheduler_type}" if cfg.lr_scheduler_type else "--lr_scheduler constant"
        raise UsageError(f"{which} has no warmup; drop --lr_warmup_steps={warmup} or use constant_with_warmup")
    adaptive = cfg.optimizer_type.lower().startswith(("dadapt", "prodigy"))
    if adaptive and cfg.learning_rate <= 0.1:
        warn(f"{cfg.optimizer_type} adapts the step size: sd-scripts recommends --learning_rate around 1.0, "
             f"not {cfg.learning_rate}")


def _check_network(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        raise UsageError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    args = parse_network_args(cfg.network_args)
    if "use_reentrant" in args and cfg.network_module != "lycoris.kohya":
        warn(f"--network_args use_reentrant={args['use_reentrant']} has no effect: no network module reads it")
    if cfg.network_module == "lycoris.kohya":
        _check_lycoris_args(cfg, args)
        return
    unknown = sorted(set(args) - LORA_NETWORK_KEYS - {"use_reentrant"})
    if unknown:
        hint = "; they are LyCORIS options: use --network_module lycoris.kohya" if set(unknown) & LYCORIS_NETWORK_KEYS else ""
        warn(f"--network_args {', '.join(unknown)} have no effect with {cfg.network_module}{hint}")
    if "conv_block_dims" in args and "block_dims" not in args:
        warn("--network_args conv_block_dims has no effect without block_dims")
    for key in ("down_lr_weight", "up_lr_weight"):
        values = [v for v in args.get(key, "").split(",") if v.strip()] if "," in args.get(key, "") else None
        if values is not None and len(values) != 12:
            warn(f"--network_args {key} has {len(values)} values; sd-scripts uses 12 "
                 f"({'cut' if len(values) > 12 else 'padded with 1.0'})")
    expected = BLOCK_COUNTS.get(cfg.model_type or "")
    for dims_key, alphas_key in (("block_dims", "block_alphas"), ("conv_block_dims", "conv_block_alphas")):
        dims = _csv_numbers(args, dims_key)
        alphas = _csv_numbers(args, alphas_key)
        if dims is not None and expected is not None and len(dims) != expected:
            raise UsageError(f"--network_args {dims_key} has {len(dims)} values; {cfg.model_type} needs {expected}")
        if alphas is not None and dims is None:
            warn(f"--network_args {alphas_key} has no effect without {dims_key}")
        if alphas is not None and dims is not None and len(alphas) != len(dims):
            raise UsageError(f"--network_args {alphas_key} has {len(alphas)} values but {dims_key} has {len(dims)}")


def _check_lycoris_args(cfg: TrainConfig, args: dict[str, str]) -> None:
    warn = cfg.warnings.append
    algo = args.get("algo", "lora").lower()
    if algo not in LYCORIS_ALGOS:
        raise UsageError(f"--network_args algo={algo} is not one of {', '.join(LYCORIS_ALGOS)}")
    preset = args.get("preset", "full")
    if preset.lower() not in LYCORIS_PRESETS and not preset.endswith(".toml"):
        raise UsageError(f"--network_args preset={preset} is not one of {', '.join(LYCORIS_PRESETS)} "
                         "(or a preset .toml file)")
    if (algo == "ia3") != (preset.lower() == "ia3"):
        raise UsageError("--network_args algo=ia3 and preset=ia3 go together")
    ignored = [k for k in LYCORIS_IGNORED_KEYS if k in args]
    if ignored:
        counts = []
        for key in ignored:
            numbers = _csv_numbers(args, key) if key != "use_reentrant" else None
            counts.append(f"{key} ({len(numbers)} values)" if numbers is not None else key)
        mismatch = ""
        dims, alphas = _csv_numbers(args, "block_dims"), _csv_numbers(args, "block_alphas")
        if dims is not None and alphas is not None and len(dims) != len(alphas):
            mismatch = f"; note block_dims has {len(dims)} values and block_alphas {len(alphas)}"
        expected = BLOCK_COUNTS.get(cfg.model_type or "")
        if dims is not None and expected is not None and len(dims) != expected:
            mismatch += f"; {cfg.model_type} has {expected} blocks, not {len(dims)}"
        warn(f"--network_args {', '.join(counts)}: lycoris.kohya ignores these (no effect){mismatch}")
    unknown = sorted(set(args) - LYCORIS_NETWORK_KEYS - set(LYCORIS_IGNORED_KEYS))
    if unknown:
        warn(f"--network_args {', '.join(unknown)} have no effect with lycoris.kohya")
    if isinstance(cfg.text_encoder_lr, (list, tuple)) and len(set(cfg.text_encoder_lr)) > 1:
        warn(f"--text_encoder_lr {' '.join(map(str, cfg.text_encoder_lr))}: lycoris.kohya uses one learning rate for "
             f"all text encoders; {cfg.text_encoder_lr[0]} is used")
    if cfg.network_dropout and args.get("dora_wd", "false").lower() in ("true", "1"):
        warn("--network_dropout has no effect with dora_wd=True (LyCORIS ignores it)")


def _csv_numbers(args: dict[str, str], key: str) -> list[float] | None:
    if key not in args:
        return None
    try:
        return [float(v) for v in args[key].split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--network_args {key}={args[key]!r} must be comma-separated numbers") from None


def _check_schedule_and_saving(cfg: TrainConfig) -> None:
    warn = cfg.warnings.append
    given = cfg.provided
    if cfg.max_train_epochs is not None and "max_train_steps" in given:
        warn(f"--max_train_epochs={cfg.max_train_epochs} overrides --max_train_steps={cfg.max_train_steps}")
    if cfg.sample_every_n_epochs and cfg.sample_every_n_steps:
        warn("--sample_every_n_epochs wins over --sample_every_n_steps (sd-scripts' rule)")
    if (cfg.sample_every_n_epochs or cfg.sample_every_n_steps or cfg.sample_at_first) and not cfg.sample_prompts:
        warn("--sample_every_n_*/--sample_at_first have no effect without --sample_prompts")
    if cfg.log_prefix and not cfg.logging_dir:
        warn(f"--log_prefix={cfg.log_prefix} has no effect without --logging_dir")
    if cfg.save_last_n_epochs and not (cfg.save_every_n_epochs or cfg.save_n_epoch_ratio):
        warn("--save_last_n_epochs has no effect without --save_every_n_epochs")
    if cfg.save_last_n_steps and not cfg.save_every_n_steps:
        warn("--save_last_n_steps has no effect without --save_every_n_steps")
    for name in ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            warn(f"--{name}={value} disables it")
            setattr(cfg, name, None)


def config_to_toml(cfg: TrainConfig, *, only_changed: bool = True) -> str:
    """The configuration as a TOML recipe (``--output_config``): by default only values that differ from sd-scripts' defaults."""
    import json

    defaults = TrainConfig()
    lines = []
    for name, value in cfg.settings().items():
        if name == "config" or value is None:
            continue
        if only_changed and value == getattr(defaults, name):
            continue
        lines.append(f"{name} = {_toml_value(value, json)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any, json: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, json) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)
