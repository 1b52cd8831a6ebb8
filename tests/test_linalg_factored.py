"""linalg.factored: spectra and vectors of up @ down from Gram matrices, against a dense float64 SVD."""

from __future__ import annotations

import numpy as np
import pytest

from loratools.linalg.factored import factored_svd


def _dense(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return up.astype(np.float64) @ down.astype(np.float64)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    decaying = (rng.standard_normal((64, 16)) @ np.diag(np.logspace(0, -5, 16))).astype(np.float32)
    zero_col = rng.standard_normal((50, 8)).astype(np.float32)
    zero_col[:, 3] = 0
    repeated = rng.standard_normal((30, 6)).astype(np.float32)
    repeated[:, 5] = repeated[:, 4]
    return [
        ("fp16 lora", rng.standard_normal((320, 8)).astype(np.float16), rng.standard_normal((8, 2880)).astype(np.float16)),
        ("decaying", decaying, rng.standard_normal((16, 100)).astype(np.float32)),
        ("zero column (singular Gram)", zero_col, rng.standard_normal((8, 40)).astype(np.float32)),
        ("rank above out", rng.standard_normal((4, 8)), rng.standard_normal((8, 40))),
        ("repeated column", repeated, rng.standard_normal((6, 20)).astype(np.float32)),
        ("large r", rng.standard_normal((80, 40)), rng.standard_normal((40, 90))),
    ]


@pytest.mark.parametrize("name,up,down", _cases(), ids=[c[0] for c in _cases()])
def test_spectrum_and_reconstruction_match_dense_svd(name, up, down):
    (f,) = factored_svd(up[None], down[None])
    M = _dense(up, down)
    ref = np.linalg.svd(M, compute_uv=False)
    assert f.S.size == min(up.shape[1], up.shape[0], down.shape[1])
    assert (f.S[:-1] >= f.S[1:]).all()
    np.testing.assert_allclose(f.S, ref[: f.S.size], atol=1e-12 * ref[0], rtol=1e-9)
    A, B = f.pieces(range(f.S.size))
    rebuilt = ((up.astype(np.float64) @ A) * f.S) @ (B @ down.astype(np.float64))
    np.testing.assert_allclose(rebuilt, M, atol=1e-12 * np.abs(M).max(), rtol=0)
    # the leading k directions are the best rank-k approximation (Eckart-Young): error = dropped sigmas
    k = max(1, int((f.S > 0).sum()) // 2)
    A, B = f.pieces(range(k))
    err = float(np.linalg.norm(M - ((up.astype(np.float64) @ A) * f.S[:k]) @ (B @ down.astype(np.float64))))
    assert err == pytest.approx(float(np.linalg.norm(ref[k:])), rel=1e-7, abs=1e-12 * ref[0])


def test_vectors_are_orthonormal():
    rng = np.random.default_rng(1)
    up, down = rng.standard_normal((40, 6)), rng.standard_normal((6, 70))
    (f,) = factored_svd(up[None], down[None])
    A, B = f.pieces(range(6))
    U, Vh = up @ A, B @ down
    np.testing.assert_allclose(U.T @ U, np.eye(6), atol=1e-10, rtol=0)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(6), atol=1e-10, rtol=0)


def test_batch_equals_one_by_one_and_zero_layers_are_zero():
    rng = np.random.default_rng(2)
    ups, downs = rng.standard_normal((5, 30, 4)), rng.standard_normal((5, 4, 50))
    ups[2] = 0
    together = factored_svd(ups, downs)
    for b in range(5):
        (alone,) = factored_svd(ups[b:b + 1], downs[b:b + 1])
        np.testing.assert_allclose(together[b].S, alone.S, atol=1e-12, rtol=1e-12)
    assert (together[2].S == 0).all()


def test_nan_or_inf_factor_gives_a_nan_spectrum_and_leaves_the_rest_exact():
    rng = np.random.default_rng(3)
    ups, downs = rng.standard_normal((3, 20, 4)), rng.standard_normal((3, 4, 25))
    ups[1, 0, 0] = np.nan
    downs[2, 1, 1] = np.inf
    got = factored_svd(ups, downs)
    assert np.isnan(got[1].S).all() and np.isnan(got[2].S).all()
    np.testing.assert_allclose(got[0].S, np.linalg.svd(_dense(ups[0], downs[0]), compute_uv=False)[:4],
                               atol=1e-12, rtol=1e-10)
