"""Single-file checkpoints (LDM/SGM `.safetensors`/`.ckpt`) as training base models.

The file is split into diffusers components by `loratools.keys.state_dict`; each component's
config starts from the shipped config of the architecture (`trainer/configs/<arch>/`) and takes
every structural value the tensor shapes determine (widths, layer counts, attention layout,
cross-attention width, SDXL's time-embedding width), so real and re-sized models both load.
Head counts cannot be read from shapes: the shipped value is kept when it divides the width,
else 64-wide heads are assumed. Tokenizers are not inside single files: they are read from
`--tokenizer_cache_dir` (a folder with `tokenizer/` and, for SDXL, `tokenizer_2/`, or the
vocab.json/merges.txt files themselves), or from `tokenizer/` folders next to the checkpoint.
When that folder also holds `<component>/config.json` files (a diffusers folder of the same
model without weights), those configs are used as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loratools.errors import InvalidFileError, UsageError
from trainer.models import CONFIG_DIR, BaseModel, detect_arch, has_tokenizer, instantiate, load_tokenizer


def shipped_config(arch: str, component: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / arch / f"{component}.json").read_text())


def _heads(shipped: Any, widths: list[int]) -> Any:
    """Shipped head counts when they divide every width, else width // 64 (at least 1)."""
    values = shipped if isinstance(shipped, list) else [shipped] * len(widths)
    if len(values) == len(widths) and all(w % h == 0 for w, h in zip(widths, values)):
        return shipped if isinstance(shipped, list) else shipped
    return [max(1, w // 64) for w in widths]


def _groups(shipped: int, widths: list[int]) -> int:
    for g in (shipped, 32, 16, 8, 4, 2, 1):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def _count(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def unet_config(arch: str, shapes: Mapping[str, tuple[int, ...]], te2_projection: int | None) -> dict[str, Any]:
    cfg = shipped_config(arch, "unet")
    keys = list(shapes)
    n = _count(keys, r"down_blocks\.(\d+)\.")
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)]
    down_attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(n)]
    up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(n)]
    cfg["block_out_channels"] = widths
    cfg["layers_per_block"] = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn]
    cfg["in_channels"] = shapes["conv_in.weight"][1]
    cfg["out_channels"] = shapes["conv_out.weight"][0]
    cfg["norm_num_groups"] = _groups(cfg.get("norm_num_groups", 32), widths)
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        cfg["cross_attention_dim"] = to_k[1]
    proj_in = next((s for k, s in shapes.items() if k.endswith("proj_in.weight")), None)
    if proj_in is not None:
        cfg["use_linear_projection"] = len(proj_in) == 2
    layers = []
    for i in range(n):
        count = _count(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        layers.append(count or 1)
    if "transformer_layers_per_block" in cfg or any(c != 1 for c in layers):
        cfg["transformer_layers_per_block"] = layers
    cfg["attention_head_dim"] = _heads(cfg["attention_head_dim"], widths)
    if "add_embedding.linear_1.weight" in shapes:
        total = shapes["add_embedding.linear_1.weight"][1]
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = total
        if te2_projection:
            cfg["addition_time_embed_dim"] = (total - te2_projection) // 6
    return cfg


def vae_config(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    cfg = shipped_config(arch, "vae")
    keys = list(shapes)
    n = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)]
    cfg["block_out_channels"] = widths
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * n
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * n
    cfg["layers_per_block"] = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    cfg["latent_channels"] = shapes["encoder.conv_out.weight"][0] // 2
    cfg["norm_num_groups"] = _groups(cfg.get("norm_num_groups", 32), widths)
    return cfg


def text_encoder_config(arch: str, component: str, shapes: Mapping[str, tuple[int, ...]], tokenizer) -> dict[str, Any]:
    cfg = shipped_config(arch, component)
    def get(suffix: str) -> tuple[int, ...]:
        return next(s for k, s in shapes.items() if k.endswith(suffix))
    vocab, hidden = get("token_embedding.weight")
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=get("position_embedding.weight")[0],
               num_hidden_layers=_count(shapes, r"(?:text_model\.)?encoder\.layers\.(\d+)\."),
               intermediate_size=get("mlp.fc1.weight")[0])
    if any(k.startswith("text_projection") for k in shapes):
        cfg["projection_dim"] = shapes["text_projection.weight"][0]
    heads = cfg["num_attention_heads"]
    cfg["num_attention_heads"] = heads if hidden % heads == 0 and hidden // heads >= 8 else max(1, hidden // 64)
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return cfg


