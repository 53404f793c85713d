"""Group scales refitted by least squares against the layer's output, the codes held fixed.

GPTQ picks codes for scales fitted on the weights alone (min-max or a clipping search), though what matters is
the output error tr((W - Ŵ) H (W - Ŵ)ᵀ). With the codes fixed, Ŵ is linear in the scales: a row's weight is
ŵ = Σ_g s_g a_g, where a_g holds the row's (code - zero) on group g's columns and 0 elsewhere. The output error of
the row is then a quadratic in its G scales, minimised by the normal equations

    M s = b,   M[g, h] = a_gᵀ H a_h,   b[g] = a_gᵀ H w,

one G × G system per row (G = in / group size), batched. Refined scales are rounded to the dtype the checkpoint
stores them in; GPTQ then sweeps again with them (the codes move towards the new grid), see gptq.py.
"""

from __future__ import annotations

import torch

from streamq.solvers.observers import group_view
from streamq.solvers.scheme import SolverConfig

_ROW_CHUNK_ELEMENTS = 1 << 25  # elements of the [rows, G, G, group] intermediate per step (128 MiB in float32)
_RIDGE = 1e-6  # relative to the mean of M's diagonal: groups whose codes are all zero keep their scale


def refine_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    cfg: SolverConfig,
) -> torch.Tensor:
    """Least-squares scales ``[E, out, G]`` for target weights ``w`` [E, out, in], Hessians ``h`` [E, in, in],
    natural-order grid values ``codes`` [E, out, in] and the current ``scale`` / ``zero`` [E, out, G] (integer
    grids with stored-dtype scales only). A row's scale is kept where the solve is not finite or not positive."""
    gs = cfg.scheme.group_size or w.shape[-1]
    values = codes.float() * cfg.scheme.grid.unit
    if zero is not None:
        values = values - zero.float().repeat_interleave(gs, dim=-1)
    out = scale.float().clone()
    for k in range(w.shape[0]):
        out[k] = _refine_matrix(w[k].float(), h[k].float(), values[k], out[k], gs)
    stored = out.to(cfg.scheme.scale_torch_dtype).float()
    ok = torch.isfinite(stored) & (stored > 0)
    return torch.where(ok, stored, scale.float())


def _refine_matrix(w: torch.Tensor, h: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, gs: int) -> torch.Tensor:
    """One matrix: ``a`` [out, in] the (code - zero) values, ``scale`` [out, G]."""
    rows, n = a.shape
    groups = n // gs
    a_g = group_view(a, gs)  # [out, G, gs]
    h4 = h.view(groups, gs, groups, gs)
    rhs = (a_g * group_view(w @ h, gs)).sum(-1)  # b [out, G]
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, groups * n))
    refined = torch.empty_like(scale)
    for lo in range(0, rows, step):
        part = a_g[lo : lo + step]
        m = torch.einsum("rgi,gihj,rhj->rgh", part, h4, part)
        # Solve for the change from the current scales, so that a group the ridge pins stays where it was.
        residual = rhs[lo : lo + step] - (m @ scale[lo : lo + step].unsqueeze(-1)).squeeze(-1)
        diag = m.diagonal(dim1=-2, dim2=-1)
        ridge = _RIDGE * diag.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        m = m + torch.diag_embed(ridge.expand_as(diag))
        delta = torch.linalg.solve_ex(m, residual.unsqueeze(-1))[0].squeeze(-1)
        refined[lo : lo + step] = scale[lo : lo + step] + delta
    return refined
