"""Honest summaries (issue 15, items 4 and 5): merge counts explained and progress with totals,
metadata of a model trained from a folder, resize comments without "; None", and the Python API
that no longer resizes its own outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from rich.progress import Progress
from typer.testing import CliRunner

from loratools.cli import output
from loratools.cli.app import app
from loratools.io import read_header, save_tensors
from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
from loratools.ops.metadata import summarize
from loratools.ops.resize import Resizer, resize
from loratools.tiny import make_lora

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("summaries")
    return make_lora(tiny_sdxl, "sdxl", "lora", rank=2, alpha=1, path=d / "lora.safetensors").path


def test_single_file_and_folder_counts_are_explained(sdxl_lora, tiny_sdxl_ckpt, tiny_sdxl_dir, tmp_path):
    """Was: 149 tensors patched into a single file, 155 into a diffusers folder, no word why."""
    one = merge_checkpoint(MergeOptions(tiny_sdxl_ckpt, [WeightedPath(sdxl_lora, 1.0)], tmp_path / "m.safetensors"))
    folder = merge_checkpoint(MergeOptions(tiny_sdxl_dir, [WeightedPath(sdxl_lora, 1.0)], tmp_path / "m"))
    applied = one.adapters[0].applied
    assert applied == folder.adapters[0].applied == folder.patched_keys and folder.fused_keys == 0
    # OpenCLIP q, k and v: three modules, one fused in_proj_weight per layer of text encoder 2
    assert one.fused_keys > 0 and one.patched_keys + 2 * one.fused_keys == folder.patched_keys
    fused = [k for k in read_header(tmp_path / "m.safetensors").tensors if k.endswith("attn.in_proj_weight")]
    assert len(fused) == one.fused_keys

    r = CliRunner().invoke(app, ["merge", str(tiny_sdxl_ckpt), str(sdxl_lora), "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    assert f"{one.patched_keys} tensors patched" in r.stdout
    assert f"({one.fused_keys} of them are text encoder 2's fused q/k/v in_proj_weight tensors" in r.stdout
    doc = json.loads(CliRunner().invoke(app, ["merge", str(tiny_sdxl_ckpt), str(sdxl_lora), "-o",
                                              str(tmp_path / "j.safetensors"), "--json"]).stdout)
    assert doc["fused_keys"] == one.fused_keys and doc["patched_keys"] == one.patched_keys


class _Spy(Progress):
    updates: list[dict] = []

    def update(self, task_id, **fields):  # noqa: D102
        _Spy.updates.append(fields)
        super().update(task_id, **fields)


def test_merge_progress_names_the_phase_and_knows_the_total(sdxl_lora, tiny_sdxl_ckpt, tmp_path, monkeypatch):
    """Was: `0/?` while loading and elapsed time only; now the total is set with the first tensor (ETA)."""
    real = output.Output.progress

    def spy(self, *, disable=False):
        p = real(self, disable=disable)
        return _Spy(*p.columns, console=p.console, disable=True)

    monkeypatch.setattr(output.Output, "progress", spy)
    r = CliRunner().invoke(app, ["merge", str(tiny_sdxl_ckpt), str(sdxl_lora), "-o", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0, r.output
    total = _Spy.updates[0]["total"]
    assert total == len(read_header(tmp_path / "p.safetensors").tensors)
    assert [u["completed"] for u in _Spy.updates] == list(range(1, total + 1))
    assert {u["description"] for u in _Spy.updates} == {"merging", "finishing"}
    assert any("Eta" in type(c).__name__ for c in real(output.out).columns)


def test_metadata_of_a_model_trained_from_a_folder(sdxl_lora, tmp_path):
    """Was: `hash IsADirectory` (sd-scripts' record of a model path that is a folder)."""
    from loratools.io import open_safetensors

    src = open_safetensors(sdxl_lora)
    meta = dict(src.metadata) | {"ss_sd_model_name": "pony-diffusers", "ss_sd_model_hash": "IsADirectory",
                                 "ss_new_sd_model_hash": "IsADirectory"}
    path = tmp_path / "folder-trained.safetensors"
    save_tensors(path, {k: src[k] for k in src}, meta)
    s = summarize(path)
    assert s.base_model["hash"] == s.base_model["sha256"] == "unknown (trained from a folder)"
    text = CliRunner().invoke(app, ["metadata", "show", str(path)]).stdout
    assert "unknown (trained from a folder)" in text and "IsADirectory" not in text


def test_resize_comment_does_not_end_in_none(sdxl_lora, tmp_path):
    """sd-scripts writes ss_training_comment = "None" when there is none; was: "...from dim 2; None"."""
    from loratools.io import open_safetensors

    src = open_safetensors(sdxl_lora)
    path = tmp_path / "c.safetensors"
    save_tensors(path, {k: src[k] for k in src}, dict(src.metadata) | {"ss_training_comment": "None"})
    out = Resizer(None, cache_dir=None).resize(path, "sv_fro=0.9", output=tmp_path).outcomes[0].path
    comment = read_header(out).metadata["ss_training_comment"]
    assert comment.startswith("Resized by loratools") and not comment.endswith("None") and ";" not in comment


def test_api_does_not_resize_its_own_outputs(sdxl_lora, tmp_path):
    """Was: `lora_svfro0.9_svfro0.9` from a second run over the same folder or glob."""
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(sdxl_lora, folder / "lora.safetensors")
    for paths in ([folder], [str(folder / "*.safetensors")], [folder]):
        resize(paths, "sv_fro=0.9", cache_dir=None)
    assert sorted(p.name for p in folder.iterdir()) == ["lora.safetensors", "lora_svfro0.9.safetensors"]


def test_readme_python_api_runs_twice(sdxl_lora, tiny_sdxl_ckpt, tmp_path, monkeypatch):
    """The README's Python API block, run as written (twice) next to files with its names."""
    code = re.search(r"Python API for batch shrinking:\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "loras").mkdir()
    shutil.copy(tiny_sdxl_ckpt, tmp_path / "sd_xl_base_1.0.safetensors")
    shutil.copy(sdxl_lora, tmp_path / "loras" / "mine.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORATOOLS_CACHE_DIR", str(tmp_path / "cache"))
    printed: list[str] = []
    for _ in range(2):
        exec(compile(code, "README.md", "exec"), {"print": printed.append})
    names = sorted(p.name for p in (tmp_path / "loras").iterdir())
    assert names == ["mine.safetensors", "mine_frockpt1_th-3.55.safetensors", "mine_svfro0.9.safetensors"]
    assert len(printed) == 4 and all("KiB -> " in line for line in printed[:2])
    assert all(re.search(r": rank \d+, [\d.]+ KiB \(exists, skipped\)$", line) for line in printed[2:])  # what is on disk
