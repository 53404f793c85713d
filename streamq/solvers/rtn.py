"""Round-to-nearest: the quality floor, and the fallback when a Hessian is unusable."""

from __future__ import annotations

from collections import Counter

import torch

from streamq.solvers.fallbacks import zero_nonfinite
from streamq.solvers.observers import dequantize_weight, fit_qparams, group_view, quantize
from streamq.solvers.scheme import QuantResult, SolverConfig


def static_qparams(w: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero ``[..., out, groups]`` fitted on the natural input groups of ``w`` ``[..., out, in]``."""
    return fit_qparams(group_view(w, cfg.scheme.group_size), cfg)


def make_result(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    cfg: SolverConfig,
    dtype: torch.dtype,
    fallbacks: Counter[str],
    weight: torch.Tensor | None = None,
) -> QuantResult:
    """Package codes (any dtype holding integers) and float zero points into the exporter's types.

    ``weight``, when given, must be the float32 dequantized codes already (a solver byproduct)."""
    if weight is None:
        weight = dequantize_weight(codes, scale, zero, cfg.scheme.group_size, g_idx)
    return QuantResult(
        q=codes.to(torch.int8),
        scale=scale.float(),
        zero_point=None if zero is None else zero.to(torch.int8),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
        weight=weight.to(dtype),
        fallbacks=dict(fallbacks),
    )


def rtn_quantize(w: torch.Tensor, cfg: SolverConfig | None = None) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` or ``[E, out, in]`` to the nearest grid point, scales on natural groups.

    ``cfg.actorder`` and the damping fields are ignored (no Hessian); NaN/Inf weights become 0, counted.
    """
    cfg = cfg or SolverConfig()
    fallbacks: Counter[str] = Counter()
    w32 = zero_nonfinite(w.float(), fallbacks)
    scale, zero = static_qparams(w32, cfg)
    gs = cfg.scheme.group_size
    zero_g = None if zero is None else zero.unsqueeze(-1)
    codes = quantize(group_view(w32, gs), scale.unsqueeze(-1), zero_g, cfg.scheme).flatten(-2)
    return make_result(codes, scale, zero, None, cfg, w.dtype, fallbacks)
