"""The demo's output folder rules: its own entries are replaced, anything else is left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratools.errors import OutputExistsError, UsageError
from loratools.ops.demo import ENTRIES, MARKER, DemoOptions, prepare_output


def test_new_and_empty_folders_are_used(tmp_path):
    prepare_output(tmp_path / "a" / "b", overwrite=False)
    assert (tmp_path / "a" / "b" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty", overwrite=False)
    assert (tmp_path / "empty" / MARKER).is_file()


def test_a_demo_folder_is_reused_and_only_its_entries_are_removed(tmp_path):
    prepare_output(tmp_path, overwrite=False)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "old.safetensors").write_bytes(b"x")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("keep")
    prepare_output(tmp_path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "mine.txt"]


def test_a_foreign_folder_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(tmp_path, overwrite=False)
    assert not (tmp_path / MARKER).exists() and (tmp_path / "base").is_dir()
    prepare_output(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "photo.png"]


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(UsageError, match="folder"):
        prepare_output(target, overwrite=True)


def test_options_are_validated():
    with pytest.raises(UsageError, match="sdxl"):
        DemoOptions(Path("x"), arch="flux")
    with pytest.raises(UsageError, match="--steps"):
        DemoOptions(Path("x"), steps=1)
    assert DemoOptions(quick=True).settings.steps < DemoOptions().settings.steps
    assert DemoOptions(steps=30).settings.steps == 30
    assert set(ENTRIES) >= {"base", "dataset", "train", "resized", "merged", "extracted", "ema", MARKER}
