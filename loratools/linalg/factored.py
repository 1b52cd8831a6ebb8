"""Singular values of many low-rank products ``up @ down`` at once, from their r x r Gram matrices.

``lowrank`` decomposes one product with two thin QRs (elias' ``fast_decompose``); a thousand
layers cost a thousand Householder QRs of tall matrices plus per-call overhead, and most of that
time is not arithmetic. Here every layer of one shape is handled in one batched call, and the
tall matrices are touched by one matrix product each (BLAS-3, the fastest thing a CPU does).
In numpy, not torch: a resize of a LoRA then never imports torch (1.1-1.5 s of a 2-3 s run)::

    Gu = up^T up = L L^T        (Cholesky; r x r)
    Gd = down down^T            (r x r)
    K  = L^T Gd L = Uc diag(S^2) Uc^T     (the eigenvalues of K are the squared singular values of
                                           up @ down: K = M M^T with M = L^T R_d^T the QR core)

so ``S`` needs two Gram products and two r x r factorisations per layer. The singular vectors
are only needed for the directions a recipe keeps, and only when the file is written:
``U = up L^-T Uc`` and ``V^T = diag(1/S) Uc^T L^T down``; ``Factored`` keeps the r x r pieces,
and ``pieces`` gives the r x k and k x r matrices that turn ``up`` and ``down`` into them.
Everything is float64, the Gram products too (fp16/bf16/fp32 factors convert exactly), so ``S``
is more accurate than a float32 QR: the error of ``S_i`` is ~1e-16 * S_0^2 / S_i against ~1e-7 * S_0.

Factors holding NaN or Inf give a NaN spectrum (so the caller can refuse them without a
separate pass over the file). A factor whose Gram matrix is singular (an all-zero or rank-deficient ``up``; ``r`` above ``out``)
cannot be Cholesky-factored; that layer takes a symmetric square root instead (``L = P sqrt(Lambda)``
from ``Gu``'s eigendecomposition, inverted only on its positive eigenvalues), which is exact on
the factor's range. Zero singular values come out as exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Eigenvalues of a Gram matrix below this fraction of its largest count as zero (float64 noise).
GRAM_FLOOR = 1e-13


@dataclass(frozen=True)
class Factored:
    """The spectrum of one ``up @ down`` (unscaled) and what forms its singular vectors.

    ``S`` has ``min(r, out, n)`` entries, descending; ``L`` (r x r) satisfies ``up^T up = L L^T``,
    ``L_pinv_T`` is ``L^-T`` (or its pseudo-inverse on a singular factor), ``Uc`` (r x r) the
    eigenvectors of ``K``, in the order of ``S``. All float64 numpy arrays.
    """

    S: np.ndarray
    L: np.ndarray
    L_pinv_T: np.ndarray
    Uc: np.ndarray

    def pieces(self, keep: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(A [r, k], B [k, r])`` float64 with ``U[:, keep] = up @ A`` and ``Vh[keep] = B @ down``.

        ``A = L^-T Uc`` and ``B = diag(1/S) Uc^T L^T``; a zero singular value has no direction
        (its row of ``B`` is zero, and so is its contribution to ``U S Vh``). Forming the
        vectors is one thin product per factor, done in the precision the caller needs.
        """
        idx = np.asarray(list(keep), dtype=np.int64)
        have = self.Uc.shape[1]  # a singular factor's core is smaller: directions past it are zero
        inside = idx < have
        uc = np.zeros((self.Uc.shape[0], idx.size))
        uc[:, inside] = self.Uc[:, idx[inside]]
        s = np.where(inside, self.S[idx], 0.0)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        return self.L_pinv_T @ uc, inv[:, None] * (uc.T @ self.L.T)


