"""kohya <-> diffusers/PEFT module names, written the way every loader accepts them.

Kohya module names are prefix + module path with `.` replaced by `_` (formats-spec §1.2, §3.4).
Which path depends on the architecture (§5.5, "most compatible naming"): SD1/SD2 UNets use the
diffusers path (`lora_unet_down_blocks_0_attentions_0_proj_in`), SDXL UNets the SGM path
(`lora_unet_input_blocks_4_1_proj_in`); text encoders use `lora_te_` (SD1/SD2) or
`lora_te1_`/`lora_te2_` (SDXL) with the HF CLIP path, which always carries `text_model_`.
transformers 5.x's `CLIPTextModel` has no `text_model` level in its module names (4.x had, and
`CLIPTextModelWithProjection` still has), so paths taken from a live model are normalised here.

The reverse direction (a kohya name -> a base weight) is not done by splitting on `_`; it is a
lookup in `loratools.keys.index.BaseIndex`, whose aliases are generated with these functions.

Example:
    >>> kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", "sd1")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    >>> kohya_name("unet", "down_blocks.1.attentions.0.proj_in", "sdxl", unet_table=table)
    'lora_unet_input_blocks_4_1_proj_in'
"""

from __future__ import annotations

import re

from loratools.errors import UsageError
from loratools.keys.unet_blocks import UNetBlockTable

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

# The kohya module-name prefixes, defined here once (formats-spec 1.2). Every other module asks
# for them: the adapter parser, the index, the loaders' rules, the trainer's networks.
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"  # the only text encoder (SD1 CLIP-L, SD2 OpenCLIP-H)
TE1_PREFIX = "lora_te1_"  # SDXL CLIP-L
TE2_PREFIX = "lora_te2_"  # SDXL OpenCLIP-bigG (HF names, q/k/v split)
#: Longest first, so `lora_te1_` is never read as `lora_te_` + "1_...".
KOHYA_TE_PREFIXES = (TE1_PREFIX, TE2_PREFIX, TE_PREFIX)
KOHYA_PREFIXES = (UNET_PREFIX, *KOHYA_TE_PREFIXES)
#: LyCORIS' own wrapper (SimpleTuner and others): `lycoris_` + diffusers module path.
LYCORIS_PREFIX = "lycoris_"

_TE_PREFIX = {
    ("sd1", TEXT_ENCODER): TE_PREFIX,
    ("sd2", TEXT_ENCODER): TE_PREFIX,
    ("sdxl", TEXT_ENCODER): TE1_PREFIX,
    ("sdxl", TEXT_ENCODER_2): TE2_PREFIX,
}
_PREFIX_COMPONENT = {UNET_PREFIX: UNET, TE1_PREFIX: TEXT_ENCODER, TE2_PREFIX: TEXT_ENCODER_2, TE_PREFIX: TEXT_ENCODER}
#: Short labels for tables and JSON (`check weights` groups modules by them).
_PREFIX_LABEL = {UNET_PREFIX: "unet", TE1_PREFIX: "te1", TE2_PREFIX: "te2", TE_PREFIX: "te"}

TEXT_MODEL = "text_model."
_TE_LAYER = re.compile(r"^text_model_encoder_layers_(\d+)_")
_SGM_WORDS = re.compile(r"^(input_blocks_\d|middle_block_\d|output_blocks_\d|time_embed_\d|label_emb_\d|out_\d)")
_DIFFUSERS_WORDS = re.compile(r"^(down_blocks_|mid_block_|up_blocks_|conv_in|conv_out|conv_norm_out|time_embedding_"
                              r"|add_embedding_)")


def te_module_path(module_path: str) -> str:
    """A CLIP text-encoder module path with the `text_model.` level that kohya names, A1111,
    ComfyUI and diffusers folders written by transformers 4.x use.

    Accepts paths from transformers 4.x and 5.x models alike; `text_projection` sits outside
    `text_model` in both and is left alone.
    """
    if module_path.startswith(TEXT_MODEL) or module_path.startswith("text_projection"):
        return module_path
    return TEXT_MODEL + module_path


def kohya_prefix(component: str, arch: str) -> str:
    """The kohya prefix for a component of an architecture (`lora_unet_`, `lora_te_`, ...)."""
    if component == UNET:
        return "lora_unet_"
    try:
        return _TE_PREFIX[(arch, component)]
    except KeyError:
        raise UsageError(f"no kohya prefix for component {component!r} of architecture {arch!r} "
                         f"(known: unet, text_encoder; text_encoder_2 for sdxl)") from None


