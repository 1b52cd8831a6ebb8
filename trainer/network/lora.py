"""LoRA / LoCon modules with sd-scripts' `networks.lora` maths and initialisation.

Why our own: the saved layout (`lora_down.weight`, `lora_up.weight`, `alpha`) and the numerics
(kaiming init of down, zero up, scale = alpha / rank, rank/module dropout, max-norm) must match
sd-scripts exactly, and we need deterministic control over module names (spec 1.7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.network.fast import FactorPair, MaxNormGroup, lean_forward


class LoRAModule(nn.Module):
    """One LoRA/LoCon adapter patched into the forward of a frozen Linear or Conv2d.

    forward(x) = org(x) + up(dropout(down(x))) * multiplier * scale, scale = alpha / rank.
    A Conv2d keeps its kernel/stride/padding on `lora_down` and gets a 1x1 `lora_up`.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        lora_dim: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                org_module.in_channels, self.lora_dim, org_module.kernel_size,
                org_module.stride, org_module.padding, bias=False,
            )
            self.lora_up: nn.Module = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = self.lora_dim if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Kept outside the module tree so that the base weights never enter our state_dict.
        self._org: list[nn.Module] = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base module's forward through this adapter (the lean fused form when no
        dropout of any kind is configured: `trainer.network.fast`)."""
        self._org_forward = self.org_module.forward
        if self.dropout or self.rank_dropout or self.module_dropout:
            self.org_module.forward = self.forward
        else:
            self.org_module.forward = lean_forward(self._org_forward, self.lora_down, self.lora_up,
                                                   lambda: self.multiplier * self.scale)

    def restore(self) -> None:
        """Undo `apply_to` (used by tests and by sampling without the adapter)."""
        if self._org_forward is not None:
            self.org_module.forward = self._org_forward
            self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org_forwarded = self._org_forward(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_forwarded
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))
        lx = self.lora_up(lx)
        return org_forwarded + (lx * self.multiplier * scale).to(org_forwarded.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = up·down·scale in float32, in the base weight's shape (3x3 conv: composed kernels)."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if up.dim() == 2:
            return (up @ down) * self.scale
        if down.shape[2:] == (1, 1):
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * self.scale
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * self.scale


def apply_max_norm(modules: list[LoRAModule], max_norm_value: float) -> tuple[int, float, float]:
    """sd-scripts' `--scale_weight_norms`: clamp ‖ΔW‖_F of every module to `max_norm_value`
    (`fast.MaxNormGroup`: r x r Gram matrices, batched, one synchronisation). Returns
    (keys_scaled, mean of the post-scaling norms, max of them), as sd-scripts logs them."""
    return MaxNormGroup(lambda: [factor_pair(m) for m in modules]).apply(max_norm_value)


def factor_pair(module: LoRAModule) -> FactorPair:
    return FactorPair(module.lora_up.weight, module.lora_down.weight, module.scale)
