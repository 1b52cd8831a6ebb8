"""Whole-state-dict conversion between diffusers folders and single-file (LDM/SGM) checkpoints.

SD1/SD2 single files use the LDM layout, SDXL the SGM layout (formats-spec §2.1):

| component | single file (prefix)                                   | notes                         |
|-----------|--------------------------------------------------------|-------------------------------|
| unet      | `model.diffusion_model.` + LDM/SGM block names          | `UNetBlockTable`, from keys   |
| TE (HF)   | `cond_stage_model.transformer.` (SD1), `conditioner.embedders.0.transformer.` (SDXL TE1) | HF names, `text_model.` level |
| TE (OpenCLIP) | `cond_stage_model.model.` (SD2), `conditioner.embedders.1.model.` (SDXL TE2), `conditioner.embedders.0.model.` (refiner) | fused `in_proj`, `text_projection` transposed |
| vae       | `first_stage_model.` + LDM VAE names                    | mid attention as 1x1 convs    |

A conversion is first *planned* from key shapes alone: every output key gets a `Source` (which
input keys, which reshaping). The plan can be checked at full scale from the fixtures' key lists
without tensors, its output shapes feed a streaming writer (`TensorSpec`), and `LazyStateDict`
evaluates one output tensor at a time, so a 7 GB checkpoint is never held whole.

SD2 note: a diffusers SD2 text encoder has 23 layers (the released OpenCLIP-H has 24; the last is
unused because SD2 reads the penultimate layer), so an SD2 single file written from a diffusers
folder has resblocks 0-22 only; diffusers' own single-file loader ignores resblock 23 anyway.

Example:
    >>> sd = to_single_file({"unet": unet.state_dict(), "text_encoder": te.state_dict(),
    ...                      "vae": vae.state_dict()}, "sd1")
    >>> parts = from_single_file(sd)          # SplitCheckpoint
    >>> unet.load_state_dict(parts.components["unet"])
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from loratools.errors import InvalidFileError, UsageError
from loratools.keys.unet_blocks import LDM_UNET_PREFIX, UNetBlockTable

VAE_PREFIX = "first_stage_model."
TEXT_MODEL = "text_model."

#: Where each text encoder of an architecture lives in a single file, and in which layout.
TE_PLACEMENT: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("hf", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"text_encoder": ("hf", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
}

# Single-file prefixes read back, most specific first; the refiner's only encoder is bigG.
_TE_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("conditioner.embedders.0.transformer.", "hf", "text_encoder"),
    ("conditioner.embedders.1.model.", "openclip", "text_encoder_2"),
    ("conditioner.embedders.0.model.", "openclip", "text_encoder_2"),
    ("cond_stage_model.transformer.", "hf", "text_encoder"),
    ("cond_stage_model.model.", "openclip", "text_encoder"),
)

#: OpenCLIP bigG's learnt logit scale is clamped at ln(100) and sits there in the released
#: SDXL file; no diffusers model holds it, so it is written with that value (SD ignores it).
OPENCLIP_LOGIT_SCALE = math.log(100.0)

_SHAPE = tuple[int, ...]


@dataclass(frozen=True)
class Source:
    """How one output tensor is made from input tensors of one component.

    `op`: "copy"; "conv" (append 1x1 kernel dims); "linear" (drop 1x1 kernel dims);
    "cat" (concatenate `keys` on dim 0: OpenCLIP fused q,k,v); "rows" (rows `rows[0]:rows[1]`
    of `keys[0]`); "transpose"; "const" (a 0-d tensor `value`, no input).
    """

    component: str
    keys: tuple[str, ...]
    op: str = "copy"
    shape: _SHAPE = ()
    rows: tuple[int, int] | None = None
    value: float | None = None


Plan = dict[str, Source]


# ---------------------------------------------------------------------------------------------
# diffusers -> single file


def plan_single_file(key_shapes: Mapping[str, Mapping[str, _SHAPE]], arch: str,
                     *, unet_table: UNetBlockTable | None = None) -> Plan:
    """Plan a single-file state dict from diffusers components' key shapes.

    Args:
        key_shapes: `{component: {key: shape}}` with components among "unet", "text_encoder",
            "text_encoder_2", "vae" (missing components are simply not written).
        arch: "sd1", "sd2" or "sdxl": decides where and in which layout text encoders go.
        unet_table: the UNet's block table; derived from the UNet keys when omitted.

    Returns:
        `{single-file key: Source}`.
    """
    if arch not in TE_PLACEMENT:
        raise UsageError(f"cannot write a single file for architecture {arch!r}; expected sd1, sd2 or sdxl")
    plan: Plan = {}
    for component, shapes in key_shapes.items():
        if component == "unet":
            part = _plan_unet_to_ldm(shapes, unet_table or UNetBlockTable.from_keys(shapes))
        elif component == "vae":
            part = _plan_vae_to_ldm(shapes)
        elif component in TE_PLACEMENT[arch]:
            layout, prefix = TE_PLACEMENT[arch][component]
            part = (_plan_hf_clip(shapes, component, prefix) if layout == "hf"
                    else _plan_openclip(shapes, component, prefix))
        else:
            raise UsageError(f"component {component!r} has no place in a {arch} single file "
                             f"(expected unet, vae, {', '.join(TE_PLACEMENT[arch])})")
        _merge(plan, part)
    return plan


def to_single_file(components: Mapping[str, Mapping[str, Any]], arch: str,
                   *, unet_table: UNetBlockTable | None = None) -> dict[str, Any]:
    """Convert diffusers component state dicts into one single-file state dict (materialised).

    For large models use `plan_single_file` + `LazyStateDict` to stream instead.
    """
    shapes = {c: {k: tuple(t.shape) for k, t in sd.items()} for c, sd in components.items()}
    lazy = LazyStateDict(plan_single_file(shapes, arch, unet_table=unet_table), components)
    return {k: lazy[k] for k in lazy}


def _plan_unet_to_ldm(shapes: Mapping[str, _SHAPE], table: UNetBlockTable) -> Plan:
    plan: Plan = {}
    for key, shape in shapes.items():
        ldm = table.to_ldm(key)
        if ldm is None:
            raise InvalidFileError(f"UNet key {key!r} has no LDM/SGM name; this UNet type cannot be "
                                   "written as a single-file checkpoint")
        plan[LDM_UNET_PREFIX + ldm] = Source("unet", (key,), shape=tuple(shape))
    return plan


def _plan_hf_clip(shapes: Mapping[str, _SHAPE], component: str, prefix: str) -> Plan:
    plan: Plan = {}
    for key, shape in shapes.items():
        out = key if key.startswith(TEXT_MODEL) or key.startswith("text_projection") else TEXT_MODEL + key
        plan[prefix + out] = Source(component, (key,), shape=tuple(shape))
    return plan


#: HF CLIP layer names -> OpenCLIP resblock names (formats-spec §2.1); the index uses them too.
OPENCLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_TOP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _plan_openclip(shapes: Mapping[str, _SHAPE], component: str, prefix: str) -> Plan:
    plan: Plan = {}
    plain = {_strip_text_model(k): k for k in shapes}
    for name, key in plain.items():
        shape = tuple(shapes[key])
        if name in OPENCLIP_TOP_NAMES:
            plan[prefix + OPENCLIP_TOP_NAMES[name]] = Source(component, (key,), shape=shape)
        elif name == "text_projection.weight":
            plan[prefix + "text_projection"] = Source(component, (key,), "transpose", shape[::-1])
        elif name.endswith("position_ids"):
            continue  # an index buffer of the HF model; OpenCLIP has none
        elif m := _HF_LAYER.match(name):
            n, inner, kind = m.groups()
            base = f"transformer.resblocks.{n}."
            if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if inner == "self_attn.q_proj":
                    parts = tuple(plain[f"encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv")
                    fused = (sum(shapes[p][0] for p in parts), *shape[1:])
                    plan[f"{prefix}{base}attn.in_proj_{kind}"] = Source(component, parts, "cat", fused)
            elif inner in OPENCLIP_LAYER_NAMES:
                plan[f"{prefix}{base}{OPENCLIP_LAYER_NAMES[inner]}.{kind}"] = Source(component, (key,), shape=shape)
            else:
                raise InvalidFileError(f"{component} key {key!r} has no OpenCLIP equivalent")
        else:
            raise InvalidFileError(f"{component} key {key!r} has no OpenCLIP equivalent")
    plan[prefix + "logit_scale"] = Source(component, (), "const", (), value=OPENCLIP_LOGIT_SCALE)
    return plan


def _strip_text_model(key: str) -> str:
    return key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key


# VAE: diffusers -> LDM path rules (formats-spec §2, diffusers' and kohya's converters agree).
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # last four: old folders
_VAE_TOP = {"conv_norm_out": "norm_out"}


def _vae_up_count(keys: Mapping[str, Any]) -> int:
    ids = [int(m[1]) for k in keys if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def _vae_key_to_ldm(key: str, n_up: int) -> str:
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side not in ("encoder", "decoder") or not rest:
        return key  # quant_conv, post_quant_conv
    head = rest[0]
    if head in _VAE_TOP:
        return ".".join([side, _VAE_TOP[head], *rest[1:]])
    if head in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level = f"down.{i}" if head == "down_blocks" else f"up.{n_up - 1 - i}"
        kind, tail = rest[2], rest[3:]
        if kind == "resnets":
            j, inner = tail[0], tail[1:]
            inner = [_VAE_RESNET.get(inner[0], inner[0]), *inner[1:]]
            return ".".join([side, level, "block", j, *inner])
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return ".".join([side, level, sampler, *tail[1:]])  # drops the `.0`
    if head == "mid_block":
        kind, j, inner = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{inner}"
        for dif, ldm in _VAE_ATTN.items():
            if inner.startswith(dif + "."):
                return f"{side}.mid.attn_{j + 1}.{ldm}{inner[len(dif):]}"
    return key


def _is_vae_attn_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_\d+\.(q|k|v|proj_out)\.weight$", ldm_key))


def _plan_vae_to_ldm(shapes: Mapping[str, _SHAPE]) -> Plan:
    n_up = _vae_up_count(shapes)
    plan: Plan = {}
    for key, shape in shapes.items():
        ldm = _vae_key_to_ldm(key, n_up)
        shape = tuple(shape)
        if _is_vae_attn_matrix(ldm) and len(shape) == 2:
            plan[VAE_PREFIX + ldm] = Source("vae", (key,), "conv", (*shape, 1, 1))
        else:
            plan[VAE_PREFIX + ldm] = Source("vae", (key,), shape=shape)
    return plan


# ---------------------------------------------------------------------------------------------
# single file -> diffusers


@dataclass
class SplitCheckpoint:
    """A single file split into diffusers components, plus every key that belongs to none of
    them (DDPM buffers, `model_ema.*`, OpenCLIP `logit_scale`, ...), kept so nothing is lost."""

    components: dict[str, dict[str, Any]]
    passthrough: dict[str, Any] = field(default_factory=dict)


def plan_diffusers(key_shapes: Mapping[str, _SHAPE]) -> tuple[dict[str, Plan], list[str]]:
    """Plan diffusers components from a single file's key shapes.

    Returns `({component: {diffusers key: Source}}, passthrough keys)`; a Source's component is
    "" (the single file). Text encoders come out in the HF layout with the `text_model.` level
    (use `align_text_model_level` for a transformers 5 `CLIPTextModel`).
    """
    plans: dict[str, Plan] = {}
    claimed: set[str] = set()
    unet_keys = {k: s for k, s in key_shapes.items() if k.startswith(LDM_UNET_PREFIX)}
    if unet_keys:
        table = UNetBlockTable.from_keys(unet_keys)
        for key, shape in unet_keys.items():
            dif = table.to_diffusers(key)
            if dif is None:
                continue  # left in passthrough
            plans.setdefault("unet", {})[dif] = Source("", (key,), shape=tuple(shape))
            claimed.add(key)
    vae_keys = {k[len(VAE_PREFIX):]: s for k, s in key_shapes.items() if k.startswith(VAE_PREFIX)}
    if vae_keys:
        plans["vae"] = _plan_vae_from_ldm(vae_keys)
        claimed.update(VAE_PREFIX + k for k in vae_keys)
    for prefix, layout, component in _TE_PREFIXES:
        sub = {k[len(prefix):]: tuple(s) for k, s in key_shapes.items() if k.startswith(prefix)}
        if not sub:
            continue
        if component in plans:
            raise InvalidFileError(f"two text encoders claim {component!r} (second at {prefix!r}); "
                                   "this single-file layout is not SD1, SD2 or SDXL")
        sd2 = prefix == "cond_stage_model.model."
        part, used = (_plan_hf_from_ldm(sub, prefix) if layout == "hf"
                      else _plan_openclip_from_ldm(sub, prefix, keep_projection=not sd2))
        plans[component] = part
        claimed.update(prefix + k for k in used)
    return plans, [k for k in key_shapes if k not in claimed]


def from_single_file(state_dict: Mapping[str, Any]) -> SplitCheckpoint:
    """Split a single-file state dict into diffusers components (materialised)."""
    plans, passthrough = plan_diffusers({k: tuple(t.shape) for k, t in state_dict.items()})
    components = {}
    for component, plan in plans.items():
        lazy = LazyStateDict(plan, {"": state_dict})
        components[component] = {k: lazy[k] for k in lazy}
    return SplitCheckpoint(components, {k: state_dict[k] for k in passthrough})


def _plan_hf_from_ldm(sub: Mapping[str, _SHAPE], prefix: str) -> tuple[Plan, list[str]]:
    # Old SD1 files lack the `text_model.` level; diffusers folders always had it.
    plan = {}
    used = []
    for k, s in sub.items():
        if k.endswith("position_ids"):
            continue  # a buffer transformers >= 4.31 no longer saves: passthrough
        used.append(k)
        out = k if k.startswith(TEXT_MODEL) or k.startswith("text_projection") else TEXT_MODEL + k
        plan[out] = Source("", (prefix + k,), shape=s)
    return plan, used


_OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
_OPENCLIP_LAYER_BACK = {v: k for k, v in OPENCLIP_LAYER_NAMES.items()}
_OPENCLIP_TOP_BACK = {v: k for k, v in OPENCLIP_TOP_NAMES.items()}


def _plan_openclip_from_ldm(sub: Mapping[str, _SHAPE], prefix: str, *,
                            keep_projection: bool) -> tuple[Plan, list[str]]:
    plan: Plan = {}
    used: list[str] = []
    for key, shape in sub.items():
        src = prefix + key
        if key in _OPENCLIP_TOP_BACK:
            plan[TEXT_MODEL + _OPENCLIP_TOP_BACK[key]] = Source("", (src,), shape=shape)
        elif key == "text_projection" and keep_projection:
            plan["text_projection.weight"] = Source("", (src,), "transpose", shape[::-1])
        elif m := _OC_BLOCK.match(key):
            n, inner, kind = m.groups()
            layer = f"{TEXT_MODEL}encoder.layers.{n}."
            if inner == "attn.in_proj":
                w = shape[0] // 3
                for i, p in enumerate("qkv"):
                    plan[f"{layer}self_attn.{p}_proj.{kind}"] = Source(
                        "", (src,), "rows", (w, *shape[1:]), rows=(i * w, (i + 1) * w))
            elif inner in _OPENCLIP_LAYER_BACK:
                plan[f"{layer}{_OPENCLIP_LAYER_BACK[inner]}.{kind}"] = Source("", (src,), shape=shape)
            else:
                continue
        else:
            continue  # logit_scale, SD2's text_projection, attn_mask: passthrough
        used.append(key)
    return plan, used


_VAE_BACK = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block|attn)_(\d+)\.(.+)$")
_VAE_ATTN_BACK = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _plan_vae_from_ldm(sub: Mapping[str, _SHAPE]) -> Plan:
    ups = [int(m[1]) for k in sub if (m := re.match(r"^decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    plan: Plan = {}
    for key, shape in sub.items():
        src, shape = VAE_PREFIX + key, tuple(shape)
        out = key
        if m := _VAE_BACK.match(key):
            side, updown, i, what, j, tail = m.groups()
            level = f"down_blocks.{i}" if updown == "down" else f"up_blocks.{n_up - 1 - int(i)}"
            if j is not None:
                tail = "conv_shortcut" + tail[len("nin_shortcut"):] if tail.startswith("nin_shortcut") else tail
                out = f"{side}.{level}.resnets.{j}.{tail}"
            else:
                out = f"{side}.{level}.{what}rs.0.{tail}"
        elif m := _VAE_MID.match(key):
            side, kind, j, tail = m.groups()
            if kind == "block":
                out = f"{side}.mid_block.resnets.{int(j) - 1}.{tail}"
            else:
                name, _, param = tail.rpartition(".")
                out = f"{side}.mid_block.attentions.{int(j) - 1}.{_VAE_ATTN_BACK.get(name, name)}.{param}"
                if param == "weight" and name != "norm" and len(shape) == 4:
                    plan[out] = Source("", (src,), "linear", shape[:2])
                    continue
        elif key.split(".")[1:2] == ["norm_out"]:
            out = key.replace(".norm_out.", ".conv_norm_out.", 1)
        plan[out] = Source("", (src,), shape=shape)
    return plan


def align_text_model_level(state_dict: Mapping[str, Any], model_keys: Any) -> dict[str, Any]:
    """Add or remove the `text_model.` level so `state_dict` matches a live model's keys
    (transformers 5 `CLIPTextModel` has none; 4.x and `CLIPTextModelWithProjection` have it)."""
    keys = set(model_keys)
    wants = any(k.startswith(TEXT_MODEL) for k in keys)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("text_projection"):
            out[k] = v
        elif wants and not k.startswith(TEXT_MODEL):
            out[TEXT_MODEL + k] = v
        elif not wants and k.startswith(TEXT_MODEL):
            out[k[len(TEXT_MODEL):]] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# evaluation


class LazyStateDict(Mapping[str, Any]):
    """A read-only mapping that builds each planned tensor on access from `sources`
    (`{component: Mapping[key, Tensor]}`, e.g. lazy safetensors readers)."""

    def __init__(self, plan: Plan, sources: Mapping[str, Mapping[str, Any]]) -> None:
        self.plan = plan
        self._sources = sources

    def __getitem__(self, key: str) -> Any:
        src = self.plan[key]
        if src.op == "const":
            import torch

            return torch.tensor(src.value, dtype=self._const_dtype(src))
        inputs = [self._sources[src.component][k] for k in src.keys]
        t = inputs[0]
        if src.op == "copy":
            return t
        if src.op == "conv":
            return t.reshape(*t.shape, 1, 1)
        if src.op == "linear":
            return t.reshape(t.shape[0], t.shape[1])
        if src.op == "transpose":
            return t.t().contiguous()
        if src.op == "rows":
            return t[src.rows[0]:src.rows[1]].clone()
        if src.op == "cat":
            import torch

            return torch.cat(inputs, 0)
        raise AssertionError(f"unknown op {src.op!r}")

    def _const_dtype(self, src: Source) -> Any:
        # The constant takes the dtype of its component's tensors (fp16 files stay fp16).
        comp = self._sources.get(src.component)
        if comp:
            for v in comp.values():
                if v.is_floating_point():
                    return v.dtype
        import torch

        return torch.float32

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    def shape(self, key: str) -> tuple[int, ...]:
        """The planned shape of `key`, without building it."""
        return self.plan[key].shape


def _merge(plan: Plan, part: Plan) -> None:
    for k, v in part.items():
        if k in plan:
            raise InvalidFileError(f"two components would both write single-file key {k!r}")
        plan[k] = v
