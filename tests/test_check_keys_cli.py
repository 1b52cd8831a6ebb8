"""`loratools check keys` end to end: the real program in a subprocess, exit codes checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wired():
    if "keys" not in _run("check", "--help").stdout:
        pytest.skip("`check keys` is not registered in loratools/cli/check.py yet (check_keys.register(app))")


@pytest.fixture(scope="module")
def files(tiny_sd1, tiny_sdxl, tmp_path_factory):
    from loratools.tiny import make_lora

    d = tmp_path_factory.mktemp("check_keys")
    return {"sdxl": make_lora(tiny_sdxl, "sdxl", "locon", path=d / "xl.safetensors").path,
            "sd1": make_lora(tiny_sd1, "sd1", "lora", path=d / "sd1.safetensors").path}


def test_matching_lora_exits_0(wired, files, tiny_sdxl_ckpt):
    p = _run("check", "keys", str(files["sdxl"]), "--base", str(tiny_sdxl_ckpt))
    assert p.returncode == 0, p.stderr
    assert "modules apply; 0 unmatched; LoRA: SDXL, base: SDXL" in p.stdout


def test_sd1_lora_on_sdxl_exits_1_and_says_why(wired, files, tiny_sdxl_dir):
    p = _run("check", "keys", str(files["sd1"]), "--base", str(tiny_sdxl_dir), "--json")
    assert p.returncode == 1
    data = json.loads(p.stdout)
    assert data["ok"] is False and data["adapter_arch"] == "SD1" and data["base_arch"] == "SDXL"
    assert any("SD1 adapter" in s and "SDXL base" in s for s in data["problems"])
    assert data["unmatched"]  # SD1 UNet names are not SDXL's
    p = _run("check", "keys", str(files["sd1"]), "--base", str(tiny_sdxl_dir))
    assert p.returncode == 1 and "SD1 adapter" in p.stderr and "LoRA: SD1, base: SDXL" in p.stdout
    # wrong architecture: a sample of the unmatched names, not a screenful
    listed = [line for line in p.stdout.splitlines() if line.startswith("  lora_")]
    assert len(listed) == 5 and f"and {len(data['unmatched']) - 5} more (--all lists them)" in p.stdout


def test_missing_base_is_an_error_exit_2(wired, files, tmp_path):
    p = _run("check", "keys", str(files["sdxl"]), "--base", str(tmp_path / "nope.safetensors"))
    assert p.returncode == 2 and "not found" in p.stderr


def test_rendering_lists_problem_modules(files, tiny_sdxl_ckpt):
    """The command module on its own group (independent of the wiring in check.py)."""
    from loratools.cli import check_keys

    app = typer.Typer()
    app.callback()(lambda: None)
    check_keys.register(app)
    runner = CliRunner()
    ok = runner.invoke(app, ["keys", str(files["sdxl"]), "--base", str(tiny_sdxl_ckpt), "--all"])
    assert ok.exit_code == 0, ok.output
    assert "modules that apply" in ok.output
    bad = runner.invoke(app, ["keys", str(files["sd1"]), "--base", str(tiny_sdxl_ckpt)])
    assert bad.exit_code == 1
    assert "unmatched modules (" in bad.output and "lora_unet_down_blocks_0_attentions_0_proj_in" in bad.output
    assert "--base" in runner.invoke(app, ["keys", "--help"]).output


@pytest.fixture(scope="module")
def peft_file(tiny_sdxl, tmp_path_factory):
    from loratools.tiny import make_lora

    return make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", path=tmp_path_factory.mktemp("ck") / "peft.safetensors").path


def test_loader_all_lists_what_each_loader_skips_and_exits_1(wired, peft_file, tiny_sdxl_ckpt):
    # issue 13: per loader, keys loaded and keys skipped with the reason; exit 1 when a chosen loader skips
    p = _run("check", "keys", str(peft_file), "--base", str(tiny_sdxl_ckpt), "--loader", "all", "--json")
    assert p.returncode == 1
    data = json.loads(p.stdout)
    comfy, a1111, dif = (data["loaders"][n] for n in ("comfyui", "a1111", "diffusers"))
    assert dif["ok"] and dif["loaded"] == dif["keys"]
    assert a1111["loaded"] == 0 and a1111["reasons"] == {"form": a1111["keys"]}
    unet_attention = [s["key"] for s in comfy["skipped"]]
    assert unet_attention and all(k.startswith("unet.") and ".attn" in k for k in unet_attention)
    assert comfy["loaded"] == comfy["keys"] - len(unet_attention) > 0
    assert any("ComfyUI would skip" in s for s in data["problems"])
    only = _run("check", "keys", str(peft_file), "--base", str(tiny_sdxl_ckpt), "--loader", "diffusers")
    assert only.returncode == 0, only.stdout + only.stderr
    assert "diffusers" in only.stdout and "ComfyUI" not in only.stdout


def test_loader_table_and_reasons_in_text_output(wired, peft_file, tiny_sdxl_ckpt):
    p = _run("check", "keys", str(peft_file), "--base", str(tiny_sdxl_ckpt), "-l", "comfyui,a1111")
    assert p.returncode == 1
    text = " ".join(p.stdout.split())
    assert "ComfyUI: keys it would skip" in text and "naming form" in text and "ComfyUI does not map" in text
    assert "A1111 would skip" in p.stderr


def test_without_base_the_released_model_is_the_reference(wired, files, peft_file):
    # a tiny model is not the released SDXL: the check says so (shapes), exit 1
    p = _run("check", "keys", str(files["sdxl"]), "--json")
    assert p.returncode == 1
    data = json.loads(p.stdout)
    assert data["base"] is None and "released SDXL" in data["summary"] and data["shape_mismatches"]


def test_unknown_loader_is_a_usage_error(wired, peft_file):
    p = _run("check", "keys", str(peft_file), "--loader", "forge")
    assert p.returncode == 2 and "forge" in p.stderr and "comfyui" in p.stderr
