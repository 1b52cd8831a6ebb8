"""What ComfyUI, A1111 and diffusers do with every key of an adapter file: load it, or skip it and why.

"lora key not loaded" is the message users of this field meet most: a key whose module name the
loader does not map is skipped, often silently. These are the loaders' own rules, read from their
source and written here as data and small functions (facts carry over, code does not), applied
to the file's keys against a `BaseIndex` (the user's base, or the released model of the
architecture). Sources, each rule citing its function:

* ComfyUI: comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`;
  comfy/weight_adapter/{lora,loha,lokr,glora,oft,boft}.py `load`; comfy/utils.py `unet_to_diffusers`.
* A1111: extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`,
  `assign_network_names_to_compvis_modules`, `load_network`, `network_apply_weights`;
  network_{lora,hada,ia3,lokr,full,norm,glora,oft}.py `create_module`.
* diffusers 0.42: loaders/lora_pipeline.py `lora_state_dict`, `load_lora_weights` (the SDXL
  pipeline passes `unet_config`, SD1/SD2 do not); loaders/lora_conversion_utils.py
  `_maybe_map_sgm_blocks_to_diffusers`, `_convert_non_diffusers_lora_to_diffusers`,
  `_convert_unet_lora_key`, `_convert_text_encoder_lora_key`.

Reasons a key is skipped (`REASONS`): an unknown prefix, a naming form the loader does not map
(the module exists), no such weight, a shape that does not fit, two modules for one weight, an
adapter type (suffix) the loader has no code for, or the loader refusing the whole file.

Example:
    >>> report = check_loader("comfyui", file_keys, modules, BaseIndex.standard("sdxl"))
    >>> report.loaded, [s.reason for s in report.skipped][:1]
    (352, ['form'])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from loratools.keys.index import BaseIndex, ModuleInfo, Target, shapes_compatible
from loratools.keys.naming import (KOHYA_PREFIXES, LYCORIS_PREFIX, TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX,
                                   underscored)

LOADERS = ("comfyui", "a1111", "diffusers")
LABELS = {"comfyui": "ComfyUI", "a1111": "A1111", "diffusers": "diffusers"}
#: Why a key is skipped: short labels for tables (each skip's `detail` says the rest).
REASONS = {
    "prefix": "unknown prefix",
    "form": "naming form",  # the module exists; this loader does not map this spelling of it
    "weight": "no such weight",
    "shape": "shape mismatch",
    "duplicate": "two modules, one weight",
    "type": "adapter type",  # a suffix / type this loader has no code for
    "refused": "file refused",  # the loader raises on the file: nothing loads
}
#: Module-name beginnings some loader maps (anything else is an unknown prefix).
KNOWN_PREFIXES = (*KOHYA_PREFIXES, LYCORIS_PREFIX, "unet.", "text_encoder.", "text_encoder_2.", "diffusion_model.",
                  "base_model.model.")

_SHAPE = tuple[int, ...]


@dataclass(frozen=True)
class FileModule:
    """One module of the file as the adapter parser grouped it: canonical `name` (what the index
    resolves), `source` (the module name in the file), its `keys`, its delta `shape` (None: IA3)."""

    name: str
    source: str
    keys: tuple[str, ...]
    shape: _SHAPE | None


@dataclass(frozen=True)
class Skip:
    """A key the loader does not apply: `reason` is a `REASONS` key, `detail` one sentence."""

    key: str
    reason: str
    detail: str


@dataclass
class LoaderReport:
    """One loader's verdict on a file: `skipped` keys (with reasons) out of `keys`; `refused` says
    why the loader rejects the whole file (then every key is skipped)."""

    loader: str
    keys: int
    skipped: list[Skip] = field(default_factory=list)
    refused: str | None = None

    @property
    def loaded(self) -> int:
        return self.keys - len(self.skipped)

    @property
    def ok(self) -> bool:
        return not self.skipped

    @property
    def label(self) -> str:
        return LABELS[self.loader]

    def reasons(self) -> dict[str, int]:
        """Skipped key counts per reason."""
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s.reason] = out.get(s.reason, 0) + 1
        return out

    def as_json(self) -> dict:
        return {"loader": self.loader, "keys": self.keys, "loaded": self.loaded, "ok": self.ok,
                "refused": self.refused, "reasons": self.reasons(),
                "skipped": [{"key": s.key, "reason": s.reason, "detail": s.detail} for s in self.skipped]}


def check_loader(loader: str, keys: Iterable[str], modules: Sequence[FileModule], index: BaseIndex) -> LoaderReport:
    """Which of `keys` (every key of the file) `loader` would load onto the model `index` describes.

    Args:
        loader: "comfyui", "a1111" or "diffusers".
        keys: all tensor keys of the file.
        modules: the file's modules as the adapter parser grouped them (keys of no module are
            judged by their prefix alone).
        index: the base model's index, or `BaseIndex.standard(arch)`.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; expected one of {', '.join(LOADERS)}")
    ctx = _Context(list(keys), modules, index, LABELS[loader])
    return {"comfyui": _comfyui, "a1111": _a1111, "diffusers": _diffusers}[loader](ctx)


