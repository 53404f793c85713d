"""Coordinate descent on GPTQ's codes: each column re-rounded given all the others, against the output error.

GPTQ decides every column once, in order, and never revisits it when later columns move. With the grid (scales,
zero points) fixed, the row's output error f(ŵ) = (w - ŵ)ᵀ H (w - ŵ) is, along one coordinate j, the parabola
f(ŵ + Δ e_j) = f(ŵ) - 2Δ g_j + Δ² H_jj with g = H (w - ŵ); its minimum over the grid is the grid value nearest
the vertex ŵ_j + g_j / H_jj (a parabola is symmetric about its vertex, so this holds for the non-uniform FP4 grid
too). Visiting every column so is one round; f never increases. This is the greedy coordinate descent of CDQuant
(Nair and Suggala, 2024, arXiv:2406.17542), applied after GPTQ as its refinement, written from that formula.

One round is GPTQ's own column sweep (``streamq.kernels.gptq_block``, Triton on CUDA) in its Cholesky form:
with ``work`` the vertices at the start of the round, ``orig`` the current dequantized weights and the feedback
M[i, j] = H_ij / H_jj (i < j), the sweep's recurrence v_j = work_j + Σ_{i<j} d_i M[i, j], d_i = orig_i - deq_i
moves each vertex by exactly the change of g that the earlier columns' new values cause. Panels pass the
feedback on as the sweep does, so most of the work is batched matrix products. Between rounds g is recomputed
from scratch; rows are independent, so every step is batched over rows and experts.

H is the Hessian GPTQ solved with (damped alike, natural column order), so the refinement minimises the sweep's
objective.

``outside_weight`` β < 1 weighs the output error by direction: tr(D H Dᵀ F), F = P + β (I - P), P the projector on
the column space of W (the directions the matrix writes). On the trained fixture a down projection's error along
those directions costs the held-out KL ~2× as much per unit of energy as its error across them (bench/RESULTS.md,
"Which errors the KL feels"); only a matrix with more rows than columns has an "across". F couples the rows: the
vertex of code (i, j) is ŵ_ij + (F D H)_ij / (F_ii H_jj). Inside a leaf of the sweep the kernel applies F's
diagonal, the row's own change (F_ii cancels), so exactly today's update; between panels the changes pass on as
F̃ d, F̃ = diag(F)⁻¹ F, so the other rows see them at the next panel (Jacobi over rows within a leaf, as the rows
of a column already are). P d = Q Qᵀ d with Q = W L⁻ᵀ an orthonormal basis of the span (WᵀW = L Lᵀ, one Cholesky
per matrix, no SVD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamq.kernels.gptq_block import add_product, gptq_block
from streamq.solvers.observers import column_params, dequantize
from streamq.solvers.scheme import QuantScheme


@dataclass(frozen=True)
class DescentRun:
    """How the rounds run (not what they compute): the sweep's panel widths, outermost first, the last one the
    kernel's leaf; the kernel or its torch reference; rows per Triton program."""

    widths: tuple[int, ...] = (1024, 128, 32)
    use_triton: bool = False
    block_r: int = 64


