"""Tensor key -> (canonical module name, kohya suffix): every naming family adapter files use.

Two families (formats-spec 1.1):

* kohya / LyCORIS: ``<module>.<suffix>`` where the module name has no dots (split at the first
  dot, as A1111 and kohya do). Prefixes ``lora_unet_``, ``lora_te_``, ``lora_te1_``,
  ``lora_te2_`` are canonical already; ``lycoris_<diffusers path>`` (LyCORIS' own wrapper, e.g.
  SimpleTuner) becomes ``lora_unet_<path>`` (or ``lora_te_`` for a text-model path, as ComfyUI
  reads it). Other prefixes (``lora_te3_``, ``oft_unet_``, ...) are kept as they are: the key
  layer then reports them as unmatched, which is the truth for SD1/SDXL.
* diffusers / PEFT: dotted module paths under ``unet.``, ``text_encoder.``, ``text_encoder_2.``,
  ``base_model.model.``, ``transformer.`` (or none), suffixes matched longest-first:
  ``lora_A``/``lora_B`` (PEFT), ``lora.down``/``lora.up`` and ``lora_linear_layer.down/up``
  (diffusers' training scripts), ``to_q_lora.down`` (legacy attention processors). They become
  ``lora_unet_<diffusers path with _>``: a legal kohya name that diffusers, ComfyUI and our key
  layer all resolve; turning it into SGM form for SDXL is the key layer's job. ``text_encoder.``
  becomes ``lora_te1_`` when the file is SDXL (it has a second text encoder, 2048-wide cross
  attention or SDXL metadata) and ``lora_te_`` otherwise.

Text-encoder names always carry ``text_model_`` (transformers 5 dropped that level from
CLIPTextModel; names written from such a model are normalised here).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loratools.adapters.base import SHARED_SUFFIXES, registry
from loratools.keys.naming import (KOHYA_TE_PREFIXES, LYCORIS_PREFIX, TE1_PREFIX, TE2_PREFIX, TE_PREFIX,
                                   UNET_PREFIX, te_module_path)
_TE_LEVELS = ("encoder_", "embeddings_", "final_layer_norm")

# (source suffix, kohya suffix, style), longest first within each family
_PEFT_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "lora_down.weight", "diffusers"),
    (".lora_linear_layer.up.weight", "lora_up.weight", "diffusers"),
    (".lora_magnitude_vector.weight", "dora_scale", "peft"),
    (".lora_A.default.weight", "lora_down.weight", "peft"),
    (".lora_B.default.weight", "lora_up.weight", "peft"),
    (".lora_magnitude_vector", "dora_scale", "peft"),
    (".lora.down.weight", "lora_down.weight", "diffusers"),
    (".lora.up.weight", "lora_up.weight", "diffusers"),
    ("_lora.down.weight", "lora_down.weight", "diffusers_legacy"),
    ("_lora.up.weight", "lora_up.weight", "diffusers_legacy"),
    (".lora_A.weight", "lora_down.weight", "peft"),
    (".lora_B.weight", "lora_up.weight", "peft"),
    (".dora_scale", "dora_scale", "peft"),
    (".alpha", "alpha", "peft"),
)
# component prefix of a dotted key -> component, longest first
_DOTTED_PREFIXES = (
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("base_model.model.", ""),
    ("transformer.", "transformer"),
    ("unet.", "unet"),
)
_LEGACY_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class ModuleKeys:
    """The keys of one module: where they came from and what they are called in kohya form."""

    name: str
    source_name: str
    style: str
    keys: dict[str, str] = field(default_factory=dict)  # kohya suffix -> file key
    alpha: float | None = None  # from metadata (PEFT), overrides an alpha tensor


@dataclass
class KeyGroups:
    """All keys of a file, grouped by canonical module name, plus the keys no family claims."""

    modules: dict[str, ModuleKeys]
    unclaimed: list[str]


def _u(path: str) -> str:
    return path.replace(".", "_")


def normalise_te(prefix: str, rest: str) -> str:
    """``lora_te*_`` + rest with the ``text_model_`` level restored when a name lacks it."""
    if rest.startswith(_TE_LEVELS):
        rest = "text_model_" + rest
    return prefix + rest


def kohya_canonical(module: str) -> tuple[str, str]:
    """Canonical name and style of a kohya-family module name."""
    for p in KOHYA_TE_PREFIXES:
        if module.startswith(p):
            return normalise_te(p, module[len(p):]), "kohya"
    if module.startswith(LYCORIS_PREFIX):
        rest = module[len(LYCORIS_PREFIX):]
        if rest.startswith(("text_model_", *_TE_LEVELS)):
            return normalise_te(TE_PREFIX, rest.removeprefix("text_model_")), "lycoris"
        return UNET_PREFIX + rest, "lycoris"
    return module, "kohya"


def _is_te_path(path: str) -> bool:
    return path.startswith(("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm"))


def dotted_canonical(component: str, path: str, style: str, *, sdxl: bool) -> str:
    """Canonical kohya name of a dotted diffusers/PEFT module path in ``component``."""
    if style == "diffusers_legacy":
        head, _, last = path.rpartition(".")
        head = head.removesuffix(".processor")
        if component.startswith("text_encoder") or _is_te_path(path):
            last = _LEGACY_TE.get(last, last)
        elif last == "to_out":
            last = "to_out.0"
        path = f"{head}.{last}" if head else last
    if component == "":
        component = "text_encoder" if _is_te_path(path) else "unet"
        sdxl = False  # one bare model: plain `lora_te_` / `lora_unet_`
    if component == "unet":
        return UNET_PREFIX + _u(path)
    if component == "transformer":
        return "lora_transformer_" + _u(path)
    prefix = TE2_PREFIX if component == "text_encoder_2" else (TE1_PREFIX if sdxl else TE_PREFIX)
    return prefix + _u(te_module_path(path))


def split_dotted(key: str) -> tuple[str, str, str, str] | None:
    """``(component, module path, kohya suffix, style)`` of a diffusers/PEFT key, or None."""
    component, rest = None, key
    for p, comp in _DOTTED_PREFIXES:
        if key.startswith(p):
            component, rest = comp, key[len(p):]
            break
    for src, dst, style in _PEFT_SUFFIXES:
        if rest.endswith(src) and len(rest) > len(src):
            if component is None and dst in SHARED_SUFFIXES:
                return None  # a bare `x.alpha` is kohya-family (`lora_unet_x.alpha`)
            return component or "", rest[: -len(src)], dst, style
    return None


def _peft_configs(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """Per-component LoraConfig fields from diffusers' ``lora_adapter_metadata`` JSON.

    diffusers (>= 0.34, ``loaders/lora_base.py``) writes one flat JSON object whose keys are
    ``<component>.<LoraConfig field>`` (``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern``,
    ``unet.use_rslora``...); a raw PEFT model's config has the fields unprefixed.
    """
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    if not isinstance(flat, dict):
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, dot, fld = k.rpartition(".")
        out.setdefault(comp if dot else "", {})[fld] = v
    return out


def _pattern_value(patterns: Mapping[str, float], path: str) -> float | None:
    """PEFT's ``get_pattern_key`` rule: a pattern matches a path that ends with it after a dot."""
    candidates = [path, path.removeprefix("text_model."), "text_model." + path]
    for pat, value in patterns.items():
        for c in candidates:
            try:
                if re.match(rf"(.*\.)?({pat})$", c):
                    return float(value)
            except re.error:
                if c == pat or c.endswith("." + pat):
                    return float(value)
    return None


