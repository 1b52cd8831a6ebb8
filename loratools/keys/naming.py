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

from collections.abc import Iterable

from loratools.errors import UsageError
from loratools.keys.unet_blocks import UNetBlockTable

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

# kohya prefixes, longest first so `lora_te1_` is never read as `lora_te_` + "1_...".
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")

_TE_PREFIX = {
    ("sd1", TEXT_ENCODER): "lora_te_",
    ("sd2", TEXT_ENCODER): "lora_te_",
    ("sdxl", TEXT_ENCODER): "lora_te1_",
    ("sdxl", TEXT_ENCODER_2): "lora_te2_",
}

TEXT_MODEL = "text_model."

_TE_COMPONENT = {"lora_te1_": TEXT_ENCODER, "lora_te2_": TEXT_ENCODER_2, "lora_te_": TEXT_ENCODER}
_TRANSFORMER_BLOCK_INNER = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
_TRANSFORMER_INNER = ("proj_in", "proj_out", "norm")
_CLIP_LAYER_INNER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")
_CLIP_OTHER = ("text_model.final_layer_norm", "text_model.embeddings.token_embedding",
               "text_model.embeddings.position_embedding", "text_projection")
# Generous bounds for the generated vocabulary (SDXL: 10 transformer blocks, bigG: 32 layers).
_MAX_TRANSFORMER_DEPTH = 32
_MAX_CLIP_LAYERS = 64


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


def underscored(path: str) -> str:
    """A dotted module path in kohya's underscore spelling (one direction only: never invert)."""
    return path.replace(".", "_")


class ModulePaths:
    """Canonical kohya module name -> (component, dotted diffusers/transformers module path).

    The inverse of ``kohya_name`` without a base checkpoint (``convert``, tests, anything that
    needs a live module's path): a lookup table of every module path the UNet (diffusers and SGM
    spellings, from its block table) and the CLIP text encoders can have, underscored. Never
    splits on ``_``; two paths with one underscored spelling raise.

    Example:
        >>> ModulePaths(UNetBlockTable.standard("sdxl")).locate("lora_unet_input_blocks_4_1_proj_in")
        ('unet', 'down_blocks.1.attentions.0.proj_in')
    """

    def __init__(self, table: UNetBlockTable) -> None:
        self._unet: dict[str, str] = {}
        for dif, ldm in table.pairs().items():
            inner: Iterable[str] = ("",)
            if ".attentions." in dif:
                inner = ("", *_TRANSFORMER_INNER, *(f"transformer_blocks.{k}.{n}" for k in range(_MAX_TRANSFORMER_DEPTH)
                                                    for n in _TRANSFORMER_BLOCK_INNER))
            for rest in inner:
                d, s = (f"{dif}.{rest}", f"{ldm}.{rest}") if rest else (dif, ldm)
                self._add(self._unet, d, d)
                self._add(self._unet, s, d)
        self._te: dict[str, str] = {}
        for n in range(_MAX_CLIP_LAYERS):
            for rest in _CLIP_LAYER_INNER:
                p = f"text_model.encoder.layers.{n}.{rest}"
                self._add(self._te, p, p)
        for p in _CLIP_OTHER:
            self._add(self._te, p, p)

    @staticmethod
    def _add(table: dict[str, str], spelled: str, path: str) -> None:
        key = spelled.replace(".", "_")
        if table.setdefault(key, path) != path:
            raise ValueError(f"{table[key]!r} and {path!r} are both spelled {key!r}")

    def locate(self, name: str) -> tuple[str, str] | None:
        """``("unet" | "text_encoder" | "text_encoder_2", dotted path)`` or None."""
        if name.startswith("lora_unet_"):
            path = self._unet.get(name[len("lora_unet_"):])
            return None if path is None else ("unet", path)
        for prefix, component in _TE_COMPONENT.items():
            if name.startswith(prefix):
                path = self._te.get(name[len(prefix):])
                return None if path is None else (component, path)
        return None
