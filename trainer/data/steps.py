"""sd-scripts' step arithmetic and its startup summary, shared by the loop and ``--dry-run``.

Users plan runs with these numbers ("images x repeats x epochs / (batch x accumulation)"), and
sd-scripts computes them with two different roundings (before and after accelerate shards the
DataLoader), so both are reproduced here in one place (train-spec 2.3). No torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """How many batches, optimizer steps and epochs a run has."""

    num_train_images: int
    num_reg_images: int
    num_validation_images: int
    batches_per_epoch: int
    batches_per_epoch_per_process: int
    batch_sizes: tuple[int, ...]
    train_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int

    @property
    def effective_batch_size(self) -> int:
        """``ss_total_batch_size``: train_batch_size x processes x accumulation."""
        return self.train_batch_size * self.num_processes * self.gradient_accumulation_steps

    def summary_rows(self) -> list[tuple[str, str]]:
        """The startup summary sd-scripts prints, as (label, value) rows."""
        return [
            ("num train images * repeats", str(self.num_train_images)),
            ("num validation images * repeats", str(self.num_validation_images)),
            ("num reg images", str(self.num_reg_images)),
            ("num batches per epoch", str(self.batches_per_epoch_per_process)),
            ("num epochs", str(self.num_epochs)),
            ("batch size per device", ", ".join(map(str, self.batch_sizes))),
            ("gradient accumulation steps", str(self.gradient_accumulation_steps)),
            ("processes", str(self.num_processes)),
            ("effective batch size", str(self.effective_batch_size)),
            ("optimizer steps per epoch", str(self.steps_per_epoch)),
            ("total optimization steps", str(self.max_train_steps)),
        ]


def num_processes_from_env() -> int:
    """The process count ``accelerate launch`` (or torchrun) announces; 1 for a plain run."""
    for name in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def plan_steps(*, batches_per_epoch: int, max_train_steps: int, max_train_epochs: int | None,
               gradient_accumulation_steps: int, num_processes: int = 1, train_batch_size: int = 1,
               batch_sizes: tuple[int, ...] = (), num_train_images: int = 0, num_reg_images: int = 0,
               num_validation_images: int = 0) -> StepPlan:
    """sd-scripts' numbers for a run.

    ``max_train_epochs`` overrides steps as ``epochs x ceil(batches / processes / accumulation)``
    (computed on the unsharded DataLoader); optimizer steps per epoch are
    ``ceil(ceil(batches / processes) / accumulation)`` (the sharded DataLoader), and the epoch
    count is ``ceil(max_train_steps / steps per epoch)``; training stops mid-epoch at max_train_steps.

    Example:
        >>> plan_steps(batches_per_epoch=10, max_train_steps=400, max_train_epochs=None,
        ...            gradient_accumulation_steps=3).num_epochs
        100
    """
    if batches_per_epoch < 1:
        raise ValueError("a dataset with no batches has no steps")
    if max_train_epochs is not None:
        max_train_steps = max_train_epochs * math.ceil(batches_per_epoch / num_processes / gradient_accumulation_steps)
    per_process = math.ceil(batches_per_epoch / num_processes)
    steps_per_epoch = math.ceil(per_process / gradient_accumulation_steps)
    return StepPlan(
        num_train_images=num_train_images, num_reg_images=num_reg_images,
        num_validation_images=num_validation_images, batches_per_epoch=batches_per_epoch,
        batches_per_epoch_per_process=per_process, batch_sizes=batch_sizes or (train_batch_size,),
        train_batch_size=train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        num_processes=num_processes, steps_per_epoch=steps_per_epoch, max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / steps_per_epoch),
    )


def plan_for_layouts(cfg, layouts, *, num_validation_images: int = 0, num_processes: int | None = None) -> StepPlan:
    """``plan_steps`` for the datasets of a run (``layouts`` from ``trainer.data.layout.build_layouts``)."""
    return plan_steps(
        batches_per_epoch=sum(layout.batches_per_epoch for layout in layouts),
        max_train_steps=cfg.max_train_steps, max_train_epochs=cfg.max_train_epochs,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_processes=num_processes if num_processes is not None else num_processes_from_env(),
        train_batch_size=cfg.train_batch_size, batch_sizes=tuple(layout.spec.batch_size for layout in layouts),
        num_train_images=sum(layout.num_train_images for layout in layouts),
        num_reg_images=sum(layout.num_reg_images for layout in layouts),
        num_validation_images=num_validation_images,
    )
