"""Writing trained networks: file names, what to keep, `ss_*`/modelspec metadata (spec 1.9, 3, 4).

Files go through `loratools.io.writer` (atomic, sshs hashes as sd-scripts), so a trained file is
written exactly like a resized or converted one.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError
from loratools.keys.arch import BASE_MODEL_VERSIONS

SAVE_DTYPES = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}

def _hash_legacy(path: Path) -> str:
    """A1111's old model hash; a diffusers folder gives "IsADirectory" as in sd-scripts."""
    from loratools.io.hashes import legacy_file_hash

    return "IsADirectory" if path.is_dir() else legacy_file_hash(path)


def _hash_full(path: Path) -> str:
    from loratools.io.hashes import file_sha256

    return "IsADirectory" if path.is_dir() else file_sha256(path)


def model_hashes(model_path: Path, vae_path: Path | None) -> dict[str, str]:
    """sd-scripts' base-model (and `--vae`) hashes: the legacy A1111 hash and the full sha256."""
    out = {"ss_sd_model_hash": _hash_legacy(model_path), "ss_new_sd_model_hash": _hash_full(model_path)}
    if vae_path is not None:
        out.update(ss_vae_hash=_hash_legacy(vae_path), ss_new_vae_hash=_hash_full(vae_path))
    return out


