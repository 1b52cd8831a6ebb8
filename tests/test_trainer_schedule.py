"""The save schedule (`trainer.schedule`): sd-scripts' rules, replayed over a whole run by hand."""

from __future__ import annotations

from types import SimpleNamespace

from trainer.schedule import RemoveFile, RemoveState, SaveFile, SaveSchedule, SaveState


def _cfg(**kw):
    base = dict(output_name="x", save_model_as="safetensors", save_every_n_steps=None, save_every_n_epochs=None,
                save_last_n_steps=None, save_last_n_epochs=None, save_last_n_steps_state=None,
                save_last_n_epochs_state=None, save_state=False, save_state_on_train_end=False)
    return SimpleNamespace(**{**base, **kw})


def test_steps_and_epochs_interleave_in_the_order_a_run_writes_them():
    """3 epochs of 3 steps, 8 steps in all (the last epoch stops early): a save every 2 steps keeping
    the newest, one every epoch except the last (which is the final file)."""
    actions = SaveSchedule(_cfg(save_every_n_steps=2, save_every_n_epochs=1, save_last_n_steps=1), 3).replay(3, 8)
    assert actions == [
        SaveFile("x-step00000002.safetensors", 1, 2),
        SaveFile("x-000001.safetensors", 1, 3),
        SaveFile("x-step00000004.safetensors", 2, 4), RemoveFile("x-step00000002.safetensors"),
        SaveFile("x-step00000006.safetensors", 2, 6), RemoveFile("x-step00000004.safetensors"),
        SaveFile("x-000002.safetensors", 2, 6),
        SaveFile("x-step00000008.safetensors", 3, 8), RemoveFile("x-step00000006.safetensors"),
        SaveFile("x.safetensors", 3, 8),
    ]


def test_save_last_n_epochs_keeps_n_and_state_folders_rotate_on_their_own_count():
    cfg = _cfg(save_every_n_epochs=1, save_last_n_epochs=2, save_state=True, save_last_n_epochs_state=1)
    actions = SaveSchedule(cfg, 5).replay(1, 5)
    removed = [a.file for a in actions if isinstance(a, RemoveFile)]
    assert removed == ["x-000001.safetensors", "x-000002.safetensors"]  # after epochs 3 and 4
    removed_states = [a.folder for a in actions if isinstance(a, RemoveState)]
    assert removed_states == ["x-000001-state", "x-000002-state", "x-000003-state"]
    assert actions[-1] == SaveState("x-state", 5, 5) and actions[-2] == SaveFile("x.safetensors", 5, 5)


def test_without_output_name_each_kind_has_sd_scripts_stem():
    files = SaveSchedule(_cfg(output_name=None, save_every_n_steps=25, save_every_n_epochs=1), 3).planned_files(20, 60)
    assert files == ["epoch-000001.safetensors", "at-step00000025.safetensors", "epoch-000002.safetensors",
                     "at-step00000050.safetensors", "last.safetensors"]
