"""Which Stable Diffusion architecture a checkpoint or an adapter belongs to.

Detection reads key names and shapes first (formats-spec §2.3): they cannot lie, metadata can.
Structure decides (a second text encoder or `label_emb` means SDXL, an OpenCLIP text encoder or
linear `proj_in` means SD2); the cross-attention width (`attn2.to_k` in-features: 768 SD1, 1024
SD2, 2048 SDXL) confirms it at full scale and is the only clue in a UNet-only adapter. Tiny test
models have other widths, so structure comes first. SD2 v-prediction cannot be seen in weights:
it is reported only when metadata says so.

Anything that is not SD1.x, SD2.x or SDXL base (SD3, Flux, Stable Cascade, the SDXL refiner)
raises `ArchitectureMismatchError` naming what was seen, rather than being mapped wrongly.

Example:
    >>> detect_checkpoint_arch(open_model("sd_xl_base_1.0.safetensors")).arch
    'sdxl'
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from loratools.errors import ArchitectureMismatchError
from loratools.keys.naming import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, unet_spelling

ARCHES = ("sd1", "sd2", "sdxl")
NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: sd-scripts' `ss_base_model_version` per (architecture, v-prediction).
BASE_MODEL_VERSIONS = {("sd1", False): "sd_v1", ("sd1", True): "sd_v1_v", ("sd2", False): "sd_v2",
                       ("sd2", True): "sd_v2_v", ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}

_SHAPE = tuple[int, ...]


@dataclass(frozen=True)
class ArchInfo:
    """An architecture and how it was recognised.

    Attributes:
        arch: "sd1", "sd2" or "sdxl".
        variant: None, "inpaint" (UNet in-channels 9) or "instruct-pix2pix" (8).
        prediction: "v_prediction" or "epsilon" when metadata says so, else None (unknown).
        evidence: a short human-readable reason, for messages.
    """

    arch: str
    variant: str | None = None
    prediction: str | None = None
    evidence: str = ""

    @property
    def label(self) -> str:
        """"SDXL", "SD2 (v-prediction)", "SD1 inpaint" ... for tables and messages."""
        text = NAMES[self.arch]
        if self.variant:
            text += f" {self.variant}"
        if self.prediction == "v_prediction":
            text += " (v-prediction)"
        return text


# --------------------------------------------------------------------------------------------
# checkpoints

def detect_checkpoint_arch(source: Any) -> ArchInfo:
    """The architecture of a base model.

    Args:
        source: a `loratools.io.checkpoint.ModelSource`, a single file's `{key: shape}`, or a
            diffusers folder's `{component: {key: shape}}`.

    Raises:
        ArchitectureMismatchError: the model is not SD1.x, SD2.x or SDXL base; the message names
            what was seen.
    """
    if hasattr(source, "components") and hasattr(source, "key_shapes"):
        with _naming(getattr(source, "path", None)):
            if source.layout == "single_file":
                return _single_file(source.key_shapes(""))
            return _diffusers({c: source.key_shapes(c) for c in source.components})
    values = list(source.values())
    if values and isinstance(values[0], Mapping):
        return _diffusers(source)
    return _single_file(source)


def _single_file(shapes: Mapping[str, _SHAPE]) -> ArchInfo:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    _refuse_foreign(shapes)
    unet = {k[len("model.diffusion_model."):]: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    variant = _variant(unet.get("input_blocks.0.0.weight"))
    if has("conditioner.embedders.1.model.transformer.resblocks.") or (
            has("conditioner.embedders.0.transformer.") and has("model.diffusion_model.label_emb.")):
        arch, evidence = "sdxl", "two text encoders (`conditioner.embedders.0/1`)"
    elif has("conditioner.embedders.0.model.transformer.resblocks."):
        raise ArchitectureMismatchError(
            "SDXL refiner checkpoint (only an OpenCLIP bigG text encoder at `conditioner.embedders.0.model`); "
            "only SD1.x, SD2.x and SDXL base are supported")
    elif has("cond_stage_model.model.transformer.resblocks."):
        arch, evidence = "sd2", "OpenCLIP text encoder at `cond_stage_model.model`"
    elif has("cond_stage_model.transformer."):
        arch, evidence = "sd1", "CLIP text encoder at `cond_stage_model.transformer`"
    elif unet:
        arch, evidence = _from_unet(unet, "label_emb.0.0.weight", "input_blocks.", "proj_in.weight")
    else:
        raise ArchitectureMismatchError(
            f"not a Stable Diffusion checkpoint: no `model.diffusion_model.` UNet keys (saw {_prefixes(shapes)})")
    _confirm_width(arch, _cross_width(unet), evidence)
    return ArchInfo(arch, variant, None, evidence)


def _diffusers(components: Mapping[str, Mapping[str, _SHAPE]]) -> ArchInfo:
    unet = components.get("unet", {})
    for shapes in components.values():
        _refuse_foreign(shapes)
    variant = _variant(unet.get("conv_in.weight"))
    if "text_encoder_2" in components and "text_encoder" not in components:
        raise ArchitectureMismatchError(
            "SDXL refiner folder (text_encoder_2 only); only SD1.x, SD2.x and SDXL base are supported")
    if not unet:
        # SD3 and Flux folders have transformer/ (and CLIP/T5 encoders) instead of unet/.
        raise ArchitectureMismatchError(
            f"diffusers folder without unet/ (has {', '.join(components) or 'nothing'}): not an SD1.x/SD2.x/SDXL "
            "model (SD3 and Flux folders have transformer/ instead)")
    if "text_encoder_2" in components and _te_width(components["text_encoder_2"]) is None:
        raise ArchitectureMismatchError("text_encoder_2 is not a CLIP text encoder (no self_attn.q_proj): "
                                        "not an SDXL model")
    if "text_encoder_2" in components or any(k.startswith("add_embedding.") for k in unet):
        arch, evidence = "sdxl", "two text encoders" if "text_encoder_2" in components else "`add_embedding`"
    else:
        arch, evidence = _from_unet(unet, "add_embedding.linear_1.weight", "down_blocks.", "proj_in.weight")
    _confirm_width(arch, _cross_width(unet), evidence)
    return ArchInfo(arch, variant, None, evidence)


def _from_unet(unet: Mapping[str, _SHAPE], add_key: str, block: str, proj: str) -> tuple[str, str]:
    """A UNet without text encoders: SDXL by its added embedding, SD2 by linear projections,
    otherwise by cross-attention width."""
    if not any(k.startswith(block) for k in unet):
        raise ArchitectureMismatchError(f"UNet keys without `{block}*`: not an SD1/SD2/SDXL UNet "
                                        f"(saw {_prefixes(unet)})")
    if add_key in unet:
        return "sdxl", "UNet with the SDXL size/crop embedding"
    width = _cross_width(unet)
    if width in CROSS_ATTENTION_WIDTH:
        return CROSS_ATTENTION_WIDTH[width], f"cross-attention width {width}"
    projs = [s for k, s in unet.items() if k.endswith(proj)]
    if projs and all(len(s) == 2 for s in projs):
        return "sd2", "linear proj_in/proj_out"
    return "sd1", "1x1-conv proj_in/proj_out"


def _cross_width(unet: Mapping[str, _SHAPE]) -> int | None:
    for k, s in unet.items():
        if k.endswith("attn2.to_k.weight") and len(s) == 2:
            return s[1]
    return None


def _te_width(te: Mapping[str, _SHAPE]) -> int | None:
    for k, s in te.items():
        if k.endswith("self_attn.q_proj.weight"):
            return s[1]
    return None


def _confirm_width(arch: str, width: int | None, evidence: str) -> None:
    seen = CROSS_ATTENTION_WIDTH.get(width) if width is not None else None
    if seen is not None and seen != arch:
        raise ArchitectureMismatchError(
            f"inconsistent model: {evidence} says {NAMES[arch]} but cross-attention width {width} says {NAMES[seen]}")


def _variant(conv_in: _SHAPE | None) -> str | None:
    if conv_in is None or len(conv_in) < 2:
        return None
    return {9: "inpaint", 8: "instruct-pix2pix"}.get(conv_in[1])


def _refuse_foreign(names: Iterable[str]) -> None:
    for k in names:
        for marker, what in (("joint_blocks.", "SD3 (MMDiT `joint_blocks`)"),
                             ("double_blocks.", "Flux (`double_blocks`)"),
                             ("single_transformer_blocks.", "Flux (`single_transformer_blocks`)"),
                             ("context_embedder.", "SD3/Flux (`context_embedder`)")):
            if marker in k:
                raise ArchitectureMismatchError(f"{what} model (key {k!r}); only SD1.x, SD2.x and SDXL are supported")


def _prefixes(names: Iterable[str], limit: int = 5) -> str:
    seen: list[str] = []
    for k in names:
        p = ".".join(k.split(".")[:2])
        if p not in seen:
            seen.append(p)
        if len(seen) >= limit:
            break
    return ", ".join(f"`{p}`" for p in seen) or "no keys"


# --------------------------------------------------------------------------------------------
# adapters

_FOREIGN_ADAPTER = (
    ("lora_transformer_", "SD3/Flux (`lora_transformer_`)"),
    ("lora_te3_", "SD3 (`lora_te3_`, a third text encoder)"),
    ("lora_prior_", "Stable Cascade (`lora_prior_`)"),
    ("transformer.", "a DiT (`transformer.`: SD3/Flux)"),
    ("lora_unet_double_blocks", "Flux (`double_blocks`)"),
    ("lora_unet_single_blocks", "Flux (`single_blocks`)"),
    ("lora_unet_joint_blocks", "SD3 (`joint_blocks`)"),
)


def guess_adapter_arch(adapter: Any, metadata: Mapping[str, str] | None = None) -> ArchInfo | None:
    """Like `detect_adapter_arch`, but None when neither shapes nor metadata tell (e.g. a tiny
    test LoRA with no metadata); foreign architectures still raise."""
    modules, unknown, metadata = _adapter_parts(adapter, metadata)
    names = list(modules) + list(unknown)
    for name in names:
        for marker, what in _FOREIGN_ADAPTER:
            if name.startswith(marker):
                raise ArchitectureMismatchError(f"{what} adapter (module {name!r}); "
                                                "only SD1.x, SD2.x and SDXL adapters are supported")
    _refuse_foreign(names)
    prediction = _prediction(metadata)
    meta_arch = _metadata_arch(metadata)

    shape_arch, evidence = None, ""
    if any(n.startswith((TE1_PREFIX, TE2_PREFIX)) for n in modules):
        shape_arch, evidence = "sdxl", "`lora_te1_`/`lora_te2_` modules"
    else:
        for name, shape in modules.items():
            if name.endswith("attn2_to_k") and shape is not None and len(shape) >= 2:
                width = shape[1]
                if width in CROSS_ATTENTION_WIDTH:
                    shape_arch, evidence = CROSS_ATTENTION_WIDTH[width], f"attn2.to_k in-features {width}"
                break
        if shape_arch is None:
            for name, shape in modules.items():
                if name.startswith(TE_PREFIX) and name.endswith("q_proj") and shape is not None and len(shape) == 2:
                    if shape[1] in (768, 1024):
                        shape_arch = "sd1" if shape[1] == 768 else "sd2"
                        evidence = f"text-encoder width {shape[1]}"
                    break
    if shape_arch is None and any(unet_spelling(n) == "sgm" for n in modules) and meta_arch in (None, "sdxl"):
        shape_arch, evidence = "sdxl", "SGM-style UNet names (`lora_unet_input_blocks_*`)"
    if shape_arch and meta_arch and meta_arch != shape_arch:
        raise ArchitectureMismatchError(
            f"adapter metadata says {NAMES[meta_arch]} but its {evidence} say {NAMES[shape_arch]}")
    arch = shape_arch or meta_arch
    if arch is None:
        return None
    if prediction == "v_prediction" and arch == "sd1":
        prediction = None  # kohya writes ss_v_parameterization for SD2 only
    return ArchInfo(arch, None, prediction, evidence or "metadata")


def detect_adapter_arch(adapter: Any, metadata: Mapping[str, str] | None = None) -> ArchInfo:
    """The architecture an adapter was trained for, from module names and shapes, then metadata.

    Args:
        adapter: a `loratools.adapters.AdapterFile`, a `HeaderSummary` (`describe_header`), or
            `{canonical module name: weight shape}`.
        metadata: the file's metadata when `adapter` does not carry it.

    Raises:
        ArchitectureMismatchError: an SD3/Flux/Cascade/refiner adapter, contradicting evidence,
            or nothing to tell by.
    """
    with _naming(getattr(adapter, "path", None)):
        info = guess_adapter_arch(adapter, metadata)
        if info is None:
            raise ArchitectureMismatchError(
                "cannot tell the adapter's architecture: no text-encoder prefix, no cross-attention module with a "
                "known width and no ss_base_model_version/modelspec.architecture metadata; pass --arch")
    return info


@contextmanager
def _naming(path: Any) -> Iterator[None]:
    """Put the file's path into an architecture error raised without one (the CLI's one line
    must say which of the user's files is wrong)."""
    try:
        yield
    except ArchitectureMismatchError as exc:
        if path is None or exc.path is not None:
            raise
        raise ArchitectureMismatchError(str(exc), path=path) from None


