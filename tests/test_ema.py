"""Post-hoc EMA of saved LoRAs (issue 16, item 3), against a dense computation.

The weights are checked against musubi-tuner's recursion run on one-hot vectors (an independent
fold, not the closed form the code uses), and the written file against the dense average of the
inputs' ground-truth deltas: sum_j w_j * delta_j for every module.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loratools.adapters import load_adapter, parse_adapter
from loratools.errors import UsageError
from loratools.io import read_header, save_tensors
from loratools.ops.ema import EmaOptions, betas, ema_weights, post_hoc_ema, sigma_rel_to_gamma
from loratools.tiny import make_lora


def musubi_fold(bs):
    """musubi-tuner's loop on one-hot inputs: the weight each file ends up with."""
    n = len(bs) + 1
    state = torch.eye(n, dtype=torch.float64)[0]
    for i, beta in enumerate(bs):
        state = state * beta + torch.eye(n, dtype=torch.float64)[i + 1] * (1 - beta)
    return state.tolist()


@pytest.mark.parametrize("schedule", [dict(beta=0.9), dict(beta=0.8, beta2=0.99), dict(sigma_rel=0.1),
                                      dict(sigma_rel=0.05), dict(beta=0.0), dict(beta=1.0)])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_weights_are_musubi_fold(schedule, n):
    bs = betas(n, **schedule)
    assert ema_weights(bs) == pytest.approx(musubi_fold(bs), abs=1e-12)
    assert sum(ema_weights(bs)) == pytest.approx(1.0)


def test_sigma_rel_gamma_and_range():
    # Karras et al. 2024: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert betas(4, sigma_rel=0.1)[0] == 0.0  # the oldest file gets weight 0, as in musubi-tuner
    for bad in (0.0, 0.3, -1.0):
        with pytest.raises(UsageError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.fixture(scope="module")
def run(tiny_sd1, tmp_path_factory):
    """Three 'epochs' of one run, file names out of step order, float32 so the check is tight."""
    folder = tmp_path_factory.mktemp("ema")
    saved = {}
    for name, step, seed, rank in (("epoch-10", 300, 1, 4), ("epoch-2", 60, 2, 2), ("epoch-5", 150, 3, 3)):
        a = make_lora(tiny_sd1, "sd1", "locon", rank=rank, alpha=rank / 2, seed=seed, dtype=torch.float32)
        meta = dict(a.metadata, ss_steps=str(step), ss_epoch=name.split("-")[1])
        path = folder / f"{name}.safetensors"
        save_tensors(path, a.tensors, meta)
        saved[step] = (path, a)
    return folder, [saved[s] for s in sorted(saved)]


def dense_average(adapters, weights):
    out = {}
    for (_, a), w in zip(adapters, weights):
        for name, target in a.targets.items():
            out[name] = out.get(name, 0) + w * target.delta
    return out


@pytest.mark.parametrize("schedule", [dict(beta=0.7), dict(sigma_rel=0.2)])
def test_average_of_deltas_is_exact(run, tmp_path, schedule):
    folder, ordered = run
    out = tmp_path / "ema.safetensors"
    result = post_hoc_ema(EmaOptions([folder], out, **schedule))
    assert result.ordered_by == "ss_steps"
    assert [i.step for i in result.inputs] == [60, 150, 300]  # by step, not by name (epoch-10 < epoch-2)
    weights = ema_weights(betas(3, **schedule))
    assert [i.weight for i in result.inputs] == pytest.approx(weights)
    want = dense_average(ordered, weights)
    got = load_adapter(out)
    assert set(got.modules) == set(want)
    for name, delta in want.items():
        torch.testing.assert_close(got.modules[name].delta().reshape(delta.shape), delta, rtol=1e-4, atol=1e-6)
    meta = read_header(out).metadata
    assert meta["ss_steps"] == "300"  # the newest file's metadata
    record = json.loads(meta["loratools.merge"])
    assert record["mode"] == "ema" and [a["file"] for a in record["adapters"]] == [
        "epoch-2.safetensors", "epoch-5.safetensors", "epoch-10.safetensors"]


def test_averaging_factors_is_not_averaging_deltas(tiny_sd1, tmp_path):
    """What musubi-tuner writes (every tensor averaged, factors included) is not the average of the
    files' deltas; what ema writes is."""
    files = []
    for seed, step in ((1, 10), (2, 20)):
        a = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2.0, seed=seed, dtype=torch.float32)
        path = save_tensors(tmp_path / f"s{step}.safetensors", a.tensors, dict(a.metadata, ss_steps=str(step))).path
        files.append(a)
    w = ema_weights(betas(2, beta=0.5))
    post_hoc_ema(EmaOptions([tmp_path], tmp_path / "ema.safetensors", beta=0.5))
    ours = load_adapter(tmp_path / "ema.safetensors")
    factor_avg = parse_adapter({k: w[0] * files[0].tensors[k] + w[1] * files[1].tensors[k] for k in files[0].tensors})
    errors = {"ours": 0.0, "factors": 0.0}
    for name, target in files[0].targets.items():
        dense = w[0] * target.delta + w[1] * files[1].targets[name].delta
        for which, adapter in (("ours", ours), ("factors", factor_avg)):
            got = adapter.modules[name].delta().reshape(dense.shape)
            errors[which] = max(errors[which], float((got - dense).norm() / dense.norm()))
    assert errors["ours"] < 1e-5 and errors["factors"] > 0.1, errors