def kohya_name(component: str, module_path: str, arch: str, *,
               unet_table: UNetBlockTable | None = None) -> str:
    """The kohya module name for a diffusers/transformers module path.

    Args:
        component: "unet", "text_encoder" or "text_encoder_2".
        module_path: the module's dotted path inside that component, as `named_modules()` of the
            diffusers/transformers model gives it (a trailing `.weight` is not expected).
        arch: "sd1", "sd2" or "sdxl".
        unet_table: the SDXL UNet's block table (`UNetBlockTable.from_config(unet.config)`); the
            released SDXL layout is used when omitted.

    Returns:
        e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (SDXL),
        `lora_unet_down_blocks_0_attentions_0_proj_in` (SD1), `lora_te1_text_model_encoder_layers_0_mlp_fc1`.
    """
    prefix = kohya_prefix(component, arch)
    if component == UNET:
        path = module_path
        if arch == "sdxl":
            table = unet_table or UNetBlockTable.standard("sdxl")
            sgm = table.to_ldm(module_path)
            if sgm is None:
                raise UsageError(f"UNet module {module_path!r} has no SGM name (kohya SDXL files name UNet "
                                 "modules by their SGM path); it cannot be written in kohya form")
            path = sgm
    else:
        path = te_module_path(module_path)
    return prefix + path.replace(".", "_")


def peft_name(component: str, module_path: str) -> str:
    """The diffusers/PEFT module name (`unet.<path>`, `text_encoder.text_model.<path>`) that
    `load_lora_weights` reads; text-encoder paths get the `text_model.` level (accepted by
    diffusers on both transformers 4.x and 5.x)."""
    if component not in COMPONENTS:
        raise UsageError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    path = module_path if component == UNET else te_module_path(module_path)
    return f"{component}.{path}"


def split_kohya_prefix(name: str) -> tuple[str, str] | None:
    """(`lora_te1_`, rest) for a kohya module name; None if it has no kohya prefix."""
    for p in KOHYA_PREFIXES:
        if name.startswith(p):
            return p, name[len(p):]
    return None


def component_of(name: str) -> str | None:
    """The component a kohya module name belongs to ("unet", "text_encoder", "text_encoder_2"), by
    its prefix (`lora_te_` is the first text encoder); None for any other name."""
    split = split_kohya_prefix(name)
    return None if split is None else _PREFIX_COMPONENT[split[0]]


def component_label(name: str) -> str:
    """"unet", "te", "te1", "te2" for a kohya module name, "other" for anything else."""
    split = split_kohya_prefix(name)
    return "other" if split is None else _PREFIX_LABEL[split[0]]


def te_layer(name: str) -> tuple[str, int] | None:
    """(component label, encoder layer) of a kohya text-encoder layer module
    (`lora_te1_text_model_encoder_layers_11_mlp_fc2` -> ("te1", 11)); None for anything else."""
    split = split_kohya_prefix(name)
    if split is None or split[0] == UNET_PREFIX:
        return None
    m = _TE_LAYER.match(split[1])
    return None if m is None else (_PREFIX_LABEL[split[0]], int(m.group(1)))


def unet_spelling(name: str) -> str | None:
    """"sgm" for a kohya UNet name spelled by its LDM/SGM path (`lora_unet_input_blocks_4_1_...`),
    "diffusers" for one spelled by its diffusers path (`lora_unet_down_blocks_1_attentions_0_...`),
    None for anything else. The two spellings can only be related through a UNet layout."""
    if not name.startswith(UNET_PREFIX):
        return None
    rest = name[len(UNET_PREFIX):]
    if _SGM_WORDS.match(rest):
        return "sgm"
    if _DIFFUSERS_WORDS.match(rest):
        return "diffusers"
    return None


def te_prefixes(arch: str) -> tuple[str, ...]:
    """The text-encoder prefixes of an architecture's kohya files, in text-encoder order."""
    return (TE1_PREFIX, TE2_PREFIX) if arch == "sdxl" else (TE_PREFIX,)


def underscored(path: str) -> str:
    """A dotted module path in kohya's underscore spelling (one direction only: never invert)."""
    return path.replace(".", "_")