def base_metadata(cfg: Any, *, arch: str, v_pred: bool, network_module: str, network_args: Mapping[str, str],
                  dataset_meta: Mapping[str, Any], num_batches_per_epoch: int, num_epochs: int, max_train_steps: int,
                  ss_optimizer: str, total_batch_size: int, seed: int, model_path: Path,
                  vae_path: Path | None, session_start: float, trainer_version: str,
                  session_id: int, hashes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `ss_*` keys every save shares (spec 3), values as `str(python value)` like sd-scripts;
    `hashes` = `model_hashes(model_path, vae_path)` when the caller computed them already."""
    text_encoder_lr = cfg.text_encoder_lr
    if isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 1:
        text_encoder_lr = text_encoder_lr[0]
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": session_start,
        "ss_output_name": cfg.output_name,  # str(None) = "None" without --output_name, as sd-scripts
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": dataset_meta.get("num_train_images"),
        "ss_num_validation_images": dataset_meta.get("num_validation_images", 0),
        "ss_num_reg_images": dataset_meta.get("num_reg_images", 0),
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": network_module,
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": bool(cfg.full_fp16),
        "ss_v2": arch == "sd2",
        "ss_base_model_version": BASE_MODEL_VERSIONS[(arch, v_pred)],
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": bool(cfg.cache_latents or cfg.cache_latents_to_disk),
        "ss_seed": seed,
        "ss_lowram": cfg.lowram,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_training_comment": cfg.training_comment,
        "ss_sd_scripts_commit_hash": trainer_version,
        "ss_trainer": trainer_version,
        "ss_optimizer": ss_optimizer,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": cfg.face_crop_aug_range,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": bool(cfg.debiased_estimation_loss),
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": cfg.huber_scale,
        "ss_huber_c": cfg.huber_c,
        "ss_fp8_base": bool(cfg.fp8_base),
        "ss_fp8_base_unet": bool(cfg.fp8_base_unet),
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_resize_interpolation": cfg.resize_interpolation,
    }
    if not cfg.dataset_config:
        md.update({
            "ss_batch_size_per_device": cfg.train_batch_size,
            "ss_total_batch_size": total_batch_size,
            "ss_resolution": tuple(cfg.resolution) if cfg.resolution else None,
            "ss_color_aug": bool(cfg.color_aug),
            "ss_flip_aug": bool(cfg.flip_aug),
            "ss_random_crop": bool(cfg.random_crop),
            "ss_shuffle_caption": bool(cfg.shuffle_caption),
            "ss_enable_bucket": bool(cfg.enable_bucket),
            "ss_bucket_no_upscale": bool(cfg.bucket_no_upscale),
            "ss_min_bucket_reso": cfg.min_bucket_reso,
            "ss_max_bucket_reso": cfg.max_bucket_reso,
            "ss_keep_tokens": cfg.keep_tokens,
        })
    for key in ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info", "ss_datasets"):
        if key in dataset_meta:
            value = dataset_meta[key]
            md[key] = value if isinstance(value, str) else json.dumps(value)
    if network_args:
        md["ss_network_args"] = json.dumps(dict(network_args))
    md["ss_sd_model_name"] = model_path.name if model_path.exists() else str(model_path)
    md.update(model_hashes(model_path, vae_path) if hashes is None else hashes)
    if vae_path is not None:
        md["ss_vae_name"] = vae_path.name
    if cfg.no_metadata:
        keep = {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args"}
        md = {k: v for k, v in md.items() if k in keep}
    return {k: str(v) for k, v in md.items()}


def modelspec(cfg: Any, *, arch: str, v_pred: bool, trainer_version: str, timestamp: float) -> dict[str, str]:
    """SAI ModelSpec 1.0.1 keys (`modelspec.*`) as sd-scripts writes them for a LoRA."""
    if arch == "sdxl":
        architecture, impl = "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"
    elif arch == "sd2":
        architecture = "stable-diffusion-v2-768-v/lora" if v_pred else "stable-diffusion-v2-512/lora"
        impl = "diffusers"
    else:
        architecture, impl = "stable-diffusion-v1/lora", "diffusers"
    if cfg.resolution:
        w, h = cfg.resolution
    else:
        w = h = {"sdxl": 1024, "sd2": 768 if v_pred else 512}.get(arch, 512)
    date = datetime.datetime.fromtimestamp(timestamp).isoformat(timespec="seconds")
    title = cfg.metadata_title or cfg.output_name or f"LoRA@{date}"
    spec: dict[str, Any] = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.author": cfg.metadata_author,
        "modelspec.description": cfg.metadata_description,
        "modelspec.date": date,
        "modelspec.license": cfg.metadata_license,
        "modelspec.tags": cfg.metadata_tags,
        "modelspec.usage_hint": cfg.metadata_usage_hint,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.encoder_layer": cfg.clip_skip,
        "modelspec.implementation_version": trainer_version,
    }
    if cfg.min_timestep is not None or cfg.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{cfg.min_timestep or 0},{cfg.max_timestep or 1000}"
    if cfg.metadata_thumbnail:
        spec["modelspec.thumbnail"] = _thumbnail(Path(cfg.metadata_thumbnail))
    return {k: str(v) for k, v in spec.items() if v is not None}


def _thumbnail(path: Path) -> str:
    import base64
    import mimetypes

    if not path.is_file():
        raise UsageError(f"--metadata_thumbnail {path} does not exist; pass an image file")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def count_fp16_flushes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> int:
    """Modules with a factor that is nonzero in fp32 but all-zero in `dtype`: their saved delta is
    zero, so `check weights` reports each of them as dead."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0
    modules: dict[str, bool] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == "alpha" or not t.is_floating_point():
            continue
        flushed = bool(t.any()) and not bool(t.to(dtype).any())
        modules[name] = modules.get(name, False) or flushed
    return sum(modules.values())


def save_network_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
                      save_dtype: torch.dtype | None, *, save_model_as: str = "safetensors") -> tuple[Path, int]:
    """Write one network file (overwriting an earlier save of the same run), cast to `save_dtype`.

    Returns the path and how many modules the cast flushed to all-zero (fp16 underflow), which
    the caller reports as `check weights` would.
    """
    from loratools.io.writer import save_tensors

    flushed = count_fp16_flushes(tensors, save_dtype)
    out = {k: (v.to(save_dtype) if save_dtype is not None and v.is_floating_point() else v).contiguous()
           for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if save_model_as == "safetensors":
        save_tensors(path, out, metadata, overwrite=True, sshs_hashes=True)
    else:  # sd-scripts' .ckpt/.pt: a torch.save of the raw state dict, no metadata
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return path, flushed


def trainer_version() -> str:
    try:
        from importlib.metadata import version

        return f"loratools/{version('loratools')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "loratools/unknown"


class RunMetadata:
    """The metadata of every file a run saves. The base model's sha256 (a whole read of a 7 GB
    checkpoint) is computed on a thread while training starts, and waited for at the first save."""

    def __init__(self, cfg: Any, session: Any, model: Any, data: Any, net: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cfg, self.model = cfg, model
        self.version = trainer_version()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
        self._hashes = self._pool.submit(model_hashes, model.path, model.vae_path) if session.main else None
        plan = data.plan
        self._base_args = dict(
            arch=model.arch, v_pred=model.v_parameterization, network_module=cfg.network_module,
            network_args=net.network_args, dataset_meta=dataset_metadata(data.dataset),
            num_batches_per_epoch=len(net.loader), num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps,
            ss_optimizer=net.opt_info.ss_optimizer, total_batch_size=plan.effective_batch_size, seed=session.seed,
            model_path=model.path, vae_path=model.vae_path, session_start=session.started,
            trainer_version=self.version, session_id=random.randint(0, 2**32))  # drawn where sd-scripts draws it
        self._base: dict[str, str] | None = None

    def for_save(self, epoch: int, step: int) -> dict[str, str]:
        import time

        if self._base is None:
            hashes = self._hashes.result() if self._hashes is not None else None
            self._pool.shutdown(wait=False)
            self._base = base_metadata(self.cfg, hashes=hashes, **self._base_args)
        ts = time.time()
        meta = dict(self._base)
        meta.update({"ss_training_finished_at": str(ts), "ss_steps": str(step), "ss_epoch": str(epoch)})
        meta.update(modelspec(self.cfg, arch=self.model.arch, v_pred=self.model.v_parameterization,
                              trainer_version=self.version, timestamp=ts))
        return meta


def dataset_metadata(dataset) -> dict:
    """The dataset part of the `ss_*` metadata (spec 3) from the dataset's own bookkeeping."""
    plan = dataset.plan
    meta: dict = {"num_train_images": plan.num_train_images, "num_reg_images": plan.num_reg_images,
                  "num_validation_images": plan.num_validation_images,
                  "ss_tag_frequency": dataset.tag_frequency(), "ss_dataset_dirs": dataset.dataset_dirs(False),
                  "ss_reg_dataset_dirs": dataset.dataset_dirs(True)}
    layouts = dataset.layouts
    meta["ss_bucket_info"] = layouts[0].bucket_info() if len(layouts) == 1 and layouts[0].spec.enable_bucket else None
    if dataset.cfg.dataset_config:
        meta["ss_datasets"] = [dataset_entry(layout) for layout in layouts]
        del meta["ss_bucket_info"], meta["ss_reg_dataset_dirs"]
    return meta


def dataset_entry(layout) -> dict:
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
