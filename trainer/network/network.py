"""The built-in `networks.lora` network: which modules get a LoRA, with which rank, and the
optimizer parameter groups (sd-scripts §1.5-1.7, §2.5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loratools.errors import UsageError
from loratools.keys.blocks import NUM_BLOCKS, block_slot
from loratools.keys.naming import te_prefixes
from trainer.network.lora import LoRAModule, apply_max_norm
from trainer.network.names import KohyaNamer

UNET_TARGETS = ("Transformer2DModel",)
UNET_TARGETS_CONV3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def block_index(lora_name: str, arch: str) -> int:
    """sd-scripts' block slot of a UNet module name (−1 when none applies); `loratools.keys.blocks`."""
    return block_slot(lora_name, arch)


@dataclass
class NetworkOptions:
    """Parsed `--network_dim/--network_alpha/--network_args` of networks.lora."""

    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    down_lr_weight: list[float] | None = None
    mid_lr_weight: float | None = None
    up_lr_weight: list[float] | None = None
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, arch: str, dim: int | None, alpha: float | None, network_dropout: float | None,
                  args: Mapping[str, str]) -> NetworkOptions:
        """Parse the string-valued `network_args` exactly as sd-scripts' `create_network` does."""
        opts = cls(dim=int(dim) if dim else 4, alpha=float(alpha) if alpha is not None else 1.0)
        def num(key: str, conv=float):
            return conv(args[key]) if key in args and args[key] not in ("", "None") else None
        opts.conv_dim = num("conv_dim", int)
        opts.conv_alpha = num("conv_alpha")
        if opts.conv_dim is not None and opts.conv_alpha is None:
            opts.conv_alpha = 1.0
        opts.dropout = num("dropout") if "dropout" in args else network_dropout
        opts.rank_dropout = num("rank_dropout")
        opts.module_dropout = num("module_dropout")
        opts.loraplus_lr_ratio = num("loraplus_lr_ratio")
        opts.loraplus_unet_lr_ratio = num("loraplus_unet_lr_ratio")
        opts.loraplus_text_encoder_lr_ratio = num("loraplus_text_encoder_lr_ratio")
        n = NUM_BLOCKS[arch]

        def listed(key: str, conv=float) -> list | None:
            if key not in args:
                return None
            values = [v.strip() for v in str(args[key]).split(",") if v.strip()]
            if len(values) != n:
                raise UsageError(f"network_args {key} has {len(values)} values; {arch} needs exactly {n} "
                                 f"(slot 0 + IN/MID/OUT blocks); fix the list length")
            return [conv(v) for v in values]

        opts.block_dims = listed("block_dims", int)
        opts.block_alphas = listed("block_alphas")
        opts.conv_block_dims = listed("conv_block_dims", int)
        opts.conv_block_alphas = listed("conv_block_alphas")
        if opts.block_dims is not None:
            if opts.block_alphas is None:
                opts.block_alphas = [opts.alpha] * n
            if opts.conv_block_dims is None and opts.conv_dim is not None:
                opts.conv_block_dims = [opts.conv_dim] * n
                opts.conv_block_alphas = [opts.conv_alpha] * n
            elif opts.conv_block_dims is not None and opts.conv_block_alphas is None:
                opts.conv_block_alphas = [opts.conv_alpha if opts.conv_alpha is not None else 1.0] * n
        elif opts.block_alphas is not None or opts.conv_block_dims is not None:
            opts.ignored.append("block_alphas/conv_block_dims need block_dims; ignored")
        if any(k in args for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
            if arch == "sdxl":
                raise UsageError("network_args down_lr_weight/mid_lr_weight/up_lr_weight are for SD1/SD2 "
                                 "(sd-scripts' 12+1+12 block layout); remove them for SDXL")
            opts.down_lr_weight, opts.mid_lr_weight, opts.up_lr_weight = block_lr_weights(
                args.get("down_lr_weight"), args.get("mid_lr_weight"), args.get("up_lr_weight"),
                float(args.get("block_lr_zero_threshold", 0.0) or 0.0), opts.ignored)
        known = {"down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "block_dims",
                 "block_alphas", "conv_block_dims", "conv_block_alphas", "loraplus_lr_ratio",
                 "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
        opts.ignored += [f"network_args {k}={v} has no effect with networks.lora" for k, v in args.items()
                         if k not in known]
        return opts

    @property
    def block_lr(self) -> bool:
        return self.down_lr_weight is not None or self.mid_lr_weight is not None or self.up_lr_weight is not None

    def lr_weight(self, lora_name: str, arch: str) -> float:
        """sd-scripts' per-block LR multiplier of a UNet module (1.0 outside the weighted blocks)."""
        idx = block_index(lora_name, arch)
        if idx < 0:
            return 1.0
        if idx < 12:
            return self.down_lr_weight[idx] if self.down_lr_weight is not None else 1.0
        if idx == 12:
            return self.mid_lr_weight if self.mid_lr_weight is not None else 1.0
        return self.up_lr_weight[idx - 13] if self.up_lr_weight is not None else 1.0

    @property
    def conv_enabled(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None


def _lr_preset(text: str, n: int = 12) -> list[float]:
    """`sine`, `cosine`, `linear`, `reverse_linear`, `zeros` (optionally `+base`), or a comma list."""
    import math

    name, _, base = text.partition("+")
    b = float(base) if base else 0.0
    presets = {
        "cosine": [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in reversed(range(n))],
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in range(n)],
        "linear": [i / (n - 1) + b for i in range(n)],
        "reverse_linear": [i / (n - 1) + b for i in reversed(range(n))],
        "zeros": [b] * n,
    }
    if name in presets:
        return presets[name]
    return [float(v) if v.strip() else 0.0 for v in text.split(",")]


def block_lr_weights(down: str | None, mid: str | None, up: str | None, zero_threshold: float,
                     notes: list[str]) -> tuple[list[float] | None, float | None, list[float] | None]:
    """sd-scripts' `get_block_lr_weight`: 12 down / 1 mid / 12 up multipliers; lists are cut or
    padded with 1.0 to 12, and values not above `block_lr_zero_threshold` become 0."""
    def fit(values: list[float] | None, label: str) -> list[float] | None:
        if values is None:
            return None
        if len(values) != 12:
            notes.append(f"network_args {label} has {len(values)} values; sd-scripts uses 12 "
                         f"({'cut' if len(values) > 12 else 'padded with 1.0'})")
        values = (values + [1.0] * 12)[:12]
        return [w if w > zero_threshold else 0.0 for w in values]

    down_w = fit(_lr_preset(down) if down else None, "down_lr_weight")
    up_w = fit(_lr_preset(up) if up else None, "up_lr_weight")
    mid_w = None if mid in (None, "") else float(mid)
    if mid_w is not None and not mid_w > zero_threshold:
        mid_w = 0.0
    return down_w, mid_w, up_w


@dataclass
class Candidate:
    """A Linear/Conv2d the network may wrap."""

    lora_name: str
    module: nn.Module
    is_unet: bool
    is_conv3x3: bool


def find_candidates(arch: str, unet: nn.Module | None, text_encoders: Sequence[nn.Module], namer: KohyaNamer,
                    *, include_conv3x3: bool) -> list[Candidate]:
    """Every Linear/Conv2d inside sd-scripts' target classes, in module order, with its kohya name."""
    found: list[Candidate] = []
    seen: set[str] = set()

    def walk(root: nn.Module, targets: tuple[str, ...], name_of, is_unet: bool) -> None:
        for name, module in root.named_modules():
            if type(module).__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                is_linear = isinstance(child, nn.Linear)
                is_conv = isinstance(child, nn.Conv2d)
                if not (is_linear or is_conv) or not child_name:
                    continue
                lora_name = name_of(f"{name}.{child_name}" if name else child_name)
                if lora_name in seen:
                    continue
                seen.add(lora_name)
                conv3 = is_conv and tuple(child.kernel_size) != (1, 1)
                found.append(Candidate(lora_name, child, is_unet, conv3))

    for i, te in enumerate(text_encoders):
        walk(te, TE_TARGETS, lambda p, i=i: namer.text_encoder(i, p), False)
    if unet is not None:
        targets = UNET_TARGETS + (UNET_TARGETS_CONV3X3 if include_conv3x3 else ())
        walk(unet, targets, namer.unet, True)
    return found


class LoRANetwork(nn.Module):
    """A set of `LoRAModule`s over the UNet and text encoders, with kohya names.

    `unet_loras`/`text_encoder_loras` hold the modules actually trained and saved (sd-scripts drops
    the modules of a part that is not trained).
    """

    def __init__(self, arch: str, unet: nn.Module, text_encoders: Sequence[nn.Module], opts: NetworkOptions, *,
                 train_unet: bool = True, train_text_encoder: bool = True,
                 weights: Mapping[str, torch.Tensor] | None = None, multiplier: float = 1.0) -> None:
        super().__init__()
        self.arch = arch
        self.opts = opts
        namer = KohyaNamer(arch, unet, text_encoders)
        from_file = _ranks_from_weights(weights) if weights is not None else None
        include_conv = opts.conv_enabled or (from_file is not None and any(
            w.dim() == 4 and w.shape[2:] != (1, 1) for w in weights.values()))
        candidates = find_candidates(arch, unet if train_unet else None,
                                     text_encoders if train_text_encoder else [], namer,
                                     include_conv3x3=include_conv)
        te_loras: list[LoRAModule] = []
        unet_loras: list[LoRAModule] = []
        self.skipped: list[str] = []
        for cand in candidates:
            if from_file is not None:
                if cand.lora_name not in from_file:
                    continue
                dim, alpha = from_file[cand.lora_name]
            else:
                dim, alpha = self._rank_for(cand)
            if not dim:
                self.skipped.append(cand.lora_name)
                continue
            module = LoRAModule(cand.lora_name, cand.module, dim, alpha, multiplier=multiplier,
                                dropout=opts.dropout, rank_dropout=opts.rank_dropout,
                                module_dropout=opts.module_dropout)
            (unet_loras if cand.is_unet else te_loras).append(module)
        self.text_encoder_loras = nn.ModuleList(te_loras)
        self.unet_loras = nn.ModuleList(unet_loras)
        self.unmatched_weights: list[str] = []
        if from_file is not None:
            if not from_file:
                raise UsageError("--network_weights holds no LoRA/LoCon modules (lora_down/lora_up); for LoHa/LoKr/... "
                                 "files use --network_module lycoris.kohya with the file's algo")
            self.unmatched_weights = self.load_kohya_state_dict(weights, strict_names=False)

    def _rank_for(self, cand: Candidate) -> tuple[int | None, float | None]:
        o = self.opts
        if cand.is_unet and o.block_dims is not None:
            idx = block_index(cand.lora_name, self.arch)
            if not cand.is_conv3x3:
                return o.block_dims[idx], o.block_alphas[idx]
            if o.conv_block_dims is not None:
                return o.conv_block_dims[idx], o.conv_block_alphas[idx]
            return None, None
        if not cand.is_conv3x3:
            return o.dim, o.alpha
        return o.conv_dim, o.conv_alpha

    def module_count(self) -> int:
        return len(self.all_loras)

    @property
    def ignored(self) -> list[str]:
        return list(self.opts.ignored)

    # -- model patching -----------------------------------------------------------------

    @property
    def all_loras(self) -> list[LoRAModule]:
        return [*self.text_encoder_loras, *self.unet_loras]

    def apply_to(self) -> None:
        for lora in self.all_loras:
            lora.apply_to()

    def restore(self) -> None:
        for lora in self.all_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.all_loras:
            lora.multiplier = multiplier

    # -- optimisation -------------------------------------------------------------------

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float) -> tuple[list[dict], list[str]]:
        """Param groups as sd-scripts builds them: per TE and UNet, LoRA+ `lora_up` in a "plus"
        group at lr × ratio, and a group whose lr ends up 0/None is dropped."""
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
            te_lrs = [default_lr]
        elif isinstance(text_encoder_lr, (int, float)):
            te_lrs = [float(text_encoder_lr)]
        else:
            te_lrs = [float(x) for x in text_encoder_lr]
        o = self.opts
        groups: list[dict] = []
        descriptions: list[str] = []

        def assemble(loras: list[LoRAModule], lr: float | None, ratio: float | None, label: str) -> None:
            plain, plus = [], []
            for lora in loras:
                for pname, param in lora.named_parameters():
                    (plus if ratio is not None and "lora_up" in pname else plain).append(param)
            for params, is_plus in ((plain, False), (plus, True)):
                if not params:
                    continue
                group_lr = None if lr is None else (lr * ratio if is_plus else lr)
                if not group_lr:
                    continue
                groups.append({"params": params, "lr": group_lr})
                descriptions.append(label + (" plus" if is_plus else ""))

        te_ratio = o.loraplus_text_encoder_lr_ratio or o.loraplus_lr_ratio
        prefixes = te_prefixes(self.arch)
        for i, prefix in enumerate(prefixes):
            loras = [m for m in self.text_encoder_loras if m.lora_name.startswith(prefix)]
            label = "textencoder" if len(prefixes) == 1 else f"textencoder{i + 1}"
            assemble(loras, te_lrs[i] if i < len(te_lrs) else te_lrs[0], te_ratio, label)
        base_unet_lr = unet_lr if unet_lr is not None else default_lr
        unet_ratio = o.loraplus_unet_lr_ratio or o.loraplus_lr_ratio
        if not o.block_lr:
            assemble(list(self.unet_loras), base_unet_lr, unet_ratio, "unet")
            return groups, descriptions
        by_block: dict[int, list[LoRAModule]] = {}
        for lora in self.unet_loras:
            by_block.setdefault(block_index(lora.lora_name, self.arch), []).append(lora)
        for idx, loras in by_block.items():
            weight = o.lr_weight(loras[0].lora_name, self.arch)
            assemble(loras, base_unet_lr * weight, unet_ratio, f"unet_block{idx}")
        return groups, descriptions

    def apply_max_norm_regularization(self, max_norm_value: float) -> tuple[int, float, float]:
        return apply_max_norm(self.all_loras, max_norm_value)

    # -- weights ------------------------------------------------------------------------

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """`<lora_name>.lora_down.weight`, `.lora_up.weight`, `.alpha`, detached, float32 on CPU."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.all_loras:
            out[f"{lora.lora_name}.lora_down.weight"] = lora.lora_down.weight.detach().float().cpu().contiguous()
            out[f"{lora.lora_name}.lora_up.weight"] = lora.lora_up.weight.detach().float().cpu().contiguous()
            out[f"{lora.lora_name}.alpha"] = lora.alpha.detach().float().cpu()
        return out

    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], *, strict_names: bool = True) -> list[str]:
        """Copy factors from a kohya-named file; returns the file's module names we have no module for."""
        by_name = {lora.lora_name: lora for lora in self.all_loras}
        unknown: list[str] = []
        with torch.no_grad():
            for key, value in tensors.items():
                name, _, suffix = key.partition(".")
                lora = by_name.get(name)
                if lora is None:
                    unknown.append(name)
                    continue
                if suffix == "lora_down.weight":
                    lora.lora_down.weight.copy_(value.to(lora.lora_down.weight.dtype).reshape(lora.lora_down.weight.shape))
                elif suffix == "lora_up.weight":
                    lora.lora_up.weight.copy_(value.to(lora.lora_up.weight.dtype).reshape(lora.lora_up.weight.shape))
                elif suffix == "alpha":
                    lora.alpha.copy_(value.float())
                    lora.scale = float(value.float()) / lora.lora_dim
                else:
                    unknown.append(key)
        unknown = sorted(set(unknown))
        if strict_names and unknown:
            raise UsageError(f"network weights contain {len(unknown)} modules this network lacks "
                             f"(first: {unknown[0]}); check the base model architecture")
        return unknown


def _ranks_from_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float | None]]:
    """Per-module (rank, alpha) of a kohya LoRA/LoCon file (for resized, per-layer-rank files)."""
    ranks: dict[str, tuple[int, float | None]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            alpha_t = tensors.get(f"{name}.alpha")
            ranks[name] = (int(value.shape[0]), None if alpha_t is None else float(alpha_t.float()))
    return ranks
