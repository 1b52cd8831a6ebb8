"""sd-scripts' UNet block slots: which `block_dims` / `down_lr_weight` entry a module belongs to.

sd-scripts numbers blocks from the kohya module name it writes (train-spec 1.6, networks/lora.py
`get_block_index` and sdxl `get_block_index`), so the slot is defined on that name:

* SD1/SD2 (diffusers-style names, 25 slots): `down_blocks_i_{resnets|attentions}_j` -> 1 + 3i + j,
  `down_blocks_i_downsamplers_0` -> 1 + 3i + 2, `mid_block` -> 12, `up_blocks_i_..._j` -> 13 + 3i + j
  (samplers 13 + 3i + 2); anything else (conv_in, time_embedding, conv_out) -1.
* SDXL (SGM names, 23 slots): `time_embed`/`label_emb` -> 0, `input_blocks_n` -> 1 + n,
  `middle_block_m` -> 10 + m, `output_blocks_n` -> 13 + n, `out` -> 22.

The numbers in a name are separated from the words around them by `_`, so these patterns read them
without ambiguity (unlike splitting a whole name back into a module path).
"""

from __future__ import annotations

import re

from loratools.keys.naming import UNET_PREFIX

#: Slots per architecture: SD1/SD2 IN00-IN11, M00, OUT00-OUT11; SDXL embeddings, 9 in, 3 mid, 9 out, out.
NUM_BLOCKS = {"sd1": 25, "sd2": 25, "sdxl": 23}

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks)_(\d+)_")
_SGM_BASE = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def block_slot(kohya_name: str, arch: str) -> int:
    """sd-scripts' block slot of a kohya UNet module name, -1 when none applies (text encoders,
    modules outside the numbered blocks)."""
    if not kohya_name.startswith(UNET_PREFIX):
        return -1
    name = kohya_name[len(UNET_PREFIX):]
    if arch != "sdxl":
        m = _UPDOWN.match(name)
        if m:
            i, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else 13 + idx
        return 12 if name.startswith("mid_block_") else -1
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    m = _SGM.match(name)
    if m:
        return _SGM_BASE[m[1]] + int(m[2])
    return 22 if name.startswith("out_") else -1
