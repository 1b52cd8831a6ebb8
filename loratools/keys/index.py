"""Adapter module name -> the base weight it changes, by lookup in aliases built from the base.

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
from typing import Any

from loratools.errors import InvalidFileError
from loratools.keys.arch import ArchInfo, detect_checkpoint_arch
from loratools.keys.naming import kohya_prefix, te_module_path, underscored
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
    """Every alias of every weight of one base model. A read-only `Mapping[alias, Target]`.

    Attributes:
        arch: the checkpoint's `ArchInfo`.
        layout: "single_file" or "diffusers".
        unet_table: the UNet's `UNetBlockTable` (None without a UNet).
    """

    def __init__(self, key_shapes: Mapping[str, Mapping[str, _SHAPE]], *, layout: str,
                 arch: ArchInfo | None = None) -> None:
        self.layout = layout
        self.arch = arch or detect_checkpoint_arch(key_shapes[""] if layout == "single_file" else key_shapes)
        self._aliases: dict[str, Target] = {}
        self._origin: dict[str, str] = {}
        self._modules: dict[Target, _Module] = {}
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

    def _add(self, alias: str, target: Target, generator: str) -> None:
        old = self._aliases.get(alias)
        if old is not None and old != target:
            raise InvalidFileError(
                f"alias {alias!r} names two base weights: {old.key!r} (from {self._origin[alias]}) and "
                f"{target.key!r} (from {generator}); the checkpoint's key list is inconsistent")
        self._aliases[alias] = target
        self._origin[alias] = generator

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
            self._add("lora_unet_" + underscored(ldm), target, "LDM/SGM UNet names")
            self._add("diffusion_model." + ldm, target, "ComfyUI generic names")
        if dif is not None:
            self._add("lora_unet_" + underscored(dif), target, "diffusers UNet names")
            self._add("lycoris_" + underscored(dif), target, "LyCORIS wrapper names")
            self._add("unet." + dif, target, "PEFT UNet names")
            legacy = re.sub(r"\.(to_[qkv]|to_out)(\.0)?$", r".processor.\1", dif)
            if legacy != dif:
                self._add("unet." + legacy, target, "legacy attention-processor names")
            self._modules[target] = _Module("unet", dif, ldm)

    def _te_names(self, component: str) -> list[str]:
        prefixes = [kohya_prefix(component, self.arch.arch)]
        if self.arch.arch == "sdxl" and component == "text_encoder":
            prefixes.append("lora_te_")  # ComfyUI reads SDXL's CLIP-L as `lora_te_` too
        return prefixes

    def _te_target(self, component: str, path: str, target: Target) -> None:
        """Register all aliases of one HF-named text-encoder module (`path` has `text_model.`)."""
        for prefix in self._te_names(component):
            self._add(prefix + underscored(path), target, f"kohya {component} names")
        self._add(f"{component}.{path}", target, f"PEFT {component} names")
        if path.startswith("text_model."):
            self._add(f"{component}.{path[len('text_model.'):]}", target, f"PEFT {component} names (transformers 5)")
        self._modules[target] = _Module(component, path, None)

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

    def kohya_name(self, target: Target) -> str:
        """The most compatible kohya name for a target (formats-spec §5.5): SD1/SD2 UNet by
        diffusers path, SDXL UNet by SGM path, text encoders by HF path with `text_model_`."""
        mod = self._modules[target]
        if mod.component == "unet":
            path = mod.ldm_path if self.arch.arch == "sdxl" and mod.ldm_path else mod.path
            return "lora_unet_" + underscored(path)
        return kohya_prefix(mod.component, self.arch.arch) + underscored(mod.path)

    def peft_name(self, target: Target) -> str:
        """The diffusers/PEFT module name for a target (`unet.<path>`, `text_encoder.text_model.<path>`)."""
        mod = self._modules[target]
        return f"{mod.component}.{mod.path}"


def _bias(shapes: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    if prefix and key.startswith(prefix):
        key = key[len(prefix):]
    bias = key[:-len("weight")] + "bias" if key.endswith("weight") else None
    return prefix + bias if bias is not None and bias in shapes else None
