"""The weights of the released SD1.x, SD2.x and SDXL-base models, by name and shape, without a file.

When no base checkpoint is given (`convert`, `merge --to-lora`, `check keys` without `--base`,
`resize` without a checkpoint), module names are resolved against the architecture's standard
model. Its key list is generated here from the released configs' numbers (channels, layers per
block, transformer depths, cross-attention width, CLIP widths) with the structure of diffusers'
`UNet2DConditionModel` and transformers' `CLIPTextModel`, so the standard index has real shapes:
an adapter made for another layout (a tiny test model, a distilled UNet) does not fit them, and
callers can tell "this name is right for the released model" from "this name only looks right".

The generator takes any SD-family UNet config (the tests check it against tiny models' real
state dicts and the fixtures' real SD1.5/SDXL key lists).

Example:
    >>> standard_key_shapes("sdxl")["unet"]["down_blocks.1.attentions.0.proj_in.weight"]
    (640, 640)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

_SHAPE = tuple[int, ...]

# The released configs' numbers (diffusers' unet/config.json and transformers' CLIP configs of
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stable-diffusion-xl-base-1.0).
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 49408,
           "max_position_embeddings": 77}
_OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "vocab_size": 49408,
               "max_position_embeddings": 77}
_OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "vocab_size": 49408,
                  "max_position_embeddings": 77, "projection_dim": 1280}
_SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "in_channels": 4,
            "out_channels": 4, "transformer_layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
STANDARD_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"unet": {**_SD_UNET, "cross_attention_dim": 768, "use_linear_projection": False},
            "text_encoder": _CLIP_L},
    "sd2": {"unet": {**_SD_UNET, "cross_attention_dim": 1024, "use_linear_projection": True},
            "text_encoder": _OPENCLIP_H},
    "sdxl": {"unet": {"block_out_channels": (320, 640, 1280), "layers_per_block": 2, "in_channels": 4,
                      "out_channels": 4, "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
                      "use_linear_projection": True, "addition_embed_type": "text_time",
                      "projection_class_embeddings_input_dim": 2816,
                      "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
             "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG},
}


@lru_cache(maxsize=None)
def _standard(arch: str) -> dict[str, dict[str, _SHAPE]]:
    configs = STANDARD_CONFIGS[arch]
    out = {"unet": unet_key_shapes(configs["unet"])}
    for component in ("text_encoder", "text_encoder_2"):
        if component in configs:
            out[component] = clip_key_shapes(configs[component], projection="projection_dim" in configs[component])
    return out


def standard_key_shapes(arch: str) -> dict[str, dict[str, _SHAPE]]:
    """`{component: {diffusers key: shape}}` of the released model of `arch` (a fresh copy)."""
    if arch not in STANDARD_CONFIGS:
        raise ValueError(f"no standard model for architecture {arch!r}; expected sd1, sd2 or sdxl")
    return {c: dict(shapes) for c, shapes in _standard(arch).items()}


def _get(config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def unet_key_shapes(config: Mapping[str, Any] | Any) -> dict[str, _SHAPE]:
    """Weight and bias shapes of an SD-family `UNet2DConditionModel` built from `config` (a dict or
    a diffusers config object): conv_in, time/added embeddings, down/mid/up blocks (resnets,
    transformers, samplers), conv_norm_out, conv_out. Buffers are not weights and are left out."""
    chans = list(_get(config, "block_out_channels"))
    n = len(chans)
    lpb = _get(config, "layers_per_block", 2)
    layers = [int(lpb)] * n if isinstance(lpb, int) else [int(x) for x in lpb]
    depth_cfg = _get(config, "transformer_layers_per_block", 1)
    depth = [int(depth_cfg)] * n if isinstance(depth_cfg, int) else [int(x) for x in depth_cfg]
    cross = int(_get(config, "cross_attention_dim"))
    linear = bool(_get(config, "use_linear_projection", False))
    ted = chans[0] * 4
    out: dict[str, _SHAPE] = {}

    def param(key: str, *shape: int, bias: bool = True) -> None:
        out[key + ".weight"] = tuple(shape)
        if bias:
            out[key + ".bias"] = (shape[0],)

    def resnet(prefix: str, cin: int, cout: int) -> None:
        param(f"{prefix}.norm1", cin)
        param(f"{prefix}.conv1", cout, cin, 3, 3)
        param(f"{prefix}.time_emb_proj", cout, ted)
        param(f"{prefix}.norm2", cout)
        param(f"{prefix}.conv2", cout, cout, 3, 3)
        if cin != cout:
            param(f"{prefix}.conv_shortcut", cout, cin, 1, 1)

    def transformer(prefix: str, c: int, blocks: int) -> None:
        proj = (c, c) if linear else (c, c, 1, 1)
        param(f"{prefix}.norm", c)
        param(f"{prefix}.proj_in", *proj)
        for k in range(blocks):
            blk = f"{prefix}.transformer_blocks.{k}"
            for norm in ("norm1", "norm2", "norm3"):
                param(f"{blk}.{norm}", c)
            for attn, width in (("attn1", c), ("attn2", cross)):
                param(f"{blk}.{attn}.to_q", c, c, bias=False)
                param(f"{blk}.{attn}.to_k", c, width, bias=False)
                param(f"{blk}.{attn}.to_v", c, width, bias=False)
                param(f"{blk}.{attn}.to_out.0", c, c)
            param(f"{blk}.ff.net.0.proj", 8 * c, c)  # GEGLU: two 4c halves
            param(f"{blk}.ff.net.2", c, 4 * c)
        param(f"{prefix}.proj_out", *proj)

    param("conv_in", chans[0], int(_get(config, "in_channels", 4)), 3, 3)
    param("time_embedding.linear_1", ted, chans[0])
    param("time_embedding.linear_2", ted, ted)
    if _get(config, "addition_embed_type") == "text_time":
        param("add_embedding.linear_1", ted, int(_get(config, "projection_class_embeddings_input_dim")))
        param("add_embedding.linear_2", ted, ted)
    width = chans[0]
    for i, kind in enumerate(_get(config, "down_block_types")):
        cin, width = width, chans[i]
        for j in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else width, width)
            if "CrossAttn" in kind:
                transformer(f"down_blocks.{i}.attentions.{j}", width, depth[i])
        if i < n - 1:
            param(f"down_blocks.{i}.downsamplers.0.conv", width, width, 3, 3)
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        resnet("mid_block.resnets.0", chans[-1], chans[-1])
        if "CrossAttn" in mid_type:
            transformer("mid_block.attentions.0", chans[-1], depth[-1])
        resnet("mid_block.resnets.1", chans[-1], chans[-1])
    rev, rev_layers, rev_depth = chans[::-1], layers[::-1], depth[::-1]
    prev = rev[0]
    for i, kind in enumerate(_get(config, "up_block_types")):
        cout, skip_in = rev[i], rev[min(i + 1, n - 1)]
        for j in range(rev_layers[i] + 1):
            skip = skip_in if j == rev_layers[i] else cout
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else cout) + skip, cout)
            if "CrossAttn" in kind:
                transformer(f"up_blocks.{i}.attentions.{j}", cout, rev_depth[i])
        if i < n - 1:
            param(f"up_blocks.{i}.upsamplers.0.conv", cout, cout, 3, 3)
        prev = cout
    param("conv_norm_out", chans[0])
    param("conv_out", int(_get(config, "out_channels", 4)), chans[0], 3, 3)
    return out


def clip_key_shapes(config: Mapping[str, Any] | Any, *, projection: bool = False) -> dict[str, _SHAPE]:
    """Weight and bias shapes of a CLIP text model in transformers' layout (with `text_model.`),
    plus `text_projection.weight` for a `CLIPTextModelWithProjection` (SDXL's second encoder)."""
    d = int(_get(config, "hidden_size"))
    inner = int(_get(config, "intermediate_size"))
    out: dict[str, _SHAPE] = {
        "text_model.embeddings.token_embedding.weight": (int(_get(config, "vocab_size")), d),
        "text_model.embeddings.position_embedding.weight": (int(_get(config, "max_position_embeddings")), d),
    }
    for n in range(int(_get(config, "num_hidden_layers"))):
        layer = f"text_model.encoder.layers.{n}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out[f"{layer}.self_attn.{proj}.weight"], out[f"{layer}.self_attn.{proj}.bias"] = (d, d), (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{layer}.{norm}.weight"], out[f"{layer}.{norm}.bias"] = (d,), (d,)
        out[f"{layer}.mlp.fc1.weight"], out[f"{layer}.mlp.fc1.bias"] = (inner, d), (inner,)
        out[f"{layer}.mlp.fc2.weight"], out[f"{layer}.mlp.fc2.bias"] = (d, inner), (d,)
    out["text_model.final_layer_norm.weight"], out["text_model.final_layer_norm.bias"] = (d,), (d,)
    if projection:
        out["text_projection.weight"] = (int(_get(config, "projection_dim")), d)
    return out
