"""Load the frozen base model (UNet, VAE, text encoders, tokenizers) for training.

Weights are read through `loratools.io` (the one file layer) and put into diffusers /
transformers models instantiated from configs: the folder's own `config.json` files for a
diffusers folder, or configs derived from the checkpoint's tensor shapes on top of the shipped
ones (`trainer/configs/`) for a single file, converted with `loratools.keys.state_dict`. Nothing
comes from a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratools.errors import InvalidFileError, UsageError

CONFIG_DIR = Path(__file__).parent / "configs"

#: latent scale factors sd-scripts uses (the VAE config may not carry them).
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


@dataclass
class BaseModel:
    """Everything the loop needs from the base model."""

    arch: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    v_parameterization: bool
    path: Path
    vae_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell, from the VAE config (8 for every real SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        return LATENT_SCALE[self.arch]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidFileError(f"cannot read config ({exc}); is this a complete diffusers folder?", path=path) from None


def _strip_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _align(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key spellings that differ between library versions: the CLIP `text_model.` level
    (transformers 4 vs 5) and the VAE mid-block attention names of diffusers < 0.17 files."""
    from loratools.keys.state_dict import align_text_model_level

    keys = model.state_dict().keys()
    if any("token_embedding" in k for k in keys):
        return align_text_model_level(sd, keys)
    out = {}
    for k, v in sd.items():
        parts = k.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in _OLD_VAE_ATTENTION and "attentions" in parts[0]:
            k = f"{parts[0]}.{_OLD_VAE_ATTENTION[parts[1]]}.{parts[2]}"
        out[k] = v
    return out


