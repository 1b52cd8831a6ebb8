"""`loratools metadata` end to end as a subprocess: output, files written, exit codes, error lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loratools.io import open_safetensors
from test_metadata_show import rank1_file


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return rank1_file(tmp_path_factory.mktemp("mcli") / "sd15.safetensors", "lora_kohya_sd15_lora.json")


def test_show_json_and_text(sd15):
    r = run("metadata", "show", str(sd15), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["architecture"]["arch"] == "sd1" and doc["module_counts"] == {"unet": 192, "te": 72}
    assert doc["trigger_words"][0] == {"tag": "sks character", "count": 40}
    assert doc["metadata"]["decoded"]["ss_shuffle_caption"] is True
    r = run("metadata", "show", str(sd15), str(sd15))
    assert r.returncode == 0 and r.stdout.count("Trigger words") == 2 and "SD1" in r.stdout
    assert "10_sks_character" in r.stdout and "40 images x 10 repeats" in r.stdout


def test_dump_and_edit(sd15, tmp_path):
    """Successes in-process (typer's runner), the error paths through the real program."""
    from typer.testing import CliRunner

    from loratools.cli.app import app

    r = CliRunner().invoke(app, ["metadata", "dump", str(sd15)])
    assert r.exit_code == 0
    dumped = json.loads(r.stdout)
    assert dumped == open_safetensors(sd15).metadata and list(dumped) == sorted(dumped)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(app, ["metadata", "set", str(sd15), "modelspec.author=me", "ss_output_name=hero",
                                 "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"] == str(out)
    assert open_safetensors(out).metadata["modelspec.author"] == "me"
    r = CliRunner().invoke(app, ["metadata", "strip", str(out), "--training-data", "--in-place"])
    assert r.exit_code == 0 and "ss_tag_frequency" in r.stdout and "caption tags" in r.stdout
    assert "ss_tag_frequency" not in open_safetensors(out).metadata
    r = run("metadata", "delete", str(out), "modelspec.author", "-o", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "input" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--debug", "metadata", "strip", str(out), "-o", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "Traceback" in r.stderr and "--training-data" in r.stderr


@pytest.mark.parametrize("content,needle", [
    (b"", "too short"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "past the end"),
    (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "does not start"), (None, "not found"), ("dir", "directory"),
])
def test_bad_inputs_exit_2(tmp_path, content, needle):
    if content == "dir":
        target = tmp_path
    else:
        target = tmp_path / "bad.safetensors"
        if content is not None:
            target.write_bytes(content)
    r = run("metadata", "show", str(target))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and str(target) in lines[0]


def test_brackets_in_names_and_values_are_text_not_markup(sd15, tmp_path, monkeypatch):
    """Civitai names like `char [v2].safetensors` and tags like `[/b]` were eaten as rich markup
    (or crashed the renderer with a MarkupError)."""
    from typer.testing import CliRunner

    from loratools.cli.app import app

    def text(*args: str) -> str:
        r = CliRunner().invoke(app, list(args))
        assert r.exit_code in (0, 1), r.output
        return " ".join(r.stdout.split())  # the console may wrap long paths

    monkeypatch.chdir(tmp_path)  # a short relative path: rules truncate long titles
    out = "char [v2].safetensors"
    shown = text("metadata", "set", str(sd15), "ss_training_comment=use [tag] and [/b] here", "-o", out)
    assert "use [tag] and [/b] here" in shown and f"wrote {out}" in shown
    shown = text("metadata", "show", out)
    assert "char [v2].safetensors" in shown and "use [tag] and [/b] here" in shown
    assert "char [v2].safetensors" in text("check", "weights", out)
