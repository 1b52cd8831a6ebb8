"""`loratools check weights` end to end as a subprocess: exit codes 0/1/2, --json, --csv, --fail-on."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from loratools.io import save_tensors
from test_check_weights_op import SD1_LAST, _kill, fixture_lora


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", "check", "weights", *args], capture_output=True,
                          text=True, timeout=180)


def in_process(*args: str):
    """The same command through typer's runner (no interpreter start; torch already imported)."""
    from typer.testing import CliRunner

    from loratools.cli.app import app

    return CliRunner().invoke(app, ["check", "weights", *args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cwcli")
    t, meta = fixture_lora("lora_kohya_sd15_lora.json", dtype=torch.float16)
    for m in SD1_LAST:
        _kill(t, m, "dead")
    save_tensors(d / "normal.safetensors", t, meta)
    _kill(t, "lora_unet_down_blocks_0_attentions_0_proj_in", "dead")
    save_tensors(d / "dead.safetensors", t, meta)
    return d / "normal.safetensors", d / "dead.safetensors"


def test_normal_file_passes(files):
    normal, _ = files
    r = run(str(normal))
    assert r.returncode == 0, r.stderr
    assert "6 dead, all expected (text-encoder layer 11 is unused at clip skip 2)" in " ".join(r.stdout.split())
    assert "OK" in r.stdout


def test_problem_file_fails_and_json(files):
    normal, dead = files
    r = run(str(normal), str(dead), "--json")
    assert r.returncode == 1
    docs = json.loads(r.stdout)
    assert [d["failed"] for d in docs] == [False, True]
    assert docs[1]["counts"] == {"ok": 257, "dead": 7}
    module = next(m for m in docs[1]["modules"] if m["name"] == "lora_unet_down_blocks_0_attentions_0_proj_in")
    assert module["status"] == "dead" and module["expected"] is None and module["delta_norm"] == 0.0
    r = in_process(str(dead), "--fail-on", "nan,underflow")
    assert r.exit_code == 0, r.output


def test_csv_columns(files):
    normal, _ = files
    r = in_process(str(normal), "--csv")
    assert r.exit_code == 0
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["key", "shape", "mean|w|", "min|w|"] and len(rows) == 1 + 2 * 264
    by_key = {row[0]: row for row in rows[1:]}
    up = by_key["lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight"]
    assert up[1] == "(768-2)" and up[2] == "0.0" and up[3] == "0.0"
    # the seed guide's habit: count lines ending in "0.0"; all-zero tensors are the 6 untrained lora_up
    assert sum(line.endswith(",0.0,0.0") for line in r.stdout.splitlines()) == 6


def test_all_lists_ok_modules(files):
    normal, _ = files
    only_problems = in_process(str(normal)).stdout
    everything = in_process(str(normal), "--all").stdout
    # 80 columns (CliRunner): one stacked record per module, its status on the line below the name
    assert "status: ok" not in only_problems and "dead (expected)" in only_problems
    assert len(re.findall(r"status: ok\b", everything)) == 258


def test_bad_input_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    r = run(str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "too short" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(str(tmp_path / "bad.safetensors"), "--fail-on", "zombie")
    assert r.returncode == 2 and "unknown status" in r.stderr


def test_alpha_zero_is_warned_and_explained(tmp_path):
    t, meta = fixture_lora("lora_kohya_sd15_lora.json")
    t["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(0.0)
    path = tmp_path / "alpha0.safetensors"
    save_tensors(path, t, meta)
    r = in_process(str(path), "--fail-on", "nan")
    assert r.exit_code == 0, r.output
    assert "1 dead: alpha is 0" in r.stdout and "fp16 underflow" not in r.stdout
    assert "store alpha 0 (first: lora_unet_down_blocks_0_attentions_0_proj_in)" in r.stderr


def test_a_checkpoint_is_not_an_adapter(tmp_path):
    """Was: "0 modules (); ; architecture UNKNOWN ... OK" and exit 0. (Exit 2 and the one-line
    rendering of every LoratoolsError are checked by test_bad_input_exit_2.)"""
    from loratools.errors import InvalidFileError

    ckpt = tmp_path / "model.safetensors"
    save_tensors(ckpt, {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8)})
    r = in_process(str(ckpt))
    assert isinstance(r.exception, InvalidFileError) and r.stdout == ""
    assert str(r.exception).startswith(f"{ckpt}: no LoRA/LyCORIS module among its 2 keys")
    assert "checkpoint?" in str(r.exception)
