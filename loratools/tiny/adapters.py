"""Synthetic LoRA/LyCORIS adapters for the tiny models, named as real trainers name them.

Which modules an adapter covers follows kohya's ``networks/lora.py`` (formats-spec §3.4): inside
every ``Transformer2DModel`` each Linear and 1x1 conv; with ``locon`` and the LyCORIS kinds also the
``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` convs; in the text encoders every Linear of
``CLIPAttention`` and ``CLIPMLP``. Factors are random with a decaying spectrum (as trained LoRAs
have), scaled so each module's delta is ``strength`` times its base weight's norm: the image
changes visibly, nothing saturates. The exact float32 delta of every module is returned too, so
tests can check merges and conversions against an independent computation.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.keys.arch import BASE_MODEL_VERSIONS

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

KINDS = ("lora", "locon", "loha", "lokr", "full", "dora")
NAMINGS = ("kohya", "kohya_diffusers", "peft")

_UNET_ATTN = ("Transformer2DModel",)
_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
#: The factor each trainer initialises to zero (kohya lora_up; LyCORIS hada_w2_a, lokr_w2(_b)), so a
#: module that never received a gradient has exactly these tensors all zero.
_ZERO_INIT = ("lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_b", "diff")
_TE_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One adapted module: where it lives and the float32 delta the adapter adds to its weight."""

    component: str  # "unet", "text_encoder", "text_encoder_2"
    module_path: str  # as named_modules() of that component gives it
    delta: torch.Tensor  # full weight shape, scale included, multiplier 1


@dataclass
class TinyAdapter:
    """A synthetic adapter: the tensors and metadata as a file holds them, plus the ground truth."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    targets: dict[str, Target] = field(default_factory=dict)  # module name in the file -> target
    path: Path | None = None


def target_modules(pipe: DiffusionPipeline, kind: str = "lora") -> list[tuple[str, str, torch.nn.Module]]:
    """``(component, module_path, layer)`` for every Linear/Conv2d an adapter of ``kind`` covers."""
    import torch

    conv = kind != "lora"
    found: list[tuple[str, str, torch.nn.Module]] = []
    for component in ("text_encoder", "text_encoder_2", "unet"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        classes = (_UNET_ATTN + (_UNET_CONV if conv else ())) if component == "unet" else _TE_TARGETS
        seen: set[str] = set()
        for name, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                path = f"{name}.{child_name}" if child_name else name
                if path in seen or not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                if (isinstance(child, torch.nn.Conv2d) and child.kernel_size != (1, 1)) and not conv:
                    continue
                seen.add(path)
                found.append((component, path, child))
    return found


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    import torch

    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen))
    return q if rows >= cols else q.T


def _spectrum(rank: int) -> torch.Tensor:
    import torch

    return torch.tensor([0.6**i for i in range(rank)], dtype=torch.float32)


def _factorize(dim: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dim, m the largest divisor not above sqrt(dim) (LyCORIS factor=-1)."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def _module_tensors(kind: str, weight: torch.Tensor, rank: int, alpha: float, strength: float,
                    gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Adapter tensors (float32) for one base weight and the exact delta they encode."""
    import torch

    out_dim = weight.shape[0]
    flat_in = weight[0].numel()
    kernel = tuple(weight.shape[2:])
    target = strength * float(weight.float().norm())
    r = min(rank, out_dim, flat_in)
    if kind in ("lora", "locon", "dora"):
        s = _spectrum(r)
        up = _orthonormal(out_dim, r, gen) * s.sqrt()
        down = s.sqrt()[:, None] * _orthonormal(r, flat_in, gen)
        scale = alpha / r
        c = math.sqrt(target / (scale * float(s.norm())))
        up, down = up * c, down * c
        delta = (scale * up @ down).reshape(weight.shape)
        shape_up = (out_dim, r) + ((1, 1) if kernel else ())
        tensors = {"lora_down.weight": down.reshape((r,) + tuple(weight.shape[1:])),
                   "lora_up.weight": up.reshape(shape_up), "alpha": torch.tensor(float(alpha))}
        if kind == "dora":
            adapted = weight.float() + delta
            norms = adapted.reshape(out_dim, -1).norm(dim=1)
            magnitude = norms * (1 + 0.2 * torch.rand(out_dim, generator=gen))
            tensors["dora_scale"] = magnitude.reshape((out_dim,) + (1,) * (weight.dim() - 1))
            delta = adapted * (magnitude / norms).reshape(tensors["dora_scale"].shape) - weight.float()
        return tensors, delta
    if kind == "loha":
        scale = alpha / r
        w = {k: torch.randn(shape, generator=gen) for k, shape in (
            ("hada_w1_a", (out_dim, r)), ("hada_w1_b", (r, flat_in)),
            ("hada_w2_a", (out_dim, r)), ("hada_w2_b", (r, flat_in)))}
        core = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        c = math.sqrt(target / (scale * float(core.norm())))
        w["hada_w1_a"] *= c
        w["hada_w2_a"] *= c
        delta = (scale * c * c * core).reshape(weight.shape)
        return w | {"alpha": torch.tensor(float(alpha))}, delta
    if kind == "lokr":
        a, b = _factorize(out_dim)
        cc, d = _factorize(weight.shape[1])
        w1 = torch.randn(a, cc, generator=gen)
        d_flat = d * math.prod(kernel)
        r2 = min(rank, b, d_flat)
        split = r2 < max(b, d) / 2
        tensors: dict[str, torch.Tensor] = {"lokr_w1": w1}
        if split:
            w2a = _orthonormal(b, r2, gen) * _spectrum(r2)
            w2b = _orthonormal(r2, d_flat, gen)
            w2 = w2a @ w2b
            scale = alpha / r2
            tensors |= {"lokr_w2_a": w2a, "lokr_w2_b": w2b}
        else:
            w2 = torch.randn(b, d_flat, generator=gen)
            scale = 1.0
            tensors["lokr_w2"] = w2.reshape((b, d) + kernel)
        w2_full = w2.reshape((b, d) + kernel)
        w1_full = w1.reshape((a, cc) + (1,) * len(kernel))
        core = torch.kron(w1_full, w2_full)
        c = target / (scale * float(core.norm()))
        tensors["lokr_w1"] = w1 * c
        delta = scale * c * core
        tensors["alpha"] = torch.tensor(float(alpha if split else r2))
        return tensors, delta.reshape(weight.shape)
    if kind == "full":
        delta = torch.randn(weight.shape, generator=gen)
        delta *= target / float(delta.norm())
        return {"diff": delta.clone()}, delta
    raise ValueError(f"unknown adapter kind {kind!r}; expected one of {KINDS}")