class _Context:
    """The file and the model, with the reason logic every loader shares."""

    def __init__(self, keys: list[str], modules: Sequence[FileModule], index: BaseIndex, label: str) -> None:
        self.keys, self.index, self.label = keys, index, label
        self.arch = index.arch.arch
        self.module_of = {k: m for m in modules for k in m.keys}
        self.infos: list[ModuleInfo] = [index.info(t) for t in index.targets()]

    def unmapped(self, key: str) -> Skip:
        """Why a key the loader did not map is not loaded: the module exists under another
        spelling (naming form), names no weight, or has a prefix no loader knows."""
        module = self.module_of.get(key)
        name = module.source if module is not None else key.partition(".")[0]
        if module is not None and self.index.resolve(module.name) is not None:
            return Skip(key, "form", f"{self.label} does not map the name {name}")
        if not key.startswith(KNOWN_PREFIXES):
            return Skip(key, "prefix", f"{self.label} knows no module prefix of {name}")
        return Skip(key, "weight", f"{name} names no weight of {self.index.arch.label}")

    def misfit(self, key: str, target: Target, *, inpaint_pad: bool = False) -> Skip | None:
        """A shape-mismatch skip when the key's module delta does not fit `target` (A1111 pads a
        4-channel conv_in delta to an inpainting model's 9 input channels)."""
        module = self.module_of.get(key)
        if module is None or module.shape is None or shapes_compatible(module.shape, target.shape):
            return None
        shape, want = module.shape, tuple(target.shape)
        if inpaint_pad and len(shape) == 4 and len(want) == 4 and want[1] == 9 and shape[1] == 4:
            return None
        return Skip(key, "shape", f"{module.source}: delta {_dims(shape)} does not fit {target.key} {_dims(want)}")


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _refuse(ctx: _Context, loader: str, why: str, offenders: Mapping[str, str]) -> LoaderReport:
    """The loader raises on this file: every key is skipped, the offenders with their own reason."""
    skipped = [Skip(k, *offenders[k].split(":", 1)) if k in offenders else Skip(k, "refused", why) for k in ctx.keys]
    return LoaderReport(loader, len(ctx.keys), skipped, refused=why)


# ---------------------------------------------------------------------------------------------
# ComfyUI

# comfy/weight_adapter/lora.py LoRAAdapter.load, loha.py, lokr.py, glora.py, oft.py, boft.py and
# comfy/lora.py load_lora (alpha, dora_scale, reshape_weight, w_norm/b_norm, diff/diff_b, set_weight):
# the key endings ComfyUI reads after a mapped module name.
COMFYUI_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight", ".lora_B", ".lora_A",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_B.default.weight",
    ".lora_A.default.weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale",
    ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight", ".alpha", ".dora_scale", ".reshape_weight",
)
# comfy/lora.py LORA_CLIP_MAP: the only text-encoder layers model_lora_keys_clip maps (layers 0-31).
_COMFY_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(mlp\.fc[12]|self_attn\.(?:[qkv]|out)_proj)$")


