"""linalg: the QR + r x r SVD fast path against a dense SVD, and exact base-weight norms."""

from __future__ import annotations

import pytest
import torch

from loratools.linalg.lowrank import (
    balanced_factors,
    contract_tucker,
    lowrank_svd,
)
from loratools.linalg.norms import frobenius_norm, spectral_norm


def _dense(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))


def _check(up, down, mid, scale, delta):
    U, S, Vh = lowrank_svd(up, down, mid, scale)
    flat = delta.reshape(delta.shape[0], -1).double()
    ref = _dense(delta)
    c = S.numel()
    assert torch.allclose(S.double(), ref[:c], rtol=1e-4, atol=1e-5 * float(ref[0]))
    assert float(ref[c:].sum()) < 1e-4 * float(ref[0])  # nothing lost past c
    rebuilt = (U.double() * S.double()) @ Vh.double()
    assert torch.allclose(rebuilt, flat, atol=1e-4 * float(ref[0]))
    eye = torch.eye(c, dtype=torch.float64)
    assert torch.allclose(U.double().T @ U.double(), eye, atol=1e-5)
    assert torch.allclose(Vh.double() @ Vh.double().T, eye, atol=1e-5)
    assert torch.all(S[:-1] >= S[1:])


@pytest.mark.parametrize("out,inp,r", [(64, 48, 8), (48, 64, 4), (6, 5, 9), (20, 3, 7)])
def test_linear_matches_dense_svd(out, inp, r):
    g = torch.Generator().manual_seed(out * 100 + r)
    up, down = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
    _check(up, down, None, 0.5, 0.5 * up @ down)


def test_rank_above_min_dimension_gives_min_dimension_values():
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6, 16, generator=g), torch.randn(16, 5, generator=g)
    U, S, Vh = lowrank_svd(up, down)
    assert (U.shape, S.shape, Vh.shape) == ((6, 5), (5,), (5, 5))


def test_conv3x3_and_nonsquare_kernel_match_dense():
    g = torch.Generator().manual_seed(4)
    for kh, kw in ((3, 3), (1, 3)):
        down = torch.randn(5, 8, kh, kw, generator=g)
        up = torch.randn(12, 5, 1, 1, generator=g)
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # kohya's way
        _check(up, down, None, 2.0, 2.0 * delta)
        U, S, Vh = lowrank_svd(up, down)
        assert Vh.reshape(-1, 8, kh, kw).shape[0] == 5


def test_tucker_contracted_before_svd():
    g = torch.Generator().manual_seed(5)
    up, mid, down = torch.randn(10, 4, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 7, 1, 1, generator=g)
    delta = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
    _check(up, down, mid, 0.25, 0.25 * delta)
    assert contract_tucker(mid, down).shape == (4, 7, 3, 3)


def test_balanced_factors_share_sqrt_sigma():
    g = torch.Generator().manual_seed(8)
    U, S, Vh = lowrank_svd(torch.randn(30, 4, generator=g), torch.randn(4, 20, generator=g))
    up, down = balanced_factors(U, S, Vh)
    assert torch.allclose(up.norm(dim=0), S.sqrt(), rtol=1e-5)
    assert torch.allclose(down.norm(dim=1), S.sqrt(), rtol=1e-5)
    assert torch.allclose(up @ down, (U * S) @ Vh, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 30), (600, 400), (400, 50, 3, 3)])
def test_spectral_norm_is_exact(shape):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(*shape, generator=g).half()
    ref = float(torch.linalg.matrix_norm(w.double().reshape(shape[0], -1), ord=2))
    assert spectral_norm(w) == pytest.approx(ref, rel=1e-6)
    assert frobenius_norm(w) == pytest.approx(float(w.double().norm()), rel=1e-9)


def test_spectral_norm_with_equal_top_singular_values():
    # power iteration stalls here; the Gram eigenvalue does not
    q1, _ = torch.linalg.qr(torch.randn(500, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(500, 500, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    s = torch.linspace(1, 0.1, 500, dtype=torch.float64)
    s[1] = 1 - 1e-6
    w = ((q1 * s) @ q2.T).float()
    assert spectral_norm(w) == pytest.approx(1.0, rel=1e-5)
    assert spectral_norm(torch.zeros(3, 4)) == 0.0
