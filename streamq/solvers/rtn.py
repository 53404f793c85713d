"""Round-to-nearest: the quality floor, and the fallback when a Hessian is unusable."""

from __future__ import annotations

from collections import Counter

import torch

from streamq.solvers.fallbacks import zero_nonfinite
from streamq.solvers.observers import dequantize, dequantize_weight, fit_qparams, global_scale, group_view, quantize
from streamq.solvers.scheme import QuantResult, SolverConfig


def static_qparams(
    w: torch.Tensor, cfg: SolverConfig, gscale: torch.Tensor | None = None, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero ``[..., out, groups]`` fitted on the natural input groups of ``w`` ``[..., out, in]``;
    ``gscale`` is NVFP4's global scale of each matrix (``observers.global_scale(w)`` when not given);
    ``importance`` ``[..., in]``: each input column's weight in the MSE observer's error (None: equal)."""
    if gscale is None:
        gscale = global_scale(w, cfg.scheme)
    gs = cfg.scheme.group_size
    weight = None if importance is None else group_view(importance, gs).unsqueeze(-3)
    return fit_qparams(group_view(w, gs), cfg, gscale, weight)


def make_result(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    cfg: SolverConfig,
    dtype: torch.dtype,
    fallbacks: Counter[str],
    weight: torch.Tensor | None = None,
    gscale: torch.Tensor | None = None,
) -> QuantResult:
    """Package codes (any dtype holding integer multiples of the grid's unit) and float zero points into the
    exporter's types.

    ``weight``, when given, must be the float32 dequantized codes already (a solver byproduct)."""
    if weight is None:
        weight = dequantize_weight(codes, scale, zero, cfg.scheme.group_size, g_idx, cfg.scheme.grid.unit)
    return QuantResult(
        q=codes.to(torch.int8),
        scale=scale.float(),
        zero_point=None if zero is None else zero.to(torch.int8),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
        weight=weight.to(dtype),
        global_scale=None if gscale is None else gscale.float(),
        fallbacks=dict(fallbacks),
    )


def rtn_quantize(w: torch.Tensor, cfg: SolverConfig | None = None) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` or ``[E, out, in]`` to the nearest grid point, scales on natural groups.

    ``cfg.actorder`` and the damping fields are ignored (no Hessian); NaN/Inf weights become 0, counted.
    """
    cfg = cfg or SolverConfig()
    fallbacks: Counter[str] = Counter()
    w32 = zero_nonfinite(w.float(), fallbacks)
    gscale = global_scale(w32, cfg.scheme)
    scale, zero = static_qparams(w32, cfg, gscale)
    gs = cfg.scheme.group_size
    scale_g, zero_g = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    values = quantize(group_view(w32, gs), scale_g, zero_g, cfg.scheme)
    weight = dequantize(values, scale_g, zero_g).flatten(-2)
    codes = (values / cfg.scheme.grid.unit).flatten(-2)
    return make_result(codes, scale, zero, None, cfg, w.dtype, fallbacks, weight=weight, gscale=gscale)
