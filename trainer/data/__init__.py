"""Training data: captions, buckets, N_concept folders, dataset TOML, latent caches, step arithmetic.

``build_dataset`` and ``TrainDataset`` need torch and are imported on first use, so the
torch-free parts (layout, steps, buckets, captions) serve ``--dry-run`` without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_dataset", "TrainDataset", "build_layouts", "plan_for_layouts", "plan_steps", "StepPlan"]


def __getattr__(name: str) -> Any:
    if name in ("build_dataset", "TrainDataset"):
        from trainer.data import dataset

        return getattr(dataset, name)
    if name == "build_layouts":
        from trainer.data.layout import build_layouts

        return build_layouts
    if name in ("plan_for_layouts", "plan_steps", "StepPlan"):
        from trainer.data import steps

        return getattr(steps, name)
    raise AttributeError(name)