def _untrained(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[dict[str, torch.Tensor],
                                                                               torch.Tensor]:
    """The same module as training initialises it: its zero-initialised factor all zero, delta 0
    (DoRA's magnitude starts as the base weight's row norms)."""
    import torch

    out = {k: (torch.zeros_like(v) if k in _ZERO_INIT else v) for k, v in tensors.items()}
    if "dora_scale" in out:
        out["dora_scale"] = weight.float().reshape(weight.shape[0], -1).norm(dim=1).reshape(out["dora_scale"].shape)
    return out, torch.zeros(weight.shape)


def _module_name(naming: str, component: str, path: str, arch: str, table: Any) -> str:
    from loratools.keys.naming import kohya_name, kohya_prefix, peft_name, underscored

    if naming == "peft":
        return peft_name(component, path)
    if naming == "kohya_diffusers" and component == "unet":
        return kohya_prefix(component, arch) + underscored(path)
    return kohya_name(component, path, arch, unet_table=table)


def make_lora(
    model: DiffusionPipeline,
    arch: str,
    kind: str = "lora",
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    naming: str = "kohya",
    *,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    strength: float = 0.2,
    dtype: torch.dtype | None = None,
    text_encoders: bool = True,
    untrained_te_layers: int = 0,
    path: str | Path | None = None,
) -> TinyAdapter:
    """Build a synthetic adapter for a tiny pipeline; write it to ``path`` if given.

    Args:
        model: the pipeline the adapter is for (its weights set each module's delta size).
        arch: "sd1", "sd2" or "sdxl": picks the kohya prefixes and SGM names for SDXL UNets.
        kind: "lora" (attention + text encoders), "locon" (+ resnet/sampler convs, kohya
            ``conv_dim``), "loha", "lokr", "full" (LyCORIS ``diff``) or "dora" (LoRA + ``dora_scale``,
            output axis); the LyCORIS kinds cover the same modules as "locon".
        rank, alpha: linear rank/alpha; ``conv_rank``/``conv_alpha`` (default: the same) for kxk convs.
        seed: the tensors are a function of the seed and the model's shapes/weights only.
        naming: "kohya" (SGM UNet names for SDXL, as sd-scripts writes), "kohya_diffusers"
            (``lora_unet_down_blocks_...`` for every arch) or "peft" (``unet.<path>.lora_A.weight``,
            kinds "lora"/"locon" only; the scale is folded into ``lora_B``).
        strength: each module's delta norm relative to its base weight's norm.
        dtype: tensor dtype in the file (default float16, as sd-scripts saves); deltas stay float32.
        text_encoders: include text-encoder modules (False = ``network_train_unet_only``).
        untrained_te_layers: the last this many layers of each text encoder are left as training
            initialises them (zero ``lora_up``/``hada_w2_a``/``lokr_w2``, delta 0): what clip skip 2
            does to a real kohya SD1 LoRA (6 all-zero ``lora_up`` tensors for 1 layer).
        path: where to write the .safetensors (through ``loratools.io``; refuses to overwrite).

    Returns:
        TinyAdapter with ``tensors``, ``metadata`` (kohya ``ss_*`` keys) and ``targets`` (ground-truth
        float32 deltas computed from the float32 factors before the cast to ``dtype``).

    Example:
        >>> ad = make_lora(build_pipeline("sdxl"), "sdxl", "locon", path=tmp_path / "x.safetensors")
        >>> pipe.load_lora_weights(str(ad.path))
    """
    import torch

    from loratools.keys.unet_blocks import UNetBlockTable

    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {KINDS}")
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; expected one of {NAMINGS}")
    if naming == "peft" and kind not in ("lora", "locon"):
        raise ValueError(f"naming 'peft' has no form for kind {kind!r}; use 'lora' or 'locon'")
    dtype = torch.float16 if dtype is None else dtype
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    table = UNetBlockTable.from_config(model.unet.config)
    gen = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, Target] = {}
    for component, module_path, layer in target_modules(model, kind):
        if component != "unet" and not text_encoders:
            continue
        weight = layer.weight.detach()
        is_kxk = weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)
        r, a = (conv_rank, conv_alpha) if is_kxk else (rank, alpha)
        module_tensors, delta = _module_tensors(kind, weight, r, a, strength, gen)
        layer_match = _TE_LAYER.search(module_path)
        if component != "unet" and layer_match and untrained_te_layers > 0:
            n_layers = getattr(model, component).config.num_hidden_layers
            if int(layer_match.group(1)) >= n_layers - untrained_te_layers:
                module_tensors, delta = _untrained(module_tensors, weight)
        name = _module_name(naming, component, module_path, arch, table)
        if naming == "peft":
            scale = float(module_tensors["alpha"]) / module_tensors["lora_down.weight"].shape[0]
            module_tensors = {"lora_A.weight": module_tensors["lora_down.weight"],
                              "lora_B.weight": module_tensors["lora_up.weight"] * scale}
        for suffix, t in module_tensors.items():
            tensors[f"{name}.{suffix}"] = t.to(dtype).contiguous()
        targets[name] = Target(component, module_path, delta)
    metadata = _metadata(arch, kind, rank, alpha, conv_rank, conv_alpha, text_encoders, naming)
    adapter = TinyAdapter(tensors=tensors, metadata=metadata, targets=targets)
    if path is not None:
        from loratools.io.writer import save_tensors

        save_tensors(Path(path), tensors, metadata)
        adapter.path = Path(path)
    return adapter


def _metadata(arch: str, kind: str, rank: int, alpha: float, conv_rank: int, conv_alpha: float,
              text_encoders: bool, naming: str) -> dict[str, str]:
    """The ``ss_*`` keys a kohya/LyCORIS file carries (a realistic subset); none for PEFT files."""
    if naming == "peft":
        return {}
    lycoris = kind in ("loha", "lokr", "full", "dora")
    args: dict[str, str] = {}
    if kind != "lora":
        args |= {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
    if lycoris:
        args["algo"] = "locon" if kind == "dora" else kind
        if kind == "dora":
            args["dora_wd"] = "True"
    return {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args) if args else "null",
        "ss_base_model_version": BASE_MODEL_VERSIONS[(arch, False)],
        "ss_v2": str(arch == "sd2"),
        "ss_network_train_unet_only": str(not text_encoders),
        "ss_output_name": f"tiny-{arch}-{kind}",
        "ss_tag_frequency": json.dumps({"5_tinychar": {"tinychar": 6, "stripes": 6}}),
    }
