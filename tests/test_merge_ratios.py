"""``PATH[:RATIO]`` parsing: Windows drive letters, commas, existing files, ``--ratio``."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratools.errors import UsageError
from loratools.ops.merge.ratios import parse_ratio_option, resolve_inputs, split_weighted


@pytest.mark.parametrize("arg, path, ratio", [
    (r"C:\loras\a.safetensors:0.7", r"C:\loras\a.safetensors", 0.7),
    (r"C:\loras\a.safetensors", r"C:\loras\a.safetensors", None),
    (r"D:\my,loras\x, y.safetensors:-0.25", r"D:\my,loras\x, y.safetensors", -0.25),
    ("a,b.safetensors", "a,b.safetensors", None),
    ("style.safetensors:1e-1", "style.safetensors", 0.1),
    ("dir:with:colons/x.safetensors:2", "dir:with:colons/x.safetensors", 2.0),
    ("dir:with:colons/x.safetensors", "dir:with:colons/x.safetensors", None),
])
def test_split_weighted(arg, path, ratio):
    assert split_weighted(arg) == (path, ratio)


def test_existing_file_is_never_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("odd:0.5").write_bytes(b"")
    assert split_weighted("odd:0.5") == ("odd:0.5", None)
    assert split_weighted("odd:0.5:0.3") == ("odd:0.5", 0.3)


@pytest.mark.parametrize("arg", ["x.safetensors:nan", "x.safetensors:inf", "x.safetensors:1..2", ""])
def test_bad_ratio_is_refused(arg):
    with pytest.raises(UsageError):
        split_weighted(arg)


def test_ratio_option_forms():
    assert parse_ratio_option(["0.7,0.3", "1"]) == [0.7, 0.3, 1.0]
    with pytest.raises(UsageError, match="--ratio"):
        parse_ratio_option(["0.7,x"])


def test_resolve_inputs_combines_and_checks():
    got = resolve_inputs(["a.safetensors:0.5", "b.safetensors"])
    assert [(str(w.path), w.ratio) for w in got] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    assert [w.ratio for w in resolve_inputs(["a", "b"], ["0.3"])] == [0.3, 0.3]
    assert [w.ratio for w in resolve_inputs(["a", "b"], ["0.3,0.6"])] == [0.3, 0.6]
    with pytest.raises(UsageError, match="3 values for 2 inputs"):
        resolve_inputs(["a", "b"], ["1,2,3"])
    with pytest.raises(UsageError, match="ratio given twice"):
        resolve_inputs(["a:0.5"], ["0.3"])
