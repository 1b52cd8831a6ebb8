"""Which modules sd-scripts' `networks.lora` wraps, told from a module's diffusers path.

The trainer finds its targets by class on live models (`Transformer2DModel`, `CLIPAttention`,
`CLIPMLP`; with `conv_dim` also `ResnetBlock2D`, `Downsample2D`, `Upsample2D`). Operations that
only have a checkpoint's key list (`extract`) need the same sets from paths; in diffusers paths
those classes are exactly these path parts, so the rule is a lookup on them (a test checks it
against the trainer's walk of the tiny models):

* "attn": UNet `attentions.N` (Transformer2DModel), text encoders' `self_attn` and `mlp`;
* "conv": UNet `resnets.N`, `downsamplers.0`, `upsamplers.0` (LoCon's extra layers);
* None: everything else (`conv_in`, `conv_out`, time and class embeddings, token and position
  embeddings, `final_layer_norm`, `text_projection`), and every weight that is no Linear/Conv2d
  weight (norms, embeddings), which no LoRA loader applies a low-rank delta to.
"""

from __future__ import annotations

import re

SCOPES = ("attn", "conv")

_UNET_ATTN = re.compile(r"(^|\.)attentions\.\d+\.")
_UNET_CONV = re.compile(r"(^|\.)(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.")
_TE_ATTN = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn|mlp)\.")


def module_scope(component: str, path: str, shape: tuple[int, ...]) -> str | None:
    """The `networks.lora` scope of one weight: "attn", "conv" or None.

    Args:
        component: "unet", "text_encoder" or "text_encoder_2".
        path: the module's diffusers/transformers path (`ModuleInfo.path`).
        shape: the weight's shape; only Linear (2-D) and Conv2d (4-D) weights are in a scope.

    Example:
        >>> module_scope("unet", "down_blocks.1.resnets.0.conv1", (640, 320, 3, 3))
        'conv'
    """
    if len(shape) not in (2, 4):
        return None
    if component == "unet":
        if path.startswith("time_embedding") or path.startswith("add_embedding"):
            return None
        if _UNET_ATTN.search(path):
            return "attn"
        return "conv" if _UNET_CONV.search(path) else None
    if len(shape) == 2 and _TE_ATTN.search(path):
        return "attn"
    return None
