"""sd-scripts' flag names on every command that has an sd-scripts twin (issue 15, item 2).

merge takes merge_lora.py / sdxl_merge_lora.py / svd_merge_lora.py command lines, metadata show takes
show_metadata.py's --model, and an unknown train flag points to --list-flags. Each sd-scripts spelling
must give exactly what the loratools spelling gives.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from loratools.cli.app import app
from loratools.errors import LoratoolsError, UsageError
from loratools.io import open_safetensors, read_header
from loratools.tiny import make_lora


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tiny_sd1, tiny_sd1_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("sdscripts")
    a = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2, seed=1, path=d / "a.safetensors").path
    b = make_lora(tiny_sd1, "sd1", "lora", rank=2, alpha=1, seed=2, path=d / "b.safetensors").path
    return tiny_sd1_ckpt, a, b


def same_tensors(x, y) -> None:
    fx, fy = open_safetensors(x), open_safetensors(y)
    assert set(fx) == set(fy)
    for k in fx:
        assert fx[k].dtype == fy[k].dtype and torch.equal(fx[k], fy[k]), k


def test_merge_lora_py_command_line(files, tmp_path):
    base, a, b = files
    r = invoke("merge", "--sd_model", base, "--models", a, b, "--ratios", 0.7, -0.3, "--save_to",
               tmp_path / "sd.safetensors", "--save_precision", "fp16", "--precision", "fp16", "--v2")
    assert r.exit_code == 0, r.output
    assert "--precision fp16 changes nothing" in r.stderr and "--v2 changes nothing" in r.stderr
    assert "a.safetensors (ratio 0.7): applied" in r.stdout and "b.safetensors (ratio -0.3): applied" in r.stdout
    r = invoke("merge", base, f"{a}:0.7", f"{b}:-0.3", "-o", tmp_path / "ours.safetensors", "--dtype", "fp16")
    assert r.exit_code == 0, r.output
    same_tensors(tmp_path / "sd.safetensors", tmp_path / "ours.safetensors")
    assert read_header(tmp_path / "ours.safetensors").tensors["model.diffusion_model.out.2.weight"].dtype == "F16"


def test_lora_merge_without_sd_model_is_exact_concat(files, tmp_path):
    _, a, b = files
    r = invoke("merge", "--models", a, b, "--ratios", 0.7, 0.3, "--save_to", tmp_path / "sd.safetensors", "--shuffle")
    assert r.exit_code == 0, r.output
    assert "--shuffle changes nothing" in r.stderr and "exactly" in r.stderr
    r = invoke("merge", "--models", a, b, "--ratios", 0.7, 0.3, "--concat", "--save_to", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    r = invoke("merge", "--to-lora", f"{a}:0.7", f"{b}:0.3", "-o", tmp_path / "ours.safetensors")
    assert r.exit_code == 0, r.output
    for name in ("sd.safetensors", "c.safetensors"):
        got, want = open_safetensors(tmp_path / name), open_safetensors(tmp_path / "ours.safetensors")
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    downs = [i.shape[0] for k, i in read_header(tmp_path / "c.safetensors").tensors.items()
             if k.endswith("lora_down.weight")]
    assert set(downs) == {6}  # ranks 4 + 2 concatenated


def test_svd_merge_lora_py_command_line(files, tmp_path):
    _, a, b = files
    r = invoke("merge", "--models", a, b, "--ratios", 0.7, 0.3, "--new_rank", 3, "--save_to", tmp_path / "s.safetensors",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    downs = {i.shape[0] for k, i in read_header(tmp_path / "s.safetensors").tensors.items()
             if k.endswith("lora_down.weight")}
    assert downs and max(downs) <= 3
    r = invoke("merge", "--to-lora", f"{a}:0.7", f"{b}:0.3", "-r", "rank=3", "-o", tmp_path / "ours.safetensors")
    assert r.exit_code == 0, r.output
    got, want = open_safetensors(tmp_path / "s.safetensors"), open_safetensors(tmp_path / "ours.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_refuses_what_it_cannot_do(files, tmp_path):
    base, a, _ = files
    r = invoke("merge", "--models", a, "--lbws", "[1,1]", "--save_to", tmp_path / "x.safetensors")
    assert isinstance(r.exception, UsageError) and "2 block weights do not fit" in str(r.exception)
    r = invoke("merge", "--sd_model", base, "--models", a, "--new_rank", 4, "--save_to", tmp_path / "x.safetensors")
    assert isinstance(r.exception, UsageError) and "--sd_model" in str(r.exception)
    r = invoke("merge", "--sd_model", base, "--models", a, "--precision", "fp8", "--save_to", tmp_path / "x.safetensors")
    assert isinstance(r.exception, UsageError) and "--precision" in str(r.exception)
    assert not list(tmp_path.iterdir())


def test_metadata_show_takes_show_metadata_py_model(files):
    _, a, _ = files
    by_flag, by_arg = invoke("metadata", "show", "--model", a), invoke("metadata", "show", a)
    assert by_flag.exit_code == 0, by_flag.output
    assert by_flag.stdout == by_arg.stdout and str(a) in by_flag.stdout


def test_unknown_train_flag_points_to_list_flags():
    r = invoke("train", "--dry-run", "--learnin_rate", "1e-4")
    assert isinstance(r.exception, LoratoolsError)
    message = str(r.exception)
    assert "--learning_rate" in message and "loratools train --list-flags" in message and "--help" not in message
    listed = invoke("train", "--list-flags", "--json")
    assert listed.exit_code == 0 and '"--learning_rate"' in listed.stdout