def instantiate(cls: Any, config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], what: str,
                path: Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Build `cls` from `config` without random init and load `sd` into it (strict), each floating
    tensor converted once, from the file, to `dtype` (the dtype it computes in: a float32 detour
    doubles the peak memory and the load time of an fp16 checkpoint); with `device` (`--lowram`)
    each tensor goes from the file straight to that device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(cls, "from_config"):
            model = cls.from_config(_strip_config(config))
        else:  # transformers: config object
            model = cls(config)
    tensors = _align(model, sd)
    expected = set(model.state_dict().keys())
    # transformers < 4.31 saved CLIP's position_ids buffer; it is derived, not learnt.
    for k in [k for k in tensors if k not in expected and k.endswith("position_ids")]:
        tensors.pop(k)
    missing = sorted(k for k in expected if k not in tensors)
    extra = sorted(k for k in tensors if k not in expected)
    if missing or extra:
        first = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise InvalidFileError(f"{what}: {len(missing)} weights missing, {len(extra)} unexpected ({first}); "
                               "the file does not match its config", path=path)
    model.load_state_dict({k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                           for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _te_classes(config: Mapping[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = CLIPTextModelWithProjection if "WithProjection" in arch else CLIPTextModel
    return cls, CLIPTextConfig(**_strip_config(config))


def has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()


def load_tokenizer(folder: Path):
    """A CLIP tokenizer from local files (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer

    if not has_tokenizer(folder):
        raise InvalidFileError("no tokenizer files (vocab.json + merges.txt or tokenizer.json)", path=folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def detect_arch(has_te2: bool, te_config: Mapping[str, Any]) -> str:
    """sdxl when there is a second text encoder; sd2 for OpenCLIP-style (gelu) encoders; else sd1."""
    if has_te2:
        return "sdxl"
    return "sd2" if te_config.get("hidden_act") == "gelu" else "sd1"


def load_base_model(cfg: Any, device: torch.device | None = None, *, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load the base model named by `cfg.pretrained_model_name_or_path` (and `cfg.vae`), the UNet and
    text encoders in `dtype`, the VAE in `vae_dtype`; with `device` (`--lowram`) the weights are
    placed there directly instead of in CPU memory."""
    from loratools.io.checkpoint import open_model

    if not cfg.pretrained_model_name_or_path:
        raise UsageError("--pretrained_model_name_or_path is required (a diffusers folder or a .safetensors/.ckpt file)")
    path = Path(cfg.pretrained_model_name_or_path).expanduser().resolve()
    if not path.exists():
        raise UsageError(f"base model {cfg.pretrained_model_name_or_path} does not exist; pass a local diffusers "
                         "folder or a single-file checkpoint (nothing is downloaded from a hub)")
    source = open_model(path)
    if source.layout == "diffusers":
        model = _load_diffusers(path, source, device, dtype, vae_dtype)
    else:
        from trainer.single_file import load_single_file

        model = load_single_file(path, source, cfg, device, dtype, vae_dtype)
    if cfg.model_type and cfg.model_type != model.arch:
        if not (cfg.model_type in ("sd1", "sd2") and model.arch in ("sd1", "sd2")):
            raise UsageError(f"--model_type {cfg.model_type} but {path} is a {model.arch} model; drop --model_type "
                             "or pass the matching base model")
        model.arch = cfg.model_type
    if cfg.v2 and model.arch == "sd1":
        model.arch = "sd2"
    model.v_parameterization = bool(cfg.v_parameterization) or model.v_parameterization
    if cfg.vae:
        model.vae, model.vae_path = load_vae(Path(cfg.vae).expanduser().resolve(), vae_dtype)
        if device is not None:
            model.vae.to(device)
    return model


def _load_diffusers(path: Path, source, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for comp in ("unet", "vae", "text_encoder"):
        if comp not in source.components:
            raise InvalidFileError(f"diffusers folder has no {comp}/ weights", path=path)
    unet = instantiate(UNet2DConditionModel, _read_json(path / "unet" / "config.json"),
                       source.components["unet"], "unet", path, device, dtype)
    vae = instantiate(AutoencoderKL, _read_json(path / "vae" / "config.json"), source.components["vae"], "vae", path,
                      device, vae_dtype)
    te_cfg = _read_json(path / "text_encoder" / "config.json")
    has_te2 = "text_encoder_2" in source.components
    text_encoders, tokenizers = [], []
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if comp not in source.components:
            continue
        cls, config = _te_classes(_read_json(path / comp / "config.json"))
        text_encoders.append(instantiate(cls, config, source.components[comp], comp, path, device, dtype))
        tokenizers.append(load_tokenizer(path / tok))
    sched = path / "scheduler" / "scheduler_config.json"
    v_pred = sched.exists() and _read_json(sched).get("prediction_type") == "v_prediction"
    return BaseModel(detect_arch(has_te2, te_cfg), unet, vae, text_encoders, tokenizers, v_pred, path)


def load_vae(path: Path, dtype: torch.dtype = torch.float32):
    """`--vae`: a diffusers VAE folder (or a model folder with vae/) or a single LDM-layout file."""
    from diffusers import AutoencoderKL

    from loratools.io.checkpoint import open_state_dict

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        from loratools.io.checkpoint import open_model

        sd = open_model(folder.parent).components["vae"] if folder.name == "vae" else _folder_weights(folder)
        return instantiate(AutoencoderKL, _read_json(folder / "config.json"), sd, "vae", path, dtype=dtype), path
    from trainer.single_file import vae_from_single_file

    return vae_from_single_file(path, open_state_dict(path), dtype), path


def _folder_weights(folder: Path) -> Mapping[str, torch.Tensor]:
    from loratools.io.checkpoint import open_state_dict

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return open_state_dict(folder / name)
    raise InvalidFileError("no diffusion_pytorch_model.safetensors in VAE folder", path=folder)


def make_noise_scheduler(zero_terminal_snr: bool, v_parameterization: bool):
    """sd-scripts' training schedule: DDPM, scaled_linear 0.00085-0.012, 1000 steps, no clipping."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False,
                          prediction_type="v_prediction" if v_parameterization else "epsilon",
                          rescale_betas_zero_snr=zero_terminal_snr)
    return sched
