"""Network construction: built-in LoRA/LoCon (`networks.lora`) or LyCORIS (`lycoris.kohya`).

Both expose the same surface to the loop: `apply_to()`, `prepare_optimizer_params(te_lr, unet_lr,
default_lr) -> (groups, descriptions)`, `apply_max_norm_regularization(x)`, `kohya_state_dict()`
(kohya names, float32), `set_multiplier(m)`, `train()/eval()`, `parameters()`, and `ignored`
(network_args that had no effect, for warnings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loratools.errors import UsageError


_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def create_network(cfg: Any, arch: str, unet, text_encoders, network_args: Mapping[str, str], *,
                   train_unet: bool, train_text_encoder: bool,
                   weights: Mapping[str, torch.Tensor] | None = None):
    """Build the network `cfg.network_module` names over the given models (not yet applied)."""
    module = cfg.network_module or "networks.lora"
    if module == "lycoris.kohya" or module == "networks.dylora":
        from trainer.network.lycoris_net import LycorisAdapter

        args = dict(network_args)
        if module == "networks.dylora":
            args.setdefault("algo", "dylora")
        for attr in _LORAPLUS:  # the --loraplus_* flags; network_args win, as in sd-scripts
            if getattr(cfg, attr, None) is not None:
                args.setdefault(attr, str(getattr(cfg, attr)))
        return LycorisAdapter(arch, unet, text_encoders, cfg.network_dim, cfg.network_alpha, cfg.network_dropout,
                              args, train_unet=train_unet, train_text_encoder=train_text_encoder, weights=weights)
    if module in ("networks.lora", "locon.locon_kohya"):
        from trainer.network.network import LoRANetwork, NetworkOptions

        args = dict(network_args)
        if module == "locon.locon_kohya" and "conv_dim" not in args:
            args["conv_dim"] = str(cfg.network_dim or 4)
            args.setdefault("conv_alpha", str(cfg.network_alpha))
        opts = NetworkOptions.from_args(arch, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, args)
        for attr in _LORAPLUS:
            if getattr(cfg, attr, None) is not None and getattr(opts, attr) is None:
                setattr(opts, attr, getattr(cfg, attr))
        return LoRANetwork(arch, unet, text_encoders, opts, train_unet=train_unet,
                           train_text_encoder=train_text_encoder, weights=weights)
    raise UsageError(f"unknown --network_module {module}; use networks.lora or lycoris.kohya")
