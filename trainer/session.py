"""The first phase of a run: accelerate, the seed, and the dtypes everything else uses.

One object instead of loose locals so that the later phases (models, data, network, loop) take
what they need by name and can be read one at a time.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError
from trainer.precision import compute_dtype, network_dtype


@dataclass
class Session:
    """accelerate's Accelerator plus the run-wide decisions made before any model is loaded.

    Attributes:
        weight_dtype: the frozen UNet and text encoders (`--mixed_precision`; float32 on a CPU for fp16).
        vae_dtype: the VAE (float32 with `--no_half_vae`).
        net_dtype: the network's storage (`--full_fp16`/`--full_bf16`; float32 otherwise).
        warnings: every "accepted without effect" and fallback message of the run.
    """

    cfg: Any
    accelerator: Any
    seed: int
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    net_dtype: torch.dtype
    started: float
    warnings: list[str] = field(default_factory=list)
    setup_seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, fn, *args):
        """Run one setup phase and record its seconds (reported once the loop starts)."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.setup_seconds[phase] = round(time.perf_counter() - start, 2)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        """One line on stderr from the main process (stdout stays clean for `--json` callers)."""
        if self.main:
            print(message, file=sys.stderr, flush=True)

    @classmethod
    def start(cls, cfg: Any) -> Session:
        from accelerate.utils import set_seed

        if not cfg.output_dir:
            raise UsageError("--output_dir is required (where the trained files go)")
        started = time.time()
        accelerator = make_accelerator(cfg)
        seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**32 - 1)
        set_seed(seed)
        warnings = list(getattr(cfg, "warnings", []) or [])
        weight_dtype = compute_dtype(cfg.mixed_precision)
        if weight_dtype == torch.float16 and accelerator.device.type == "cpu":
            warnings.append("--mixed_precision fp16 needs a GPU; on the CPU the frozen models stay in float32 "
                            "(use bf16 for half precision on CPUs)")
            weight_dtype = torch.float32
        vae_dtype = torch.float32 if cfg.no_half_vae else weight_dtype
        return cls(cfg, accelerator, seed, weight_dtype, vae_dtype, network_dtype(cfg), started, warnings)


def make_accelerator(cfg: Any):
    """accelerate's Accelerator for this run: mixed precision, accumulation, trackers.

    accelerate keeps its state per process and refuses a second run with another precision or
    device; the previous run's state is forgotten first (the process group of a distributed
    launch stays: `accelerate launch` set it up for the whole process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    log_with = cfg.log_with or ("tensorboard" if cfg.logging_dir else None)
    project = None
    if log_with:
        if not cfg.logging_dir:
            raise UsageError(f"--log_with {log_with} needs --logging_dir (where the logs go)")
        run_dir = Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
        if log_with in ("wandb", "all"):
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UsageError("--log_with wandb needs the wandb package (pip install wandb)") from None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Several processes without a GPU (accelerate launch / torchrun on CPUs): DDP over gloo.
    cpu_ddp = not torch.cuda.is_available() and distributed
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cpu_ddp,
                       mixed_precision=cfg.mixed_precision or "no",
                       log_with=None if not log_with else ("all" if log_with == "all" else [log_with]),
                       project_config=project)
