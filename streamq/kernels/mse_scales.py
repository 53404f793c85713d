"""The MSE observer's search over clipping ratios for integer grids, fused: each weight read once.

For every group g (a row of ``groups`` ``[R, G]``) and every ratio p of ``shrink`` the range [p·lo, p·hi] gives a
grid (``observers.range_qparams``: scale, and the zero point of an asymmetric grid, the scale rounded to its
stored dtype); the group's error is sum |dequantize(quantize(w)) - w| ** norm over its G weights, and the ratio
with the smallest error wins, the first one on ties. The pure-torch reference, with the same leading arguments, is
the observer's own search, ``observers.mse_search_ref`` (which also serves the FP4 grids, NVFP4's global scale and
per-element weights, which this kernel does not). It materialises a candidate's codes, dequantized values and
errors for every weight, about nine float32 passes over the weights per ratio, which at DeepSeek-V3 width (11.3 G
expert weights per MoE block, 20 ratios) was ~4 s of an H200's solve stage. The kernel keeps a tile of groups in
registers and loops over the ratios there.

The arithmetic is the reference's, operation for operation (IEEE division, ties-to-even rounding, the scale
rounded to bfloat16 by hand as the CPU interpreter truncates); the sums over a group run in another order and
|x| ** norm is exp2(norm · log2|x|), so a near tie between two ratios may go the other way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the solvers package imports this module
    from streamq.solvers.scheme import QuantScheme

try:
    import triton
    import triton.language as tl

    from streamq.kernels.gptq_block import _round_half_even
except ImportError:  # pragma: no cover - triton ships with every Linux torch build we support
    triton = None

BLOCK_G = 32  # groups per program
SCALE_DTYPES = {torch.bfloat16: 1, torch.float32: 0}  # stored scale dtypes the kernel rounds to


def supported(groups: torch.Tensor, scheme: QuantScheme) -> bool:
    """Whether the kernel serves these groups: float32 on CUDA with Triton present, an integer grid whose scale is
    stored in bfloat16 or float32, a power-of-two group of at most 1024 weights (one register tile)."""
    size = groups.shape[-1]
    on_gpu = triton is not None and groups.is_cuda and groups.dtype == torch.float32
    grid = scheme.format == "int" and scheme.scale_torch_dtype in SCALE_DTYPES
    return on_gpu and grid and size & (size - 1) == 0 and size <= 1024


def mse_scales_triton(
    groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shrink: torch.Tensor, scheme: QuantScheme, norm: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, None for a symmetric grid) of each group ``[..., G]`` (float32), given its range
    ``lo``/``hi`` ``[...]`` and the ratios ``shrink`` ``[S]`` to try; see the module docstring."""
    size = groups.shape[-1]
    flat = groups.reshape(-1, size).float().contiguous()
    rows = flat.shape[0]
    scale = torch.empty(rows, dtype=torch.float32, device=groups.device)
    zero = None if scheme.symmetric else torch.empty_like(scale)
    if rows:
        _mse_kernel[(triton.cdiv(rows, BLOCK_G),)](
            flat,
            lo.reshape(-1).float().contiguous(),
            hi.reshape(-1).float().contiguous(),
            shrink.float().contiguous(),
            scale,
            scale if zero is None else zero,
            rows,
            shrink.numel(),
            float(scheme.qmin),
            float(scheme.qmax),
            float(norm),
            torch.finfo(torch.float32).eps,
            G=size,
            BLOCK=BLOCK_G,
            SYMMETRIC=scheme.symmetric,
            ROUND_BF16=SCALE_DTYPES[scheme.scale_torch_dtype] == 1,
        )
    shape = groups.shape[:-1]
    return scale.view(shape), None if zero is None else zero.view(shape)


if triton is not None:

    @triton.jit
    def _to_bf16(x):
        # Round to nearest even by hand (the CPU interpreter truncates); scales are positive and finite.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _mse_kernel(
        w_ptr, lo_ptr, hi_ptr, shrink_ptr, scale_ptr, zero_ptr,
        rows, steps, qmin, qmax, norm, eps,
        G: tl.constexpr, BLOCK: tl.constexpr, SYMMETRIC: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        w = tl.load(w_ptr + r[:, None] * G + tl.arange(0, G)[None, :], mask=live[:, None], other=0.0)
        lo = tl.load(lo_ptr + r, mask=live, other=0.0)
        hi = tl.load(hi_ptr + r, mask=live, other=0.0)
        best_err = tl.full([BLOCK], float("inf"), tl.float32)
        best_scale = tl.zeros([BLOCK], tl.float32)
        best_zero = tl.zeros([BLOCK], tl.float32)
        for s in range(steps):
            p = tl.load(shrink_ptr + s)
            low = tl.minimum(p * lo, 0.0)
            high = tl.maximum(p * hi, 0.0)
            if SYMMETRIC:
                scale = tl.div_rn(tl.maximum(-low, high), (qmax - qmin) / 2)
                scale = tl.where(scale == 0, eps, scale)
            else:
                scale = tl.where(high - low == 0, eps, tl.div_rn(high - low, qmax - qmin))
            if ROUND_BF16:
                scale = _to_bf16(scale)
            if SYMMETRIC:
                zero = tl.zeros([BLOCK], tl.float32)
                x = tl.div_rn(w, scale[:, None])
            else:
                zero = _round_half_even(tl.minimum(tl.maximum(qmin - tl.div_rn(low, scale), qmin), qmax))
                x = tl.div_rn(w, scale[:, None]) + zero[:, None]
            q = _round_half_even(tl.minimum(tl.maximum(x, qmin), qmax))
            diff = tl.abs((q - zero[:, None]) * scale[:, None] - w)
            powered = tl.where(diff > 0, tl.exp2(norm * tl.log2(tl.maximum(diff, 1e-30))), 0.0)
            err = tl.sum(powered, axis=1)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_scale = tl.where(better, scale, best_scale)
            best_zero = tl.where(better, zero, best_zero)
        tl.store(scale_ptr + r, best_scale, mask=live)
        if not SYMMETRIC:
            tl.store(zero_ptr + r, best_zero, mask=live)
