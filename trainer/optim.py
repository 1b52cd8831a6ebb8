"""Optimizers and LR schedules under sd-scripts' names and rules (spec 1.8).

Optional packages (bitsandbytes, lion-pytorch, dadaptation, prodigyopt, schedulefree) are
imported only when their optimizer is chosen, and a missing one is a UsageError naming the
pip package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from loratools.errors import UsageError

#: lower-cased sd-scripts name -> (module, class, extra default kwargs, pip package)
_OPTIMIZERS: dict[str, tuple[str, str, dict[str, Any], str | None]] = {
    "adamw": ("torch.optim", "AdamW", {}, None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", {}, "bitsandbytes"),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW", {}, "bitsandbytes"),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}, "bitsandbytes"),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}, "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", {}, "bitsandbytes"),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}, "bitsandbytes"),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit", {"nesterov": True, "momentum": 0.9}, "bitsandbytes"),
    "lion": ("lion_pytorch", "Lion", {}, "lion-pytorch"),
    "sgdnesterov": ("torch.optim", "SGD", {"nesterov": True, "momentum": 0.9}, None),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", {}, "dadaptation"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", {}, "dadaptation"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", {}, "dadaptation"),
    "dadaptadam": ("dadaptation", "DAdaptAdam", {}, "dadaptation"),
    "dadaptadan": ("dadaptation", "DAdaptAdan", {}, "dadaptation"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", {}, "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", {}, "dadaptation"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", {}, "dadaptation"),
    "prodigy": ("prodigyopt", "Prodigy", {}, "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", {}, None),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", {}, "schedulefree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", {}, "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", {}, "schedulefree"),
}


@dataclass
class OptimizerInfo:
    """The optimizer plus what metadata, logging and the loop need to know about it."""

    optimizer: torch.optim.Optimizer
    name: str  # module.Class, as ss_optimizer writes it
    kwargs: dict[str, Any]
    adaptive: bool  # D-Adaptation / Prodigy: log d*lr
    schedule_free: bool
    lr_scheduler: str  # possibly rewritten to adafactor:<lr>

    @property
    def ss_optimizer(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return self.name + (f"({args})" if args else "")


def _import_class(module: str, cls: str, package: str | None):
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UsageError(f"optimizer {cls} needs the {package or module} package; install it with "
                         f"`pip install {package or module}` or pick another --optimizer_type") from None


#: torch optimizers with a fused implementation: one kernel group per step instead of several per
#: parameter, and with a grad scaler no host synchronisation (the skip happens on the device).
_FUSED = ("adamw",)
#: devices with torch's fused AdamW kernels (on a CPU it is 4x faster than the per-parameter loop
#: torch picks by default, which also reads every parameter's step count back with `.item()`)
_FUSED_DEVICES = ("cuda", "cpu")


def create_optimizer(cfg: Any, param_groups: list[dict], optimizer_kwargs: dict[str, Any],
                     device: torch.device | None = None) -> OptimizerInfo:
    """Build the optimizer named by `cfg.optimizer_type` (legacy `--use_8bit_adam`/`--use_lion_optimizer` too).

    On CUDA and the CPU, torch's AdamW runs fused unless `--optimizer_args` chooses `fused`/`foreach` itself
    (the same update; sd-scripts' metadata `ss_optimizer` records only the user's arguments)."""
    name = cfg.optimizer_type or "AdamW"
    if cfg.use_8bit_adam:
        name = "AdamW8bit"
    elif cfg.use_lion_optimizer:
        name = "Lion"
    key = name.lower()
    kwargs = dict(optimizer_kwargs)
    lr: float | None = cfg.learning_rate
    lr_scheduler = cfg.lr_scheduler
    if key in _OPTIMIZERS:
        module, cls_name, defaults, package = _OPTIMIZERS[key]
        cls = _import_class(module, cls_name, package)
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
    elif "." in name:
        module, _, cls_name = name.rpartition(".")
        cls = _import_class(module, cls_name, None)
    else:
        raise UsageError(f"unknown --optimizer_type {name}; use AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, "
                         "AdaFactor, AdamWScheduleFree, ... or a full pkg.module.Class path")
    if key == "adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            for group in param_groups:
                group.pop("lr", None)
            if not lr_scheduler.startswith("adafactor"):
                lr_scheduler = f"adafactor:{lr}"
            lr = None
    call_kwargs = dict(kwargs)
    if key in _FUSED and device is not None and device.type in _FUSED_DEVICES and not {"fused", "foreach"} & set(kwargs):
        call_kwargs["fused"] = True
    optimizer = cls(param_groups, lr=lr, **call_kwargs) if lr is not None else cls(param_groups, **call_kwargs)
    return OptimizerInfo(optimizer, f"{cls.__module__}.{cls.__name__}", dict(optimizer_kwargs),
                         key.startswith("dadapt") or key == "prodigy", key.endswith("schedulefree"), lr_scheduler)


def warmup_steps(value: Any, total: int) -> int:
    """`--lr_warmup_steps`: int steps, a float < 1 as a fraction of the total, or "10%"."""
    if value is None:
        return 0
    if isinstance(value, str):
        value = float(value.rstrip("%")) / 100 if value.endswith("%") else float(value)
    if isinstance(value, float) and value < 1:
        return int(value * total)
    return int(value)


def create_scheduler(cfg: Any, info: OptimizerInfo, num_processes: int):
    """The LR schedule; `num_training_steps = max_train_steps × num_processes` as sd-scripts
    (the accelerate-prepared scheduler steps once per process per optimizer step)."""
    from transformers import optimization as tro

    optimizer = info.optimizer
    total = cfg.max_train_steps * num_processes
    warmup = warmup_steps(cfg.lr_warmup_steps, total)
    name = info.lr_scheduler
    if info.schedule_free:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if cfg.lr_scheduler_type:
        from trainer.config import parse_literal_args

        cls_path = cfg.lr_scheduler_type
        module, _, cls_name = cls_path.rpartition(".")
        cls = _import_class(module or "torch.optim.lr_scheduler", cls_name, None)
        if warmup:
            raise UsageError("--lr_warmup_steps is not supported with --lr_scheduler_type; set it to 0")
        return cls(optimizer, **parse_literal_args(cfg.lr_scheduler_args or [], "--lr_scheduler_args"))
    if name.startswith("adafactor"):
        if not type(optimizer).__name__ == "Adafactor":
            raise UsageError("--lr_scheduler adafactor needs --optimizer_type AdaFactor")
        initial_lr = float(name.split(":")[1]) if ":" in name else cfg.learning_rate
        return tro.AdafactorSchedule(optimizer, initial_lr)
    if name == "constant":
        if warmup:
            raise UsageError("--lr_scheduler constant does not use warmup; use constant_with_warmup or "
                             "set --lr_warmup_steps 0")
        return tro.get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return tro.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "linear":
        return tro.get_linear_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine":
        return tro.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine_with_restarts":
        return tro.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total,
                                                                       num_cycles=cfg.lr_scheduler_num_cycles)
    if name == "polynomial":
        return tro.get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total,
                                                             power=cfg.lr_scheduler_power)
    if name == "inverse_sqrt":
        return tro.get_inverse_sqrt_schedule(optimizer, warmup, timescale=cfg.lr_scheduler_timescale)
    if name == "cosine_with_min_lr":
        return tro.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=cfg.lr_scheduler_min_lr_ratio or 0.0)
    if name == "warmup_stable_decay":
        decay = warmup_steps(cfg.lr_decay_steps, total)
        return tro.get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total,
                                    min_lr_ratio=cfg.lr_scheduler_min_lr_ratio or 0.0)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        rules = ",".join(cfg.lr_scheduler_args or [])
        return get_piecewise_constant_schedule(optimizer, rules)
    raise UsageError(f"unknown --lr_scheduler {name}")
