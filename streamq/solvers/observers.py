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

The FP4 formats follow the same functions' float branches:

- values are rounded to the nearest E2M1 value, ties to the even mantissa (compressed-tensors' ``cast_to_fp4``);
- NVFP4: a global scale per matrix, ``448 * 6 / max|W|`` (float32; 1 for an all-zero matrix), and group scales
  ``fp8_e4m3(global * max|g| / 6)`` (0 becomes FP8's eps, 0.125); the multiplying scale is ``fp8 / global``;
- MXFP4: ``2**(e - 2)`` where 2**e is max|g| rounded to a power of two (up when its significand is >= 1.75),
  the exponent kept in [-126, 127] so the scale stays a normal float32.

One deliberate difference: a group of zeros gets scale = float32 eps *before* the zero point is computed,
where compressed-tensors divides 0 by 0 and stores whatever int8(NaN) is. Ours is qmin, which dequantizes
the zeros to exactly 0.

Zero points are carried as float32 tensors holding integers while solving (kernels read them as floats)
and converted to int8 only in the result.
"""

from __future__ import annotations

import torch

from streamq.kernels import mse_scales
from streamq.solvers.scheme import QuantScheme, SolverConfig

_FP8_E4M3_MAX = 448.0
_FP8_E4M3_EPS = 0.125
_E8M0_EXP = (-126, 127)
# Candidate grids evaluated at once by the MSE search; bounds its temporary memory to this many elements. On the
# CPU the temporaries are host memory, which a run keeps to about one block (memory.py): 16 MiB per temporary
# instead of 256 MiB (a few are alive at once; the larger bound doubled a CPU run's peak above a block's).
_MSE_ELEMENTS_PER_STEP = 1 << 26
_MSE_ELEMENTS_PER_STEP_CPU = 1 << 22


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., in] -> [..., groups, group_size]; per-channel (group_size 0) is one group of all columns."""
    columns = w.shape[-1]
    if group_size == 0:
        return w.unsqueeze(-2)
    if columns % group_size:
        raise ValueError(f"in_features {columns} is not a multiple of group_size {group_size}")
    return w.unflatten(-1, (columns // group_size, group_size))


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (float, integral) whose grid covers [lo, hi] widened to contain 0.

    ``global_scale`` (NVFP4 only): one per leading matrix, shape [] or [E] for ``lo`` [E, ...]."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    eps = torch.finfo(torch.float32).eps
    code = scheme.scale_code
    if code == "fp8_global":
        return _fp8_global_scale(torch.maximum(-lo, hi) / scheme.grid.hi, _per_matrix(global_scale, lo)), None
    if code == "e8m0":
        return _e8m0_scale(torch.maximum(-lo, hi)), None
    if scheme.symmetric:
        scale = torch.maximum(-lo, hi) / ((scheme.qmax - scheme.qmin) / 2)
        return _stored(torch.where(scale == 0, eps, scale), scheme), None
    scale = _stored(torch.where((hi - lo) == 0, eps, (hi - lo) / (scheme.qmax - scheme.qmin)), scheme)
    zero = torch.round(torch.clamp(scheme.qmin - lo / scale, scheme.qmin, scheme.qmax))
    return scale, zero


def global_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
    """NVFP4's float32 global scale of each matrix ``[..., out, in]`` (shape ``[...]``); None for other formats."""
    if scheme.scale_code != "fp8_global":
        return None
    amax = w.float().abs().amax(dim=(-2, -1)).clamp(min=torch.finfo(torch.float32).tiny)
    scale = _FP8_E4M3_MAX * scheme.grid.hi / amax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)


def _per_matrix(scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A global scale [] or [E] viewed to broadcast against ``like`` [E, ...]; one already shaped so is kept."""
    if scale is None:
        raise ValueError("NVFP4 scales need the matrix's global scale; compute it with observers.global_scale")
    if scale.dim() > 1:
        return scale
    return scale.view(*scale.shape, *([1] * (like.dim() - scale.dim())))


def _fp8_global_scale(scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """The multiplying scale ``fp8 / global`` of FP8 E4M3 group scales stored relative to a global scale."""
    fp8 = torch.clamp(gscale * scale, -_FP8_E4M3_MAX, _FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(scale.dtype)
    return torch.where(fp8 == 0, _FP8_E4M3_EPS, fp8) / gscale


def _e8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    """A power-of-two scale: amax rounded to a power of two (up from a significand of 1.75), over 2**2 (E2M1's
    largest exponent); all-zero groups get the smallest exponent."""
    significand, exponent = torch.frexp(amax)  # amax = significand * 2**exponent, significand in [0.5, 1)
    power = exponent - 1 + (significand >= 0.875).to(exponent.dtype)
    power = torch.where(amax > 0, power - 2, _E8M0_EXP[0]).clamp(*_E8M0_EXP)
    return torch.ldexp(torch.ones_like(amax), power)


def _stored(scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scale as the checkpoint will hold it (rounded to the scale dtype), kept in the working dtype."""
    return scale.to(scheme.scale_torch_dtype).to(scale.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Grid values (integers for integer formats) of ``w``; ``scale``/``zero`` broadcast against ``w``."""
    scaled = w / scale
    if zero is not None:
        scaled = scaled + zero
    return scheme.grid.round(scaled)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, the same two roundings compressed-tensors' ``dequantize`` does."""
    shifted = q.float() if zero is None else q.float() - zero.float()
    return shifted * scale


def fit_qparams(
    groups: torch.Tensor,
    cfg: SolverConfig,
    global_scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for each group ``[..., group_size]`` (reduced over the last dimension);
    ``global_scale`` as in ``range_qparams``; ``weight`` (broadcast against ``groups``): each element's weight
    in the MSE observer's error."""
    lo, hi = torch.aminmax(groups, dim=-1)
    if cfg.observer == "minmax":
        return range_qparams(lo, hi, cfg.scheme, global_scale)
    if cfg.observer == "mse":
        scheme, shrink = cfg.scheme, mse_ratios(cfg, groups.device, groups.dtype)
        if global_scale is None and weight is None and mse_scales.supported(groups, scheme):
            return mse_scales.mse_scales_triton(groups, lo, hi, shrink, scheme, cfg.mse_norm)
        return mse_search_ref(groups, lo, hi, shrink, scheme, cfg.mse_norm, global_scale, weight)
    raise ValueError(f"unknown observer {cfg.observer!r}")


def mse_ratios(cfg: SolverConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The clipping ratios the MSE observer tries: 1 - i/grid for i < max_shrink*grid."""
    steps = max(1, int(cfg.mse_max_shrink * cfg.mse_grid))
    return 1.0 - torch.arange(steps, device=device, dtype=dtype) / cfg.mse_grid


def mse_search_ref(
    groups: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    shrink: torch.Tensor,
    scheme: QuantScheme,
    norm: float,
    gscale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shrink the min-max range [lo, hi] of each group by each ratio of ``shrink`` (``mse_ratios``); keep, per
    group, the range whose rounding error has the smallest sum of |error|**norm. Ties keep the widest range (the
    min-max one). Pure torch, every grid; ``gscale`` as in ``range_qparams``, ``weight`` each element's weight in the
    error. With neither, the reference of ``kernels.mse_scales.mse_scales_triton`` (its leading arguments)."""
    steps = shrink.numel()
    cap = _MSE_ELEMENTS_PER_STEP_CPU if groups.device.type == "cpu" else _MSE_ELEMENTS_PER_STEP
    per_step = max(1, cap // max(1, groups.numel()))
    best_err = torch.full_like(lo, float("inf"))
    if gscale is not None:  # shaped before the candidates' leading dimension is added
        gscale = _per_matrix(gscale, lo)
    best_scale, best_zero = range_qparams(lo, hi, scheme, gscale)
    for start in range(0, steps, per_step):
        p = shrink[start : start + per_step].view(-1, *([1] * lo.dim()))
        scale, zero = range_qparams(p * lo, p * hi, scheme, gscale)
        zero_b = None if zero is None else zero.unsqueeze(-1)
        deq = dequantize(quantize(groups, scale.unsqueeze(-1), zero_b, scheme), scale.unsqueeze(-1), zero_b)
        err = (deq - groups).abs_().pow_(norm)
        err = (err if weight is None else err.mul_(weight)).sum(-1)
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
    unit: float = 1.0,
) -> torch.Tensor:
    """Dequantize int8 codes ``[..., out, in]`` (multiples of the grid's ``unit``) with per-group scale/zero
    ``[..., out, groups]`` (float32 result)."""
    columns = q.shape[-1]
    col_scale = column_params(scale, group_size, g_idx, columns)
    col_zero = None if zero is None else column_params(zero, group_size, g_idx, columns)
    return dequantize(q.float() * unit, col_scale, col_zero)
