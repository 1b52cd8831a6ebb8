"""Singular values of many low-rank products ``up @ down`` at once, from their r x r Gram matrices.

``lowrank`` decomposes one product with two thin QRs (elias' ``fast_decompose``); a thousand
layers cost a thousand Householder QRs of tall matrices plus per-call overhead, and most of that
time is not arithmetic. Here every layer of one shape is handled in one batched call, and the
tall matrices are touched by one matrix product each (BLAS-3, the fastest thing a CPU does):

    Gu = up^T up = L L^T        (Cholesky; r x r)
    Gd = down down^T            (r x r)
    K  = L^T Gd L = Uc diag(S^2) Uc^T     (the eigenvalues of K are the squared singular values of
                                           up @ down: K = M M^T with M = L^T R_d^T the QR core)

so ``S`` needs two Gram products and two r x r factorisations per layer. The singular vectors
are only needed for the directions a recipe keeps, and only when the file is written:
``U = up L^-T Uc`` and ``V^T = diag(1/S) Uc^T L^T down``; ``Factored`` keeps the r x r pieces,
and ``pieces`` gives the r x k and k x r matrices that turn ``up`` and ``down`` into them.
Everything after the Gram products is float64, and the Gram products are float64 too (fp16/bf16/fp32 factors convert exactly), so ``S`` is more accurate than a float32
QR: the error of ``S_i`` is ~1e-16 * S_0^2 / S_i against ~1e-7 * S_0.

Factors holding NaN or Inf give a NaN spectrum (so the caller can refuse them without a
separate pass over the file). A factor whose Gram matrix is singular (an all-zero or rank-deficient ``up``; ``r`` above ``out``)
cannot be Cholesky-factored; that layer takes a symmetric square root instead (``L = P sqrt(Lambda)``
from ``Gu``'s eigendecomposition, inverted only on its positive eigenvalues), which is exact on
the factor's range. Zero singular values come out as exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Eigenvalues of a Gram matrix below this fraction of its largest count as zero (float64 noise).
GRAM_FLOOR = 1e-13


@dataclass(frozen=True)
class Factored:
    """The spectrum of one ``up @ down`` (unscaled) and what forms its singular vectors.

    ``S`` has ``min(r, out, n)`` entries, descending; ``L`` (r x r) satisfies ``up^T up = L L^T``,
    ``L_pinv_T`` is ``L^-T`` (or its pseudo-inverse on a singular factor), ``Uc`` (r x r) the
    eigenvectors of ``K``, in the order of ``S``.
    """

    S: torch.Tensor
    L: torch.Tensor
    L_pinv_T: torch.Tensor
    Uc: torch.Tensor

    def pieces(self, keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, k], B [k, r])`` float64 with ``U[:, keep] = up @ A`` and ``Vh[keep] = B @ down``.

        ``A = L^-T Uc`` and ``B = diag(1/S) Uc^T L^T``; a zero singular value has no direction
        (its row of ``B`` is zero, and so is its contribution to ``U S Vh``). Forming the
        vectors is one thin product per factor, done in the precision the caller needs.
        """
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        have = self.Uc.shape[1]  # a singular factor's core is smaller: directions past it are zero
        uc = torch.zeros(self.Uc.shape[0], idx.numel(), dtype=self.Uc.dtype)
        inside = idx < have
        uc[:, inside] = self.Uc[:, idx[inside]]
        s = torch.where(inside, self.S[idx], torch.zeros_like(self.S[idx]))
        inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
        return self.L_pinv_T @ uc, inv[:, None] * (uc.T @ self.L.T)