def comfyui_key_map(index: BaseIndex) -> dict[str, tuple[Target, int]]:
    """ComfyUI's module names for a model: `{name: (target, order)}`; a later `order` overwrites
    an earlier one when a file has both (its `patch_dict` is keyed by the weight)."""
    out: dict[str, tuple[Target, int]] = {}
    for info in (index.info(t) for t in index.targets()):
        t = info.target
        if info.component == "unet":
            # model_lora_keys_unet: every `diffusion_model.` key of the model first ...
            if info.ldm_path is not None:
                for name in (f"{UNET_PREFIX}{underscored(info.ldm_path)}", f"lora_prior_unet_{underscored(info.ldm_path)}",
                             f"diffusion_model.{info.ldm_path}"):
                    out[name] = (t, 0)
            # ... then unet_to_diffusers' names; attention projections only in the processor form
            legacy = info.path.replace(".to_", ".processor.to_")
            if legacy.endswith(".to_out.0"):
                legacy = legacy[:-2]
            for name in (f"{UNET_PREFIX}{underscored(info.path)}", f"{LYCORIS_PREFIX}{underscored(info.path)}",
                         legacy, f"unet.{legacy}"):
                out.setdefault(name, (t, 1))
            continue
        m = _COMFY_CLIP_LAYER.match(info.path)
        if m is None or int(m[1]) >= 32:
            continue
        tail = f"{m[1]}_{underscored(m[2])}"
        if info.component == "text_encoder_2":  # clip_g next to clip_l (SDXL)
            names = (f"{TE2_PREFIX}text_model_encoder_layers_{tail}", f"text_encoder_2.{info.path}")
        else:  # clip_l (SD1, SDXL) or clip_h (SD2)
            names = (f"{TE_PREFIX}text_model_encoder_layers_{tail}", f"{TE1_PREFIX}text_model_encoder_layers_{tail}",
                     f"text_encoder.{info.path}")
        for name in names:
            out[name] = (t, 2)
    return out


def _comfyui(ctx: _Context) -> LoaderReport:
    key_map = comfyui_key_map(ctx.index)
    skipped: list[Skip] = []
    applied: dict[Target, list[tuple[int, str, list[str]]]] = {}
    by_module: dict[str, tuple[Target, int, list[str]]] = {}
    for key in ctx.keys:
        hit = next(((key[:-len(s)], s) for s in COMFYUI_SUFFIXES if key.endswith(s) and key[:-len(s)] in key_map),
                   None)
        if hit is None:
            mapped = _mapped_prefix(key, key_map)
            if mapped is not None:  # the module is mapped, the suffix is no type ComfyUI has (IA3 ...)
                skipped.append(Skip(key, "type", f"ComfyUI has no adapter type reading {key[len(mapped):]!r} "
                                                 f"(module {mapped})"))
            else:
                skipped.append(ctx.unmapped(key))
            continue
        name = hit[0]
        target, order = key_map[name]
        misfit = ctx.misfit(key, target)
        if misfit is not None:
            skipped.append(misfit)
            continue
        by_module.setdefault(name, (target, order, []))[2].append(key)
    for name, (target, order, keys) in by_module.items():
        applied.setdefault(target, []).append((order, name, keys))
    for target, users in applied.items():
        if len(users) > 1:  # load_lora: patch_dict[weight] is overwritten by the module mapped last
            users.sort()
            winner = users[-1][1]
            for _, name, keys in users[:-1]:
                skipped += [Skip(k, "duplicate", f"{name} and {winner} both change {target.key}; ComfyUI applies "
                                                 f"only {winner}, without a message") for k in keys]
    return LoaderReport("comfyui", len(ctx.keys), _in_order(ctx, skipped))


def _mapped_prefix(key: str, key_map: Mapping[str, object]) -> str | None:
    """The longest `.`-bounded beginning of `key` that is a mapped module name, or None."""
    cut = key.rfind(".")
    while cut > 0:
        if key[:cut] in key_map:
            return key[:cut]
        cut = key.rfind(".", 0, cut)
    return None


