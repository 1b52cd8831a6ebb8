"""`loratools train` end to end as a subprocess: --dry-run on the three seed recipes with a tiny
dataset on disk, errors with exit code 2, help, and no torch import for a dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from loratools.tiny import make_dataset

    root = tmp_path_factory.mktemp("train_cli")
    sd1 = make_dataset(root / "sd1", "sd1", 6, repeats=5, uncaptioned=1)
    sdxl = make_dataset(root / "sdxl", "sdxl", 6, repeats=5)
    return {"sd1": sd1, "sdxl": sdxl}


@pytest.mark.parametrize("recipe, arch", [("pony-locon", "sdxl"), ("sd15-character", "sd1"), ("sd15-style", "sd1")])
def test_dry_run_on_seed_recipes(datasets, tmp_path: Path, recipe: str, arch: str):
    data = datasets[arch]
    (tmp_path / "model").mkdir()  # a dry run loads no model, but the path must exist
    result = run("train", "--config", str(REPO / "recipes" / f"{recipe}.toml"), "--train_data_dir", str(data.root),
                 "--output_dir", str(tmp_path / "out"), "--pretrained_model_name_or_path", str(tmp_path / "model"),
                 "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    cfg, steps = doc["config"], doc["steps"]
    assert cfg["config"].endswith(f"{recipe}.toml") and cfg["train_data_dir"] == str(data.root)
    assert steps["num_train_images"] == len(data.images) * data.repeats == 30
    counts = [b["count"] for b in doc["buckets"]]
    assert sum(counts) == 30
    batch = cfg["train_batch_size"]
    assert steps["batches_per_epoch"] == sum(math.ceil(c / batch) for c in counts)
    accumulation = cfg["gradient_accumulation_steps"]
    assert steps["steps_per_epoch"] == math.ceil(steps["batches_per_epoch"] / accumulation)
    if cfg["max_train_epochs"] is not None:
        assert steps["max_train_steps"] == cfg["max_train_epochs"] * steps["steps_per_epoch"]
    else:
        assert steps["num_epochs"] == math.ceil(cfg["max_train_steps"] / steps["steps_per_epoch"])
    assert steps["effective_batch_size"] == batch * accumulation
    assert doc["outputs"][-1] == str(tmp_path / "out" / f"{cfg['output_name'] or 'last'}.safetensors")
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_pony_recipe_reproduces_the_hungarian_command(datasets, tmp_path: Path):
    result = run("train", "--config", "recipes/pony-locon.toml", "--train_data_dir", str(datasets["sdxl"].root),
                 "--dry-run", "--json")
    doc = json.loads(result.stdout)
    cfg = doc["config"]
    assert cfg["network_module"] == "lycoris.kohya" and "algo=locon" in cfg["network_args"]
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["max_train_steps"]) == (8, 6, 400)
    assert doc["steps"]["effective_batch_size"] == 48
    assert cfg["resolution"] == [1024, 1024] and cfg["bucket_reso_steps"] == 32 and cfg["model_type"] == "sdxl"
    assert any("--sample_prompts" in w for w in doc["warnings"])


def test_flags_override_recipe_and_warnings_go_to_stderr(datasets):
    result = run("train", "--config", "recipes/sd15-style.toml", "--train_data_dir", str(datasets["sd1"].root),
                 "--network_dim=16", "--spda", "--dataset_repeats", "3", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "network_dim" in result.stdout and "16" in result.stdout
    assert "Step arithmetic" in result.stdout and "total optimization steps" in result.stdout
    assert "--spda is read as --sdpa" in result.stderr
    assert "--dataset_repeats=3 has no effect" in result.stderr
    assert "without a .txt caption use 'tinychar'" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--output_name="], "--output_name is empty"),
    (["--save_precision", "fp8"], "--save_precision: 'fp8' is not one of float, fp16, bf16"),
    (["--network_dimm", "8"], "did you mean --network_dim"),
    (["--config", "nope.toml"], "recipe not found"),
    (["--train_data_dir", "/nonexistent/dir", "--resolution", "64", "--dry-run"], "--train_data_dir is not a folder"),
    (["--train_data_dir", ".", "--resolution", "64"], "--pretrained_model_name_or_path is required"),
])
def test_errors_exit_2_with_one_line(args, message):
    result = run("train", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_output_config_prints_a_recipe(tmp_path: Path):
    result = run("train", "--network_dim", "8", "--network_args", "conv_dim=4", "conv_alpha=1", "--output_config")
    assert result.returncode == 0, result.stderr
    assert "network_dim = 8" in result.stdout and 'network_args = ["conv_dim=4", "conv_alpha=1"]' in result.stdout


def test_help_and_flag_list():
    result = run("train", "--help")
    assert result.returncode == 0 and "Examples:" in result.stdout and "--dry-run" in result.stdout
    listing = run("train", "--list-flags", "--json")
    flags = {row["flag"] for row in json.loads(listing.stdout)}
    assert {"--network_args", "--sdpa", "--caption_extension", "--max_train_epochs"} <= flags


def test_dry_run_does_not_import_torch(datasets):
    code = (
        "import sys\n"
        "from loratools.cli.app import app\n"
        f"args = ['train', '--config', 'recipes/sd15-character.toml', '--train_data_dir', {str(datasets['sd1'].root)!r},"
        " '--dry-run', '--json']\n"
        "app(args, prog_name='loratools', standalone_mode=False)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NO_TORCH" in result.stderr


def test_dry_run_lists_sd_scripts_default_names_without_output_name(datasets, tmp_path: Path):
    """Without --output_name sd-scripts names each kind of file differently (epoch-, at-, last)."""
    (tmp_path / "model").mkdir()
    result = run("train", "--train_data_dir", str(datasets["sd1"].root), "--output_dir", str(tmp_path),
                 "--pretrained_model_name_or_path", str(tmp_path / "model"), "--max_train_epochs", "3",
                 "--save_every_n_epochs", "1", "--save_every_n_steps", "25", "--resolution", "64",
                 "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    names = [Path(p).name for p in doc["outputs"]]  # in the order the run writes them
    assert [n for n in names if n.startswith("epoch-")] == ["epoch-000001.safetensors", "epoch-000002.safetensors"]
    steps = [n for n in names if n.startswith("at-step")]
    assert steps and steps[0].startswith("at-step00000025") and names[-1] == "last.safetensors"
    assert len(steps) + 3 == len(names)