def factored_svd(ups: np.ndarray, downs: np.ndarray) -> list[Factored]:
    """``Factored`` of every ``ups[b] @ downs[b]`` in one batch.

    Args:
        ups: ``[B, out, r]`` (any float dtype numpy holds).
        downs: ``[B, r, n]``.

    Returns:
        One ``Factored`` per batch entry.

    Example:
        >>> f = factored_svd(up[None], down[None])[0]
        >>> A, B = f.pieces(range(f.S.size))
        >>> np.allclose((up @ A) * f.S @ (B @ down), up @ down)
        True
    """
    B, out, r = ups.shape
    keep = min(r, out, downs.shape[2])
    u = ups.astype(np.float64)
    gu = u.transpose(0, 2, 1) @ u
    del u
    d = downs.astype(np.float64)
    gd = d @ d.transpose(0, 2, 1)
    del d
    return from_grams(gu, gd, keep)


def from_grams(gu: np.ndarray, gd: np.ndarray, keep: int) -> list[Factored]:
    """``Factored`` of a batch from its Gram matrices ``gu [B, r, r]``, ``gd [B, r, r]``."""
    B, r = gu.shape[0], gu.shape[1]
    finite = np.isfinite(gu).all(axis=(1, 2)) & np.isfinite(gd).all(axis=(1, 2))
    if not finite.all():  # NaN/Inf in a factor: its spectrum says so, nothing is factorised
        return [_one(gu[b], gd[b], keep) if finite[b] else _broken(r, keep) for b in range(B)]
    try:
        L = np.linalg.cholesky(gu)
    except np.linalg.LinAlgError:  # a singular Gram matrix in the batch: each layer on its own
        return [_one(gu[b], gd[b], keep) for b in range(B)]
    L_pinv_T = np.linalg.inv(L).transpose(0, 2, 1)
    lam, Uc = np.linalg.eigh(_core(L, gd))
    return [Factored(_spectrum(lam[b], keep), L[b], L_pinv_T[b], Uc[b][:, ::-1]) for b in range(B)]


def _core(L: np.ndarray, gd: np.ndarray) -> np.ndarray:
    """``K = L^T Gd L``, symmetrised (its eigenvalues are the squared singular values)."""
    Lt = np.swapaxes(L, -1, -2)
    K = Lt @ gd @ L
    return (K + np.swapaxes(K, -1, -2)) / 2


def _spectrum(lam: np.ndarray, keep: int) -> np.ndarray:
    """Singular values from ``K``'s ascending eigenvalues: descending, ``keep`` of them, the
    square-root noise of the eigenvalues (below ``sqrt(GRAM_FLOOR) * S_0``) as exact zeros."""
    S = np.sqrt(np.clip(lam[::-1][:keep], 0.0, None))
    return np.where(S > S[:1] * (GRAM_FLOOR ** 0.5), S, 0.0) if S.size else S


def _broken(r: int, keep: int) -> Factored:
    """A layer whose factors hold NaN or Inf: ``S`` all NaN (the caller refuses or skips it)."""
    zero = np.zeros((r, 0))
    return Factored(np.full(keep, np.nan), zero, zero, np.zeros((0, 0)))


def _one(gu: np.ndarray, gd: np.ndarray, keep: int) -> Factored:
    """One layer: Cholesky, or on a singular Gram a square root on its positive eigenvalues only
    (the core then shrinks to that rank: fp16 factors of a trained LoRA often hold exact zero
    columns, and an r x r core full of zeros is slow to diagonalise)."""
    try:
        L = np.linalg.cholesky(gu)
        L_pinv_T = np.linalg.inv(L).T
    except np.linalg.LinAlgError:
        lam, P = np.linalg.eigh(gu)
        pos = lam > max(float(lam[-1]), 0.0) * GRAM_FLOOR
        root = np.sqrt(lam[pos])
        L, L_pinv_T = P[:, pos] * root, P[:, pos] / root
    lam, Uc = np.linalg.eigh(_core(L, gd))
    S = _spectrum(lam, keep)
    if S.size < keep:
        S = np.concatenate([S, np.zeros(keep - S.size)])
    return Factored(S, L, L_pinv_T, Uc[:, ::-1])
