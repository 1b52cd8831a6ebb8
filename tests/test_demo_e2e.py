"""`loratools demo --quick` end to end as a subprocess: every artifact exists and is what it claims."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from loratools.io import open_model, read_header
from loratools.ops.demo import MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo run (the expensive part), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "out dir"  # a space in the path, as on many users' machines
    proc = subprocess.run([sys.executable, "-m", "loratools", "demo", "--quick", "-o", str(out), "--json"],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout), proc.stderr


def test_demo_writes_every_artifact(demo_run):
    out, report, stderr = demo_run
    assert (out / MARKER).exists()
    assert json.loads((out / "report.json").read_text()) == report
    for step in ("[1/10]", "[10/10]"):
        assert step in stderr

    base = report["base"]
    assert read_header(base["single_file"]).file_size == base["single_file_bytes"]
    folder = open_model(base["diffusers_dir"])
    assert folder.layout == "diffusers" and {"unet", "text_encoder", "text_encoder_2", "vae"} <= set(folder.components)

    captions = sorted((out / "dataset" / "5_tinychar").glob("*.txt"))
    assert len(captions) == report["dataset"]["images"] == 4
    assert all(c.read_text().startswith("tinychar, ") for c in captions)


def test_demo_trains_and_samples(demo_run):
    out, report, _ = demo_run
    train = report["train"]
    assert train["steps"] == len(train["losses"]) == 8
    assert train["loss_first"] == train["losses"][0] and train["loss_last"] == train["losses"][-1]
    header = read_header(train["lora"])
    assert any(k.startswith("lora_te1_") for k in header.tensors)
    assert any(k.startswith("lora_unet_") for k in header.tensors)
    # LoCon: 3x3 conv layers have 4-d factors of rank conv_dim=4
    conv_downs = [i.shape for k, i in header.tensors.items() if k.endswith("lora_down.weight") and len(i.shape) == 4
                  and i.shape[2:] == (3, 3)]
    assert conv_downs and all(s[0] == 4 for s in conv_downs)
    # sample_at_first + every 4 steps, two prompts: steps 0, 4, 8
    assert len(train["samples"]) == 6
    for path in train["samples"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the command shown for the step (paths relative to where the demo ran, quoted for the shell) is a
    # valid configuration of the same run
    argv = shlex.split(train["command"])
    assert argv == ["loratools", "train", "--config", "out dir/train/recipe.toml"]
    proc = subprocess.run([sys.executable, "-m", *argv, "--dry-run", "--json"], capture_output=True, text=True,
                          cwd=out.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dry = json.loads(proc.stdout)
    assert dry["config"]["max_train_steps"] == 8 and dry["config"]["network_module"] == "lycoris.kohya"
    assert dry["config"]["network_args"] == ["algo=locon", "preset=full", "conv_dim=4", "conv_alpha=2"]
    assert dry["outputs"] == train["saved"] and train["saved"][-1] == train["lora"]  # every third of the steps


def test_demo_resizes_to_smaller_files(demo_run):
    _, report, _ = demo_run
    resized = {r["recipe"]: r for r in report["resized"]}
    assert set(resized) == {"fro_ckpt=1,thr=-3.55", "sv_fro=0.9"}
    lora_bytes = report["train"]["bytes"]
    for r in resized.values():
        assert r["status"] == "written"
        size = read_header(r["path"]).file_size
        assert size == r["bytes_after"] < lora_bytes
        assert r["rank_after"] < r["rank_before"]
        ranks = sum(i.shape[0] for k, i in read_header(r["path"]).tensors.items() if k.endswith("lora_down.weight"))
        assert ranks == r["rank_after"]


def test_demo_checks_merges_and_reads_metadata(demo_run):
    out, report, _ = demo_run
    assert [c["path"] for c in report["checks"]] == [report["train"]["lora"], *(r["path"] for r in report["resized"])]
    for c in report["checks"]:
        assert sum(c["counts"].values()) == c["modules"] > 0
    # the demo's own LoCon: its findings are expected (unused TE1 layer, harmless fp16 underflow); was FAILED
    assert [c["failed"] for c in report["checks"]] == [False, False, False]

    merge = report["merge"]
    assert merge["applied"] == merge["modules"] > 0 and merge["verified"] is True and merge["ratio"] == 0.8
    assert "out dir/train/tinychar-locon.safetensors:0.8" in shlex.split(merge["command"])
    merged = open_model(merge["path"])
    base = open_model(report["base"]["single_file"])
    assert merged.layout == "single_file" and set(merged.components[""]) == set(base.components[""])
    changed = [k for k in base.components[""]
               if not base.components[""][k].equal(merged.components[""][k])]
    # every patched weight changed, except those of the modules the check found dead (zero deltas)
    dead = report["checks"][0]["counts"].get("dead", 0)
    assert len(changed) == merge["patched_keys"] - dead > 0
    for key in ("preview_base", "preview_merged"):
        with open(merge[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    meta = report["metadata"]
    assert meta["architecture"] == "SDXL"
    assert ["tinychar", 4] in meta["trigger_words"]
    assert meta["datasets"] == [{"folder": "5_tinychar", "images": 4, "repeats": 5, "regularization": False}]


def test_demo_block_merge_extract_and_ema(demo_run):
    _, report, _ = demo_run
    blocks = report["blocks"]
    assert 0 < blocks["zeroed"] < blocks["applied"] == report["merge"]["modules"]
    assert shlex.split(blocks["command"])[3].endswith("tinychar-locon.safetensors:0.8:OUTALL")
    ex = report["extract"]
    # the merged checkpoint minus the base is 0.8 x the LoCon: extracting at its ranks gives it back
    assert ex["kept"] > 0.9999 and ex["deviation"] < 0.01 and ex["compared"] == ex["layers"] > 0
    assert read_header(ex["path"]).metadata["ss_network_module"] == "networks.lora"
    ema = report["ema"]
    assert ema["steps"] == [2, 4, 6, 8] and sum(ema["weights"]) == pytest.approx(1.0) and ema["weights"][0] == 0.0
    assert shlex.split(ema["command"])[:3] == ["loratools", "ema", "out dir/train"]


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "loratools", "demo", "--quick", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and str(tmp_path) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_sd1(tmp_path, monkeypatch):
    """--arch sd1 runs the same steps on the SD1-like model (in-process, one training step: the wiring)."""
    from loratools.ops.demo import DemoOptions, run_demo

    lines: list[str] = []
    r = run_demo(DemoOptions(tmp_path / "sd1", arch="sd1", steps=2, quick=True), progress=lines.append)
    assert len(lines) == 10 and r.metadata.architecture == "SD1" and r.train.steps == 2
    assert any(k.startswith("lora_te_") for k in read_header(r.train.lora).tensors)
    assert all(x.bytes_after < r.train.bytes for x in r.resized)
    assert r.merge.applied == r.merge.modules and r.merge.verified is True
    assert "model.diffusion_model.input_blocks.0.0.weight" in read_header(r.merge.path).tensors
    assert json.loads((tmp_path / "sd1" / "report.json").read_text())["arch"] == "sd1"

    # the human rendering of the same result: three tables naming the files, numbers and commands
    from loratools.cli import demo as cli_demo, output

    recorder = output.make_console(record=True, width=250)
    monkeypatch.setattr(output.out, "console", recorder)
    cli_demo._render(r)
    text = recorder.export_text()
    for needle in ("Where everything is", "What each step produced", "Each step on your own files",
                   "base/tiny-sd1.safetensors", f"rank {r.resized[1].rank_before} -> {r.resized[1].rank_after}",
                   f"applied {r.merge.applied}/{r.merge.modules} modules", "loratools metadata show",
                   "LoCon (networks.lora with conv_dim)"):
        assert needle in text, needle


def test_demo_commands_reproduce_its_steps(demo_run):
    """The resize command the demo prints gives the demo's own ranks and sizes when run (dry run)."""
    out, report, _ = demo_run

    argv = shlex.split(report["resize_command"])
    assert argv[:2] == ["loratools", "resize"]
    # --no-cache: the test must not write a norm cache into the user's cache folder
    proc = subprocess.run([sys.executable, "-m", *argv, "--json", "--dry-run", "--no-cache"], capture_output=True,
                          text=True, cwd=out.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dry = {o["recipe"]: (o["rank_after"], o["size_after"]) for o in json.loads(proc.stdout)[0]["outputs"]}
    assert dry == {r["recipe"]: (r["rank_after"], r["bytes_after"]) for r in report["resized"]}