def test_recipe_shrinks_the_average(run, tmp_path):
    folder, ordered = run
    out = tmp_path / "small.safetensors"
    result = post_hoc_ema(EmaOptions([folder], out, beta=0.7, recipe="rank=2"))
    [outcome] = result.merge.resized.outcomes
    assert outcome.status == "written" and outcome.path == out
    downs = [i.shape[0] for k, i in read_header(out).tensors.items() if k.endswith("lora_down.weight")]
    assert downs and max(downs) <= 2


def test_order_needs_metadata_or_no_sort(tiny_sd1, tmp_path):
    paths = []
    for i in range(2):
        a = make_lora(tiny_sd1, "sd1", "lora", rank=2, seed=i, dtype=torch.float32)
        meta = {k: v for k, v in a.metadata.items() if k not in ("ss_steps", "ss_epoch")}
        paths.append(save_tensors(tmp_path / f"x{i}.safetensors", a.tensors, meta).path)
    with pytest.raises(UsageError, match="--no_sort") as err:
        post_hoc_ema(EmaOptions(paths, tmp_path / "o.safetensors"))
    assert "x0.safetensors" in str(err.value)
    result = post_hoc_ema(EmaOptions(paths[::-1], tmp_path / "o.safetensors", keep_order=True, beta=0.5))
    assert [i.path.name for i in result.inputs] == ["x1.safetensors", "x0.safetensors"]
    with pytest.raises(UsageError, match="keep one"):
        post_hoc_ema(EmaOptions(paths, tmp_path / "p.safetensors", beta=0.5, sigma_rel=0.1, keep_order=True))
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_table_json_and_bad_input(run, tmp_path):
    folder, _ = run
    cmd = [sys.executable, "-m", "loratools", "ema", str(folder), "--sigma_rel", "0.15", "-o",
           str(tmp_path / "e.safetensors"), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [i["step"] for i in data["inputs"]] == [60, 150, 300] and data["schedule"]["sigma_rel"] == 0.15
    r = subprocess.run([sys.executable, "-m", "loratools", "ema", str(folder), "--beta", "1.5", "-o",
                        str(tmp_path / "bad.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--beta 1.5" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad.safetensors").exists()


def test_a_runs_last_step_saved_twice_counts_once(run, tmp_path):
    """sd-scripts and the trainer save the last step as a step file and as the final file."""
    import shutil

    folder, ordered = run
    for path, _ in ordered:
        shutil.copy(path, tmp_path / path.name)
    newest = ordered[-1][0]
    shutil.copy(newest, tmp_path / "last.safetensors")
    (tmp_path / "out").mkdir()
    result = post_hoc_ema(EmaOptions([tmp_path], tmp_path / "out" / "e.safetensors", beta=0.7))
    assert [i.step for i in result.inputs] == [60, 150, 300] and len(result.duplicates) == 1
    other = ordered[0][1]
    save_tensors(tmp_path / "clash.safetensors", other.tensors, dict(other.metadata, ss_steps="300"))
    with pytest.raises(UsageError, match="both at ss_steps=300 but hold different weights"):
        post_hoc_ema(EmaOptions([tmp_path], tmp_path / "out" / "f.safetensors", beta=0.7))


def test_loha_runs_are_refused_before_any_work(tiny_sd1, tmp_path):
    paths = []
    for i in range(2):
        a = make_lora(tiny_sd1, "sd1", "loha", rank=2, seed=i, dtype=torch.float32)
        paths.append(save_tensors(tmp_path / f"h{i}.safetensors", a.tensors, dict(a.metadata, ss_steps=str(i))).path)
    with pytest.raises(UsageError, match="LOHA modules") as err:
        post_hoc_ema(EmaOptions(paths, tmp_path / "o.safetensors"))
    assert "h0.safetensors" in str(err.value) and not (tmp_path / "o.safetensors").exists()
