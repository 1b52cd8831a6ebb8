"""Precision of the frozen models and of the network: dtypes, and float32 master weights.

`--full_fp16` / `--full_bf16` put the network's own weights in half precision, so its forward and
backward run without autocast casts. The optimizer must not step those half weights directly:
AdamW's eps (1e-8) and the square of small gradients are 0 in fp16, and a fresh LoRA's down
factors get exactly zero gradients (its up factors are zero), so the first update is 0/0 = NaN
(reproduced on a CPU: one AdamW step on an fp16 zero gradient gives NaN). Updates of 1e-4 x lr are
also below the fp16/bf16 resolution of typical weights. So the optimizer owns float32 master copies:
after each backward the half gradients are copied into them, the optimizer (and the grad scaler,
which then sees float32 gradients and skips non-finite steps) works on float32, and the result is
copied back into the half weights, as mixed-precision training with master weights does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def compute_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype of `--mixed_precision` ("fp16", "bf16"; anything else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def network_dtype(cfg) -> torch.dtype:
    """The network's storage dtype: fp16 / bf16 with `--full_fp16` / `--full_bf16`, else float32."""
    return torch.float16 if cfg.full_fp16 else torch.bfloat16 if cfg.full_bf16 else torch.float32


class MasterWeights:
    """Float32 copies of half-precision trainable parameters, for the optimizer.

    Args:
        params: the network's trainable parameters (fp16/bf16).
    Use `groups(param_groups)` to hand the optimizer the masters, `pull_grads()` after the
    backward (before clipping and the optimizer step), `push()` after the step; anything that edits
    the weights between steps (`--scale_weight_norms`) runs inside `editing_masters()`.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.model = list(params)
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model]
        self._by_id = {id(p): m for p, m in zip(self.model, self.master)}
        self._grads: list[torch.Tensor] | None = None  # float32 gradient buffers, allocated once
        # detached aliases for `editing_masters`, made once: a detach per parameter and step is
        # 2000+ dispatcher calls for the pony recipe
        self._halves = [p.detach() for p in self.model]
        self._masters = [m.detach() for m in self.master]

    def groups(self, param_groups: list[dict]) -> list[dict]:
        """The same groups with each parameter replaced by its float32 master."""
        return [{**g, "params": [self._by_id[id(p)] for p in g["params"]]} for g in param_groups]

    @torch.no_grad()
    def pull_grads(self) -> None:
        """master.grad = float32(model.grad) for every parameter that has a gradient; the half
        gradients are released (they are accumulated again from zero next step)."""
        if self._grads is None:  # the optimizer's zero_grad(set_to_none) drops them; these come back
            self._grads = [torch.empty_like(m) for m in self.master]
        pairs = [(p, g) for p, g in zip(self.model, self._grads) if p.grad is not None]
        if pairs:
            torch._foreach_copy_([g for _, g in pairs], [p.grad for p, _ in pairs])
        for m, p, g in zip(self.master, self.model, self._grads):
            if p.grad is not None:
                m.grad = g
                p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Copy the updated masters into the half-precision weights the network computes with."""
        torch._foreach_copy_(self.model, self.master)

    @contextlib.contextmanager
    def editing_masters(self) -> Iterator[None]:
        """The network's parameters hold the float32 masters' storage while the block runs, so code
        that edits module weights in place (max-norm scaling, LyCORIS' own `apply_max_norm`) edits
        what the optimizer steps; `push()` afterwards gives the half weights the result. Editing
        the half weights instead would be undone by the next `push()`."""
        if any(p.data_ptr() != h.data_ptr() for p, h in zip(self.model, self._halves)):  # storage replaced since
            self._halves = [p.detach() for p in self.model]
        for p, m in zip(self.model, self._masters):
            p.data = m
        try:
            yield
        finally:
            for p, half in zip(self.model, self._halves):
                p.data = half

    @torch.no_grad()
    def reload(self) -> None:
        """Masters from the network's weights (after a checkpoint was loaded into the network)."""
        torch._foreach_copy_(self.master, self.model)
