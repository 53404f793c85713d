"""Coordinate descent on GPTQ's codes: each column re-rounded given all the others, against the output error.

GPTQ decides every column once, in order, and never revisits it when later columns move. With the grid (scales,
zero points) fixed, the row's output error f(ŵ) = (w - ŵ)ᵀ H (w - ŵ) is, along one coordinate j, the parabola
f(ŵ + Δ e_j) = f(ŵ) - 2Δ g_j + Δ² H_jj with g = H (w - ŵ); its minimum over the grid is the grid value nearest
ŵ_j + g_j / H_jj (a parabola is symmetric about its vertex, so this holds for the non-uniform FP4 grid too).
Visiting every column so is one round; f never increases. This is the greedy coordinate descent of CDQuant
(Nair and Suggala, 2024, arXiv:2406.17542), applied after GPTQ as its refinement, written here from that formula.

Rows are independent given H, so every step is vectorised over rows and experts. g is kept up to date lazily,
as GPTQ's feedback is: inside a block of columns only the block's own entries are updated, one column at a time;
the rest of g gets the block's changes with one matrix product when the block is done.

H here is the Hessian GPTQ solved with (damped as the solver damps it, natural column order), so the refinement
minimises the same objective as the sweep.
"""

from __future__ import annotations

import torch

from streamq.solvers.observers import column_params, dequantize, quantize
from streamq.solvers.scheme import QuantScheme

_BLOCK = 128  # columns whose g entries are updated one step at a time; the rest waits for one product per block


def refine_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    scheme: QuantScheme,
    rounds: int,
) -> torch.Tensor:
    """``rounds`` rounds of coordinate descent; returns the new int8 codes ``[E, out, in]``.

    ``w`` [E, out, in] target weights, ``h`` [E, in, in] (positive diagonal), ``codes`` the int8 codes in natural
    order (multiples of the grid's unit), ``scale`` / ``zero`` [E, out, groups], ``g_idx`` [E, in] or None."""
    n = w.shape[-1]
    h = h.float()
    col_scale = column_params(scale.float(), scheme.group_size, g_idx, n)
    col_zero = None if zero is None else column_params(zero.float(), scheme.group_size, g_idx, n)
    values = codes.float() * scheme.grid.unit  # grid values, the unit of quantize()
    deq = dequantize(values, col_scale, col_zero)
    grad = torch.bmm(w.float() - deq, h)  # g = (w - ŵ) H, row by row (H is symmetric)
    inv_diag = 1.0 / h.diagonal(dim1=-2, dim2=-1)
    for _ in range(rounds):
        for lo in range(0, n, _BLOCK):
            _descend_block(lo, min(lo + _BLOCK, n), h, inv_diag, grad, values, deq, col_scale, col_zero, scheme)
    return torch.round(values / scheme.grid.unit).to(torch.int8)


def _descend_block(
    lo: int,
    hi: int,
    h: torch.Tensor,
    inv_diag: torch.Tensor,
    grad: torch.Tensor,
    values: torch.Tensor,
    deq: torch.Tensor,
    col_scale: torch.Tensor,
    col_zero: torch.Tensor | None,
    scheme: QuantScheme,
) -> None:
    """Columns [lo, hi) one at a time, in place; then g outside the block catches up with one product."""
    start, before = grad[:, :, lo:hi].clone(), deq[:, :, lo:hi].clone()
    for j in range(lo, hi):
        zero = None if col_zero is None else col_zero[:, :, j]
        vertex = deq[:, :, j] + grad[:, :, j] * inv_diag[:, j, None]
        new_values = quantize(vertex, col_scale[:, :, j], zero, scheme)
        new_deq = dequantize(new_values, col_scale[:, :, j], zero)
        step = new_deq - deq[:, :, j]  # ŵ_j moves by step, so e = w - ŵ moves by -step and g by -step H[j, :]
        values[:, :, j] = new_values
        deq[:, :, j] = new_deq
        grad[:, :, j + 1 : hi].sub_(step.unsqueeze(-1) * h[:, j, None, j + 1 : hi])
    grad[:, :, lo:hi] = start
    grad.sub_(torch.bmm(deq[:, :, lo:hi] - before, h[:, lo:hi, :]))
