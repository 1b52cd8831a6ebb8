"""`--network_module lycoris.kohya`: LyCORIS algorithms (locon, loha, lokr, ia3, full, dylora, ...)
through the lycoris-lora package, behind the same surface as `LoRANetwork`.

What this adapter adds around `lycoris.kohya.create_network` (spec 5, "pitfalls"):
- a preset naming a layer that one of its classes already wraps (`full`: `TimestepEmbedding` and
  `time_embedding.linear_1`) would wrap it twice on SD1/SD2: the name entry is dropped;
- presets are class-level state in lycoris: the preset is applied right before each network;
- on SDXL the UNet is a diffusers model here but an SGM model in sd-scripts, whose class/name
  targets (`TimestepEmbedding`, `conv_in`, `conv_out`, `time_embedding.*`) do not exist there:
  they are removed so the module set equals what sd-scripts + LyCORIS write;
- `attn-only` names kohya's attention classes; diffusers' `Attention` is added so it trains the
  UNet at all;
- lycoris names modules by the diffusers path (and without `text_model_` under transformers
  5); saved names are mapped to kohya form (SGM paths for the SDXL UNet) and back on load;
- `rank_dropout_scale` is not forwarded by lycoris' create_network: it is set on the modules;
- the `ia3` preset's leaf names are anchored as path suffixes (lycoris' `re.match` on whole
  paths makes the built-in preset wrap nothing).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from loratools.errors import UsageError
from loratools.keys.naming import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX
from trainer.network.fast import FactorPair, MaxNormGroup, lean_forward
from trainer.network.names import KohyaNamer

#: network_args lycoris.kohya accepts but never reads (the Hungarian guide passes them).
IGNORED_BY_LYCORIS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                      "mid_lr_weight", "up_lr_weight", "use_reentrant", "block_lr_zero_threshold")
_SGM_MISSING_CLASSES = ("TimestepEmbedding",)
_SGM_MISSING_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def _import_lycoris():
    """`lycoris.kohya` and its PRESET table, with lycoris' log lines sent to stderr: its logger
    writes to stdout (a handler built at import time), which would corrupt `--json` output and
    users' pipes. The handler's stream is swapped; site-packages stay untouched."""
    try:
        from lycoris import kohya as lyco_kohya
        from lycoris.config import PRESET
    except ImportError:
        raise UsageError("--network_module lycoris.kohya needs the lycoris-lora package "
                         "(pip install 'lycoris-lora>=4.1,<5')") from None
    for handler in logging.getLogger("LyCORIS").handlers:  # only lycoris' own handler (its formatter)
        if isinstance(handler, logging.StreamHandler) and type(handler.formatter).__module__.startswith("lycoris"):
            handler.setStream(sys.stderr)
    return lyco_kohya, PRESET


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


class LycorisAdapter(nn.Module):
    """A lycoris-lora network with kohya names and the loop's interface."""

    def __init__(self, arch: str, unet, text_encoders, dim: int | None, alpha: float | None, dropout: float | None,
                 args: Mapping[str, str], *, train_unet: bool, train_text_encoder: bool,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        lyco_kohya, presets = _import_lycoris()
        self.arch = arch
        self.ignored = [f"network_args {k} is ignored by lycoris.kohya (sd-scripts + LyCORIS ignore it too)"
                        for k in IGNORED_BY_LYCORIS if k in args]
        kwargs = {k: v for k, v in args.items() if k not in IGNORED_BY_LYCORIS}
        if dropout is not None and "dropout" not in kwargs:
            kwargs["dropout"] = str(dropout)
        preset_name = kwargs.get("preset", "full")
        if preset_name in presets:
            preset = copy.deepcopy(presets[preset_name])
        else:
            from lycoris.utils.preset import read_preset

            preset = read_preset(preset_name)
            if preset is None:
                raise UsageError(f"network_args preset={preset_name}: not a built-in preset "
                                 f"({', '.join(presets)}) nor a readable preset TOML file")
        if arch == "sdxl":
            preset["unet_target_module"] = [m for m in preset.get("unet_target_module", [])
                                            if m not in _SGM_MISSING_CLASSES]
            preset["unet_target_name"] = [n for n in preset.get("unet_target_name", []) if n not in _SGM_MISSING_NAMES]
        preset = _drop_names_inside_target_classes(preset, unet)
        if preset_name == "ia3" and not preset.get("use_fnmatch"):
            preset = _anchor_ia3_names(preset)
        if preset_name == "attn-only":
            preset["unet_target_module"] = list(preset.get("unet_target_module", [])) + ["Attention"]
        lyco_kohya.LycorisNetworkKohya.apply_preset(preset)
        kwargs["preset"] = "__applied__"
        # create_network re-applies the named preset; hand it ours instead.
        original = lyco_kohya.PRESET
        lyco_kohya.PRESET = {**original, "__applied__": preset}
        try:
            te_arg = list(text_encoders) if len(text_encoders) > 1 else text_encoders[0]
            with contextlib.redirect_stdout(sys.stderr):  # LoHa/LoKr print() warnings while building
                self.net = lyco_kohya.create_network(1.0, dim, alpha, None, te_arg, unet, warn_on_unmatched=False,
                                                     **kwargs)
        except AssertionError as exc:  # lycoris validates its arguments with asserts
            raise UsageError(f"lycoris.kohya rejected the network_args: {exc}") from None
        finally:
            lyco_kohya.PRESET = original
        self.net.apply_to(te_arg, unet, apply_text_encoder=train_text_encoder, apply_unet=train_unet)
        if _truthy(args.get("rank_dropout_scale", "false")):
            for module in self.net.loras:
                module.rank_dropout_scale = True
        self._lean = [lora for lora in self.net.loras if _install_lean_forward(lora)]
        lean_ids = {id(lora) for lora in self._lean}
        self._other = [lora for lora in self.net.loras if id(lora) not in lean_ids]
        self._max_norm = MaxNormGroup(lambda: [FactorPair(m.lora_up.weight, m.lora_down.weight, m.scale)
                                               for m in self._lean])
        self._to_kohya = self._name_map(unet, text_encoders)
        self._from_kohya = {v: k for k, v in self._to_kohya.items()}
        if weights is not None:
            self.load_kohya_state_dict(weights)

    def _name_map(self, unet, text_encoders) -> dict[str, str]:
        """lycoris module name -> kohya module name, for every wrapped module. lycoris names a
        module by its own prefix + the live module path with `_` (`lora_te1_`/`lora_te2_` when it
        gets two text encoders, `lora_te_` for one): looked up in the models' own module lists,
        then named by the one vocabulary."""
        namer = KohyaNamer(self.arch, unet, text_encoders)
        components = [(UNET_PREFIX, unet, namer.unet)]
        te_names = [TE1_PREFIX, TE2_PREFIX] if len(text_encoders) > 1 else [TE_PREFIX]
        components += [(p, te, lambda path, i=i: namer.text_encoder(i, path))
                       for i, (p, te) in enumerate(zip(te_names, text_encoders))]
        wrapped = {lora.lora_name for lora in self.net.loras}
        out: dict[str, str] = {}
        for prefix, model, name_of in components:
            for path, _ in model.named_modules():
                name = prefix + path.replace(".", "_")
                if path and name in wrapped:
                    out[name] = name_of(path)
        return out

    # -- loop interface -------------------------------------------------------------------

    def apply_to(self) -> None:
        """The modules were patched in at construction (lycoris patches while registering)."""

    def module_count(self) -> int:
        return len(self.net.loras)

    def set_multiplier(self, multiplier: float) -> None:
        self.net.set_multiplier(multiplier)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        if isinstance(text_encoder_lr, (list, tuple)):
            if len(set(text_encoder_lr)) > 1:
                self.ignored.append("lycoris.kohya uses one learning rate for all text encoders; the first is used")
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        return self.net.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    def apply_max_norm_regularization(self, max_norm_value: float) -> tuple[int, float, float]:
        """LoRA-form modules in one batched pass (`fast.MaxNormGroup`); other algorithms through
        their own LyCORIS `apply_max_norm`. Returns (keys scaled, mean and max norm of the scaled)."""
        scaled, mean, peak = self._max_norm.apply(max_norm_value)
        if not self._other:
            return scaled, mean, peak
        device = next(self.parameters()).device
        norms = [mean] * len(self._lean) if self._lean else []
        for module in self._other:
            hit, norm = module.apply_max_norm(max_norm_value, device)
            if hit is None:
                continue
            scaled += int(hit)
            norms.append(float(norm))
        return scaled, sum(norms) / max(1, len(norms)), max([peak, *norms])

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The file content sd-scripts + LyCORIS write, with kohya module names, float32 on CPU."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.net.state_dict().items():
            name, _, suffix = key.partition(".")
            value = value.detach()
            if value.device.type != "meta":
                value = value.float().cpu().contiguous()
            out[f"{self._to_kohya.get(name, name)}.{suffix}"] = value
        return out

    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        renamed = {}
        unknown = []
        for key, value in tensors.items():
            name, _, suffix = key.partition(".")
            if name not in self._from_kohya:
                unknown.append(name)
                continue
            renamed[f"{self._from_kohya[name]}.{suffix}"] = value
        result = self.net.load_state_dict(renamed, strict=False)
        if result.unexpected_keys:
            raise UsageError(f"network weights do not fit the chosen algorithm (first unexpected key: "
                             f"{result.unexpected_keys[0]}); use the same algo/preset as the file")
        return sorted(set(unknown))


def _install_lean_forward(lora) -> bool:
    """Give a plain LyCORIS LoCon/LoRA module the lean fused forward of `trainer.network.fast`
    (same ΔW = up·down·alpha/rank; LyCORIS' own forward rebuilds the full weight each call).
    Modules with dropout, rank/module dropout, Tucker, DoRA, a trainable scalar, a grouped conv
    or a quantised base keep LyCORIS' forward."""
    if type(lora).__name__ != "LoConModule" or getattr(lora, "tucker", False) or getattr(lora, "wd", False):
        return False
    if isinstance(getattr(lora, "scalar", None), nn.Parameter) or getattr(lora, "is_quant", False):
        return False
    dropout = lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0  # nn.Identity when 0
    if dropout or float(lora.rank_dropout or 0) or float(lora.module_dropout or 0):
        return False
    org = lora.org_module[0]
    if type(org) not in (nn.Linear, nn.Conv2d) or getattr(org, "groups", 1) != 1:
        return False
    forward = lean_forward(lora.org_forward, lora.lora_down, lora.lora_up, lambda: lora.multiplier * lora.scale)
    lora.forward = forward
    org.forward = forward
    return True


def _drop_names_inside_target_classes(preset: dict, unet) -> dict:
    """Remove target names that a target class already wraps. lycoris' `full` preset lists both
    the `TimestepEmbedding` class and `time_embedding.linear_1/2`; on SD1/SD2 both match the
    same layers and lycoris stops with "duplicated lora name". Real SD1.5 LyCORIS files hold each
    of `lora_unet_time_embedding_linear_1/2` once (same name either way), so the name entry goes."""
    classes = set(preset.get("unet_target_module", []))
    inside: set[str] = set()
    for path, module in unet.named_modules():
        if path and type(module).__name__ in classes:
            inside.update(f"{path}.{sub}" for sub, _ in module.named_modules() if sub)
    out = dict(preset)
    out["unet_target_name"] = [n for n in preset.get("unet_target_name", []) if n not in inside]
    return out


def _anchor_ia3_names(preset: dict) -> dict:
    """lycoris' `ia3` preset lists leaf names (`to_k`, `mlp.fc2`) but matches them with `re.match`
    against whole module paths, so on its own it wraps nothing; match them as path suffixes."""
    import re

    def anchor(name: str) -> str:
        return rf"(.*\.)?{re.escape(name)}$"

    out = dict(preset)
    for key in ("unet_target_name", "text_encoder_target_name"):
        out[key] = [anchor(n) for n in preset.get(key, [])]
    out["name_algo_map"] = {anchor(k): v for k, v in preset.get("name_algo_map", {}).items()}
    return out
