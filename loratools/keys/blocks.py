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

Block-weight merges (`--lbws`, supermerger/LoRA Block Weight presets) number blocks differently:
26 LBW slots `BASE` (the text encoders), `IN00`-`IN11`, `MID`, `OUT00`-`OUT11`, from sd-scripts'
`svd_merge_lora.get_lbw_block_index`. SD1/SD2 slot = block slot + 1; SDXL: embeddings and
`input_blocks_0` share `IN00`, `input_blocks_n` -> `IN0n`, every `middle_block` part -> `MID`,
`output_blocks_n` -> `OUT0n`, `out` -> `OUT09`. A list of 12, 17 or 20 weights names a subset of the
26 (`LBW_LAYOUTS`, sd-scripts' LAYER12/17/20 flags); slots it does not name keep weight 1.
"""

from __future__ import annotations

import re

from loratools.keys.naming import UNET_PREFIX, component_of

#: Slots per architecture: SD1/SD2 IN00-IN11, M00, OUT00-OUT11; SDXL embeddings, 9 in, 3 mid, 9 out, out.
NUM_BLOCKS = {"sd1": 25, "sd2": 25, "sdxl": 23}

#: The 26 LBW block ids, in slot order.
LBW_BLOCK_IDS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
#: Which LBW ids a list of each length gives weights for, in order (sd-scripts' LAYER12/17/20/26).
LBW_LAYOUTS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
         "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))),
    26: LBW_BLOCK_IDS,
}
#: List lengths that fit each architecture's UNet (12 and 20 are SDXL's blocks, 17 SD1's; 26 is all).
LBW_LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20, 26)}

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


def lbw_slot(kohya_name: str, arch: str) -> int:
    """The LBW slot (index into `LBW_BLOCK_IDS`) of a kohya module name: 0 for text-encoder
    modules, the UNet block's slot, -1 for UNet modules outside the numbered blocks (SD1's
    `conv_in`, `time_embedding`, `conv_out`), which block weights leave at 1 as sd-scripts does."""
    if component_of(kohya_name) in ("text_encoder", "text_encoder_2"):
        return 0
    slot = block_slot(kohya_name, arch)
    if slot < 0:
        return -1
    if arch != "sdxl":
        return slot + 1
    if slot == 0:
        return 1
    if slot <= 9:
        return slot
    return 13 if slot <= 12 else slot + 1
