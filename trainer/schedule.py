"""When a run writes what: sd-scripts' save schedule as one object, torch-free.

The training loop asks it after every optimizer step, after every epoch and at the end; `train
--dry-run` replays the same calls over the step plan to list the files a run will write, so the
two can never disagree. Names come from `trainer.filenames` (sd-scripts' stems and padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from trainer import filenames


@dataclass(frozen=True)
class SaveFile:
    """Write the network to `file` (metadata records `epoch` and `step`)."""

    file: str
    epoch: int
    step: int


@dataclass(frozen=True)
class RemoveFile:
    """Delete an older save (`--save_last_n_epochs` / `--save_last_n_steps`)."""

    file: str


@dataclass(frozen=True)
class SaveState:
    """Write accelerate's training state (`--save_state`) to `folder`."""

    folder: str
    epoch: int
    step: int


@dataclass(frozen=True)
class RemoveState:
    """Delete an older state folder (`--save_last_n_*_state`)."""

    folder: str


Action = Union[SaveFile, RemoveFile, SaveState, RemoveState]


def epoch_to_remove(epoch: int, every: int | None, keep: int | None) -> int | None:
    """`--save_last_n_epochs`: after saving epoch e, the file of epoch e − every·N goes (keeps N)."""
    if not keep or not every:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, keep: int | None) -> int | None:
    """`--save_last_n_steps`: r = s − N − 1 rounded down to a multiple of every; r > 0 goes."""
    if not keep or not every:
        return None
    r = step - keep - 1
    r -= r % every
    return r if r > 0 else None


class SaveSchedule:
    """sd-scripts' rules for `--save_every_n_epochs/steps`, `--save_last_n_*`, `--save_state`.

    Args:
        cfg: the run's `TrainConfig` (read: output_name, save_model_as, save_every_n_epochs,
            save_every_n_steps, save_last_n_epochs, save_last_n_steps, save_last_n_epochs_state,
            save_last_n_steps_state, save_state, save_state_on_train_end).
        num_epochs: the run's epoch count (the last epoch is saved as the final file only).
    """

    def __init__(self, cfg: Any, num_epochs: int) -> None:
        self.cfg = cfg
        self.num_epochs = num_epochs
        self.name: str | None = cfg.output_name
        self.ext = cfg.save_model_as or "safetensors"

    def after_step(self, step: int, epoch: int) -> list[Action]:
        """After optimizer step `step` (1-based) inside epoch `epoch` (1-based)."""
        cfg, every = self.cfg, self.cfg.save_every_n_steps
        if not every or step % every:
            return []
        return self._save_and_rotate(step, epoch, step, filenames.step_file, filenames.step_state_dir,
                                     step_to_remove(step, every, cfg.save_last_n_steps),
                                     step_to_remove(step, every, cfg.save_last_n_steps_state))

    def after_epoch(self, epoch: int, step: int) -> list[Action]:
        """After epoch `epoch` (1-based) ended at optimizer step `step`; the last epoch is the final file."""
        cfg, every = self.cfg, self.cfg.save_every_n_epochs
        if not every or epoch % every or epoch >= self.num_epochs:
            return []
        return self._save_and_rotate(epoch, epoch, step, filenames.epoch_file, filenames.epoch_state_dir,
                                     epoch_to_remove(epoch, every, cfg.save_last_n_epochs),
                                     epoch_to_remove(epoch, every, cfg.save_last_n_epochs_state))

    def _save_and_rotate(self, index: int, epoch: int, step: int, file_name, state_name, old: int | None,
                         old_state: int | None) -> list[Action]:
        """Save number `index` (an epoch or a step), drop the one `--save_last_n_*` lets go, and the
        same for the state folders with `--save_state`."""
        out: list[Action] = [SaveFile(file_name(self.name, index, self.ext), epoch, step)]
        if old is not None:
            out.append(RemoveFile(file_name(self.name, old, self.ext)))
        if self.cfg.save_state:
            out.append(SaveState(state_name(self.name, index), epoch, step))
            if old_state is not None:
                out.append(RemoveState(state_name(self.name, old_state)))
        return out

    def at_end(self, epoch: int, step: int) -> list[Action]:
        """The final file (and state with `--save_state`/`--save_state_on_train_end`)."""
        out: list[Action] = [SaveFile(filenames.final_file(self.name, self.ext), epoch, step)]
        if self.cfg.save_state or self.cfg.save_state_on_train_end:
            out.append(SaveState(filenames.final_state_dir(self.name), epoch, step))
        return out

    def replay(self, steps_per_epoch: int, max_train_steps: int) -> list[Action]:
        """Every action of a whole run in order, as the loop issues them (for `--dry-run`)."""
        actions: list[Action] = []
        step, epoch = 0, 0
        for epoch in range(1, self.num_epochs + 1):
            for _ in range(steps_per_epoch):
                if step >= max_train_steps:
                    break
                step += 1
                actions += self.after_step(step, epoch)
            actions += self.after_epoch(epoch, step)
            if step >= max_train_steps:
                break
        return actions + self.at_end(epoch, step)

    def planned_files(self, steps_per_epoch: int, max_train_steps: int) -> list[str]:
        """The model files a run writes, in order (files removed later by `--save_last_n_*` included)."""
        return [a.file for a in self.replay(steps_per_epoch, max_train_steps) if isinstance(a, SaveFile)]
