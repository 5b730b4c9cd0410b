"""Exact singular-value spectra of one matrix or a batch, in float64 accuracy.

Route 1 (fast): the float64 Gram matrix of the smaller side, accumulated over row blocks
(BLAS ``syrk`` on CPU, ``matmul`` on GPU) so memory does not grow with the height, then a
symmetric eigensolver. Its relative error on kappa grows like ``eps * kappa**2`` (measured
~1e-10 at kappa = 1000), so it is used only when the estimated kappa is at most
``GRAM_MAX_KAPPA``. Route 2 (exact): a blocked Householder QR to the square R factor and a
float64 LAPACK SVD of R, which is backward stable like the SVD of the matrix itself.

A singular value at or below ``s_max * max(m, n) * eps`` (the float64 numerical-rank
tolerance) is exactly zero: kappa is then ``inf``.

Kappa only (``kappa_only=True``, CPU): after the same Gram, a Cholesky factorization and two
Lanczos runs (on G for the largest eigenvalue, on G^-1 through the Cholesky factor for the
smallest) replace the tridiagonal reduction. Each run stops when the Ritz residual is below
``LANCZOS_TOL`` times the Ritz value, which bounds the eigenvalue's relative error by the same
figure (a symmetric matrix has an eigenvalue within the residual norm of any Ritz value). When
the Cholesky fails (singular Gram), a run does not converge in ``LANCZOS_MAX_STEPS`` steps, or
the estimated kappa is above ``GRAM_MAX_KAPPA``, the full route above answers instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import torch
from numpy.typing import NDArray
from scipy.linalg import blas, lapack

from kappatune.analysis.options import DEFAULT_BLOCK_ROWS  # defined once, without torch

GRAM_MAX_KAPPA = 600.0
LANCZOS_TOL = 1e-10  # relative; kappa then within 1e-10 from each extreme
LANCZOS_MAX_STEPS = 300
LANCZOS_MIN_SIDE = 512  # below, syevd is as fast (kappa_only_crossover.md: parity near 400)
_EPS = float(np.finfo(np.float64).eps)


class NonFiniteMatrix(ValueError):
    """The matrix holds NaN or Inf values."""


@dataclass(frozen=True)
class SpectrumResult:
    singular_values: NDArray[np.float64]  # descending, length min(m, n); [max, min] if partial
    method: str  # "gram", "qr-svd", or "gram-lanczos" (partial: the extremes only)

    @property
    def complete(self) -> bool:
        """Whether every singular value is known (False on the kappa-only route)."""
        return self.method != "gram-lanczos"


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a kernel as a matrix: (out, in * k...) for ndim > 2."""
    if w.ndim < 2:
        raise ValueError(f"not a matrix: shape {tuple(w.shape)}")
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1)


def _tall(w: torch.Tensor) -> torch.Tensor:
    return w if w.shape[0] >= w.shape[1] else w.T


def _nonfinite_reason(w: torch.Tensor) -> str:
    return _nonfinite_blocks(tensor_row_blocks(w.reshape(w.shape[0], -1)), DEFAULT_BLOCK_ROWS)


RowBlocks = Callable[[int], Iterator[torch.Tensor]]
"""Given a number of rows, yields consecutive row blocks of a tall matrix (any float dtype)."""


def tensor_row_blocks(t: torch.Tensor) -> RowBlocks:
    return lambda b: (t[i : i + b] for i in range(0, t.shape[0], b))


def _gram_cpu(blocks: RowBlocks, n: int, block_rows: int) -> NDArray[np.float64]:
    g = np.zeros((n, n), dtype=np.float64)
    for block in blocks(block_rows):
        b = block.to(torch.float64, memory_format=torch.contiguous_format).numpy()
        # numpy runs ``b.T @ b`` (one buffer, transposed) as BLAS syrk and releases the GIL,
        # so worker threads run in parallel; scipy's BLAS wrappers hold the GIL.
        g += b.T @ b
    return g


def _gram_torch(t: torch.Tensor, block_rows: int, device: torch.device) -> torch.Tensor:
    n = t.shape[-1]
    g = torch.zeros((*t.shape[:-2], n, n), dtype=torch.float64, device=device)
    for start in range(0, t.shape[-2], block_rows):
        block = t[..., start : start + block_rows, :].to(device=device, dtype=torch.float64)
        g += block.mT @ block
    return g


def _gram_blocks_torch(
    blocks: RowBlocks, n: int, block_rows: int, device: torch.device
) -> torch.Tensor:
    g = torch.zeros((n, n), dtype=torch.float64, device=device)
    for block in blocks(block_rows):
        b = block.to(device=device, dtype=torch.float64)
        g += b.T @ b
    return g


