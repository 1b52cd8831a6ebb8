"""io.stream: float64 sums of squares of tensors and row blocks read in one pass, against torch."""

from __future__ import annotations

import pytest
import torch

from loratools.errors import InvalidFileError
from loratools.io import open_safetensors, save_tensors
from loratools.io import stream
from loratools.io.checkpoint import open_model
from loratools.io.stream import ByteRange, sum_of_squares, tensor_range


def _exact(t: torch.Tensor) -> float:
    return float((t.double() ** 2).sum())


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w16": (torch.randn(300, 70, generator=g) * 0.02).half(),
         "wbf": (torch.randn(64, 33, generator=g) * 3).bfloat16(),
         "w32": torch.randn(17, 5, 3, 3, generator=g),
         "w64": torch.randn(9, 4, generator=g, dtype=torch.float64),
         "fused": torch.randn(3 * 40, 40, generator=g).half()}
    b = {"other": torch.randn(1000, 3, generator=g).half()}
    save_tensors(tmp_path / "a.safetensors", a, {})
    save_tensors(tmp_path / "b.safetensors", b, {})
    return tmp_path, a, b


def test_sums_match_torch_for_every_dtype_rows_and_files(files, monkeypatch):
    monkeypatch.setattr(stream, "BLOCK", 4096)  # many blocks per tensor: the seams are exercised
    d, a, b = files
    ra, rb = open_safetensors(d / "a.safetensors"), open_safetensors(d / "b.safetensors")
    asks = [(rb, "other", None), (ra, "w16", None), (ra, "fused", (40, 80)), (ra, "wbf", None),
            (ra, "w32", None), (ra, "fused", (0, 40)), (ra, "w64", None), (ra, "fused", (80, 120))]
    ranges = [tensor_range(r, k, rows) for r, k, rows in asks]
    got = sum_of_squares(ranges)
    for (r, k, rows), value in zip(asks, got):
        t = (a | b)[k]
        t = t if rows is None else t[rows[0]:rows[1]]
        assert value == pytest.approx(_exact(t), rel=1e-12), k


def test_progress_counts_every_byte(files):
    d, a, _ = files
    r = open_safetensors(d / "a.safetensors")
    ranges = [tensor_range(r, k) for k in a]
    seen = []
    sum_of_squares(ranges, lambda done, total: seen.append((done, total)))
    total = sum(x.stop - x.start for x in ranges)
    assert seen[-1] == (total, total)


def test_shards_and_unreadable_dtypes(files, tmp_path):
    d, _, _ = files
    save_tensors(tmp_path / "c.safetensors", {"ints": torch.arange(10, dtype=torch.int32)}, {})
    assert tensor_range(open_safetensors(tmp_path / "c.safetensors"), "ints") is None
    assert tensor_range({"w": torch.ones(2)}, "w") is None  # an in-memory dict has no bytes on disk
    model = open_model(d / "a.safetensors")
    assert tensor_range(model.components[""], "w16").path == d / "a.safetensors"


def test_truncated_file_is_one_error_naming_it(files):
    d, _, _ = files
    r = open_safetensors(d / "a.safetensors")
    good = tensor_range(r, "w16")
    past = ByteRange(good.path, good.start, good.path.stat().st_size + 64, "F16")
    with pytest.raises(InvalidFileError, match="truncated") as exc:
        sum_of_squares([good, past])
    assert str(good.path) in str(exc.value)
