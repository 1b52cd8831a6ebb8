"""File and state-folder names of a training run, as sd-scripts names them.

Torch-free so that ``loratools train --dry-run`` lists exactly the files a run will write.
"""

from __future__ import annotations

#: sd-scripts' stems when --output_name is not given: each kind of file has its own.
DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME, DEFAULT_LAST_NAME = "epoch", "at", "last"


def epoch_file(name: str | None, epoch: int, ext: str = "safetensors") -> str:
    return f"{DEFAULT_EPOCH_NAME if name is None else name}-{epoch:06d}.{ext}"


def step_file(name: str | None, step: int, ext: str = "safetensors") -> str:
    return f"{DEFAULT_STEP_NAME if name is None else name}-step{step:08d}.{ext}"


def final_file(name: str | None, ext: str = "safetensors") -> str:
    return f"{DEFAULT_LAST_NAME if name is None else name}.{ext}"


def epoch_state_dir(name: str | None, epoch: int) -> str:
    return f"{DEFAULT_EPOCH_NAME if name is None else name}-{epoch:06d}-state"


def step_state_dir(name: str | None, step: int) -> str:
    return f"{DEFAULT_STEP_NAME if name is None else name}-step{step:08d}-state"


def final_state_dir(name: str | None) -> str:
    return f"{DEFAULT_LAST_NAME if name is None else name}-state"