def _qr_svd(blocks: RowBlocks, n: int, block_rows: int) -> NDArray[np.float64]:
    """Singular values of a tall matrix through a blocked QR (bounded memory) and LAPACK SVD."""
    r = torch.zeros((0, n), dtype=torch.float64)
    for block in blocks(max(block_rows, n)):
        r = torch.linalg.qr(torch.cat([r, block.to(torch.float64)]), mode="r").R
    return np.asarray(sla.svdvals(r.numpy(), check_finite=False), dtype=np.float64)


def _nonfinite_blocks(blocks: RowBlocks, block_rows: int) -> str:
    nan = inf = 0
    for block in blocks(block_rows):
        nan += int(torch.isnan(block).sum())
        inf += int(torch.isinf(block).sum())
    return f"non-finite weights ({nan} NaN, {inf} Inf)"


def _clean(s: NDArray[np.float64], shape: tuple[int, int]) -> NDArray[np.float64]:
    s = np.sort(np.clip(s, 0.0, None))[::-1].copy()
    if s.size and s[0] > 0.0:
        s[s <= s[0] * max(shape) * _EPS] = 0.0
    return s


def _from_gram_eigs(
    eigs: NDArray[np.float64], blocks: RowBlocks, shape: tuple[int, int], block_rows: int
) -> SpectrumResult:
    lmax, lmin = float(eigs[-1]), float(eigs[0])
    if lmax == 0.0:
        return SpectrumResult(np.zeros(shape[1]), "gram")
    if lmin > 0.0 and lmax / lmin <= GRAM_MAX_KAPPA**2:
        return SpectrumResult(_clean(np.sqrt(eigs), shape), "gram")
    return SpectrumResult(_clean(_qr_svd(blocks, shape[1], block_rows), shape), "qr-svd")


def lanczos_largest(
    matvec: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    n: int,
    *,
    tol: float | None = None,
    max_steps: int | None = None,
) -> float | None:
    """Largest eigenvalue of a symmetric operator by Lanczos with full reorthogonalization.

    Stops when the Ritz residual ``beta_j |y_j|`` is at most ``tol`` times the Ritz value
    (then an eigenvalue lies within that relative distance). None when it does not converge.
    The start vector is seeded, so the result is deterministic.
    """
    tol = LANCZOS_TOL if tol is None else tol
    steps = min(LANCZOS_MAX_STEPS if max_steps is None else max_steps, n)
    q = np.random.default_rng(0).standard_normal(n)
    basis = np.empty((steps + 1, n))
    basis[0] = q / np.linalg.norm(q)
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(steps):
        w = matvec(basis[j])
        alpha.append(float(basis[j] @ w))
        for _ in range(2):  # twice is enough (Parlett): keeps the basis orthonormal to eps
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if b > 0.0 and j + 1 < steps and (j < 8 or j % 4):
            beta.append(b)  # the Ritz test (a small LAPACK call) runs every 4th step
            basis[j + 1] = w / b
            continue
        theta, y = sla.eigh_tridiagonal(
            np.array(alpha), np.array(beta), select="i", select_range=(j, j)
        )
        top = float(theta[0])
        if b * abs(float(y[-1, 0])) <= tol * abs(top) or b == 0.0:
            return top
        beta.append(b)
        basis[j + 1] = w / b
    return None