def _adapter_parts(adapter: Any, metadata: Mapping[str, str] | None
                   ) -> tuple[dict[str, _SHAPE | None], list[str], dict[str, str]]:
    mods = getattr(adapter, "modules", adapter)
    modules: dict[str, _SHAPE | None] = {}
    for name, m in mods.items():
        if isinstance(m, tuple):
            modules[name] = m
            continue
        try:
            shape = m.weight_shape
        except (NotImplementedError, AttributeError, ValueError):
            shape = None
        modules[name] = tuple(shape) if shape is not None else None
    unknown = list(getattr(adapter, "unknown", []) or [])
    meta = dict(metadata if metadata is not None else (getattr(adapter, "metadata", None) or {}))
    return modules, unknown, meta


def _metadata_arch(meta: Mapping[str, str]) -> str | None:
    base = (meta.get("ss_base_model_version") or "").lower()
    spec = (meta.get("modelspec.architecture") or "").lower()
    if "refiner" in base or "refiner" in spec:
        raise ArchitectureMismatchError("adapter metadata says SDXL refiner; only SDXL base adapters are supported")
    for text in (spec, base):
        if not text:
            continue
        if text.startswith(("stable-diffusion-xl", "sdxl")):
            return "sdxl"
        if text.startswith(("stable-diffusion-v2", "sd_v2", "sd_2")):
            return "sd2"
        if text.startswith(("stable-diffusion-v1", "sd_v1", "sd_1")):
            return "sd1"
        if text.startswith(("stable-diffusion-3", "flux", "sd3")):
            raise ArchitectureMismatchError(f"adapter metadata says {text!r}; only SD1.x, SD2.x and SDXL are supported")
    if meta.get("ss_v2") == "True":
        return "sd2"
    return None


def _prediction(meta: Mapping[str, str]) -> str | None:
    spec = (meta.get("modelspec.prediction_type") or "").lower()
    arch = (meta.get("modelspec.architecture") or "").lower().split("/")[0]
    if (meta.get("ss_v_parameterization") == "True" or spec in ("v", "v_prediction", "v-prediction")
            or arch.endswith("-v")):  # modelspec "stable-diffusion-v2-768-v"
        return "v_prediction"
    if spec == "epsilon":
        return "epsilon"
    return None


def check_compatible(adapter: ArchInfo | None, base: ArchInfo) -> None:
    """Refuse an adapter trained for another architecture than the base (None: unknown, allowed;
    the key mapping then decides).

    Raises:
        ArchitectureMismatchError: e.g. "SD1 adapter (attn2.to_k in-features 768) cannot apply to
            an SDXL base (two text encoders)".
    """
    if adapter is not None and adapter.arch != base.arch:
        raise ArchitectureMismatchError(
            f"{adapter.label} adapter ({adapter.evidence}) cannot apply to an {base.label} base ({base.evidence}); "
            f"use a base checkpoint of the adapter's architecture ({NAMES[adapter.arch]})")
