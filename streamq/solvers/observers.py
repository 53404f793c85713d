"""Fitting the integer grid (scale, zero point) to weights, and moving between weights and codes.

The formulas are compressed-tensors 0.20's (``calculate_qparams``, ``_quantize``, ``_dequantize``), so that
our codes, packed into its pack-quantized format and decompressed by it, give back exactly our dequantized
weight:

- the observed range [min, max] is widened to contain 0;
- symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, no zero point: max|w| lands on
  +-(2**(bits-1) - 0.5), a rounding tie (+ rounds to 2**(bits-1) and is clamped to qmax, - rounds to
  qmin). That is compressed-tensors' grid, kept as is;
- asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(clamp(qmin - min / scale, qmin, qmax))``;
- codes: ``round_half_even(clamp(w / scale + zero, qmin, qmax))``; dequantized: ``(q - zero) * scale``.

One deliberate difference: a group of zeros gets scale = float32 eps *before* the zero point is computed,
where compressed-tensors divides 0 by 0 and stores whatever int8(NaN) is. Ours is qmin, which dequantizes
the zeros to exactly 0.

Zero points are carried as float32 tensors holding integers while solving (kernels read them as floats)
and converted to int8 only in the result.
"""

from __future__ import annotations

import torch

from streamq.solvers.scheme import QuantScheme, SolverConfig

# Candidate grids evaluated at once by the MSE search; bounds its temporary memory to this many elements.
_MSE_ELEMENTS_PER_STEP = 1 << 26


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., in] -> [..., groups, group_size]; per-channel (group_size 0) is one group of all columns."""
    columns = w.shape[-1]
    if group_size == 0:
        return w.unsqueeze(-2)
    if columns % group_size:
        raise ValueError(f"in_features {columns} is not a multiple of group_size {group_size}")
    return w.unflatten(-1, (columns // group_size, group_size))


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (float, integral) whose grid covers [lo, hi] widened to contain 0."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    eps = torch.finfo(torch.float32).eps
    if scheme.symmetric:
        scale = torch.maximum(-lo, hi) / ((scheme.qmax - scheme.qmin) / 2)
        return _stored(torch.where(scale == 0, eps, scale), scheme), None
    scale = _stored(torch.where((hi - lo) == 0, eps, (hi - lo) / (scheme.qmax - scheme.qmin)), scheme)
    zero = torch.round(torch.clamp(scheme.qmin - lo / scale, scheme.qmin, scheme.qmax))
    return scale, zero


def _stored(scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scale as the checkpoint will hold it (rounded to the scale dtype), kept in the working dtype."""
    return scale.to(scheme.scale_torch_dtype).to(scale.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` on the grid; ``scale``/``zero`` broadcast against ``w``."""
    scaled = w / scale
    if zero is not None:
        scaled = scaled + zero
    return torch.round(torch.clamp(scaled, scheme.qmin, scheme.qmax))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, the same two roundings compressed-tensors' ``dequantize`` does."""
    shifted = q.float() if zero is None else q.float() - zero.float()
    return shifted * scale


def fit_qparams(groups: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for each group ``[..., group_size]`` (reduced over the last dimension)."""
    lo, hi = torch.aminmax(groups, dim=-1)
    if cfg.observer == "minmax":
        return range_qparams(lo, hi, cfg.scheme)
    if cfg.observer == "mse":
        return _mse_qparams(groups, lo, hi, cfg)
    raise ValueError(f"unknown observer {cfg.observer!r}")


def _mse_qparams(
    groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cfg: SolverConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shrink the min-max range by 1 - i/grid for i < max_shrink*grid; keep, per group, the range whose
    rounding error has the smallest sum of |error|**norm. Ties keep the widest range (the min-max one)."""
    steps = max(1, int(cfg.mse_max_shrink * cfg.mse_grid))
    shrink = 1.0 - torch.arange(steps, device=groups.device, dtype=groups.dtype) / cfg.mse_grid
    per_step = max(1, _MSE_ELEMENTS_PER_STEP // max(1, groups.numel()))
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = range_qparams(lo, hi, cfg.scheme)
    for start in range(0, steps, per_step):
        p = shrink[start : start + per_step].view(-1, *([1] * lo.dim()))
        scale, zero = range_qparams(p * lo, p * hi, cfg.scheme)
        zero_b = None if zero is None else zero.unsqueeze(-1)
        deq = dequantize(quantize(groups, scale.unsqueeze(-1), zero_b, cfg.scheme), scale.unsqueeze(-1), zero_b)
        err = (deq - groups).abs_().pow_(cfg.mse_norm).sum(-1)
        step_err, step_idx = err.min(dim=0)
        better = step_err < best_err
        best_err = torch.where(better, step_err, best_err)
        pick = step_idx.unsqueeze(0)
        best_scale = torch.where(better, scale.gather(0, pick).squeeze(0), best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero.gather(0, pick).squeeze(0), best_zero)
    return best_scale, best_zero


def column_params(param: torch.Tensor, group_size: int, g_idx: torch.Tensor | None, columns: int) -> torch.Tensor:
    """Expand per-group ``[..., out, groups]`` to per-column ``[..., out, columns]``."""
    if g_idx is not None:
        index = g_idx.long().unsqueeze(-2).expand(*param.shape[:-1], columns)
        return param.gather(-1, index)
    if group_size == 0:
        return param.expand(*param.shape[:-1], columns)
    return param.repeat_interleave(group_size, dim=-1)


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize codes ``[..., out, in]`` with per-group scale/zero ``[..., out, groups]`` (float32 result)."""
    columns = q.shape[-1]
    col_scale = column_params(scale, group_size, g_idx, columns)
    col_zero = None if zero is None else column_params(zero, group_size, g_idx, columns)
    return dequantize(q, col_scale, col_zero)
