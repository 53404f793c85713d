"""Batched blocked Cholesky on tensor cores, for the many same-size Hessians of one MoE layer.

cuSOLVER's potrf runs fp32 on the CUDA cores and, measured on an H100, reaches ~18 TFLOP/s at n = 7168 and
~4 at n = 2048 (bench/gptq_notes.md). Right-looking blocked Cholesky puts almost all of the n^3/3 flops in
two matrix products per block step, batched over the experts:

    R_kk = chol(A_kk)                     small, cuSOLVER (batched)
    R_rk = A_rk R_kk^-T                   product with the small block's inverse
    A_rr -= R_rk R_rk^T                   the Schur complement, upper block-triangle only

GPTQ wants the factor of H = R R^T with R upper (see ``hessian.py``), which is what this computes, from the
last block up, so the big matrix is never reversed.

Precision of those products (``SchurPrecision``):

- ``"fp32"``: CUDA cores, exact float32 (no faster than cuSOLVER; for comparison);
- ``"tf32"``: one TF32 product: 10-bit mantissas in, float32 accumulation; the factor's backward error
  ||L L^T - A|| / ||A|| is ~5e-5 instead of ~1e-7;
- ``"3xtf32"``: split x = hi + lo with hi on the TF32 grid; hi hi^T + hi lo^T + lo hi^T recovers float32
  accuracy (~1e-7) from three TF32 products.

The default is TF32: its backward error is ~300x below the sampling noise of a Hessian estimated from 8192
tokens and ~100x below GPTQ's 1% damping, and measured GPTQ errors agree with float32 factors to 5 digits
(bench/gptq_notes.md). A matrix TF32 rounding pushes past definiteness is refactored by cuSOLVER in float32.

A matrix whose block factorisation fails (not positive definite at this precision) is reported in the
returned mask; the caller decides what to do with it (``prepare_hessians`` retries it with cuSOLVER).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

SchurPrecision = Literal["fp32", "tf32", "3xtf32"]

# float32 has 23 fraction bits, TF32 10: keeping sign, exponent and the top 10 clears the low 13.
_TF32_MASK = ~((1 << 13) - 1)


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 (or strict float32) for float32 matmuls inside the block; the caller's setting is restored."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo exactly, with hi = x truncated to TF32's 10 fraction bits (so a TF32 product reads it
    unrounded) and |lo| < 2**-10 |x|. Strided inputs are fine; both outputs are contiguous."""
    hi = (x.view(torch.int32) & _TF32_MASK).view(torch.float32)
    return hi, x - hi


Operand = tuple[torch.Tensor, torch.Tensor | None]  # (x, None), or (hi, lo) with x = hi + lo for 3xTF32


def operand(x: torch.Tensor, precision: SchurPrecision) -> Operand:
    """Prepare a matmul operand once (3xTF32 splits it; slices of the pair stay valid)."""
    if precision not in ("fp32", "tf32", "3xtf32"):
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "3xtf32" and x.dtype == torch.float32:
        return split_tf32(x)
    return x, None


def _terms(a: Operand, b: Operand) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The products that make up a @ b: hi hi, plus hi lo and lo hi for 3xTF32 (lo lo is below float32)."""
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    if a_lo is None or b_lo is None:
        return [(a_hi, b_hi)]
    return [(a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi)]


def _use_tf32(precision: SchurPrecision, x: torch.Tensor) -> bool:
    # TF32 only means something for float32: other dtypes (float64 in tests) keep their full precision.
    return precision != "fp32" and x.dtype == torch.float32


def sub_product(out: torch.Tensor, a: Operand, b: Operand, precision: SchurPrecision) -> None:
    """out -= a @ b for [E, m, k] @ [E, k, p] operands, float32 accumulation."""
    with tf32_matmuls(_use_tf32(precision, a[0])):
        for x, y in _terms(a, b):
            out.baddbmm_(x, y, alpha=-1)


def product(a: torch.Tensor, b: torch.Tensor, precision: SchurPrecision) -> torch.Tensor:
    """a @ b at the given precision."""
    (x, y), *rest = _terms(operand(a, precision), operand(b, precision))
    with tf32_matmuls(_use_tf32(precision, a)):
        out = torch.bmm(x, y)
        for x, y in rest:
            out.baddbmm_(x, y)
    return out


def _rows(x: Operand, rows: slice, transpose: bool = False) -> Operand:
    """Rows of a prepared [E, m, k] operand, optionally transposed to [E, k, rows]."""
    hi, lo = x[0][:, rows], None if x[1] is None else x[1][:, rows]
    if transpose:
        return hi.mT, None if lo is None else lo.mT
    return hi, lo


def upper_cholesky_blocked_(a: torch.Tensor, block: int, precision: SchurPrecision) -> torch.Tensor:
    """Factor each symmetric matrix of ``a`` ``[E, n, n]`` as A = R R^T with R *upper* triangular, in place:
    the upper triangle becomes R, the strict lower triangle is left as garbage (read with ``triu``). Only the
    upper triangle of the input is read. Returns a bool mask [E] of the matrices that factored.

    This is the Cholesky factorisation of the order-reversed matrix, without reversing anything big: the
    blocks are taken from the bottom-right corner up, and only each small diagonal block is flipped.
    """
    experts, n, _ = a.shape
    ok = torch.ones(experts, dtype=torch.bool, device=a.device)
    for e in range(n, 0, -block):
        k = max(e - block, 0)
        lower, info = torch.linalg.cholesky_ex(a[:, k:e, k:e].flip((-2, -1)))
        ok &= info == 0
        r_kk = lower.flip((-2, -1))
        a[:, k:e, k:e] = r_kk
        if k == 0:
            break
        eye = torch.eye(e - k, dtype=a.dtype, device=a.device)
        inv_t = torch.linalg.solve_triangular(r_kk, eye, upper=True).mT  # R_kk^-T
        panel = a[:, :k, k:e]
        panel.copy_(product(panel, inv_t, precision))  # R_rk = A_rk R_kk^-T
        split = operand(panel, precision)  # once per step, not once per Schur block
        for j in range(0, k, block):  # Schur complement, one block column of the upper triangle at a time
            f = min(j + block, k)
            sub_product(a[:, :f, j:f], _rows(split, slice(0, f)), _rows(split, slice(j, f), True), precision)
    return ok
