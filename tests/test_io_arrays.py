"""io.arrays: numpy's view of tensor data, bfloat16 as tagged bits rounded exactly as torch rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.io import TensorSpec, open_safetensors, write_safetensors
from loratools.io.arrays import as_numpy, cast, scalar
from loratools.io.dtypes import from_torch


def test_bf16_cast_rounds_as_torch_and_widens_exactly():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.3e38, -3.4e38], np.float32)])
    ours = cast(x, "BF16")
    ref = torch.from_numpy(x).to(torch.bfloat16)
    assert from_torch(ours.dtype) == "BF16"
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(as_numpy(ours), ref.float().numpy())  # widening is exact
    assert as_numpy(scalar(0.3, ours.dtype)) == pytest.approx(float(torch.tensor(0.3, dtype=torch.bfloat16)), abs=0)


def test_bf16_bits_round_trip_through_a_file(tmp_path):
    x = torch.randn(3, 5).to(torch.bfloat16)
    p = tmp_path / "a.safetensors"
    write_safetensors(p, [TensorSpec("x", torch.bfloat16, (3, 5))], lambda name: x)
    bits = open_safetensors(p, numpy=True)["x"]
    assert from_torch(bits.dtype) == "BF16"
    q = tmp_path / "b.safetensors"
    write_safetensors(q, [TensorSpec("x", bits.dtype, bits.shape)], lambda name: bits)  # written back as BF16
    assert q.read_bytes() == p.read_bytes()