def _cholesky_solve(factor: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """G^-1 x from G's lower Cholesky factor (Fortran order; its upper triangle is not read):
    two BLAS triangular solves, 3x faster than LAPACK's dpotrs on one vector (measured, n = 640)."""
    y = blas.dtrsv(factor, x, lower=1)
    return np.asarray(blas.dtrsv(factor, y, lower=1, trans=1, overwrite_x=1), dtype=np.float64)


def _gram_extremes(g: NDArray[np.float64]) -> tuple[float, float] | None:
    """(largest, smallest) eigenvalue of an SPD Gram, or None when this route cannot tell."""
    n = g.shape[0]
    factor, info = lapack.dpotrf(g, lower=1, clean=0)  # Fortran order: dtrsv copies nothing
    if info != 0:
        return None  # not numerically positive definite: singular or nearly so
    lmax = lanczos_largest(lambda x: g @ x, n)
    inv_max = lanczos_largest(lambda x: _cholesky_solve(factor, x), n)
    if lmax is None or inv_max is None or not (lmax > 0.0 and inv_max > 0.0):
        return None
    return lmax, 1.0 / inv_max


def _kappa_from_gram(
    g: NDArray[np.float64], blocks: RowBlocks, shape: tuple[int, int], block_rows: int
) -> SpectrumResult:
    ext = _gram_extremes(g) if shape[1] >= LANCZOS_MIN_SIDE else None
    if ext is not None and ext[0] / ext[1] <= GRAM_MAX_KAPPA**2:
        return SpectrumResult(np.sqrt(np.array(ext)), "gram-lanczos")
    eigs = np.linalg.eigvalsh(g)
    return _from_gram_eigs(np.asarray(eigs, dtype=np.float64), blocks, shape, block_rows)


def spectrum_of_blocks(
    blocks: RowBlocks,
    shape: tuple[int, int],
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    device: torch.device | None = None,
    kappa_only: bool = False,
) -> SpectrumResult:
    """Exact singular values of a tall (rows >= cols) matrix given as row blocks.

    Memory stays at one block plus the cols x cols Gram, whatever the height.
    ``kappa_only`` (CPU) may return only the largest and smallest (see the module text).
    Raises NonFiniteMatrix.
    """
    if shape[0] < shape[1]:
        raise ValueError(f"row-block spectra need a tall matrix, got {shape}")
    device = device or torch.device("cpu")
    if device.type == "cpu":
        g = _gram_cpu(blocks, shape[1], block_rows)
        if not np.all(np.isfinite(np.diag(g))):
            raise NonFiniteMatrix(_nonfinite_blocks(blocks, block_rows))
        if kappa_only:
            return _kappa_from_gram(g, blocks, shape, block_rows)
        eigs = np.linalg.eigvalsh(g)  # LAPACK syevd; releases the GIL
    else:
        gt = _gram_blocks_torch(blocks, shape[1], block_rows, device)
        if not bool(torch.isfinite(torch.diagonal(gt)).all()):
            raise NonFiniteMatrix(_nonfinite_blocks(blocks, block_rows))
        eigs = torch.linalg.eigvalsh(gt).cpu().numpy()
    return _from_gram_eigs(np.asarray(eigs, dtype=np.float64), blocks, shape, block_rows)


def matrix_spectrum(
    w: torch.Tensor,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    device: torch.device | None = None,
    kappa_only: bool = False,
) -> SpectrumResult:
    """Exact singular values of a 2-D tensor (any float dtype). Raises NonFiniteMatrix."""
    t = _tall(as_matrix(w))
    shape = (int(t.shape[0]), int(t.shape[1]))
    return spectrum_of_blocks(
        tensor_row_blocks(t), shape, block_rows=block_rows, device=device, kappa_only=kappa_only
    )


def batch_spectra(
    ws: Sequence[torch.Tensor],
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    device: torch.device | None = None,
    kappa_only: bool = False,
) -> list[SpectrumResult | NonFiniteMatrix]:
    """Spectra of matrices of one shape; batched on an accelerator, one by one on CPU.

    ``kappa_only`` takes the Lanczos route on CPU; an accelerator computes every value.
    """
    device = device or torch.device("cpu")
    if device.type == "cpu" or len(ws) == 1:
        out: list[SpectrumResult | NonFiniteMatrix] = []
        for w in ws:
            try:
                out.append(
                    matrix_spectrum(w, block_rows=block_rows, device=device, kappa_only=kappa_only)
                )
            except NonFiniteMatrix as exc:
                out.append(exc)
        return out
    tall = [_tall(as_matrix(w)) for w in ws]
    g = _gram_torch(torch.stack(tall), block_rows, device)
    finite = torch.isfinite(torch.diagonal(g, dim1=-2, dim2=-1)).all(dim=-1).cpu().tolist()
    eigs = torch.linalg.eigvalsh(torch.where(torch.isfinite(g), g, 0.0)).cpu().numpy()
    results: list[SpectrumResult | NonFiniteMatrix] = []
    for i, t in enumerate(tall):
        if not finite[i]:
            results.append(NonFiniteMatrix(_nonfinite_reason(ws[i])))
        else:
            shape = (int(t.shape[0]), int(t.shape[1]))
            eig = np.asarray(eigs[i], np.float64)
            results.append(_from_gram_eigs(eig, tensor_row_blocks(t), shape, block_rows))
    return results


def reference_svdvals(w: torch.Tensor) -> NDArray[np.float64]:
    """Float64 LAPACK SVD values of the same matrix: the accuracy reference in tests/benchmarks."""
    m = as_matrix(w).to(torch.float64).numpy()
    return np.asarray(sla.svdvals(m, check_finite=False), dtype=np.float64)
