"""GPTQ under an output metric: a matrix's rows solved a chunk at a time, each chunk towards the weights that make
up, as far as real-valued rows can, for the errors of the chunks already quantized.

GPTQ minimises each row's output error (w - ŵ)ᵀ H (w - ŵ) alone. When the error of the whole output matters by
direction, with a metric F over the output rows (for a down projection: the model's output Fisher, see
streamq/fisher.py), the objective is tr(D H Dᵀ F), D = W - Ŵ, and rows interact through F. Given the rows already
quantized (f, errors D_f), the rest (l) are best off, over real values and whatever H, with errors
D_l = -F_ll⁻¹ F_lf D_f: so they are quantized towards T_l = W_l + F_ll⁻¹ F_lf D_f, which lets the later rows carry
the earlier rows' errors into the directions F does not feel. With one row per chunk this is GPTQ's own sequential
rounding (Babai's nearest plane) run along the rows as well as the columns; rows of one chunk are solved together,
independent given H, as GPTQ solves every row. On the trained fixture 8 chunks kept most of the gain of one row per
chunk (bench/RESULTS.md, "The output Fisher").

Each chunk's change is G_c D_f with G_c = (F_ll⁻¹ F_lf) restricted to the chunk's rows: a [rows, earlier rows]
matrix that depends on F only, computed once per metric (``row_gains``), so the per-expert work is one matrix
product per chunk, out² · in / 2 multiply-adds per matrix in all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamq.solvers.scheme import QuantResult


@dataclass(frozen=True)
class RowGains:
    """Chunk boundaries over a matrix's output rows and, per chunk after the first, G_c [rows, earlier rows]."""

    bounds: tuple[tuple[int, int], ...]
    gains: tuple[torch.Tensor | None, ...]

    @property
    def rows(self) -> int:
        return self.bounds[-1][1]


def output_metric(fisher: torch.Tensor, weight: float) -> torch.Tensor:
    """F = weight · Fisher / mean(diag Fisher) + (1 - weight) · I, float64: the Fisher's scale does not matter,
    and the identity keeps F well conditioned (a Fisher from a few thousand tokens has near-null directions, in
    which the conditional corrections F_ll⁻¹ F_lf D_f would grow without bound; weight 0.8 measured far worse
    than 0.5 on the trained fixture)."""
    f = fisher.double()
    scale = f.diagonal().mean()
    eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    if not bool(scale > 0):  # a block whose output the predictions do not feel: nothing to weigh
        return eye
    return weight * f / scale + (1 - weight) * eye


def row_gains(metric: torch.Tensor, chunks: int) -> RowGains:
    """G_c = (F_ll⁻¹ F_lf)[: rows of c] for each chunk c (l: c and the rows after it, f: the rows before it)."""
    out = metric.shape[0]
    chunks = max(1, min(chunks, out))
    bounds = tuple((c * out // chunks, (c + 1) * out // chunks) for c in range(chunks))
    gains: list[torch.Tensor | None] = []
    for a, b in bounds:
        if a == 0:
            gains.append(None)
            continue
        rest = torch.linalg.cholesky(metric[a:, a:])
        gains.append(torch.cholesky_solve(metric[a:, :a], rest)[: b - a].float().contiguous())
    return RowGains(bounds, tuple(gains))


def solve_in_row_chunks(w: torch.Tensor, gains: RowGains, solve: Callable[[torch.Tensor], QuantResult]) -> QuantResult:
    """Quantize ``w`` [E, out, in] chunk by chunk of rows with ``solve`` (any solver of [E, rows, in] targets, e.g.
    GPTQ with the matrices' Hessians), each chunk's target moved by G_c D_f; the chunks' results joined along the
    rows. ``solve`` must not give a per-matrix global scale (NVFP4): chunks would each choose their own."""
    if w.shape[1] != gains.rows:
        raise ValueError(f"the metric is over {gains.rows} rows, the matrices have {w.shape[1]}")
    parts: list[QuantResult] = []
    errors = torch.empty_like(w)  # W - Ŵ of the rows already quantized
    for (a, b), gain in zip(gains.bounds, gains.gains, strict=True):
        target = w[:, a:b]
        if gain is not None:
            target = target + torch.matmul(gain.to(w.device, w.dtype), errors[:, :a])
        part = solve(target)
        if part.global_scale is not None:
            raise ValueError("row chunks cannot share a per-matrix global scale")
        errors[:, a:b] = w[:, a:b] - part.weight.to(w.dtype)
        parts.append(part)
    return _join_rows(parts)


def _join_rows(parts: list[QuantResult]) -> QuantResult:
    first = parts[0]
    fallbacks: dict[str, int] = {}
    for part in parts:  # every chunk of a matrix shares its Hessian, so a matrix that fell back did in each chunk
        for reason, n in part.fallbacks.items():
            fallbacks[reason] = max(fallbacks.get(reason, 0), n)
    return QuantResult(
        q=torch.cat([p.q for p in parts], dim=-2),
        scale=torch.cat([p.scale for p in parts], dim=-2),
        zero_point=None if first.zero_point is None else torch.cat([p.zero_point for p in parts], dim=-2),  # type: ignore[misc]
        g_idx=first.g_idx,
        weight=torch.cat([p.weight for p in parts], dim=-2),
        fallbacks=fallbacks,
    )
