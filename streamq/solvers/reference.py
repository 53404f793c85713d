"""Textbook GPTQ, one column at a time: the yardstick for ``gptq_quantize``'s quality.

The classic algorithm as published: U = chol(H^-1) upper through cholesky -> cholesky_inverse -> cholesky,
then for each column in activation order: quantize, divide the error by U_jj, subtract err * U[j, j:] from
every later column at once (no lazy blocks, no kernels). Dynamic group scales are fitted at a group's first
column on the fully updated values. Slow (out * in^2 work in ``in`` rank-1 updates); for tests and the
benchmark's few reference matrices only.
"""

from __future__ import annotations

from collections import Counter

import torch

from streamq.solvers.observers import fit_qparams, global_scale, quantize
from streamq.solvers.rtn import make_result, static_qparams
from streamq.solvers.scheme import QuantResult, SolverConfig


def gptq_reference(
    w: torch.Tensor, h: torch.Tensor, cfg: SolverConfig | None = None, dtype: torch.dtype = torch.float32
) -> QuantResult:
    """Quantize one matrix ``w`` ``[out, in]`` given its Hessian ``h`` ``[in, in]``, in ``dtype``."""
    cfg = cfg or SolverConfig()
    scheme = cfg.scheme
    gs = scheme.group_size
    out_dtype = w.dtype
    w = w.to(dtype).clone()
    h = h.to(dtype).clone()
    out, n = w.shape

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    dynamic = gs > 0 and cfg.actorder in ("none", "group")
    gscale = global_scale(w, scheme)
    if dynamic:
        scale = torch.empty(out, n // gs, dtype=dtype, device=w.device)
        zero = None if scheme.symmetric else torch.empty_like(scale)
    else:
        scale, zero = static_qparams(w, cfg, gscale)

    perm = torch.arange(n, device=w.device)
    if cfg.actorder != "none":
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += cfg.damp * torch.diagonal(h).mean() * torch.eye(n, dtype=dtype, device=w.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    static_group = (perm // gs).tolist() if gs else [0] * n
    codes = torch.empty_like(w)
    for j in range(n):
        if dynamic and j % gs == 0:
            s, z = fit_qparams(w[:, j : j + gs], cfg, gscale)
            scale[:, j // gs] = s
            if zero is not None:
                zero[:, j // gs] = z
        g = j // gs if dynamic else static_group[j]
        z = None if zero is None else zero[:, g]
        codes[:, j] = quantize(w[:, j], scale[:, g], z, scheme)
        deq = codes[:, j] * scale[:, g] if z is None else (codes[:, j] - z) * scale[:, g]
        err = (w[:, j] - deq) / u[j, j]
        w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)

    position = torch.argsort(perm)
    g_idx = (position // gs).to(torch.int32) if dynamic and cfg.actorder == "group" else None
    codes = codes[:, position] / scheme.grid.unit
    return make_result(codes, scale, zero, g_idx, cfg, out_dtype, Counter(), gscale=gscale)
