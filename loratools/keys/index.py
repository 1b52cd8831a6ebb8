"""The one module vocabulary: adapter module name <-> base weight <-> kohya / PEFT name.

One index type answers, for every weight-bearing module of a model: which base weight a module
name changes (`resolve`), its kohya and PEFT/diffusers names, its component and sd-scripts block
(`info`). It is built from whatever describes the model: a checkpoint's key list (`from_model`,
single-file LDM/SGM or a diffusers folder), live diffusers/transformers modules (`from_modules`,
the trainer) or the architecture's released model when no base is given (`standard`).

Kohya names cannot be split back into paths (`to_q`, `proj_in`, `text_model` all contain `_`),
so, as ComfyUI does, the index goes the other way (formats-spec §3.1, §3.6): for every weight of
the base checkpoint it generates every name a LoRA may use for it and files them in one dict.
Resolving is then an exact lookup, whatever the file's naming scheme:

* UNet: `lora_unet_` + SGM/LDM path, `lora_unet_` + diffusers path, `lycoris_` + diffusers path,
  `unet.<diffusers path>` (PEFT), `unet.<path with .processor.to_q>` (legacy attention
  processors), `diffusion_model.<ldm path>`; the LDM <-> diffusers correspondence comes from
  `UNetBlockTable`, derived from this checkpoint's own keys.
* Text encoders: `lora_te_`/`lora_te1_`/`lora_te2_` + HF path (always with `text_model_`), and
  `text_encoder.`/`text_encoder_2.` + HF path with or without `text_model.` (transformers 4 and 5
  folders). OpenCLIP encoders (SD2, SDXL TE2 in single files) are indexed under their HF names;
  q, k, v are row slices of the fused `in_proj_weight`, in that order.

Two generators naming one alias for different weights is a bug in the tables and raises with
both targets. `Target.shape` is the base weight's shape (a row slice's shape for q/k/v); a LoRA
whose delta has the same number of elements and the same out-features (1x1 conv vs linear,
flattened conv factors) applies after a reshape: see `shapes_compatible`.

Example:
    >>> index = BaseIndex.from_model(open_model("sd_xl_base_1.0.safetensors"))
    >>> index.resolve("lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
    Target(component='', key='conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight',
           rows=(1280, 2560), shape=(1280, 1280), bias_key='...in_proj_bias')
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from loratools.errors import InvalidFileError
from loratools.keys.arch import NAMES, ArchInfo, detect_checkpoint_arch
from loratools.keys.blocks import block_slot
from loratools.keys.naming import (LYCORIS_PREFIX, TE_PREFIX, UNET_PREFIX, kohya_name, kohya_prefix, te_module_path,
                                   underscored)
from loratools.keys.unet_blocks import LDM_UNET_PREFIX, UNetBlockTable

_SHAPE = tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """A base weight an adapter module changes.

    Attributes:
        component: "" for a single file, else the diffusers component ("unet", "text_encoder", ...).
        key: the weight key inside that component.
        rows: `(start, stop)` rows of `key` when the module owns only a slice (fused OpenCLIP q/k/v).
        shape: the shape the module's delta must take (the slice's shape for `rows`).
        bias_key: the matching bias key (sliced by the same rows), when the base has one.
    """

    component: str
    key: str
    rows: tuple[int, int] | None
    shape: _SHAPE
    bias_key: str | None = None


@dataclass(frozen=True)
class _Module:
    """What a target is in diffusers terms, for writing names back out."""

    component: str  # unet, text_encoder, text_encoder_2
    path: str  # diffusers / HF module path (TE paths with `text_model.`)
    ldm_path: str | None  # UNet LDM/SGM path


@dataclass(frozen=True)
class ModuleInfo:
    """Everything the vocabulary knows about one indexed module.

    Attributes:
        target: the base weight (`Target`).
        component: "unet", "text_encoder" or "text_encoder_2".
        path: its diffusers/transformers module path (text encoders with `text_model.`).
        ldm_path: the UNet's LDM/SGM module path (None for text encoders).
        kohya_name: the most compatible kohya name (what loratools writes).
        peft_name: the diffusers/PEFT module name (`unet.<path>`, `text_encoder.text_model.<path>`).
        block: sd-scripts' block slot (`block_dims` index) of a UNet module, -1 outside the blocks
            and for text encoders.
    """

    target: Target
    component: str
    path: str
    ldm_path: str | None
    kohya_name: str
    peft_name: str
    block: int

    @property
    def label(self) -> str:
        """"UNet", "TE1" or "TE2" (the only text encoder of SD1/SD2 is "TE1")."""
        return {"unet": "UNet", "text_encoder": "TE1", "text_encoder_2": "TE2"}[self.component]


#: Alias spellings that name a UNet module by its LDM/SGM path: right only for the layout the
#: index was built from. Every other spelling names the diffusers path, whatever the layout.
LAYOUT_BOUND = frozenset({"sgm", "comfy"})


def shapes_compatible(delta_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    """True when a delta of `delta_shape` can be added to a weight of `target_shape`: equal, or
    same out-features and element count (1x1 conv vs linear; conv factors stored flattened)."""
    delta_shape, target_shape = tuple(delta_shape), tuple(target_shape)
    if delta_shape == target_shape:
        return True
    if not delta_shape or not target_shape:
        return False
    return delta_shape[0] == target_shape[0] and math.prod(delta_shape) == math.prod(target_shape)


class BaseIndex(Mapping[str, Target]):
    """Every alias of every weight of one model. A read-only `Mapping[alias, Target]`.

    Attributes:
        arch: the model's `ArchInfo`.
        layout: "single_file" or "diffusers".
        source: "checkpoint" (a file or folder's key list), "modules" (live models) or "standard"
            (the released model of `arch`, no base given: its layout-bound names are only right
            for modules whose shape fits, see `keys.resolve`).
        unet_table: the UNet's `UNetBlockTable` (None without a UNet).
    """

    def __init__(self, key_shapes: Mapping[str, Mapping[str, _SHAPE]], *, layout: str,
                 arch: ArchInfo | None = None, source: str = "checkpoint") -> None:
        self.layout = layout
        self.source = source
        self.arch = arch or detect_checkpoint_arch(key_shapes[""] if layout == "single_file" else key_shapes)
        self._aliases: dict[str, Target] = {}
        self._origin: dict[str, str] = {}
        self._kind: dict[str, str] = {}
        self._modules: dict[Target, _Module] = {}
        self._by_path: dict[tuple[str, str], Target] = {}
        self.unet_table: UNetBlockTable | None = None
        if layout == "single_file":
            self._index_single_file(key_shapes[""])
        elif layout == "diffusers":
            self._index_diffusers(key_shapes)
        else:
            raise ValueError(f"unknown layout {layout!r}")

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: Any) -> BaseIndex:
        """Build from a `loratools.io.checkpoint.ModelSource` (headers only, no tensor data); an
        architecture error names the model's path."""
        return cls({c: model.key_shapes(c) for c in model.components}, layout=model.layout,
                   arch=detect_checkpoint_arch(model))

    @classmethod
    def from_key_shapes(cls, key_shapes: Mapping[str, Any], *, layout: str | None = None) -> BaseIndex:
        """Build from plain shapes: a single file's `{key: shape}` or `{component: {key: shape}}`
        (`{"": {...}}` is a single file)."""
        values = list(key_shapes.values())
        if not values or not isinstance(values[0], Mapping):
            return cls({"": key_shapes}, layout="single_file")
        if layout is None:
            layout = "single_file" if set(key_shapes) == {""} else "diffusers"
        return cls(key_shapes, layout=layout)

    @classmethod
    def standard(cls, arch: str) -> BaseIndex:
        """The released SD1.x / SD2.x / SDXL-base model of `arch` (`keys.standard`), for when no
        base is given; `source` is "standard"."""
        if arch not in NAMES:
            raise ValueError(f"no standard model for architecture {arch!r}; expected sd1, sd2 or sdxl")
        return _standard_index(arch)

    @classmethod
    def from_modules(cls, arch: str, unet: Any, text_encoders: Any = ()) -> BaseIndex:
        """Build from live diffusers/transformers models (the trainer): `unet` a
        `UNet2DConditionModel` (or None), `text_encoders` the CLIP models in order (the second is
        SDXL's `text_encoder_2`). Shapes come from their state dicts; no tensor is copied."""
        comps: dict[str, dict[str, _SHAPE]] = {}
        if unet is not None:
            comps["unet"] = _live_shapes(unet)
        for component, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
            comps[component] = _live_shapes(te)
        return cls(comps, layout="diffusers", arch=ArchInfo(arch, evidence="the trainer's models"), source="modules")

    def _add(self, alias: str, target: Target, generator: str, kind: str) -> None:
        old = self._aliases.get(alias)
        if old is not None and old != target:
            raise InvalidFileError(
                f"alias {alias!r} names two base weights: {old.key!r} (from {self._origin[alias]}) and "
                f"{target.key!r} (from {generator}); the checkpoint's key list is inconsistent")
        self._aliases[alias] = target
        self._origin[alias] = generator
        self._kind[alias] = kind

    def _index_single_file(self, shapes: Mapping[str, _SHAPE]) -> None:
        unet = {k: s for k, s in shapes.items() if k.startswith(LDM_UNET_PREFIX)}
        if unet:
            self.unet_table = UNetBlockTable.from_keys(unet)
            for key, shape in unet.items():
                if key.endswith(".weight"):
                    ldm = key[len(LDM_UNET_PREFIX):-len(".weight")]
                    self._unet_aliases(Target("", key, None, tuple(shape), _bias(shapes, key)), ldm,
                                       self.unet_table.to_diffusers(ldm))
        from loratools.keys.state_dict import TE_PLACEMENT

        placements = TE_PLACEMENT[self.arch.arch]
        for component, (layout, prefix) in placements.items():
            sub = {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}
            if layout == "hf":
                self._hf_aliases(component, sub, prefix, "")
            else:
                self._openclip_aliases(component, sub, prefix)

    def _index_diffusers(self, comps: Mapping[str, Mapping[str, _SHAPE]]) -> None:
        unet = comps.get("unet")
        if unet:
            self.unet_table = UNetBlockTable.from_keys(unet)
            for key, shape in unet.items():
                if key.endswith(".weight"):
                    dif = key[:-len(".weight")]
                    self._unet_aliases(Target("unet", key, None, tuple(shape), _bias(unet, key)),
                                       self.unet_table.to_ldm(dif), dif)
        for component in ("text_encoder", "text_encoder_2"):
            if component in comps:
                self._hf_aliases(component, {k: tuple(s) for k, s in comps[component].items()}, "", component)

    def _unet_aliases(self, target: Target, ldm: str | None, dif: str | None) -> None:
        if ldm is not None:
            self._add(UNET_PREFIX + underscored(ldm), target, "LDM/SGM UNet names", "sgm")
            self._add("diffusion_model." + ldm, target, "ComfyUI generic names", "comfy")
        if dif is not None:
            self._add(UNET_PREFIX + underscored(dif), target, "diffusers UNet names", "diffusers")
            self._add(LYCORIS_PREFIX + underscored(dif), target, "LyCORIS wrapper names", "lycoris")
            self._add("unet." + dif, target, "PEFT UNet names", "peft")
            legacy = re.sub(r"\.(to_[qkv]|to_out)(\.0)?$", r".processor.\1", dif)
            if legacy != dif:
                self._add("unet." + legacy, target, "legacy attention-processor names", "legacy")
            self._modules[target] = _Module("unet", dif, ldm)
            self._by_path["unet", dif] = target

    def _te_names(self, component: str) -> list[str]:
        prefixes = [kohya_prefix(component, self.arch.arch)]
        if self.arch.arch == "sdxl" and component == "text_encoder":
            prefixes.append(TE_PREFIX)  # ComfyUI reads SDXL's CLIP-L as `lora_te_` too
        return prefixes

    def _te_target(self, component: str, path: str, target: Target) -> None:
        """Register all aliases of one HF-named text-encoder module (`path` has `text_model.`)."""
        for prefix in self._te_names(component):
            self._add(prefix + underscored(path), target, f"kohya {component} names", "kohya_te")
        self._add(f"{component}.{path}", target, f"PEFT {component} names", "peft_te")
        if path.startswith("text_model."):
            self._add(f"{component}.{path[len('text_model.'):]}", target, f"PEFT {component} names (transformers 5)",
                      "peft_te")
        self._modules[target] = _Module(component, path, None)
        self._by_path[component, path] = target

    def _hf_aliases(self, component: str, sub: Mapping[str, _SHAPE], prefix: str, target_component: str) -> None:
        for key, shape in sub.items():
            if key.endswith(".weight"):
                path = te_module_path(key[:-len(".weight")])
                self._te_target(component, path, Target(target_component, prefix + key, None, shape,
                                                        _bias(sub, key, prefix)))

    def _openclip_aliases(self, component: str, sub: Mapping[str, _SHAPE], prefix: str) -> None:
        from loratools.keys.state_dict import OPENCLIP_LAYER_NAMES, OPENCLIP_TOP_NAMES

        layer_back = {v: k for k, v in OPENCLIP_LAYER_NAMES.items()}
        top_back = {v: k for k, v in OPENCLIP_TOP_NAMES.items()}
        for key, shape in sub.items():
            full = prefix + key
            if key in top_back and key.endswith(".weight") or key == "positional_embedding":
                path = "text_model." + top_back[key].removesuffix(".weight")
                self._te_target(component, path, Target("", full, None, shape, _bias(sub, key, prefix)))
                continue
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+?)[._]weight$", key)
            if not m:
                continue
            n, inner = m.groups()
            layer = f"text_model.encoder.layers.{n}."
            if inner == "attn.in_proj":
                w = shape[0] // 3
                bias = prefix + f"transformer.resblocks.{n}.attn.in_proj_bias"
                for i, p in enumerate("qkv"):
                    self._te_target(component, f"{layer}self_attn.{p}_proj",
                                    Target("", full, (i * w, (i + 1) * w), (w, *shape[1:]),
                                           bias if bias[len(prefix):] in sub else None))
            elif inner in layer_back:
                self._te_target(component, layer + layer_back[inner],
                                Target("", full, None, shape, _bias(sub, key, prefix)))

    # -- queries --------------------------------------------------------------------------

    def resolve(self, name: str) -> Target | None:
        """The base weight a module name (kohya, LyCORIS or PEFT/diffusers spelling) changes."""
        return self._aliases.get(name)

    def __getitem__(self, alias: str) -> Target:
        return self._aliases[alias]

    def __iter__(self) -> Iterator[str]:
        return iter(self._aliases)

    def __len__(self) -> int:
        return len(self._aliases)

    def targets(self) -> list[Target]:
        """Every indexed weight once (q/k/v slices count separately)."""
        return list(self._modules)

    def alias_kind(self, name: str) -> str | None:
        """Which spelling `name` is: "sgm" (`lora_unet_` + LDM/SGM path), "comfy"
        (`diffusion_model.` + LDM path), "diffusers" (`lora_unet_` + diffusers path), "lycoris",
        "peft", "legacy" (attention processors), "kohya_te", "peft_te"; None if not indexed."""
        return self._kind.get(name)

    def find(self, component: str, module_path: str) -> Target | None:
        """The target of a live module (`component`, its `named_modules()` path), or None; text
        encoder paths with or without `text_model.` (transformers 4 and 5) alike."""
        if component != "unet":
            module_path = te_module_path(module_path)
        return self._by_path.get((component, module_path))

    def info(self, target: Target) -> ModuleInfo:
        """Everything known about a target's module: component, paths, kohya/PEFT names, block."""
        mod = self._modules[target]
        name = self.kohya_name(target)
        return ModuleInfo(target, mod.component, mod.path, mod.ldm_path, name, self.peft_name(target),
                          block_slot(name, self.arch.arch) if mod.component == "unet" else -1)

    def kohya_name(self, target: Target) -> str:
        """The most compatible kohya name for a target (formats-spec §5.5): SD1/SD2 UNet by
        diffusers path, SDXL UNet by SGM path, text encoders by HF path with `text_model_`."""
        mod = self._modules[target]
        if mod.component == "unet":
            path = mod.ldm_path if self.arch.arch == "sdxl" and mod.ldm_path else mod.path
            return UNET_PREFIX + underscored(path)
        return kohya_name(mod.component, mod.path, self.arch.arch)

    def diffusers_kohya_name(self, target: Target) -> str:
        """The kohya name spelled with the diffusers path (`lora_unet_down_blocks_...`), which
        needs no layout: what is written for an SDXL UNet module whose layout is unknown."""
        mod = self._modules[target]
        if mod.component == "unet":
            return UNET_PREFIX + underscored(mod.path)
        return kohya_name(mod.component, mod.path, self.arch.arch)

    def peft_name(self, target: Target) -> str:
        """The diffusers/PEFT module name for a target (`unet.<path>`, `text_encoder.text_model.<path>`)."""
        mod = self._modules[target]
        return f"{mod.component}.{mod.path}"


def _live_shapes(model: Any) -> dict[str, _SHAPE]:
    """`{key: shape}` of a live model; a Linear/Conv2d whose `weight` a wrapper removed (LyCORIS'
    `full` algorithm moves it into its own module) still counts, with the shape its layer implies."""
    from torch import nn

    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if key in shapes:
            continue
        if isinstance(module, nn.Linear):
            shapes[key] = (module.out_features, module.in_features)
        elif isinstance(module, nn.Conv2d):
            shapes[key] = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    return shapes


@lru_cache(maxsize=None)
def _standard_index(arch: str) -> BaseIndex:
    from loratools.keys.standard import standard_key_shapes

    return BaseIndex(standard_key_shapes(arch), layout="diffusers",
                     arch=ArchInfo(arch, evidence=f"the released {NAMES[arch]} model"), source="standard")


def _bias(shapes: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    if prefix and key.startswith(prefix):
        key = key[len(prefix):]
    bias = key[:-len("weight")] + "bias" if key.endswith("weight") else None
    return prefix + bias if bias is not None and bias in shapes else None