def refine_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    scheme: QuantScheme,
    rounds: int,
    run: DescentRun | None = None,
    outside_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` rounds of coordinate descent; returns the new int8 codes and dequantized weights (float32),
    both ``[E, out, in]``.

    ``w`` [E, out, in] target weights, ``h`` [E, in, in] (positive diagonal), ``codes`` the int8 codes in natural
    order (multiples of the grid's unit), ``scale`` / ``zero`` [E, out, groups], ``g_idx`` [E, in] or None;
    ``outside_weight`` β: see the module docstring (1, or a matrix with no more rows than columns: plain)."""
    run = run or DescentRun()
    experts, out, n = w.shape
    h, w = h.float(), w.float()
    weigh = OutputMetric(w, outside_weight) if weighs(out, n, outside_weight) else None
    gs = scheme.group_size
    deq = dequantize(
        codes.float() * scheme.grid.unit,
        column_params(scale.float(), gs, g_idx, n),
        None if zero is None else column_params(zero.float(), gs, g_idx, n),
    )
    diag = h.diagonal(dim1=-2, dim2=-1).unsqueeze(1)  # [E, 1, n]
    feedback = torch.triu(h, diagonal=1) / diag  # M[i, j] = H_ij / H_jj
    gidx = _column_groups(g_idx, gs, experts, n, w.device)
    codes = codes.clone()
    for _ in range(rounds):
        residual = w - deq if weigh is None else weigh(w - deq)
        work = deq + torch.bmm(residual, h) / diag  # each column's vertex given all the others
        orig = deq
        _sweep_panel(work, orig, feedback, scale.float(), zero, gidx, codes, scheme, run, 0, n, 0, weigh)
        deq = work  # the sweep left the new dequantized weights in ``work`` (and d in ``orig``)
    return codes, deq


def _sweep_panel(
    work: torch.Tensor,
    orig: torch.Tensor,
    feedback: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    gidx: torch.Tensor,
    codes: torch.Tensor,
    scheme: QuantScheme,
    run: DescentRun,
    lo: int,
    hi: int,
    level: int,
    weigh: OutputMetric | None = None,
) -> None:
    """Columns [lo, hi) in sub-panels of ``run.widths[level]``, each passing its changes to the rest at once (as
    F̃ d with an output metric ``weigh``)."""
    width = run.widths[level]
    for a in range(lo, hi, width):
        b = min(a + width, hi)
        if level + 1 == len(run.widths):
            z = None if zero is None else zero.float()
            grid = scheme.grid
            gptq_block(
                work[:, :, a:b], orig[:, :, a:b], feedback[:, a:b, a:b], scale, z, gidx[:, a:b], codes[:, :, a:b],
                grid, babai=True, use_triton=run.use_triton, block_r=run.block_r,
            )  # fmt: skip
        else:
            _sweep_panel(work, orig, feedback, scale, zero, gidx, codes, scheme, run, a, b, level + 1, weigh)
        if b < hi:
            changes = orig[:, :, a:b] if weigh is None else weigh(orig[:, :, a:b])
            add_product(work[:, :, b:hi], changes, feedback[:, a:b, b:hi])


def _column_groups(
    g_idx: torch.Tensor | None, group_size: int, experts: int, n: int, device: torch.device
) -> torch.Tensor:
    """int32 [E, n]: the scale group of each column (natural groups unless ``g_idx`` says otherwise)."""
    if g_idx is not None:
        return g_idx.to(torch.int32)
    columns = torch.arange(n, device=device)
    groups = torch.zeros_like(columns) if group_size == 0 else columns // group_size
    return groups.to(torch.int32).expand(experts, n)


def weighs(out: int, n: int, outside_weight: float) -> bool:
    """Whether the descent of an ``out`` x ``n`` matrix uses the output metric: a weight below 1, and more rows
    than columns (otherwise the column space is every direction and F = I)."""
    return outside_weight < 1 and out > n


class OutputMetric:
    """d ↦ diag(F)⁻¹ F d for F = P + β (I - P), P the projector on the column space of ``w`` [E, out, in] (out >
    in): the output-space weighting of the module docstring, applied to [E, out, k] row changes or residuals."""

    def __init__(self, w: torch.Tensor, outside_weight: float) -> None:
        gram = w.transpose(1, 2) @ w
        # A tiny ridge keeps the Gram matrix of a matrix with zeroed (dead) columns factorable; P then projects on
        # the span of the others.
        ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        gram.diagonal(dim1=-2, dim2=-1).add_(ridge.unsqueeze(-1))
        lower = torch.linalg.cholesky(gram)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
        # An orthonormal basis of the span, Q = W L⁻ᵀ (QᵀQ = I for WᵀW = LLᵀ), so that P d = Q Qᵀ d is two matrix
        # products per panel: triangular solves there cost more than the descent itself on a GPU.
        self.basis = w @ torch.linalg.solve_triangular(lower, eye, upper=False).transpose(1, 2)
        self.beta = outside_weight
        inside = self.basis.square().sum(-1)  # diag P
        self.diag = (outside_weight + (1 - outside_weight) * inside).unsqueeze(-1)  # [E, out, 1]

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        inside = self.basis @ (self.basis.transpose(1, 2) @ d)
        return (self.beta * d + (1 - self.beta) * inside) / self.diag
