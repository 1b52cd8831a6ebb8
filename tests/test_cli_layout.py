"""Readable at 80 columns, the width of a pipe (issue 15, item 3).

Was: `check weights` wrapped module names to 10 characters a line at 80 columns and cut them mid-word
at 120; `resize --help` truncated flag names (`--output,--output_folder,--output-fo…`) and showed
`<bool>` on every flag. `--csv` / `--json` hold everything whatever the width.
"""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from loratools.cli import output
from loratools.cli.app import app
from loratools.io import save_tensors
from test_check_weights_op import SD1_LAST, _kill, fixture_lora

RESIZE_FLAGS = ["--output", "--output_folder", "--output-folder", "--save_to", "--save-to", "--score_recipes",
                "--score-recipes", "--new_rank", "--new-rank", "--new_conv_rank", "--new-conv-rank", "--dynamic_method",
                "--dynamic-method", "--dynamic_param", "--dynamic-param", "--save_precision", "--save-precision",
                "--output_dtype", "--output-dtype", "--kohya-compat", "--kohya_compat", "--dry-run", "--dry_run"]


def commands(group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_shows_whole_flag_names_and_no_type_labels_at_80_columns():
    runner = CliRunner()
    text = runner.invoke(app, ["resize", "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
    for flag in RESIZE_FLAGS:
        assert f"{flag}," in text or f"{flag} " in text or text.rstrip().endswith(flag), flag
    every = list(commands(typer.main.get_command(app)))
    assert {("merge",), ("resize",), ("check", "weights"), ("metadata", "show")} <= set(every)
    for path in every:
        text = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
        assert "<bool>" not in text and "…" not in text, path
        # help text wraps at 80; a line of many aliases or an example may run a little past it, never cut
        assert max(len(line) for line in text.splitlines()) <= 100, path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    t, meta = fixture_lora("lora_kohya_sd15_lora.json", dtype=torch.float16)
    for m in SD1_LAST:
        _kill(t, m, "dead")
    _kill(t, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", "dead")
    p = tmp_path_factory.mktemp("layout") / "planted.safetensors"
    save_tensors(p, t, meta)
    return p


@pytest.mark.parametrize("width", [80, 120])
def test_check_weights_keeps_module_names_whole(planted, width, monkeypatch):
    monkeypatch.setattr(output.out, "console", output.make_console(width=width))
    r = CliRunner().invoke(app, ["check", "weights", str(planted)])
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    table = lines[1:next(i for i, line in enumerate(lines) if line.startswith("264 modules ("))]
    assert table and all(len(line.rstrip()) <= width for line in table)  # one-line summaries are not broken
    for name in [*SD1_LAST, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"]:
        assert name in lines, name  # on a line of its own, whole
    assert "FAILED: 1 module(s) with problems (1 dead)" in r.stdout


def test_csv_and_json_are_complete_at_80_columns(planted, monkeypatch):
    monkeypatch.setattr(output.out, "console", output.make_console(width=80))
    doc = json.loads(CliRunner().invoke(app, ["check", "weights", str(planted), "--json"]).stdout)
    assert len(doc["modules"]) == 264 and all(m["name"].startswith("lora_") for m in doc["modules"])
    rows = CliRunner().invoke(app, ["check", "weights", str(planted), "--csv"]).stdout.splitlines()
    assert len(rows) == 1 + 2 * 264 and max(len(r) for r in rows) > 80