def factored_svd(ups: torch.Tensor, downs: torch.Tensor) -> list[Factored]:
    """``Factored`` of every ``ups[b] @ downs[b]`` in one batch.

    Args:
        ups: ``[B, out, r]`` (any float dtype).
        downs: ``[B, r, n]``.

    Returns:
        One ``Factored`` per batch entry (CPU, float64 pieces, ``S`` float64).

    Example:
        >>> f = factored_svd(up[None], down[None])[0]
        >>> A, B = f.pieces(range(f.S.numel()))
        >>> torch.allclose((up.double() @ A) * f.S @ (B @ down.double()), (up @ down).double())
        True
    """
    B, out, r = ups.shape
    keep = min(r, out, downs.shape[2])
    u = ups.double()
    gu = u.mT @ u
    del u
    d = downs.double()
    gd = d @ d.mT
    del d
    gu, gd = gu.cpu(), gd.cpu()
    finite = gu.isfinite().all(-1).all(-1) & gd.isfinite().all(-1).all(-1)
    if not bool(finite.all()):  # NaN/Inf in a factor: its spectrum says so, nothing is factorised
        return [_one(gu[b], gd[b], keep) if bool(finite[b]) else _broken(r, keep) for b in range(B)]
    if r > BATCHED_EIGH_MAX:  # LAPACK work dominates; torch's batched eigh is far slower there (measured 25x)
        return [_one(gu[b], gd[b], keep) for b in range(B)]
    L, info = torch.linalg.cholesky_ex(gu)
    if bool((info != 0).any()):
        return [_one(gu[b], gd[b], keep) for b in range(B)]
    L_pinv_T = torch.linalg.solve_triangular(L.mT, torch.eye(r, dtype=L.dtype).expand(B, r, r), upper=True)
    lam, Uc = torch.linalg.eigh(_core(L, gd))
    return [Factored(_spectrum(lam[b], keep), L[b], L_pinv_T[b], Uc[b].flip(-1)) for b in range(B)]


#: Largest r solved as one batched eigh; above it, one call per layer.
BATCHED_EIGH_MAX = 32


def _core(L: torch.Tensor, gd: torch.Tensor) -> torch.Tensor:
    """``K = L^T Gd L``, symmetrised (its eigenvalues are the squared singular values)."""
    K = L.mT @ gd @ L
    return (K + K.mT) / 2


def _spectrum(lam: torch.Tensor, keep: int) -> torch.Tensor:
    """Singular values from ``K``'s ascending eigenvalues: descending, ``keep`` of them, the
    square-root noise of the eigenvalues (below ``sqrt(GRAM_FLOOR) * S_0``) as exact zeros."""
    S = lam.flip(-1)[:keep].clamp_min(0).sqrt()
    return torch.where(S > S[:1] * (GRAM_FLOOR ** 0.5), S, torch.zeros_like(S))


def _broken(r: int, keep: int) -> Factored:
    """A layer whose factors hold NaN or Inf: ``S`` all NaN (the caller refuses or skips it)."""
    nan = torch.full((keep,), float("nan"), dtype=torch.float64)
    zero = torch.zeros(r, 0, dtype=torch.float64)
    return Factored(nan, zero, zero, torch.zeros(0, 0, dtype=torch.float64))


def _one(gu: torch.Tensor, gd: torch.Tensor, keep: int) -> Factored:
    """One layer: Cholesky, or on a singular Gram a square root on its positive eigenvalues only
    (the core then shrinks to that rank: fp16 factors of a trained LoRA often hold exact zero
    columns, and an r x r core full of zeros is slow to diagonalise)."""
    r = gu.shape[0]
    L, info = torch.linalg.cholesky_ex(gu)
    if int(info) == 0:
        L_pinv_T = torch.linalg.solve_triangular(L.T, torch.eye(r, dtype=L.dtype), upper=True)
    else:
        lam, P = torch.linalg.eigh(gu)
        pos = lam > max(float(lam[-1]), 0.0) * GRAM_FLOOR
        root = lam[pos].sqrt()
        L, L_pinv_T = P[:, pos] * root, P[:, pos] / root
    lam, Uc = torch.linalg.eigh(_core(L, gd))
    S = _spectrum(lam, keep)
    if S.numel() < keep:
        S = torch.cat([S, S.new_zeros(keep - S.numel())])
    return Factored(S, L, L_pinv_T, Uc.flip(-1))
