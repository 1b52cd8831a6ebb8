"""linalg.factored: spectra and vectors of up @ down from Gram matrices, against a dense float64 SVD."""

from __future__ import annotations

import pytest
import torch

from loratools.linalg.factored import BATCHED_EIGH_MAX, factored_svd


def _dense(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return up.double() @ down.double()


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    decaying = torch.randn(64, 16, generator=g) @ torch.diag(torch.logspace(0, -5, 16, dtype=torch.float32))
    zero_col = torch.randn(50, 8, generator=g)
    zero_col[:, 3] = 0
    repeated = torch.randn(30, 6, generator=g)
    repeated[:, 5] = repeated[:, 4]
    return [
        ("fp16 lora", torch.randn(320, 8, generator=g).half(), torch.randn(8, 2880, generator=g).half()),
        ("decaying", decaying, torch.randn(16, 100, generator=g)),
        ("zero column (singular Gram)", zero_col, torch.randn(8, 40, generator=g)),
        ("rank above out", torch.randn(4, 8, generator=g), torch.randn(8, 40, generator=g)),
        ("repeated column", repeated, torch.randn(6, 20, generator=g)),
        ("large r, one call per layer", torch.randn(80, BATCHED_EIGH_MAX + 8, generator=g),
         torch.randn(BATCHED_EIGH_MAX + 8, 90, generator=g)),
    ]


@pytest.mark.parametrize("name,up,down", _cases(), ids=[c[0] for c in _cases()])
def test_spectrum_and_reconstruction_match_dense_svd(name, up, down):
    (f,) = factored_svd(up[None], down[None])
    M = _dense(up, down)
    ref = torch.linalg.svdvals(M)
    assert f.S.numel() == min(up.shape[1], up.shape[0], down.shape[1])
    assert bool((f.S[:-1] >= f.S[1:]).all())
    torch.testing.assert_close(f.S, ref[: f.S.numel()], atol=1e-12 * float(ref[0]), rtol=1e-9)
    A, B = f.pieces(range(f.S.numel()))
    rebuilt = ((up.double() @ A) * f.S) @ (B @ down.double())
    torch.testing.assert_close(rebuilt, M, atol=1e-12 * float(M.abs().max()), rtol=0)
    # the leading k directions are the best rank-k approximation (Eckart-Young): error = dropped sigmas
    k = max(1, int((f.S > 0).sum()) // 2)
    A, B = f.pieces(range(k))
    err = float((M - ((up.double() @ A) * f.S[:k]) @ (B @ down.double())).norm())
    assert err == pytest.approx(float(ref[k:].norm()), rel=1e-7, abs=1e-12 * float(ref[0]))


def test_vectors_are_orthonormal():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 70, generator=g)
    (f,) = factored_svd(up[None], down[None])
    A, B = f.pieces(range(6))
    U, Vh = up.double() @ A, B @ down.double()
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_batch_equals_one_by_one_and_zero_layers_are_zero():
    g = torch.Generator().manual_seed(2)
    ups, downs = torch.randn(5, 30, 4, generator=g), torch.randn(5, 4, 50, generator=g)
    ups[2] = 0
    together = factored_svd(ups, downs)
    for b in range(5):
        (alone,) = factored_svd(ups[b:b + 1], downs[b:b + 1])
        torch.testing.assert_close(together[b].S, alone.S, atol=1e-12, rtol=1e-12)
    assert bool((together[2].S == 0).all())


def test_nan_or_inf_factor_gives_a_nan_spectrum_and_leaves_the_rest_exact():
    g = torch.Generator().manual_seed(3)
    ups, downs = torch.randn(3, 20, 4, generator=g), torch.randn(3, 4, 25, generator=g)
    ups[1, 0, 0] = float("nan")
    downs[2, 1, 1] = float("inf")
    got = factored_svd(ups, downs)
    assert bool(got[1].S.isnan().all()) and bool(got[2].S.isnan().all())
    torch.testing.assert_close(got[0].S, torch.linalg.svdvals(_dense(ups[0], downs[0]))[:4], atol=1e-12, rtol=1e-10)
