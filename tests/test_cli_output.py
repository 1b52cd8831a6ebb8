"""The output object: every user string printed as text, tables that fit, sizes that show the change,
progress with an ETA, and sd-scripts' space-separated lists. No torch: these are the CLI's own parts."""

from __future__ import annotations

import io

import pytest
from rich.progress import Progress

from loratools.cli.options import expand_lists
from loratools.cli.output import Output, make_console
from loratools.units import size_change

TRICKY = ["char [v2].safetensors", "style:smile:.safetensors", "lora.safetensors:abc", "[/b] end", "[bold]x[/bold]",
          "a\\[b]"]


def recorder(width: int = 80) -> tuple[Output, io.StringIO, io.StringIO]:
    stdout, stderr = io.StringIO(), io.StringIO()
    return Output(make_console(file=stdout, width=width), make_console(file=stderr, width=width)), stdout, stderr


def test_every_channel_prints_text_as_text():
    """Was: `char [v2].safetensors` printed as `char .safetensors`, `:smile:` as an emoji, `:abc` as 🔤."""
    out, stdout, stderr = recorder()
    for s in TRICKY:
        out.print(f"wrote {s}")
        out.warn(s)
        out.info(s)
        out.error(s)
        out.problem(s)
        out.rule(s)
        out.show(out.table(s, ["module", "value"], [(s, s)]))
        out.show(out.key_values(s, [(s, s)]))
    text = stdout.getvalue() + stderr.getvalue()
    for s in TRICKY:
        assert f"wrote {s}" in text and f"warning: {s}" in text and f"error: {s}" in text and f"problem: {s}" in text
        assert text.count(s) >= 9, s
    assert "😄" not in text and "🔤" not in text


def test_progress_line_is_text_and_shows_count_and_eta_once_known():
    """Was: `0/?` while loading, elapsed time only, and rich markup applied to file names."""
    clock = [0.0]
    out, _, stderr = recorder(120)
    bar = out.progress()
    columns = bar.columns
    p = Progress(*columns, console=make_console(file=stderr, width=120), get_time=lambda: clock[0])
    task = p.add_task("char [v2].safetensors: :smile: reading", total=None)
    line = lambda: "".join(str(c.render(p.tasks[0])) for c in columns if not hasattr(c, "bar_width"))  # noqa: E731
    assert "char [v2].safetensors: :smile: reading" in line() and "?" not in line() and "eta" not in line()
    for done in range(1, 6):
        clock[0] = float(done)
        p.update(task, completed=done, total=10)
    assert "5/10" in line() and "eta 0:00:05" in line()


def test_table_fits_or_stacks_and_never_cuts_a_name():
    """Was: check weights wrapped module names to 10 characters a line (80 columns) and cut them at 120."""
    name = "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0"
    rows = [(name, "dead (expected)", "lora 8/4", "100.0%", "0.4%", "0", "lora_down 0.09/5.04e-05; lora_up 0/0")]
    cols = ["module", "status", "type r/α", "zeros", "<fp16", "‖ΔW‖", "mean|w| / min|w| per factor"]
    for width in (80, 120, 200):
        out, stdout, _ = recorder(width)
        t = out.table(None, cols, rows, justify_right=("zeros", "<fp16", "‖ΔW‖"), wrap=(cols[-1],))
        out.show(t)
        lines = stdout.getvalue().splitlines()
        assert any(name in line for line in lines), (width, lines)
        assert all(len(line.rstrip()) <= width for line in lines)
        stacked = not t.fits(width)
        assert stacked == (width < 150)
        assert ("status: dead (expected)" in stdout.getvalue()) == stacked
        assert (lines[0].startswith("module")) == (not stacked)


def test_headerless_table_is_a_key_value_listing():
    out, stdout, _ = recorder()
    out.show(out.table(None, ("", ""), [("input", "a [b].safetensors"), ("modules", 12)]))
    assert stdout.getvalue().split() == ["input", "a", "[b].safetensors", "modules", "12"]


@pytest.mark.parametrize("before, after, text", [
    (496128, 476570, "484.5 KiB -> 465.4 KiB"),  # was "0.5 MiB -> 0.5 MiB"
    (151_000_000, 150_990_000, "144.005 MiB -> 143.995 MiB"),
    (151_000_000, 151_000_100, "144.005 MiB -> 144.005 MiB (+100 bytes)"),
    (38_000_000, 9_500_000, "36.2 MiB -> 9.1 MiB"),
    (900, 800, "900 B -> 800 B"),
    (2048, 2048, "2.0 KiB -> 2.0 KiB"),
])
def test_size_change_shows_the_change(before, after, text):
    assert size_change(before, after) == text


def test_sd_scripts_lists_expand_to_repeated_options():
    names = frozenset({"--models", "--ratios"})
    args = ["--sd_model", "b.safetensors", "--models", "a.safetensors", "c d.safetensors", "--ratios", "0.7", "-0.3",
            "--save_to", "o.safetensors", "--models", "e.safetensors"]
    assert expand_lists(args, names) == [
        "--sd_model", "b.safetensors", "--models", "a.safetensors", "--models", "c d.safetensors",
        "--ratios", "0.7", "--ratios", "-0.3", "--save_to", "o.safetensors", "--models", "e.safetensors"]
    assert expand_lists(["--models", "a", "--", "--models"], names) == ["--models", "a", "--", "--models"]
    assert expand_lists(["--models=a", "b"], names) == ["--models=a", "b"]