def _peft_alpha(config: Mapping, path: str, rank: int | None) -> float | None:
    if "lora_alpha" not in config:
        return None
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
    alpha = float(config["lora_alpha"]) if alpha is None else alpha
    if config.get("use_rslora") and rank:
        alpha *= math.sqrt(rank)  # rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
    return alpha


def _is_sdxl(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None,
             configs: Mapping[str, dict]) -> bool:
    md = metadata or {}
    if str(md.get("ss_base_model_version", "")).startswith("sdxl") or "text_encoder_2" in configs:
        return True
    if "xl" in str(md.get("modelspec.architecture", "")):
        return True
    for k in keys:
        if k.startswith(("text_encoder_2.", TE2_PREFIX)):
            return True
        if "attn2" in k and ("to_k" in k or "to_v" in k) and ("lora_A" in k or "down" in k):
            s = shapes.get(k, ())
            if len(s) >= 2 and s[1] == 2048:
                return True
    return False


def group_keys(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> KeyGroups:
    """Group every key of a file by canonical module name.

    Keys of no known family, or with a suffix no registered type or shared suffix claims, go
    to ``unclaimed`` unchanged. Two spellings of one module in a file raise ``ValueError``.
    """
    claimed = set(registry()) | set(SHARED_SUFFIXES)
    configs = _peft_configs(metadata)
    sdxl = _is_sdxl(shapes.keys(), shapes, metadata, configs)
    modules: dict[str, ModuleKeys] = {}
    unclaimed: list[str] = []
    peft_paths: dict[str, tuple[str, str]] = {}
    for key in shapes:
        dotted = split_dotted(key)
        if dotted is not None:
            component, path, suffix, style = dotted
            name = dotted_canonical(component, path, style, sdxl=sdxl)
            source = f"{component}.{path}" if component else path
            peft_paths[name] = (component, path)
        else:
            source, dot, suffix = key.partition(".")
            if not dot or suffix not in claimed:
                unclaimed.append(key)
                continue
            name, style = kohya_canonical(source)
        group = modules.get(name)
        if group is None:
            group = modules[name] = ModuleKeys(name=name, source_name=source, style=style)
        elif group.source_name != source:
            raise ValueError(
                f"module {name} is stored twice, as {group.source_name!r} and {source!r}; "
                "remove one spelling from the file"
            )
        if suffix in group.keys:
            raise ValueError(f"module {name}: keys {group.keys[suffix]!r} and {key!r} both hold {suffix}")
        group.keys[suffix] = key
    for name, (component, path) in peft_paths.items():
        config = configs.get(component) or ({} if component else configs.get("", {}))
        down = modules[name].keys.get("lora_down.weight")
        rank = shapes[down][0] if down is not None and shapes.get(down) else None
        modules[name].alpha = _peft_alpha(config, path, rank)
    return KeyGroups(modules=modules, unclaimed=unclaimed)
