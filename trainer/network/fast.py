"""The hot path of LoRA-form modules (kohya LoRA/LoCon, LyCORIS `locon`/`lora` without extras).

Why this exists: a training step of SD/SDXL on a fast GPU is bound by the host (Python and kernel
launches), not by the GPU (measured: a plain diffusers loop takes the same time at batch 1 and 4
on an H200). Every adapter module runs once per forward, again in the recomputation of gradient
checkpointing, and once in the backward, so what it launches is paid ~3000 times a step for a
1000-module network. Two things here cut that:

- `lean_forward`: y = org(x) + c · up(down(x)) with the up-projection, the scale and the residual
  add fused into one GEMM (`addmm(base, h, upᵀ, alpha=c)`; 3 kernels instead of 5) for linear
  layers, and `add(base, up(h), alpha=c)` for convolutions. LyCORIS' own LoCon forward without
  `bypass_mode` builds the full weight delta and runs a second full-size matmul/convolution
  (twice the layer's FLOPs and an out x in temporary per module per call); it is replaced by this
  forward where its options allow (no dropout, rank/module dropout, Tucker, DoRA, scalar).
- `MaxNormGroup`: sd-scripts' `--scale_weight_norms` needs ‖ΔW‖_F of every module every step.
  LyCORIS forms each full ΔW and synchronises twice per module (`.cpu()`), 2000+ host-device
  round trips a step for the pony recipe; here ‖U·D‖²_F = Σ (UᵀU) ⊙ (DDᵀ) (r x r Gram matrices)
  for all modules of one shape in one batched matmul, and the step synchronises once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def lean_forward(org_forward: Callable[[torch.Tensor], torch.Tensor], down: nn.Module, up: nn.Module,
                 coefficient: Callable[[], float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward of an adapted layer: `org_forward(x) + coefficient() · up(down(x))`.

    Args:
        org_forward: the frozen layer's own forward (Linear or Conv2d).
        down: `nn.Linear(in, r)` or `nn.Conv2d(in, r, k, stride, padding)` (bias-free).
        up: `nn.Linear(r, out)` or a 1x1 `nn.Conv2d(r, out)` (bias-free).
        coefficient: multiplier x alpha / rank, read at each call (the multiplier can change).
    Returns:
        A function of `x` to install as the layer's forward.
    """
    if isinstance(down, nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            base = org_forward(x)
            wd, wu = down.weight, up.weight
            if not torch.is_autocast_enabled(x.device.type) and x.dtype != wd.dtype:
                h = F.linear(x.to(wd.dtype), wd).to(base.dtype)
                wu = wu.to(base.dtype)
            else:
                h = F.linear(x, wd)
            if base.dim() == 2:
                return torch.addmm(base, h, wu.t(), alpha=coefficient())
            return torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), wu.t(),
                               alpha=coefficient()).view(base.shape)
        return forward

    def conv_forward(x: torch.Tensor) -> torch.Tensor:
        base = org_forward(x)
        wd = down.weight
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != wd.dtype:
            y = up(down(x.to(wd.dtype))).to(base.dtype)
        else:
            y = up(down(x))
        return torch.add(base, y, alpha=coefficient())
    return conv_forward


@dataclass
class FactorPair:
    """One LoRA-form module as the max-norm step sees it: its factors and alpha / rank."""

    up: torch.Tensor  # (out, r[, 1, 1])
    down: torch.Tensor  # (r, in[, kh, kw])
    scale: float


class MaxNormGroup:
    """sd-scripts' `--scale_weight_norms X` over many LoRA-form modules at once.

    For each module: norm = max(‖scale·U·D‖_F, X/2), ratio = min(norm, X) / norm; if ratio < 1 both
    factors are multiplied by √ratio (sd-scripts' networks.lora; LyCORIS multiplies a hidden
    `scalar` instead, which gives the same ΔW but slows that module's later learning, so this
    trainer uses one rule for every LoRA-form module). Returns sd-scripts' log values:
    (keys scaled, mean and max of the norms after scaling).
    """

    def __init__(self, pairs: Callable[[], Sequence[FactorPair]]) -> None:
        self._pairs = pairs

    @torch.no_grad()
    def apply(self, max_norm: float) -> tuple[int, float, float]:
        pairs = list(self._pairs())
        if not pairs:
            return 0, 0.0, 0.0
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault((p.up.shape[0], p.up.shape[1], p.down[0].numel(), p.up.dtype, p.up.device), []).append(i)
        device = pairs[0].up.device
        norms = torch.empty(len(pairs), device=device, dtype=torch.float32)
        for (out, rank, fan_in, _, _), members in groups.items():
            ups = torch.stack([pairs[i].up.reshape(out, rank) for i in members]).float()
            downs = torch.stack([pairs[i].down.reshape(rank, fan_in) for i in members]).float()
            gram = (ups.transpose(1, 2) @ ups) * (downs @ downs.transpose(1, 2))
            scales = torch.tensor([pairs[i].scale for i in members], device=device)
            index = torch.tensor(members, device=device)
            norms.index_copy_(0, index, gram.sum(dim=(1, 2)).clamp_min(0).sqrt() * scales.abs())
        clamped = norms.clamp(min=max_norm / 2)
        ratio = clamped.clamp(max=max_norm) / clamped
        scaled = ratio != 1
        summary = torch.stack([scaled.sum().float(), (norms * ratio).mean(), (norms * ratio).max()])
        count, mean, peak = summary.tolist()  # the step's one synchronisation
        if count:
            roots = ratio.sqrt()
            for i in torch.nonzero(scaled).flatten().tolist():
                pairs[i].up.mul_(roots[i].to(pairs[i].up.dtype))
                pairs[i].down.mul_(roots[i].to(pairs[i].down.dtype))
        return int(count), float(mean), float(peak)
