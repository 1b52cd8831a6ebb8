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

    The work per step is a fixed handful of operators per group of modules with one shape (34 groups
    for the pony recipe's 1052 modules): the grouping, the module indices and the scales are built
    once and kept on the device (a list turned into a device tensor every step is a host-to-device
    copy from pageable memory, which waits for the GPU), factors are stacked and written back per
    group, and the step synchronises once.
    """

    def __init__(self, pairs: Callable[[], Sequence[FactorPair]]) -> None:
        self._pairs = pairs
        self._plan: tuple[tuple, list[_ShapeGroup]] | None = None

    def _groups(self, pairs: Sequence[FactorPair]) -> list[_ShapeGroup]:
        signature = tuple((p.up.shape, p.down.shape, p.up.dtype, p.up.device, p.scale) for p in pairs)
        if self._plan is None or self._plan[0] != signature:
            members: dict[tuple, list[int]] = {}
            for i, (up_shape, down_shape, dtype, device, _) in enumerate(signature):
                members.setdefault((up_shape, down_shape, dtype, device), []).append(i)
            groups = [_ShapeGroup(idx, torch.tensor(idx, device=key[3]),
                                  torch.tensor([abs(pairs[i].scale) for i in idx], device=key[3]))
                      for key, idx in members.items()]
            self._plan = (signature, groups)
        return self._plan[1]

    @torch.no_grad()
    def apply(self, max_norm: float) -> tuple[int, float, float]:
        pairs = list(self._pairs())
        if not pairs:
            return 0, 0.0, 0.0
        groups = self._groups(pairs)
        norms = torch.empty(len(pairs), device=pairs[0].up.device, dtype=torch.float32)
        stacks = []
        for group in groups:
            first = pairs[group.members[0]]
            out, rank = first.up.shape[0], first.up.shape[1]
            ups = torch.stack([pairs[i].up for i in group.members]).float()
            downs = torch.stack([pairs[i].down for i in group.members]).float()
            u, d = ups.view(len(group.members), out, rank), downs.view(len(group.members), rank, -1)
            gram = (u.transpose(1, 2) @ u) * (d @ d.transpose(1, 2))
            norms.index_copy_(0, group.index, gram.sum(dim=(1, 2)).clamp_min(0).sqrt() * group.scales)
            stacks.append((ups, downs))
        clamped = norms.clamp(min=max_norm / 2)
        ratio = clamped.clamp(max=max_norm) / clamped
        scaled = ratio != 1
        after = norms * ratio
        summary = torch.cat([torch.stack([after.mean(), after.max()]), scaled.float()])
        mean, peak, *flags = summary.tolist()  # the step's one synchronisation
        count = int(sum(flags))
        if count:
            roots = ratio.sqrt()
            for group, (ups, downs) in zip(groups, stacks):
                if not any(flags[i] for i in group.members):
                    continue
                factor = roots.index_select(0, group.index).view(-1, *[1] * (ups.dim() - 1))
                targets_up = [pairs[i].up for i in group.members]
                targets_down = [pairs[i].down for i in group.members]
                torch._foreach_copy_(targets_up, list(ups.mul_(factor).unbind()))  # x1 where not scaled: exact
                torch._foreach_copy_(targets_down, list(downs.mul_(factor).unbind()))
        return count, float(mean), float(peak)


@dataclass
class _ShapeGroup:
    """Modules whose factors share shapes, dtype and device: stacked together each step."""

    members: list[int]
    index: torch.Tensor  # members, on the device
    scales: torch.Tensor  # |alpha / rank| of each member, on the device