def _tokenizer_dirs(path: Path, cfg: Any, n: int) -> list[Path]:
    roots = [Path(cfg.tokenizer_cache_dir)] if cfg.tokenizer_cache_dir else []
    roots.append(path.parent)
    names = ["tokenizer", "tokenizer_2"][:n]
    for root in roots:
        dirs = [root / name for name in names]
        if all(has_tokenizer(d) for d in dirs):
            return dirs
        if n == 1 and has_tokenizer(root):
            return [root]
    raise UsageError(f"{path.name} is a single-file checkpoint, which holds no tokenizer: pass "
                     f"--tokenizer_cache_dir DIR with {' and '.join(names)}/ folders (vocab.json + merges.txt, "
                     "e.g. copied from a diffusers folder of the same model family)")


def load_single_file(path: Path, source, cfg: Any, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32) -> BaseModel:
    """A BaseModel from a single-file checkpoint (see the module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratools.keys.state_dict import from_single_file

    split = from_single_file(source.components[""])
    parts = split.components
    for comp in ("unet", "vae", "text_encoder"):
        if comp not in parts:
            raise InvalidFileError(f"single-file checkpoint has no {comp} weights; is this a full SD1/SD2/SDXL "
                                   "checkpoint?", path=path)
    has_te2 = "text_encoder_2" in parts
    arch = detect_arch(has_te2, {"hidden_act": "gelu" if any("cond_stage_model.model." in k for k in
                                                             source.components[""]) else "quick_gelu"})
    if cfg.v2 and arch == "sd1":
        arch = "sd2"
    tok_dirs = _tokenizer_dirs(path, cfg, 2 if has_te2 else 1)
    tokenizers = [load_tokenizer(d) for d in tok_dirs]
    root = tok_dirs[0].parent

    def config_for(comp: str, derived: dict[str, Any]) -> dict[str, Any]:
        """A `<root>/<comp>/config.json` beside the tokenizers wins (exact head counts)."""
        file = root / comp / "config.json"
        return json.loads(file.read_text()) if file.exists() else derived

    text_encoders = []
    te2_proj = None
    for i, comp in enumerate(("text_encoder", "text_encoder_2")[: 2 if has_te2 else 1]):
        shapes = {k: tuple(v.shape) for k, v in parts[comp].items()}
        values = config_for(comp, text_encoder_config(arch, comp, shapes, tokenizers[i]))
        config = CLIPTextConfig(**{k: v for k, v in values.items() if k not in ("architectures", "model_type")})
        cls = CLIPTextModelWithProjection if comp == "text_encoder_2" else CLIPTextModel
        if comp == "text_encoder_2":
            te2_proj = config.projection_dim
        text_encoders.append(instantiate(cls, config, parts[comp], comp, path, device, dtype))
    unet_shapes = {k: tuple(v.shape) for k, v in parts["unet"].items()}
    unet = instantiate(UNet2DConditionModel, config_for("unet", unet_config(arch, unet_shapes, te2_proj)),
                       parts["unet"], "unet", path, device, dtype)
    vae = instantiate(AutoencoderKL, config_for("vae", vae_config(arch, {k: tuple(v.shape) for k, v in parts["vae"].items()})),
                      parts["vae"], "vae", path, device, vae_dtype)
    return BaseModel(arch, unet, vae, text_encoders, tokenizers, False, path)


def vae_from_single_file(path: Path, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """`--vae FILE`: an LDM-layout VAE file (bare `encoder.*` keys or `first_stage_model.*`)."""
    from diffusers import AutoencoderKL

    from loratools.keys.state_dict import VAE_PREFIX, from_single_file

    sd = state_dict
    if not any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {VAE_PREFIX + k: v for k, v in sd.items()}
    parts = from_single_file(sd).components
    if "vae" not in parts:
        raise InvalidFileError("no VAE weights (encoder.*/decoder.*) in --vae file", path=path)
    arch = "sdxl"  # only the scaling factor differs, and BaseModel.latent_scaling is per arch
    shapes = {k: tuple(v.shape) for k, v in parts["vae"].items()}
    return instantiate(AutoencoderKL, vae_config(arch, shapes), parts["vae"], "vae", path, dtype=dtype)