def _in_order(ctx: _Context, skipped: list[Skip]) -> list[Skip]:
    order = {k: i for i, k in enumerate(ctx.keys)}
    return sorted(skipped, key=lambda s: order[s.key])


# ---------------------------------------------------------------------------------------------
# A1111

# networks.py convert_diffusers_name_to_compvis: suffix_conversion of resnet inner names
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
# network_*.py create_module: the parts each module type needs (a module none accepts fails the file)
A1111_TYPES = (
    ("lora", (("lora_up.weight", "lora_down.weight"), ("lora_A.weight", "lora_B.weight"))),
    ("loha", (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)),
    ("ia3", (("weight",),)),
    ("lokr", (("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"), ("lokr_w1_a", "lokr_w1_b", "lokr_w2"),
              ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"))),
    ("full", (("diff",),)),
    ("norm", (("w_norm", "b_norm"),)),
    ("glora", (("a1.weight", "a2.weight", "b1.weight", "b2.weight"),)),
    ("oft", (("oft_blocks",), ("oft_diag",))),
)
_OPENCLIP = {"self_attn.out_proj": "attn_out_proj", "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj",
             "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_TE_LAYER_PATH = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


def a1111_convert(name: str, sd2: bool) -> str:
    """networks.py convert_diffusers_name_to_compvis: diffusers-style kohya names -> A1111's
    compvis layer names (the patterns are A1111's own literals, not our prefix constants) (SD1 block arithmetic: 3 blocks per level, upsampler sub-index 1 on the
    first up level, 2 elsewhere); any other name comes back unchanged."""
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_resnet(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_resnet(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_resnet(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}" if sd2
         else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}"),
    )
    for pattern, build in rules:
        m = re.match(pattern, name)
        if m:
            return build(m)
    return name


def _resnet(kind: str, rest: str) -> str:
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _openclip_rest(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_layers(index: BaseIndex) -> dict[str, tuple[Target, bool]]:
    """assign_network_names_to_compvis_modules: A1111's layer names for a model (`.` -> `_` of
    its LDM module paths; SDXL text encoders numbered `0_`/`1_`; OpenCLIP encoders (SD2, SDXL's
    second) by their OpenCLIP names, q/k/v inside one MultiheadAttention `..._attn`).
    `{layer: (target, is_mha_part)}`; an MHA part's layer is `<attn>_q_proj` etc. as A1111 keys it."""
    arch = index.arch.arch
    out: dict[str, tuple[Target, bool]] = {}
    for info in (index.info(t) for t in index.targets()):
        if info.component == "unet":
            if info.ldm_path is not None:
                out[f"diffusion_model_{underscored(info.ldm_path)}"] = (info.target, False)
            continue
        openclip = arch == "sd2" or info.component == "text_encoder_2"
        if not openclip:
            prefix = "0_transformer_" if arch == "sdxl" else "transformer_"
            out[prefix + underscored(info.path)] = (info.target, False)
            continue
        head = "1_model_" if info.component == "text_encoder_2" else "model_"
        m = _TE_LAYER_PATH.match(info.path)
        if m is None:
            continue
        inner = m[2]
        if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            out[f"{head}transformer_resblocks_{m[1]}_attn_{inner[-6:]}"] = (info.target, True)
        elif inner in _OPENCLIP:
            out[f"{head}transformer_resblocks_{m[1]}_{_OPENCLIP[inner]}"] = (info.target, inner == "self_attn.out_proj")
    return out


def _a1111_layer(name: str, sd2: bool, layers: Mapping[str, tuple[Target, bool]]) -> str | None:
    """networks.py load_network: the layer a module name lands on, after its fallbacks."""
    key = a1111_convert(name, sd2)
    if key in layers:  # (an OpenCLIP q/k/v is found through re_x_proj: registered under its own name here)
        return key
    if "lora_unet" in name:  # "SDXL loras seem to already have correct compvis keys"
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in layers else None
    if "lora_te1_text_model" in name:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", replacement)
            if key in layers:
                return key
    return None


def _a1111(ctx: _Context) -> LoaderReport:
    layers = a1111_layers(ctx.index)
    sd2 = ctx.arch == "sd2"
    skipped: list[Skip] = []
    matched: dict[str, dict[str, list[str]]] = {}  # layer -> part -> keys (load_network's matched_networks)
    for key in ctx.keys:
        module, _, part = key.partition(".")
        layer = _a1111_layer(module, sd2, layers)
        if layer is None:
            skipped.append(ctx.unmapped(key))
            continue
        matched.setdefault(layer, {}).setdefault(part, []).append(key)
    accepted: dict[str, list[str]] = {}
    for layer, parts in matched.items():
        names = {k.partition(".")[0] for ks in parts.values() for k in ks}
        keys = [k for ks in parts.values() for k in ks]
        if len(names) > 1:  # one NetworkWeights per layer: the later module's parts overwrite the earlier's
            skipped += [Skip(k, "duplicate", f"{' and '.join(sorted(names))} both land on A1111 layer {layer}; "
                                             "A1111 mixes their tensors") for k in keys]
            continue
        if not any(all(p in parts for p in need) for _, forms in A1111_TYPES for need in forms):
            why = (f"A1111 has no module type for the parts {', '.join(sorted(parts))} of {names.pop()} and stops "
                   "loading the file (AssertionError in load_network)")
            return _refuse(ctx, "a1111", why, {k: f"type:{why}" for k in keys})
        accepted[layer] = keys
    # network_apply_weights: an OpenCLIP MultiheadAttention is patched only when q, k, v and out are all there
    for layer, keys in list(accepted.items()):
        target, mha = layers[layer]
        if mha:
            attn = re.sub(r"_(?:[qkv]_proj|out_proj)$", "", layer)
            missing = [p for p in ("q_proj", "k_proj", "v_proj", "out_proj") if f"{attn}_{p}" not in accepted]
            if missing:
                skipped += [Skip(k, "form", f"A1111 patches OpenCLIP attention {attn} only with q, k, v and out_proj "
                                            f"together; {', '.join(missing)} missing") for k in keys]
                continue
        for k in keys:
            misfit = ctx.misfit(k, target, inpaint_pad=True)
            if misfit is not None:
                skipped.append(misfit)
    return LoaderReport("a1111", len(ctx.keys), _in_order(ctx, skipped))


# ---------------------------------------------------------------------------------------------
# diffusers

_SGM_WORDS = ("input_blocks", "middle_block", "output_blocks")
_DIFFUSERS_WORDS = ("down_blocks", "mid_block", "up_blocks")
# lora_conversion_utils._convert_unet_lora_key: its replacements, in order, on the key with `_` -> `.`
_DIFFUSERS_UNET_REPLACE = (
    ("input.blocks.0.0", "conv_in"), ("out.2", "conv_out"), ("input.blocks", "down_blocks"),
    ("down.blocks", "down_blocks"), ("middle.block", "mid_block"), ("mid.block", "mid_block"),
    ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"), ("transformer.blocks", "transformer_blocks"),
    ("to.q.lora", "to_q_lora"), ("to.k.lora", "to_k_lora"), ("to.v.lora", "to_v_lora"), ("to.out.0.lora", "to_out_lora"),
    ("proj.in", "proj_in"), ("proj.out", "proj_out"), ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"),
    ("conv.out", "conv_out"), ("time.embed.0", "time_embedding.linear_1"), ("time.embed.2", "time_embedding.linear_2"),
    ("label.emb.0.0", "add_embedding.linear_1"), ("label.emb.0.2", "add_embedding.linear_2"),
    ("time.embedding.linear.1", "time_embedding.linear_1"), ("time.embedding.linear.2", "time_embedding.linear_2"),
)
# _convert_text_encoder_lora_key
_DIFFUSERS_TE_REPLACE = (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj.lora", "to_q_lora"),
                         ("k.proj.lora", "to_k_lora"), ("v.proj.lora", "to_v_lora"), ("out.proj.lora", "to_out_lora"),
                         ("text.projection", "text_projection"))
# convert_unet_state_dict_to_peft: the key endings of a non-kohya file, -> how the module path ends
_PEFT_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
                 ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", ".lora_magnitude_vector",
                 ".lora_magnitude_vector.weight")
_LEGACY_ENDING = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
_LEGACY_TE_ENDING = re.compile(r"\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
_TE_LEGACY = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def diffusers_unet_path(key: str) -> str | None:
    """`_convert_unet_lora_key` applied to a `lora_unet_<name>.lora_down.weight` key: the
    diffusers UNet module path the LoRA is loaded onto (None when the result is no module path)."""
    s = key.replace(UNET_PREFIX, "").replace("_", ".")
    for old, new in _DIFFUSERS_UNET_REPLACE:
        s = s.replace(old, new)
    if "emb" in s and "time.emb.proj" not in s:  # "SDXL specific conversions"
        s = re.sub(r"\.\d+(?=\D*$)", "", s, count=1)
    if ".in." in s:
        s = s.replace("in.layers.2", "conv1")
    if ".out." in s:
        s = s.replace("out.layers.3", "conv2")
    if "downsamplers" in s or "upsamplers" in s:
        s = s.replace("op", "conv")
    if "skip" in s:
        s = s.replace("skip.connection", "conv_shortcut")
    s = s.replace("time.emb.proj", "time_emb_proj").replace("conv.shortcut", "conv_shortcut")
    m = re.match(r"^(.*)\.(to_[qkv]|to_out)_lora\.down\.weight$", s)
    if m:  # the legacy attention-processor form, which the PEFT conversion maps back to to_q / to_out.0
        return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
    return s.removesuffix(".lora.down.weight") if s.endswith(".lora.down.weight") else None


def diffusers_te_path(key: str, prefix: str) -> str | None:
    """`_convert_text_encoder_lora_key` applied to a `lora_te*_<name>.lora_down.weight` key."""
    s = key.replace(prefix, "", 1).replace("_", ".")
    for old, new in _DIFFUSERS_TE_REPLACE:
        s = s.replace(old, new)
    m = _LEGACY_TE_ENDING.search(s)
    if m:
        return s[:m.start()] + "." + _TE_LEGACY[m[1]]
    return s.removesuffix(".lora.down.weight") if s.endswith(".lora.down.weight") else None


def diffusers_sgm_rename(keys: Sequence[str], layers_per_block: int) -> dict[str, str]:
    """`_maybe_map_sgm_blocks_to_diffusers` (SDXL pipeline only): SGM block numbers in kohya keys
    -> diffusers ones, split on `_` at the fixed field positions diffusers uses.

    Raises:
        ValueError: where diffusers raises (a block number it cannot read, a middle block above 2).
    """
    inner = ("resnets", "attentions", "upsamplers")
    out = {}
    for key in keys:
        if "text" in key or not any(p in key for p in _SGM_WORDS) or "input_blocks_0_0" in key:
            out[key] = key
            continue
        parts = key.split("_")
        block = int(parts[4])
        if "input_blocks" in key:
            sub = int(parts[5])
            level, pos = (block - 1) // (layers_per_block + 1), (block - 1) % (layers_per_block + 1)
            kind = inner[sub] if "op" not in key else "downsamplers"
            new = parts[:4] + [str(level), kind, str(pos) if "op" not in key else "0"] + parts[6:]
        elif "middle_block" in key:
            if block > 2:
                raise ValueError(f"Invalid middle block id {block}.")
            new = parts[:4] + [["resnets", "0"], ["attentions", "0"], ["resnets", "1"]][block] + parts[5:]
        else:
            sub = int(parts[5])
            level, pos = block // (layers_per_block + 1), block % (layers_per_block + 1)
            new = parts[:4] + [str(level), inner[sub], str(pos) if sub < 2 else "0"] + parts[6:]
        out[key] = "_".join(new)  # still `input_blocks_`/`output_blocks_`: _convert_unet_lora_key renames them
    return out


def _diffusers(ctx: _Context) -> LoaderReport:
    skipped: list[Skip] = []
    sdxl = ctx.arch == "sdxl"
    # lora_state_dict: dora_scale keys are filtered out with a warning
    keys = []
    for key in ctx.keys:
        if "dora_scale" in key:
            skipped.append(Skip(key, "type", "diffusers drops dora_scale (the module loads as a plain LoRA)"))
        else:
            keys.append(key)
    paths = {(i.component, i.path): i.target for i in ctx.infos}
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return _diffusers_kohya(ctx, keys, skipped, paths, sdxl)
    # load_lora_weights: "Invalid LoRA checkpoint" unless every key contains "lora"
    bad = [k for k in keys if "lora" not in k]
    if bad:
        why = "diffusers refuses a file whose keys are not all kohya and not all contain 'lora' (Invalid LoRA checkpoint)"
        return _refuse(ctx, "diffusers", why, {k: f"prefix:{k} has no 'lora' in its name" for k in bad})
    components = ("unet", "text_encoder", "text_encoder_2") if sdxl else ("unet", "text_encoder")
    landing = _Landing(ctx)
    for key in keys:
        component = next((c for c in components if key.startswith(c + ".")), None)
        if component is None:  # load_lora_into_unet / _text_encoder keep only their own prefix
            skip = ctx.unmapped(key)
            if skip.reason == "form":
                skip = Skip(key, "form", f"in a file that is not all kohya, diffusers reads only "
                                         f"{', '.join(c + '.' for c in components)} keys")
            skipped.append(skip)
            continue
        path = _peft_path(key[len(component) + 1:], component)
        if path is None:
            skipped.append(Skip(key, "type", f"diffusers reads no {key.rpartition('.lora')[2] or key!r} part"))
            continue
        landing.land(key, component, path, paths.get((component, path if component == "unet" else
                                                       _with_text_model(path))))
    return landing.report(skipped)


def _with_text_model(path: str) -> str:
    return path if path.startswith(("text_model.", "text_projection")) else "text_model." + path


def _peft_path(rest: str, component: str) -> str | None:
    """The module path of a dotted PEFT / diffusers-script / attention-processor key."""
    for ending in _PEFT_ENDINGS:
        if rest.endswith(ending):
            return rest[:-len(ending)]
    m = _LEGACY_ENDING.search(rest) if component == "unet" else _LEGACY_TE_ENDING.search(rest)
    if m:
        head = rest[:m.start()]
        if component == "unet":
            return f"{head}.{m[1]}" + (".0" if m[1] == "to_out" else "")
        return f"{head}.{_TE_LEGACY[m[1]]}"
    return None


_DIFFUSERS_REFUSAL = ("diffusers raises on this file (no module of a component found: NoMatchingPeftModuleError; a "
                      "shape that does not fit: size mismatch; a LoRA on a layer that is not Linear/Conv/Embedding)")


class _Landing:
    """Where each key converted to (component, module path) lands (peft.py `load_lora_adapter`):
    a module the model lacks is an "unexpected key" warning, unless no module of that component
    is found at all (PEFT's NoMatchingPeftModuleError); a shape mismatch fails `load_state_dict`
    and a LoRA on a norm is refused: those raise, so the whole file fails."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.skipped: list[Skip] = []
        self.refusals: dict[str, str] = {}
        self.missing: dict[str, list[Skip]] = {}
        self.found: set[str] = set()
        self.owners: dict[Target, str] = {}

    def land(self, key: str, component: str, path: str | None, target: Target | None) -> None:
        ctx = self.ctx
        if target is None:
            skip = ctx.unmapped(key)
            if skip.reason == "form":
                skip = Skip(key, "form", f"diffusers converts {key.partition('.')[0]} to {component}.{path}, which is "
                                         "no module")
            self.missing.setdefault(component, []).append(skip)
            return
        self.found.add(component)
        if len(target.shape) < 2:
            self.refusals[key] = f"type:{target.key} is a norm; PEFT LoRA takes Linear, Conv and Embedding layers only"
            return
        misfit = ctx.misfit(key, target)
        if misfit is not None:
            self.refusals[key] = f"shape:{misfit.detail} (size mismatch in load_state_dict)"
            return
        self.skipped += _placed(ctx, key, target, self.owners)

    def report(self, skipped: list[Skip]) -> LoaderReport:
        for component, skips in self.missing.items():
            if component in self.found:
                skipped += skips
            else:  # nothing of this component matched: PEFT raises for the file
                self.refusals.update({s.key: f"{s.reason}:{s.detail} (NoMatchingPeftModuleError)" for s in skips})
        if self.refusals:
            return _refuse(self.ctx, "diffusers", _DIFFUSERS_REFUSAL, self.refusals)
        return LoaderReport("diffusers", len(self.ctx.keys), _in_order(self.ctx, skipped + self.skipped))


def _placed(ctx: _Context, key: str, target: Target, owners: dict[Target, str]) -> list[Skip]:
    """A key that lands on `target`: skipped if another module of the file already took the
    weight (diffusers' state dicts keep one entry per module)."""
    module = ctx.module_of.get(key)
    source = module.source if module is not None else key.partition(".")[0]
    other = owners.setdefault(target, source)
    if other != source:
        return [Skip(key, "duplicate", f"{source} and {other} both change {target.key}; diffusers keeps one")]
    return []


def _diffusers_kohya(ctx: _Context, keys: list[str], skipped: list[Skip], paths: dict, sdxl: bool) -> LoaderReport:
    """The kohya path of `lora_state_dict` (every key has a kohya prefix)."""
    renamed = {k: k for k in keys}
    if sdxl and ctx.index.unet_table is not None:
        has_sgm = any(any(p in k for p in _SGM_WORDS) for k in keys)
        has_dif = any(not any(p in k for p in _SGM_WORDS) and any(p in k for p in _DIFFUSERS_WORDS) for k in keys)
        if has_sgm and has_dif:  # "if state_dict contains both patterns, remove sgm"
            for k in [k for k in keys if any(p in k for p in _SGM_WORDS)]:
                skipped.append(Skip(k, "form", "the file mixes SGM and diffusers UNet names; diffusers drops the SGM "
                                               "ones"))
                keys.remove(k)
                del renamed[k]
        elif has_sgm:
            try:
                renamed = diffusers_sgm_rename(keys, ctx.index.unet_table.layout.down[0].resnets)
            except (ValueError, IndexError) as exc:
                return _refuse(ctx, "diffusers", f"diffusers cannot renumber the SGM names ({exc})", {})
    # _convert_non_diffusers_lora_to_diffusers: lora_down/lora_up/alpha only, anything else raises
    others = [k for k in keys if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if others:
        why = ("diffusers' kohya converter reads only lora_down/lora_up/alpha and raises on any other key "
               "(LoCon-Tucker, LoHa, LoKr, full, norm, .scale): the file does not load")
        return _refuse(ctx, "diffusers", why, {k: f"type:{why}" for k in others})
    landing = _Landing(ctx)
    for key in keys:
        name = renamed[key]
        down = name.partition(".")[0] + ".lora_down.weight"  # alpha / up go with their lora_down
        if name.startswith(UNET_PREFIX):
            component, path = "unet", diffusers_unet_path(down)
        elif name.startswith(TE2_PREFIX):
            component, path = "text_encoder_2", diffusers_te_path(down, TE2_PREFIX)
            if not sdxl:
                skipped.append(Skip(key, "form", "SD1/SD2 pipelines load no text_encoder_2"))
                continue
        else:
            prefix = TE_PREFIX if name.startswith(TE_PREFIX) else TE1_PREFIX
            component, path = "text_encoder", diffusers_te_path(down, prefix)
        landing.land(key, component, path, paths.get((component, path)) if path is not None else None)
    return landing.report(skipped)
