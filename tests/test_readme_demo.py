"""The README's demo table is what `loratools demo` prints: a real run, compared row by row.

The run is the README's own command (default settings, output piped, so 80 columns). Timings (the
`s` column) are left out and the text of each row is compared without its line breaks; words and
row order must match exactly, numbers within a few percent (training on another CPU rounds
differently). After a deliberate change, refresh the README with
``LORATOOLS_UPDATE_README=1 pytest tests/test_readme_demo.py``; a failure prints the fresh table too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- demo table: kept equal to a real `loratools demo` run by tests/test_readme_demo.py -->"
TITLE = "What each step produced"
NEXT_TITLE = "Each step on your own files"
_TIME = re.compile(r"^(.*?)(?:\s{3,}\d+\.\d)?\s*$")  # a row line, without its right-aligned seconds
_NUMBER = re.compile(r"^[(\"']*(-?\d+(?:\.\d+)?)[),;:%'\"]*$")


def table_block(text: str) -> list[str]:
    """The table's lines (title included, trailing spaces removed) from a demo's stdout."""
    lines = text.splitlines()
    start = lines.index(TITLE)
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == NEXT_TITLE)
    return [line.rstrip() for line in lines[start:end]]


def readme_block(readme: str) -> tuple[int, int, list[str]]:
    """``(first, last, lines)``: where the README's copy of the table sits (inside the fence after MARKER)."""
    lines = readme.splitlines()
    fence = lines.index(MARKER) + 1
    assert lines[fence] == "```", "the demo table's code fence must follow its marker"
    end = lines.index("```", fence + 1)
    return fence + 1, end, lines[fence + 1:end]


def rows(block: list[str]) -> list[tuple[str, str]]:
    """``(step, result text)`` per row; continuation lines are joined, the seconds dropped."""
    header = block[1]
    assert header.startswith("step") and "result" in header, block[:3]
    cut = header.index("result")
    out: list[tuple[str, str]] = []
    for line in block[3:]:
        body = _TIME.match(line).group(1)
        step, text = body[:cut].strip(), body[cut:].strip()
        if step:
            out.append((step, text))
        else:
            out[-1] = (out[-1][0], f"{out[-1][1]} {text}".strip())
    return out


def same_words(a: str, b: str) -> bool:
    """Equal word for word; numbers may differ by 5 % (and counts by one)."""
    wa, wb = a.split(), b.split()
    if len(wa) != len(wb):
        return False
    for x, y in zip(wa, wb):
        mx, my = _NUMBER.match(x), _NUMBER.match(y)
        if mx and my:
            u, v = float(mx.group(1)), float(my.group(1))
            slack = 1.0 if "." not in mx.group(1) + my.group(1) else 0.05
            if abs(u - v) > 0.05 * max(abs(u), abs(v)) + slack:
                return False
            if re.sub(r"[\d.\-]", "", x) != re.sub(r"[\d.\-]", "", y):
                return False
        elif x != y:
            return False
    return True


def test_helpers_compare_rows_not_layout():
    a = ["What each step produced", "step   result   s", "──", "train  loss 1.0845 ->     41.0",
         "       0.7668, 155 modules", "resize rank 1168 -> 1083,"]
    b = ["What each step produced", "step   result   s", "──", "train  loss 1.0830 -> 0.7649,   3.9",
         "       155 modules", "resize rank 1168 -> 1084,"]
    assert rows(a) == [("train", "loss 1.0845 -> 0.7668, 155 modules"), ("resize", "rank 1168 -> 1083,")]
    assert all(same_words(x, y) for (_, x), (_, y) in zip(rows(a), rows(b)))
    assert not same_words("155 modules", "155 layers") and not same_words("149 weights", "120 weights")
    assert not same_words("484.5 KiB", "484.5 MiB") and not same_words("a b", "a b c")


def test_readme_demo_table_is_real_output(tmp_path):
    # the README's table is what the demo prints on a CPU; a GPU's kernels train a slightly different
    # LoCon, so on a CUDA machine the demo is sent to the CPU with accelerate's own switch
    env = {**os.environ, "COLUMNS": "80", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-m", "loratools", "demo", "-o", str(tmp_path / "demo")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = table_block(proc.stdout)
    assert all(len(line) <= 80 for line in fresh), fresh
    text = README.read_text(encoding="utf-8")
    first, last, shown = readme_block(text)
    if os.environ.get("LORATOOLS_UPDATE_README"):
        lines = text.splitlines()
        README.write_text("\n".join([*lines[:first], *fresh, *lines[last:]]) + "\n", encoding="utf-8")
        shown = fresh
    expected, got = rows(shown), rows(fresh)
    message = "README's demo table differs from a real run; the run printed:\n" + "\n".join(fresh)
    assert [s for s, _ in expected] == [s for s, _ in got], message
    for (step, want), (_, have) in zip(expected, got):
        assert same_words(want, have), f"{step}: README {want!r} vs run {have!r}\n{message}"
